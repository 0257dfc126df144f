"""examples/quickstart.ipynb: committed with stripped outputs, and executes top to bottom (nbclient) in a kernel
running THIS test's Python (the test virtualenv), from the examples/ folder as Jupyter would. The kernel inherits
this process's environment: its temporary files and the remote-code copy transformers makes go under tmp_path."""

import os
import sys

import nbclient
import nbformat

from siglip_navit_tools import repo_code

ROOT = repo_code.REPO_ROOT

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


def test_notebook_executes(tmp_path, monkeypatch):
    scratch, modules = tmp_path / "tmp", tmp_path / "hf_modules"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))  # the notebook's WORK folder (tempfile) lands here
    monkeypatch.setenv("HF_MODULES_CACHE", str(modules))  # not ~/.cache/huggingface/modules: a new folder per run
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
    # the remote code was loaded from the redirected cache, and the last cell removed WORK
    assert (modules / "transformers_modules").is_dir()
    assert not list(scratch.glob("siglip-navit-quickstart-*")), list(scratch.iterdir())
