"""Executes the notebooks with nbclient and stores them with their outputs (what tests/docs runs).

    python scripts/execute_notebooks.py                     # every notebooks/*.ipynb
    python scripts/execute_notebooks.py notebooks/x.ipynb   # one

Run it from a clean `bash scripts/setup.sh` environment, so the stored outputs show what a user sees.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def execute(path: Path) -> nbformat.NotebookNode:
    """Run every cell in a fresh kernel whose working directory is the repository root."""
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    ).execute()
    return notebook


def main(argv: list[str]) -> int:
    paths = [Path(a) for a in argv] or sorted((ROOT / "notebooks").glob("*.ipynb"))
    for path in paths:
        start = time.perf_counter()
        nbformat.write(execute(path), path)
        print(f"{path}: executed in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
