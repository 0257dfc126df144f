"""convert_checkpoint.py against sources that used to hang it or end in a traceback (issue 20 items 4 and 6): a FIFO,
directory or device where a config, index, card or weight file is read (refused unopened, never a read that blocks),
a config file too large to be one, and weights in a dtype the model is not stored in (fp8: refused at --dry-run too,
cast exactly when --dtype says how; safetensors dtypes this reader does not know: "unsupported", not "corrupt")."""

import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from siglip_navit_tools.convert import cli as convert_cli
from siglip_navit_tools.testing import no_hang, tiny_bagel_checkpoint, unique_dir


def convert(*args) -> int:
    return convert_cli.main([str(a) for a in args] + ["--no-progress"])


def error_paragraph(err: str) -> str:
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and "unexpected" not in lines[-1] and "Traceback" not in err, err
    return lines[-1]




@pytest.fixture
def src(tmp_path):
    return tiny_bagel_checkpoint(unique_dir(tmp_path, "bagel"))


def _replace(path, kind):
    """Put a FIFO, a directory or (a symlink to) a character device where a file was."""
    if path.exists() or path.is_symlink():
        path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to("/dev/zero")  # an endless read if it were ever read whole


# ---- item 4: nothing the converter reads can block it --------------------------------------------------------------
@pytest.mark.parametrize("kind", ["fifo", "directory", "device"])
@pytest.mark.parametrize("where", ["vit_config_beside", "config_flag", "index", "weights_in_folder", "weights_as_src"])
def test_non_regular_source_files_are_refused_unopened(tmp_path, src, capsys, kind, where):
    out = unique_dir(tmp_path, "out")
    args = ["--src", src]
    if where == "vit_config_beside":
        _replace(src / "vit_config.json", kind)
    elif where == "config_flag":
        config = tmp_path / "config_elsewhere.json"
        _replace(config, kind)
        args += ["--config", config]
    elif where == "index":
        (src / "ema.safetensors").rename(src / "model-00001-of-00001.safetensors")
        _replace(src / "model.safetensors.index.json", kind)
    elif where == "weights_in_folder":
        _replace(src / "ema.safetensors", kind)
    else:
        _replace(src / "ema.safetensors", kind)
        args = ["--src", src / "ema.safetensors", "--config", src / "vit_config.json"]
    for dry in ([], ["--dry-run"]):
        with no_hang(60):
            status = convert(*args, "--out", out, *dry)
        assert status == 1
        err = error_paragraph(capsys.readouterr().err)
        shown = {"fifo": "a FIFO", "directory": "a directory", "device": "a character device"}[kind]
        if where == "weights_as_src" and kind == "directory":  # --src names a folder: searched for weights
            assert "contains no checkpoint" in err
        else:
            assert "not a regular file" in err and shown in err, err
        assert not out.exists()


def test_fifo_pickle_source_is_refused_unopened(tmp_path, capsys):
    fifo = tmp_path / "weights.pt"
    os.mkfifo(fifo)
    with no_hang(60):
        assert convert("--src", fifo, "--out", tmp_path / "out", "--allow-pickle") == 1
    assert "not a regular file (a FIFO)" in error_paragraph(capsys.readouterr().err)


def test_fifo_model_card_beside_the_source_is_ignored_unopened(tmp_path, src):
    os.mkfifo(src / "README.md")  # the card is optional: a FIFO there is no card
    with no_hang(60):
        assert convert("--src", src, "--out", tmp_path / "out") == 0


def test_a_config_too_large_to_be_one_is_refused_without_reading_it_all(tmp_path, src, capsys):
    config = src / "vit_config.json"
    with open(config, "r+b") as f:
        f.truncate(101_000_000)  # sparse: costs no disk
    assert convert("--src", src, "--out", tmp_path / "out", "--dry-run") == 1
    assert "larger than 100000000 bytes" in error_paragraph(capsys.readouterr().err)


# ---- item 6: dtypes ------------------------------------------------------------------------------------------------
FP8 = [d for d in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, d)]


def _recast(src, dtype):
    tensors = load_file(str(src / "ema.safetensors"))
    cast = {k: v.to(dtype) for k, v in tensors.items()}
    save_file(cast, str(src / "ema.safetensors"), metadata={"format": "pt"})
    return cast


@pytest.mark.parametrize("name", FP8)
def test_fp8_source_is_refused_at_dry_run_unless_dtype_says_how(tmp_path, src, capsys, name):
    fp8 = _recast(src, getattr(torch, name))
    out = unique_dir(tmp_path, "out")
    for dry in (["--dry-run"], []):
        assert convert("--src", src, "--out", out, *dry) == 1
        err = error_paragraph(capsys.readouterr().err)
        assert name in err and "--dtype bfloat16" in err and "Nothing was written" in err
        assert not out.exists()
    assert convert("--src", src, "--out", out, "--dtype", "bfloat16") == 0
    written = load_file(str(out / "model.safetensors"))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    for key, value in written.items():
        assert value.dtype == torch.bfloat16
        # every fp8 value is exact in bf16: the cast loses nothing
        source = fp8["vit_model." + key].to(torch.float32)
        if key.endswith("patch_embedding.weight") and source.shape != value.shape:
            continue  # re-laid-out (checked elsewhere); BAGEL already stores it as Linear, so this does not happen
        assert torch.equal(value.to(torch.float32), source), key


def _raw_safetensors(path, dtype: str, nbytes: int):
    header = json.dumps({"w": {"dtype": dtype, "shape": [nbytes], "data_offsets": [0, nbytes]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * nbytes)


@pytest.mark.parametrize("dtype", ["F8_E8M0", "F4", "F6_E2M3", "C64", "U32"])
def test_safetensors_dtypes_this_reader_does_not_know_are_unsupported_not_corrupt(tmp_path, capsys, dtype):
    weights = tmp_path / "odd.safetensors"
    _raw_safetensors(weights, dtype, 8)
    assert convert("--src", weights, "--out", tmp_path / "out", "--dry-run") == 1
    err = error_paragraph(capsys.readouterr().err)
    assert f"stored as {dtype}" in err and "does not read" in err and "corrupt" not in err
