"""How the test run executes the notebooks: each solution notebook once, with its students' copy's exercise cells.

A students' copy `notebooks/NN.ipynb` is made from `solutions/NN.ipynb` by `sse_lab.course.authoring`, which
changes only the code cells holding a `# BEGIN SOLUTION` block (tests/course/test_authoring.py and `make test`
check that the committed copies are exactly what it makes). Running the students' copy whole would run every
other cell, the experiments included, a second time. Instead, when pytest collects this folder, it leaves the
students' copies out and runs each of their cells that differ in the solution notebook's kernel, just before the
solution cell it stands for: the kernel then holds what a student's kernel holds at that point (no later cell
uses what an exercise cell defines: tests/course/test_students_copies.py), the stub must run and its checker
must remind, not fail. A students' notebook named on the command line still runs whole, like any notebook.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parent
SOLUTIONS = NOTEBOOKS / "solutions"
STUDENTS_COPY = "(students' copy)"

# tests/ and notebooks/ each have a conftest.py and no __init__.py, so both import as the
# module `conftest`: collecting either as a doctest module as well would clash with the other.
collect_ignore = ["conftest.py"]


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Leave out the students' copies found by walking this folder; they run inside their solution's run."""
    is_students_copy = collection_path.suffix == ".ipynb" and collection_path.parent == NOTEBOOKS
    return True if is_students_copy and (SOLUTIONS / collection_path.name).is_file() else None


def students_code_cells(solution: Path) -> list[nbformat.NotebookNode]:
    """The code cells of a solution notebook's students' copy, in order."""
    notebook = nbformat.read(NOTEBOOKS / solution.name, as_version=4)
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


@pytest.hookimpl(trylast=True)  # after nbval has collected the cells
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Put each students' cell that differs from its solution cell right before it, in the same kernel."""
    try:
        from nbval.plugin import IPyNbCell
    except ImportError:  # notebooks are not being run
        return
    students: dict[Path, list[nbformat.NotebookNode]] = {}
    with_students_cells: list[pytest.Item] = []
    for item in items:
        if isinstance(item, IPyNbCell) and item.path.parent == SOLUTIONS and (NOTEBOOKS / item.path.name).is_file():
            if item.path not in students:
                students[item.path] = students_code_cells(item.path)
            cells = students[item.path]
            if item.cell_num < len(cells) and cells[item.cell_num].source != item.cell.source:
                with_students_cells.append(
                    IPyNbCell.from_parent(
                        item.parent,
                        name=f"{item.name} {STUDENTS_COPY}",
                        cell_num=item.cell_num,
                        cell=cells[item.cell_num],
                        options=item.options,
                    )
                )
        with_students_cells.append(item)
    # Notebooks first: they are the longest files, and `make test`'s workers take files in this order
    # (`--dist loadfile --no-loadscope-reorder`), so the short test modules fill in around them.
    notebook_cells = [item for item in with_students_cells if isinstance(item, IPyNbCell)]
    items[:] = notebook_cells + [item for item in with_students_cells if not isinstance(item, IPyNbCell)]
