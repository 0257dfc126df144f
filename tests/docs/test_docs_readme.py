"""README.md's ```python blocks run as written, in order, in one fresh interpreter (later blocks may use what earlier
ones defined, as a reader would), against a tiny converted checkpoint on this machine: nothing is downloaded.

The folders the README's commands would have made are made first, by the same tools: `repo` (README's name for a
converted repo: `python examples/demo.py --save`'s kind of folder, here written by the converter from a tiny BAGEL
checkpoint), its stock-transformers export, and `feats/` from extract_features.py on a folder of photos. The training block runs as one
torchrun process (RANK=0, WORLD_SIZE=1, gloo on the CPU)."""

import json
import os
import re
import socket
import subprocess
import sys

from PIL import Image

from siglip_navit_tools import repo_code
from siglip_navit_tools.extract.cli import main as extract_main
from siglip_navit_tools.testing import convert, tiny_converted_repo

ROOT = repo_code.REPO_ROOT

README = ROOT / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
# The folder names README's python blocks use (repo = "..."; the stock export; the extraction output).
REPO_NAME = "siglip-navit-tiny"
STOCK_NAME = "siglip-bagel-stock"

RUNNER = r"""
import json, sys, traceback
blocks = json.load(open(sys.argv[1]))
namespace = {"__name__": "__main__"}
for i, (line, code) in enumerate(blocks):
    try:
        exec(compile(code, f"README.md:{line}", "exec"), namespace)
    except BaseException:
        traceback.print_exc()
        print(f"README block {i} (line {line}) failed", file=sys.stderr)
        sys.exit(1)
    print(f"README block {i} (line {line}) ok")
"""


def python_blocks() -> list[tuple[int, str]]:
    text = README.read_text()
    return [(text[: m.start()].count("\n") + 2, m.group(1)) for m in BLOCK.finditer(text)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_readme_defines_repo_before_using_it():
    blocks = python_blocks()
    assert len(blocks) >= 5
    first_use = next(i for i, (_, code) in enumerate(blocks) if re.search(r"\brepo\b", code))
    assert re.search(rf'^repo = "{REPO_NAME}"', blocks[first_use][1], re.M), "the first block using `repo` defines it"


def test_readme_python_blocks_run(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    repo = tiny_converted_repo(work / REPO_NAME, work=tmp_path)
    convert(repo, work / STOCK_NAME, "--to", "stock-siglip")
    photos = work / "photos"
    photos.mkdir()
    for i, size in enumerate([(64, 48), (30, 90), (50, 50)]):
        Image.effect_noise(size, 50).convert("RGB").save(photos / f"{i}.png")
    assert extract_main(["--model", str(repo), "--input", str(photos), "--output", str(work / "feats"),
                         "--no-progress", "--num-workers", "0"]) == 0  # fmt: skip
    blocks = python_blocks()
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    (tmp_path / "runner.py").write_text(RUNNER)
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), RANK="0", LOCAL_RANK="0",
        WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
    )  # fmt: skip
    result = subprocess.run(
        [sys.executable, str(tmp_path / "runner.py"), str(tmp_path / "blocks.json")],
        cwd=work, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert result.stdout.count(" ok") == len(blocks)
