"""Every notebook under notebooks/ executes without error."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).parents[1] / "notebooks").glob(
    "*.ipynb"))


def test_there_are_notebooks():
  assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path, tmp_path, monkeypatch):
  # The kernel inherits the environment: XLA compilation, most of a
  # notebook's time at these sizes, runs ~2x faster with most of its
  # optimizations off (numbers move in the last bits; the notebooks'
  # assertions hold either way).
  monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
  nb = nbformat.read(path, as_version=4)
  # nbclient raises CellExecutionError on the first failing cell.
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = [o for c in nb.cells if c.cell_type == "code"
             for o in c.get("outputs", [])]
  assert outputs and not [o for o in outputs if o.get("output_type") == "error"]
