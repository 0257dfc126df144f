"""examples/quickstart.ipynb: committed with stripped outputs, and executes top to bottom (nbclient) in a kernel
running THIS test's Python (the test virtualenv), from the examples/ folder as Jupyter would."""

import os
import sys

import nbclient
import nbformat
from conftest import ROOT

NOTEBOOK = ROOT / "examples" / "quickstart.ipynb"


def test_committed_notebook_is_stripped():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "the notebook has no code cells"
    for i, cell in enumerate(code):
        assert cell.outputs == [], f"code cell {i} has outputs"
        assert cell.execution_count is None, f"code cell {i} has an execution count"
    assert "widgets" not in nb.metadata, "widget state in the notebook metadata"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    # no stray run metadata (execution timings, scroll state...) either
    for cell in nb.cells:
        assert not set(cell.get("metadata", {})) & {"execution", "scrolled", "collapsed"}, cell.metadata


def test_notebook_executes(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    n_code = sum(c.cell_type == "code" for c in nb.cells)
    # one extra cell reports the kernel's interpreter, so the test proves the notebook ran in THIS environment
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable); print(sys.prefix)"))
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "examples")}}
    )
    client.execute()

    executed = [c for c in nb.cells if c.cell_type == "code"]
    assert len(executed) == n_code + 1 and all(c.execution_count for c in executed)
    for i, cell in enumerate(executed):
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert not errors, f"cell {i}: {errors}"
    exe, prefix = "".join(o.get("text", "") for o in executed[-1].outputs).split()
    assert os.path.realpath(exe) == os.path.realpath(sys.executable), (exe, sys.executable)
    assert os.path.realpath(prefix) == os.path.realpath(sys.prefix), (prefix, sys.prefix)

    # the three pictures (and the input preview) were displayed as PNG images
    pngs = [o for c in executed for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(pngs) >= 4, f"expected >= 4 PNG outputs, got {len(pngs)}"
    text = "".join(o.get("text", "") for c in executed for o in c.outputs if o.output_type == "stream")
    assert "packed vs one image at a time: max |diff| =" in text
    worst = float(text.split("packed vs one image at a time: max |diff| =")[1].split()[0])
    assert worst <= 1e-5
    assert text.count("-> feature map (") == 3
