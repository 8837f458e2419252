"""Make the students' notebooks from the solution notebooks, so the two never drift.

`notebooks/solutions/NAME.ipynb` is the source. In its code cells, lines between
`# BEGIN SOLUTION` and `# END SOLUTION` are the answer; the students' copy
`notebooks/NAME.ipynb` has them replaced by `raise NotImplementedError`, and no
outputs. Run `python -m sse_lab.course.authoring` after editing a solution notebook;
`--check` only reports notebooks that are out of date (the tests run it).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
from pathlib import Path
from typing import Any

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"

_SOLUTION = re.compile(r"^([ \t]*)# BEGIN SOLUTION\n.*?^[ \t]*# END SOLUTION$", re.MULTILINE | re.DOTALL)


def strip_solutions(source: str, solution_path: str) -> str:
    """Replace each solution block in a cell's source with a stub pointing at the solution."""
    stub = rf'\1raise NotImplementedError("your code here; stuck? see {solution_path}")'
    return _SOLUTION.sub(stub, source)


def exercise_notebook(solution: dict[str, Any], solution_path: str) -> dict[str, Any]:
    """The students' notebook for a solution notebook: solutions stubbed, outputs cleared."""
    notebook = copy.deepcopy(solution)
    for cell in notebook["cells"]:
        if cell["cell_type"] != "code":
            continue
        source = strip_solutions("".join(cell["source"]), solution_path)
        cell["source"] = source.splitlines(keepends=True)
        cell["outputs"] = []
        cell["execution_count"] = None
    return notebook


def dumps(notebook: dict[str, Any]) -> str:
    """Serialize as Jupyter does, so that saving from JupyterLab leaves no diff."""
    return json.dumps(notebook, indent=1, ensure_ascii=False) + "\n"


def sync(notebooks: Path = NOTEBOOKS, *, check: bool = False) -> list[Path]:
    """Write (or with `check`, only list) the students' notebooks that differ from their source."""
    stale = []
    for solution_file in sorted((notebooks / "solutions").glob("*.ipynb")):
        target = notebooks / solution_file.name
        solution = json.loads(solution_file.read_text(encoding="utf-8"))
        wanted = dumps(exercise_notebook(solution, f"solutions/{solution_file.name}"))
        if not target.exists() or target.read_text(encoding="utf-8") != wanted:
            stale.append(target)
            if not check:
                target.write_text(wanted, encoding="utf-8")
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sse_lab.course.authoring", description=__doc__)
    parser.add_argument("--check", action="store_true", help="only report notebooks that are out of date")
    args = parser.parse_args(argv)
    stale = sync(check=args.check)
    verb = "out of date" if args.check else "written"
    for path in stale:
        print(f"{verb}: {path}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
