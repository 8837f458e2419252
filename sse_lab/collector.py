"""The garbage collector of a process that serves many long streams (`python -m sse_lab serve`).

Python's cyclic collector makes a full collection whenever a quarter more objects
have survived its young collections since the last full one. An open stream
keeps about 150 tracked objects (its tasks, coroutines, request and response)
alive for its whole life, so while streams pile up (a class opening the page, a
load test's ramp) a full collection comes every few hundred new streams, and
each one walks every object of every open stream: at 2,000 streams about
300,000 objects, a pause of 100-200 ms in which no stream gets a token. That
pause, not the work per token, is what first breaks a p99 lateness of 50 ms.

    startup ── gc.freeze() ──▶ permanent: never walked again
    new objects ── young collections (as Python does them: at most ~7,700 objects each)
                 ── full collection: every FULL_COLLECTION_EVERY_S, not on growth

A stream leaves no reference cycle, whether it ends on its own, with an error
event or cut by its client (`tests/test_server.py` pins that), so a full
collection frees nothing of the kit's. It is insurance against cycles other
code makes (a token source of one's own, an exception kept with its traceback),
and it still pauses every stream (160 ms with 1,000 open): hence every ten
minutes, not every few seconds.

Only for a process that is a server and nothing else: an in-kernel server
(`serve_in_background`) leaves the notebook's collector alone.
"""

from __future__ import annotations

import gc
import time

FULL_COLLECTION_EVERY_S = 600.0
_NEVER = 2**31 - 1  # the largest threshold gc.set_threshold takes: full collections only when asked for


def steady_collection() -> None:
    """Freeze what exists now (startup: modules, the app) and stop the full collections growth triggers."""
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, _NEVER)


def collect_forever(interval_s: float = FULL_COLLECTION_EVERY_S) -> None:
    """Make a full collection every `interval_s` seconds; returns only by an exception (a stop signal)."""
    while True:
        time.sleep(interval_s)
        gc.collect()
