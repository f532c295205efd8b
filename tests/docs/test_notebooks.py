"""The notebooks' code cells run top to bottom (in-process, so no Jupyter kernel is needed)."""

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parents[2] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[n.name for n in NOTEBOOKS])
def test_notebook_runs(notebook):
    cells = json.loads(notebook.read_text())["cells"]
    code = [("".join(c["source"])) for c in cells if c["cell_type"] == "code"]
    assert code
    scope: dict = {}
    for index, source in enumerate(code):
        exec(compile(source, f"{notebook.name}[{index}]", "exec"), scope)


def test_there_is_a_notebook():
    assert NOTEBOOKS
