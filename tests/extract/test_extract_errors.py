"""extract_features.py says what is wrong, in one line with its exit status, instead of a traceback or a hang (issue
20 items 4 and 6): a --device this machine does not have (or that holds no data), a manifest.json / .lock / shard
name that is a directory or a FIFO (never opened), a read-only --output (a real read-only file system, also as root),
a disk that fills up mid-run, an empty path option, a --model that is a stock SigLIP export, a BAGEL folder or
another model (with the command that converts it, which then works), a FIFO in a --model folder; and inputs whose
listing never ended (a glob or folder over symlink loops)."""

import errno
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from siglip_navit_tools.convert import cli as convert_cli
from siglip_navit_tools.extract import cli as extract_cli
from siglip_navit_tools.io import atomic
from siglip_navit_tools.repo_code import REPO_ROOT
from siglip_navit_tools.testing import (
    no_hang,
    read_only_prefix,
    saved_repo,
    tiny_bagel_checkpoint,
    tiny_config,
    unique_dir,
)

PROG = "extract_features.py: error: "


def extract(model, inputs, output, *extra) -> int:
    argv = ["--model", str(model), "--input", str(inputs), "--output", str(output), "--num-workers", "0",
            "--no-progress", *map(str, extra)]  # fmt: skip
    return extract_cli.main(argv)


def error_line(err: str) -> str:
    """The error: one line, the last, naming the program; no traceback."""
    lines = [line for line in err.strip().splitlines() if line.startswith(PROG)]
    assert len(lines) == 1 and err.strip().endswith(lines[0]) and "Traceback" not in err, err
    return lines[0][len(PROG):]




@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return saved_repo(unique_dir(tmp_path_factory.mktemp("model"), "navit"), tiny_config(image_size=64, rope=True))


def picture(path: Path, seed: int, size=(40, 28)) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for i in range(3):
        picture(root / f"p{i}.png", i)
    return root


def manifest(output: Path) -> dict:
    return json.loads((output / "manifest.json").read_text())


# ---- --device --------------------------------------------------------------------------------------------------------
DEVICES = [("foo", "is not a torch device"), ("meta", "holds no data"), ("cuda:-1", "is not a torch device")]
if not torch.cuda.is_available():
    DEVICES += [("cuda", "this machine has no cuda device"), ("cuda:7", "this machine has no cuda device")]
elif torch.cuda.device_count() < 8:
    DEVICES += [("cuda:7", f"this machine has {torch.cuda.device_count()} cuda device(s)")]


@pytest.mark.parametrize("device, words", DEVICES)
def test_a_device_this_machine_does_not_have_is_one_line(tmp_path, images, capsys, device, words):
    assert extract(tmp_path / "no-model-needed", images, tmp_path / "out", "--device", device) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"--device {device!r}") and words in line and not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--model", "--input", "--output"])
