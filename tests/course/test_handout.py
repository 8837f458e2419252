from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from sse_lab.course.authoring import dumps, exercise_notebook
from sse_lab.course.handout import NAME, ROOT, HandoutError, make_handout

SOLUTION_BLOCK = re.compile(r"# BEGIN SOLUTION\n(.*?)# END SOLUTION", re.DOTALL)


@pytest.fixture(scope="module")
def handout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_handout(output=tmp_path_factory.mktemp("build"))


def test_the_handout_holds_the_students_notebooks_and_the_package_without_solutions(handout: Path) -> None:
    names = set(zipfile.ZipFile(handout).namelist())
    students = sorted(path.name for path in (ROOT / "notebooks").glob("*.ipynb"))
    assert students and {f"{NAME}/notebooks/{name}" for name in students} <= names
    assert {f"{NAME}/{name}" for name in ["pyproject.toml", "Makefile", "README.md", "sse_lab/server.py"]} <= names
    assert f"{NAME}/sse_lab/instruments/sse_vectors.json" in names  # package data too
    assert not [name for name in names if "/solutions/" in name or "/tests/" in name or "__pycache__" in name]


def test_the_handout_folder_and_archive_hold_the_same_files(handout: Path) -> None:
    folder = handout.parent / "handout" / NAME
    in_folder = {f"{NAME}/{path.relative_to(folder).as_posix()}" for path in folder.rglob("*") if path.is_file()}
    assert in_folder == set(zipfile.ZipFile(handout).namelist())


def test_no_line_of_a_solution_reaches_the_handout(handout: Path) -> None:
    notebooks = "\n".join(
        zipfile.ZipFile(handout).read(name).decode()
        for name in zipfile.ZipFile(handout).namelist()
        if name.endswith(".ipynb")
    )
    for solution in (ROOT / "notebooks" / "solutions").glob("*.ipynb"):
        for cell in json.loads(solution.read_text(encoding="utf-8"))["cells"]:
            for block in SOLUTION_BLOCK.findall("".join(cell["source"])):
                for line in block.splitlines():
                    if len(line.strip()) > 12:  # a line of the answer, not a bare `return x`
                        assert json.dumps(line.strip())[1:-1] not in notebooks, (solution.name, line)


def test_the_handouts_package_imports_from_the_handout(handout: Path) -> None:
    folder = handout.parent / "handout" / NAME
    check = "import sse_lab, sse_lab.course.exercises; print(sse_lab.__file__)"
    imported = subprocess.run(
        [sys.executable, "-c", check], cwd=folder, capture_output=True, text=True, check=True, timeout=60
    )
    assert Path(imported.stdout.strip()).is_relative_to(folder)


def test_the_handout_refuses_students_copies_out_of_date(tmp_path: Path) -> None:
    (tmp_path / "notebooks" / "solutions").mkdir(parents=True)
    solution = {"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    (tmp_path / "notebooks" / "solutions" / "09_new.ipynb").write_text(dumps(solution), encoding="utf-8")
    with pytest.raises(HandoutError, match=re.escape("09_new.ipynb; run `make notebooks`")):
        make_handout(tmp_path, tmp_path / "build")
    (tmp_path / "notebooks" / "09_new.ipynb").write_text(
        dumps(exercise_notebook(solution, "solutions/09_new.ipynb")), encoding="utf-8"
    )
    shutil.copytree(ROOT / "sse_lab", tmp_path / "sse_lab", ignore=shutil.ignore_patterns("__pycache__"))
    assert make_handout(tmp_path, tmp_path / "build").is_file()  # once in sync, it is made
