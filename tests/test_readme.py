"""The README's commands work as written from a fresh clone: its targets, imports and flags exist."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

from sse_lab.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"^```(\w*)\n(.*?)^```", README, re.MULTILINE | re.DOTALL)
COMMANDS = [line[2:] for kind, block in BLOCKS if kind == "console" for line in block.splitlines() if line[:2] == "$ "]
IMPORTS = sorted(
    {
        line.removeprefix(">>> ")
        for _, block in BLOCKS
        for line in re.findall(r"^(?:>>> )?from sse_lab\S* import .*$", block, re.MULTILINE)
    }
)


def make_targets() -> set[str]:
    return set(re.findall(r"^([\w.-]+):", (ROOT / "Makefile").read_text(encoding="utf-8"), re.MULTILINE))


@pytest.mark.parametrize("command", [command for command in COMMANDS if command.startswith("make ")])
def test_every_make_command_in_the_readme_is_a_target(command: str) -> None:
    target, *variables = shlex.split(command.split("#")[0])[1:]
    assert target in make_targets()
    for variable in variables:
        name, value = variable.split("=", 1)
        assert re.search(rf"^{name} \?=", (ROOT / "Makefile").read_text(encoding="utf-8"), re.MULTILINE), name
        if name == "FLAGS":
            build_parser().parse_args(["serve", *shlex.split(value)])  # exits on a flag serve does not take


def test_no_readme_command_needs_the_venv_activated() -> None:
    """`python -m sse_lab` from a fresh clone finds no uvicorn: commands go through make or `.venv/bin/`."""
    outside_conda = [
        line[2:]
        for kind, block in BLOCKS
        if kind == "console" and "conda activate" not in block
        for line in block.splitlines()
        if line[:2] == "$ "
    ]
    assert not [command for command in outside_conda if re.match(r"(python3?|pytest|jupyter) ", command)]


@pytest.mark.parametrize("statement", IMPORTS)
def test_every_import_in_the_readme_works(statement: str) -> None:
    module, names = re.fullmatch(r"from (\S+) import (.*)", statement).groups()  # type: ignore[union-attr]
    imported = importlib.import_module(module)
    for name in (name.strip() for name in names.split(",")):
        if not hasattr(imported, name):  # a submodule is an attribute once imported
            importlib.import_module(f"{module}.{name}")
        assert hasattr(imported, name), f"{module} has no {name}"
