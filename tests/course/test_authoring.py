from __future__ import annotations

import json
from pathlib import Path

import pytest

from sse_lab.course.authoring import NOTEBOOKS, exercise_notebook, strip_solutions, sync

SOLVED = """def answer() -> int:
    # BEGIN SOLUTION
    return 42
    # END SOLUTION


check(answer)
"""


def test_solution_blocks_become_stubs_at_their_indentation() -> None:
    assert strip_solutions(SOLVED, "solutions/x.ipynb") == (
        "def answer() -> int:\n"
        '    raise NotImplementedError("your code here; stuck? see solutions/x.ipynb")\n'
        "\n\ncheck(answer)\n"
    )


def test_exercise_notebook_clears_outputs_and_keeps_the_rest() -> None:
    solution = {
        "cells": [
            {"cell_type": "markdown", "source": ["# BEGIN SOLUTION is prose here"], "metadata": {}},
            {"cell_type": "code", "source": SOLVED.splitlines(True), "outputs": [{"x": 1}], "execution_count": 3},
        ],
        "metadata": {},
    }
    notebook = exercise_notebook(solution, "solutions/x.ipynb")
    prose, code = notebook["cells"]
    assert prose == solution["cells"][0]
    assert (code["outputs"], code["execution_count"]) == ([], None)
    assert "42" not in "".join(code["source"])
    assert solution["cells"][1]["execution_count"] == 3  # the source is left alone


def test_sync_writes_stale_notebooks_and_check_only_reports(tmp_path: Path) -> None:
    (tmp_path / "solutions").mkdir()
    solution = {"cells": [{"cell_type": "code", "source": [SOLVED], "outputs": [], "execution_count": None}]}
    (tmp_path / "solutions" / "x.ipynb").write_text(json.dumps(solution))
    assert sync(tmp_path, check=True) == [tmp_path / "x.ipynb"]
    assert not (tmp_path / "x.ipynb").exists()
    assert sync(tmp_path) == [tmp_path / "x.ipynb"]
    assert sync(tmp_path, check=True) == []


def test_students_notebooks_are_in_sync_with_the_solutions() -> None:
    assert sync(check=True) == [], "run `make notebooks` after editing notebooks/solutions/"


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.rglob("*.ipynb")), ids=lambda path: path.name)
def test_notebooks_are_committed_without_outputs(path: Path) -> None:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    assert all(not cell.get("outputs") and cell.get("execution_count") is None for cell in cells if "outputs" in cell)