def test_empty_path_options_are_not_the_current_directory(tmp_path, images, model_dir, capsys, monkeypatch, flag):
    monkeypatch.chdir(tmp_path)
    args = {"--model": model_dir, "--input": images, "--output": tmp_path / "out", flag: ""}
    assert extract(args["--model"], args["--input"], args["--output"]) == 2
    assert f"{flag} is empty" in error_line(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


# ---- what is in --output ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["manifest.json", ".lock", "shard-00000-of-00001.safetensors"])
@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_output_entries_that_are_not_files_are_one_line_never_opened(tmp_path, images, model_dir, capsys, name, kind):
    out = tmp_path / "out"
    out.mkdir()
    (out / name).mkdir() if kind == "directory" else os.mkfifo(out / name)
    for extra in ([], ["--overwrite"]):
        with no_hang(120):
            status = extract(model_dir, images, out, *extra)
        err = capsys.readouterr().err
        if name.startswith("shard") and kind == "fifo":  # a FIFO at a shard's name is never read, just replaced
            assert status == 0 and (out / name).is_file(), err
            return
        assert status == 2, err
        line = error_line(err)
        shown = "a directory" if kind == "directory" else "a FIFO"
        assert f"its {name if name != '.lock' else 'lock file .lock'} is {shown}" in line and "--output" in line
        assert (out / name).is_dir() if kind == "directory" else (out / name).exists()


def _wrapped(prefix, argv):
    return [*prefix, sys.executable, str(REPO_ROOT / "extract_features.py"), *argv]


@pytest.mark.parametrize("where", ["existing_output", "output_inside_read_only_folder"])
def test_read_only_output_is_one_line(tmp_path, images, model_dir, where):
    """A real read-only file system where one can be made; as root permission bits are ignored, so the folder is
    bind-mounted read-only in a private mount namespace for the command alone (skipped only where that is refused)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    out = ro if where == "existing_output" else ro / "feats"
    prefix, how = read_only_prefix(ro)
    if prefix is None:
        pytest.skip(f"cannot make a read-only location here: {how}")
    try:
        argv = ["--model", str(model_dir), "--input", str(images), "--output", str(out), "--no-progress",
                "--num-workers", "0"]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
        result = subprocess.run(_wrapped(prefix, argv), capture_output=True, text=True, timeout=300, env=env)
    finally:
        os.chmod(ro, 0o755)
    assert result.returncode == 2, (how, result.stderr)
    line = error_line(result.stderr)
    reason = "read-only file system" if os.geteuid() == 0 else "permission denied"
    assert line.startswith(f"--output {str(out)!r} cannot be written ({reason}") and "writable" in line, line
    assert list(ro.iterdir()) == []


@pytest.mark.parametrize("how", ["oserror", "safetensors"])
def test_disk_full_mid_run_is_one_paragraph_and_the_rerun_resumes(tmp_path, images, model_dir, capsys, monkeypatch,
                                                                   how):
    out = tmp_path / "out"
    if how == "oserror":
        real = atomic.replace_file

        def full(tmp, path):  # the manifest still fits; the first shard does not
            if not path.name.startswith("shard-"):
                return real(tmp, path)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(atomic, "replace_file", full)
    else:
        import safetensors.torch
        from safetensors import SafetensorError

        def full(*args, **kwargs):  # how safetensors' Rust writer reports it: the OS error only in the message
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

        monkeypatch.setattr(safetensors.torch, "save_file", full)
    assert extract(model_dir, images, out, "--shard-size", "2") == 1
    line = error_line(capsys.readouterr().err)
    assert line.startswith("no space left on device while writing") and "shard-00000-of-00002" in line
    assert "rerun the same command to resume" in line
    assert not [p for p in out.iterdir() if atomic.TMP_MARK in p.name]
    monkeypatch.undo()
    assert extract(model_dir, images, out, "--shard-size", "2") == 0 and manifest(out)["complete"]


# ---- --model ----------------------------------------------------------------------------------------------------
def _stock_export(parent: Path) -> Path:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                image_size=24, patch_size=4)  # fmt: skip
    folder = unique_dir(parent, "stock")
    SiglipVisionModel(config).save_pretrained(folder)
    return folder


def test_a_stock_siglip_export_says_what_it_is_and_its_conversion_works(tmp_path, images, capsys, monkeypatch):
    stock = _stock_export(tmp_path)
    assert extract(stock, images, tmp_path / "out") == 2
    line = error_line(capsys.readouterr().err)
    assert "is a stock SigLIP checkpoint" in line and "model_type 'siglip_vision_model'" in line
    command = re.search(r"convert it first: (python convert_checkpoint\.py [^,]+), then pass --model (\S+)", line)
    assert command is not None, line
    monkeypatch.chdir(tmp_path)
    words = shlex.split(command[1])
    assert words[:2] == ["python", "convert_checkpoint.py"]
    assert convert_cli.main(words[2:] + ["--no-progress", "--quiet"]) == 0  # the command it printed, as printed
    assert extract(command[2], images, tmp_path / "out") == 0 and manifest(tmp_path / "out")["num_encoded"] == 3


def test_a_bagel_folder_says_how_to_convert_it(tmp_path, images, capsys):
    bagel = tiny_bagel_checkpoint(unique_dir(tmp_path, "bagel"))
    assert extract(bagel, images, tmp_path / "out") == 2
    line = error_line(capsys.readouterr().err)
    assert "is a BAGEL checkpoint folder (it holds ema.safetensors and vit_config.json)" in line
    assert f"python convert_checkpoint.py --src {bagel} --out" in line


def test_another_model_type_is_named(tmp_path, images, capsys):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    folder = unique_dir(tmp_path, "clip")
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                     image_size=24, patch_size=4)).save_pretrained(folder)  # fmt: skip
    assert extract(folder, images, tmp_path / "out") == 2
    assert "holds a 'clip_vision_model' model, not SigLIP-NaViT" in error_line(capsys.readouterr().err)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "preprocessor_config.json"])
def test_a_fifo_in_the_model_folder_is_refused_unopened(tmp_path, images, model_dir, capsys, name):
    copy = unique_dir(tmp_path, "model")
    copy.mkdir()
    for f in model_dir.iterdir():
        (copy / f.name).symlink_to(f) if f.name != name else os.mkfifo(copy / name)
    with no_hang(120):
        assert extract(copy, images, tmp_path / "out") == 2
    assert f"its {name} is not a regular file (a FIFO)" in error_line(capsys.readouterr().err)


# ---- item 4: inputs whose listing never ended ------------------------------------------------------------------------
def _photo_tree_with_loops(root: Path) -> list[str]:
    (root / "a" / "b").mkdir(parents=True)
    made = [picture(root / p, i) for i, p in enumerate(("x.png", "a/y.png", "a/b/z.png"))]
    (root / "a" / "up").symlink_to("..")
    (root / "a" / "b" / "up").symlink_to("../..")
    (root / "a" / "b" / "again").symlink_to(root)
    return sorted(map(str, made))


@pytest.mark.parametrize("spec", ["glob", "folder"])
def test_inputs_over_symlink_loops_are_listed_once_and_the_run_ends(tmp_path, model_dir, spec):
    root = tmp_path / "loops"
    expected = _photo_tree_with_loops(root)
    out = tmp_path / "out"
    with no_hang(120):
        assert extract(model_dir, root / "**" / "*.png" if spec == "glob" else root, out) == 0
    data = manifest(out)
    assert sorted(i for s in data["shards"] for i in s["ids"]) == expected and data["complete"]


def test_a_fifo_shard_left_in_output_is_never_read(tmp_path, images, model_dir):
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / "shard-00000-of-00009.safetensors")  # matches the shard pattern; read back on recovery
    with no_hang(120):
        assert extract(model_dir, images, out) == 0
    assert manifest(out)["complete"]
