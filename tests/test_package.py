from __future__ import annotations

from types import ModuleType

import sse_lab


def test_public_surface_is_exactly_all() -> None:
    public = {name for name, value in vars(sse_lab).items() if not name.startswith("_")}
    modules = {name for name, value in vars(sse_lab).items() if isinstance(value, ModuleType)}
    assert public - modules == set(sse_lab.__all__)
