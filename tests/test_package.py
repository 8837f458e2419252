from __future__ import annotations

import subprocess
import sys
from types import ModuleType

import sse_lab


def test_public_surface_is_exactly_all() -> None:
    public = {name for name, value in vars(sse_lab).items() if not name.startswith("_")}
    modules = {name for name, value in vars(sse_lab).items() if isinstance(value, ModuleType)}
    assert public - modules == set(sse_lab.__all__)


def test_the_stack_imports_no_experiment_instrument_or_course_module() -> None:
    """Imports run one way: the stack a deployment keeps must load without the lab around it."""
    stack = ["model", "sse", "server", "background", "client", "metrics", "plots"]
    check = (
        "import sys\n"
        f"for name in {stack!r}: __import__('sse_lab.' + name)\n"
        "print(sorted(m for m in sys.modules if m.startswith(('sse_lab.experiments', 'sse_lab.instruments',"
        " 'sse_lab.course', 'sse_lab.parts'))))"
    )
    loaded = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True, timeout=60)
    assert loaded.stdout.strip() == "[]"
