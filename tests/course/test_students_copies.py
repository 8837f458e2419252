"""What lets the test run execute a students' copy inside its solution's run (notebooks/conftest.py)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
SOLUTIONS = sorted((NOTEBOOKS / "solutions").glob("*.ipynb"))


def code_cells(path: Path) -> list[str]:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return ["".join(cell["source"]) for cell in cells if cell["cell_type"] == "code"]


def exercise_cells(solution: Path) -> list[int]:
    """The indices of the code cells where a students' copy differs from its solution notebook."""
    solved, stubbed = code_cells(solution), code_cells(NOTEBOOKS / solution.name)
    return [index for index, (answer, stub) in enumerate(zip(solved, stubbed, strict=True)) if answer != stub]


def defined_names(source: str) -> set[str]:
    """Names a cell binds at the top level: functions, classes, assignments, imports."""
    names: set[str] = set()
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        else:
            names.update(
                name.id for name in ast.walk(node) if isinstance(name, ast.Name) and isinstance(name.ctx, ast.Store)
            )
    return names


def used_names(source: str) -> set[str]:
    return {node.id for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Name)}


@pytest.mark.parametrize("solution", SOLUTIONS, ids=lambda path: path.stem)
def test_a_students_copy_differs_from_its_solution_only_in_cells_with_a_solution_block(solution: Path) -> None:
    solved, stubbed = code_cells(solution), code_cells(NOTEBOOKS / solution.name)
    differing = exercise_cells(solution)  # the same number of code cells, or zip(strict=True) raises
    assert differing, "a notebook without exercises"
    for index in differing:
        assert "# BEGIN SOLUTION" in solved[index] and "raise NotImplementedError" in stubbed[index]


@pytest.mark.parametrize("solution", SOLUTIONS, ids=lambda path: path.stem)
def test_no_other_cell_uses_what_an_exercise_cell_defines(solution: Path) -> None:
    """So the kernel a students' cell runs in, mid-solution, holds what a student's kernel holds there."""
    stubbed = code_cells(NOTEBOOKS / solution.name)
    exercises = exercise_cells(solution)
    defined_elsewhere: set[str] = set()
    for index, source in enumerate(stubbed):
        if index not in exercises:
            defined_elsewhere |= defined_names(source)
    for index in exercises:
        own = defined_names(stubbed[index]) - defined_elsewhere  # what only the exercise defines
        for other, source in enumerate(stubbed):
            if other != index:
                assert not own & used_names(source), f"cell {other} uses {own & used_names(source)} of cell {index}"


def test_a_test_run_collects_the_students_cells_into_their_solutions_run() -> None:
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "--nbval-lax", "notebooks"],
        cwd=NOTEBOOKS.parent,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout.splitlines()
    students = [line for line in collected if line.endswith("(students' copy)")]
    for solution in SOLUTIONS:
        wanted = len(exercise_cells(solution))
        assert len([line for line in students if line.startswith(f"notebooks/solutions/{solution.name}::")]) == wanted
    assert not [line for line in collected if line.startswith("notebooks/0")]  # no students' copy run whole
