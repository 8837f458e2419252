"""What every handle on something running has in common: a `with` block that ends in `stop()`.

The in-kernel server, the gRPC server, nginx, Redis, the cluster and Chromium are
each a handle of this kind: `stop()` ends what runs and frees what it holds, and
may be called again (a `with` block and a notebook's own `stop()` can both end it).
"""

from __future__ import annotations

import abc
from types import TracebackType
from typing import TypeVar

_Handle = TypeVar("_Handle", bound="Stoppable")


class Stoppable(abc.ABC):
    """A handle whose `with` block ends in `stop()`, failed or not."""

    @abc.abstractmethod
    def stop(self) -> None:
        """End what runs and free what it holds; idempotent."""

    def __enter__(self: _Handle) -> _Handle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
