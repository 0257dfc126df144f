"""examples/demo.py, as README's quickstart runs it: the packed == per-image check, and `--save DIR` leaving a tiny
ready-to-load repo that a fresh process loads offline with the Auto classes."""

import json
import os
import subprocess
import sys

from siglip_navit_tools import repo_code
from siglip_navit_tools.testing import unique_dir

ROOT = repo_code.REPO_ROOT

DEMO = ROOT / "examples" / "demo.py"


def run(*args, cwd, env=None):
    return subprocess.run([sys.executable, str(DEMO), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)  # fmt: skip


def test_demo_save_writes_a_loadable_repo(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    target = unique_dir(tmp_path, "demo_repo")
    result = run("--layers", "1", "--save", target, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert "packed == per-image: True" in result.stdout and f"saved: {target}" in result.stdout
    names = {p.name for p in target.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "modeling_siglip_navit.py",
            "configuration_siglip_navit.py", "image_processing_siglip_navit.py", "pipeline_siglip_navit.py",
            "handler.py"} <= names  # fmt: skip
    assert json.loads((target / "config.json").read_text())["num_hidden_layers"] == 1
    load = (
        "import torch, numpy as np, sys\n"
        "from transformers import AutoImageProcessor, AutoModel\n"
        f"p = AutoImageProcessor.from_pretrained({str(target)!r}, trust_remote_code=True)\n"
        f"m = AutoModel.from_pretrained({str(target)!r}, trust_remote_code=True).float().eval()\n"
        "x = p(images=[np.zeros((50, 80, 3), np.uint8), np.full((300, 200, 3), 9, np.uint8)], return_tensors='pt')\n"
        "maps = p.unpack(m(**x).last_hidden_state, x)\n"
        "print([tuple(f.shape) for f in maps])\n"
    )
    loaded = subprocess.run([sys.executable, "-c", load], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env=env)  # fmt: skip
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "[(16, 26, 1152), (24, 16, 1152)]"


def test_demo_save_refuses_a_non_empty_folder(tmp_path):
    target = tmp_path / "full"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    result = run("--save", target, cwd=tmp_path)
    assert result.returncode == 2 and "not an empty folder" in result.stderr
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
