"""The notebooks run top to bottom in a Jupyter kernel (nbclient), and are stored with their outputs."""

import importlib.util
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
spec = importlib.util.spec_from_file_location("execute_notebooks", ROOT / "scripts" / "execute_notebooks.py")
execute_notebooks = importlib.util.module_from_spec(spec)
sys.modules["execute_notebooks"] = execute_notebooks
spec.loader.exec_module(execute_notebooks)


def outputs(notebook, kind: str) -> list:
    return [
        o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if kind in o.get("data", {})
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[n.name for n in NOTEBOOKS])
def test_notebook_executes_in_a_kernel(path):
    executed = execute_notebooks.execute(path)  # raises CellExecutionError naming the failing cell
    assert outputs(executed, "image/png") and outputs(executed, "text/html")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[n.name for n in NOTEBOOKS])
def test_notebook_is_stored_with_its_outputs(path):
    stored = nbformat.read(path, as_version=4)
    code = [c for c in stored.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))  # run once, in order
    assert len(outputs(stored, "image/png")) >= 3  # the image and the plots
    assert outputs(stored, "text/html")  # the report as a table
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert errors == []


def test_the_quickstart_is_linked_from_the_readme():
    assert "(notebooks/quickstart.ipynb)" in (ROOT / "README.md").read_text()
    assert NOTEBOOKS
