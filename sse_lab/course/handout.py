"""The course as students get it: their notebooks and the package, without the solutions.

    python -m sse_lab.course.handout [--output build]        (what `make handout` runs)

writes OUTPUT/handout/sse-lab/, a folder to copy, and OUTPUT/sse-lab-handout.zip,
the same as one file. Both hold the students' notebooks (`notebooks/*.ipynb`,
answers stubbed), the `sse_lab` package and what installs it, so that `make lab`
works in them as in the course's repository; `notebooks/solutions/`, the tests and
CI stay behind. It refuses to run while a students' copy is out of date with its
solution notebook, since it would hand out stale exercises.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import zipfile
from pathlib import Path

from .authoring import sync

ROOT = Path(__file__).resolve().parents[2]
NAME = "sse-lab"
TOP_FILES = ("README.md", "ARCHITECTURE.md", "pyproject.toml", "Makefile", "environment.yml", ".gitignore")
SOLUTION_MARKER = "# BEGIN SOLUTION"


class HandoutError(RuntimeError):
    """The handout cannot be made: the students' copies are stale, or a solution would leak."""


def handout_files(root: Path = ROOT) -> list[Path]:
    """The files a student gets, relative to `root`: top-level files, the package, the students' notebooks."""
    files = [Path(name) for name in TOP_FILES if (root / name).is_file()]
    files += sorted(
        path.relative_to(root)
        for path in (root / "sse_lab").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    )
    files += sorted(path.relative_to(root) for path in (root / "notebooks").glob("*.ipynb"))
    return files


def make_handout(root: Path = ROOT, output: Path = ROOT / "build") -> Path:
    """Write the handout folder and its zip archive under `output`; return the archive's path."""
    stale = sync(root / "notebooks", check=True)
    if stale:
        names = ", ".join(path.name for path in stale)
        raise HandoutError(f"students' copies out of date with their solutions: {names}; run `make notebooks`")
    files = handout_files(root)
    for relative in files:
        if relative.suffix == ".ipynb" and SOLUTION_MARKER in (root / relative).read_text(encoding="utf-8"):
            raise HandoutError(f"{relative} holds a solution block; only students' copies may be handed out")
    folder = output / "handout" / NAME
    shutil.rmtree(folder, ignore_errors=True)
    for relative in files:
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / relative, folder / relative)
    archive = output / f"{NAME}-handout.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as packed:
        for relative in files:
            packed.write(folder / relative, f"{NAME}/{relative.as_posix()}")
    return archive


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sse_lab.course.handout", description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=ROOT / "build", help="where to write it (default: build/)")
    args = parser.parse_args(argv)
    try:
        archive = make_handout(output=args.output)
    except HandoutError as error:
        print(f"handout: {error}", file=sys.stderr)
        return 1
    print(f"handout written to {archive.parent / 'handout' / NAME}/ and {archive}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
