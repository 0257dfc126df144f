"""convert_checkpoint.py against crafted and hostile inputs (issue 12): rope=True BAGEL checkpoints, absurd layer
indices, weight_map escapes, malformed headers and configs, size options, the read-chunk bound, leftovers of killed
runs, and a target that cannot be written. Tiny checkpoints made in the test, as in test_convert_checkpoint.py."""

import errno
import json
import os
import pathlib
import shutil
import socket
import struct
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

from siglip_navit_tools.convert import plan as plan_mod
from siglip_navit_tools.io import atomic, locations
from siglip_navit_tools.io import safetensors as st_io
from siglip_navit_tools.testing import make_model, tiny_config, unique_dir
from test_convert_checkpoint import (
    BAGEL_OTHER,
    BAGEL_VIT_CONFIG,
    assert_same_outputs,
    convert,
    leftovers,
    load_ours,
    make_bagel,
    tensors_of,
    write_stock,
)

ROPE_NAMES = ("cos_h", "sin_h", "cos_w", "sin_w")
LAYER = "vit_model.vision_model.encoder.layers."


def one_paragraph(err: str) -> str:
    """The error line, which must be the last one and a single paragraph (notes logged before it are fine)."""
    lines = err.strip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert starts and starts[0] == len(lines) - 1, err
    text = lines[-1]
    assert "unexpected" not in text, text
    return text


def make_bagel_rope(tmp_path, *, tables=True, name="bagel_rope"):
    """A BAGEL checkpoint trained with --vit_rope True: no position table, upstream's persistent RoPE tables."""
    ref = make_model(rope=True, num_hidden_layers=2, seed=3)
    tensors = {"vit_model." + k: v.clone() for k, v in ref.state_dict().items()}
    assert not any("position_embedding" in k for k in tensors)
    if tables:
        for n in ROPE_NAMES:
            tensors[f"vit_model.vision_model.rope.{n}"] = getattr(ref.vision_model.rope, n).clone()
    gen = torch.Generator().manual_seed(1)
    tensors.update({k: torch.randn(s, generator=gen) for k, s in BAGEL_OTHER.items()})
    d = unique_dir(tmp_path, name)
    d.mkdir()
    save_file(tensors, str(d / "ema.safetensors"), metadata={"format": "pt"})
    (d / "vit_config.json").write_text(json.dumps(BAGEL_VIT_CONFIG))  # says 3 layers, no rope key (default True)
    return d, ref


# ---- item 1: rope from the keys, --rope ---------------------------------------------------------------------
@pytest.mark.parametrize("tables", [True, False])
def test_bagel_vit_rope_true_converts_and_matches_a_rope_model(tmp_path, capsys, tables):
    src, ref = make_bagel_rope(tmp_path, tables=tables)
    out = unique_dir(tmp_path, "rope_out")
    assert convert("--src", src, "--out", out) == 0
    assert "--vit_rope True" in capsys.readouterr().err
    written = tensors_of(out)
    assert not any("rope" in k or "position_embedding" in k for k in written)
    assert json.loads((out / "config.json").read_text())["rope"] is True
    model = load_ours(out)  # AutoModel + trust_remote_code, fp32
    assert model.config.rope is True
    assert_same_outputs(ref, model, ref.config)  # fp32 max|diff| <= 1e-5
    out2 = unique_dir(tmp_path, "rope_forced")
    assert convert("--src", src, "--out", out2, "--rope", "true") == 0  # agreeing with the keys is fine


def _own_repo(tmp_path, rope: bool, config_rope: bool):
    ref = make_model(rope=rope)
    d = unique_dir(tmp_path, "own")
    d.mkdir()
    save_file(dict(ref.state_dict()), str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = tiny_config(rope=True).to_dict()
    (d / "config.json").write_text(json.dumps({**cfg, "rope": config_rope, "model_type": "siglip_navit"}))
    return d


@pytest.mark.parametrize(
    "case, args, words",
    [
        ("bagel", ["--rope", "true"], ["--rope true", "position table", "--rope auto"]),
        ("bagel_rope", ["--rope", "false"], ["--rope false", "no position table", "--vit_rope True"]),
        ("stock", ["--rope", "true"], ["--rope true", "stock SigLIP"]),
        ("own_config_says_false", [], ["rope=False", "do not belong together"]),
        ("own_config_says_true", [], ["rope=True", "do not belong together"]),
    ],
)
def test_rope_contradictions_are_clear_errors(tmp_path, capsys, case, args, words):
    if case == "bagel":
        src, _ = make_bagel(tmp_path)
    elif case == "bagel_rope":
        src, _ = make_bagel_rope(tmp_path)
    elif case == "stock":
        src, _ = write_stock(tmp_path, "vision-4x")
    else:
        rope = case == "own_config_says_false"  # keys of a rope model, config says False (and the reverse)
        src = _own_repo(tmp_path, rope=rope, config_rope=not rope)
    out = unique_dir(tmp_path, "contradiction")
    assert convert("--src", src, "--out", out, *args) == 1
    err = one_paragraph(capsys.readouterr().err)
    for w in words:
        assert w in err, (w, err)
    assert not out.exists() and leftovers(tmp_path) == []


def test_rope_false_agreeing_and_own_rope_repo(tmp_path):
    src, ref = make_bagel(tmp_path, dtype=torch.float32)
    out = unique_dir(tmp_path, "rope_false")
    assert convert("--src", src, "--out", out, "--rope", "false") == 0
    assert_same_outputs(ref, load_ours(out), ref.config)
    own = _own_repo(tmp_path, rope=True, config_rope=True)
    out2 = unique_dir(tmp_path, "own_rope")
    assert convert("--src", own, "--out", out2) == 0 and load_ours(out2).config.rope is True


# ---- item 3: layer indices checked from the keys, before anything is built ----------------------------------
def _forbid_building(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the model was built")

    monkeypatch.setattr(plan_mod, "expected_shapes", boom)


@pytest.mark.parametrize(
    "key_index, config_layers, words",
    [
        ("99999999999", 100_001, ["layers.99999999999.mlp.fc1.weight", "not a plain layer index"]),
        ("9" * 5000, 3, ["not a plain layer index"]),
        ("100000", 100_001, ["layers.100000.mlp.fc1.weight", "names encoder layer 100000", "missing: 2, 3, 4"]),
        ("5", 3, ["names encoder layer 5", "not 0..2"]),
        ("01", 3, ["'01'", "not a plain layer index"]),
    ],
)
def test_absurd_or_gapped_layer_indices_refused_cheaply(tmp_path, capsys, monkeypatch, key_index, config_layers, words):
    w = torch.zeros(48, 32, dtype=torch.bfloat16)
    src, _ = make_bagel(tmp_path, config_layers=config_layers, extra={f"{LAYER}{key_index}.mlp.fc1.weight": w})
    _forbid_building(monkeypatch)
    out = unique_dir(tmp_path, "layers")
    t0 = time.perf_counter()
    assert convert("--src", src, "--out", out) == 1
    assert time.perf_counter() - t0 < 5
    err = one_paragraph(capsys.readouterr().err)
    for word in words:
        assert word in err, (word, err[:500])
    assert not out.exists()


def test_layer_gap_refused(tmp_path, capsys, monkeypatch):
    ref = make_model(num_hidden_layers=3)
    tensors = {"vit_model." + k: v for k, v in ref.state_dict().items() if ".layers.1." not in k}
    d = unique_dir(tmp_path, "gap")
    d.mkdir()
    save_file(tensors, str(d / "ema.safetensors"), metadata={"format": "pt"})
    _forbid_building(monkeypatch)
    assert convert("--src", d, "--out", unique_dir(tmp_path, "o")) == 1
    err = one_paragraph(capsys.readouterr().err)
    assert "layers.2." in err and "missing: 1" in err


def test_non_ascii_digit_layer_is_an_unexpected_key(tmp_path, capsys):
    src, _ = make_bagel(tmp_path, extra={LAYER + "\u0663.mlp.fc1.weight": torch.zeros(48, 32, dtype=torch.bfloat16)})
    assert convert("--src", src, "--out", unique_dir(tmp_path, "o")) == 1
    err = capsys.readouterr().err
    assert "unexpected (1)" in err and "\u0663" in err


def test_expected_shapes_cost_does_not_grow_with_layers():
    small = tiny_config(num_hidden_layers=3)
    with torch.device("meta"):
        full = plan_mod.modeling().SiglipVisionModel(small)
    assert plan_mod.expected_shapes(small) == {k: tuple(v.shape) for k, v in full.state_dict().items()}
    t0 = time.perf_counter()
    shapes = plan_mod.expected_shapes(tiny_config(num_hidden_layers=1024))
    assert time.perf_counter() - t0 < 2 and len(shapes) == 5 + 1024 * 16


# ---- item 3: a sharded index may only name weight files inside the source folder ----------------------------
def _sharded(tmp_path, names):
    """A 2-shard BAGEL checkpoint whose index maps one key to each of `names` (the rest to the real shard)."""
    src, _ = make_bagel(tmp_path, name="sharded")
    (src / "ema.safetensors").rename(src / "model-00001-of-00001.safetensors")
    from safetensors import safe_open

    with safe_open(str(src / "model-00001-of-00001.safetensors"), "pt") as f:
        keys = sorted(f.keys())
    weight_map = {k: "model-00001-of-00001.safetensors" for k in keys}
    for key, name in zip(keys, names):
        weight_map[key] = name
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return src


@pytest.mark.parametrize(
    "name",
    ["/etc/passwd", "../other/x.safetensors", "sub/../../x.safetensors", "C:\\x.safetensors", "x.bin", "notes.txt",
     5, ["x.safetensors"], "./x.safetensors", "a//b.safetensors", "escape.safetensors"],
)  # fmt: skip
@pytest.mark.parametrize("url", [False, True])
def test_weight_map_cannot_leave_the_source_folder(tmp_path, capsys, monkeypatch, name, url):
    outside = tmp_path / "other"
    outside.mkdir(exist_ok=True)
    save_file({"x": torch.zeros(2)}, str(outside / "x.safetensors"), metadata={"format": "pt"})
    src = _sharded(tmp_path, [name])
    if name == "escape.safetensors":
        os.symlink(outside / "x.safetensors", src / name)
    opened = []
    real_init = locations.ByteReader.__init__
    monkeypatch.setattr(locations.ByteReader, "__init__",
                        lambda self, loc: opened.append(loc.path) or real_init(self, loc))  # fmt: skip
    arg = f"file://{src}" if url else src
    assert convert("--src", arg, "--out", unique_dir(tmp_path, "o")) == 1
    err = one_paragraph(capsys.readouterr().err)
    assert "weight_map" in err and "header length" not in err
    assert opened == []  # refused from the index alone: no file it names was opened


def test_weight_map_checked_on_remote_filesystems_too(tmp_path, capsys):
    import fsspec
    from test_convert_checkpoint import CountingFileSystem

    fsspec.register_implementation("countingfs", CountingFileSystem, clobber=True)
    src = _sharded(tmp_path, ["../other/x.safetensors"])
    assert convert("--src", f"countingfs://{src}", "--out", unique_dir(tmp_path, "o")) == 1
    assert "weight_map" in one_paragraph(capsys.readouterr().err)


def test_hf_cache_layout_symlinks_are_inside(tmp_path):
    """A snapshot of the Hugging Face cache: snapshots/<rev>/<file> are symlinks into the repo's blobs/."""
    src = _sharded(tmp_path, [])
    repo = tmp_path / "models--org--bagel"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in src.iterdir():
        (blobs / f"blob-{f.name}").write_bytes(f.read_bytes())
        os.symlink(f"../../blobs/blob-{f.name}", snap / f.name)
    assert convert("--src", snap, "--out", unique_dir(tmp_path, "o")) == 0


# ---- item 3: malformed headers and configs ------------------------------------------------------------------
def test_deeply_nested_header_is_a_corrupt_header(tmp_path, capsys):
    src, _ = make_bagel(tmp_path)
    raw = b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    (src / "ema.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    assert convert("--src", src, "--out", unique_dir(tmp_path, "o")) == 1
    err = one_paragraph(capsys.readouterr().err)
    assert "corrupt safetensors header" in err and "nested too deeply" in err


def test_deeply_nested_index_and_config_json(tmp_path, capsys):
    src, _ = make_bagel(tmp_path)
    (src / "vit_config.json").write_text("[" * 200_000 + "]" * 200_000)
    assert convert("--src", src, "--out", unique_dir(tmp_path, "o")) == 1
    assert "vit_config.json" in one_paragraph(capsys.readouterr().err)
    idx = _sharded(tmp_path, [])
    (idx / "model.safetensors.index.json").write_text('{"weight_map":' + "[" * 200_000 + "]" * 200_000 + "}")
    assert convert("--src", idx, "--out", unique_dir(tmp_path, "o")) == 1
    assert "nested too deeply" in one_paragraph(capsys.readouterr().err)


SIZE_CASES = [("hidden_size", -32), ("hidden_size", 10**12), ("hidden_size", "32"), ("intermediate_size", 0),
              ("intermediate_size", -1), ("num_attention_heads", 0), ("patch_size", 0), ("patch_size", -4),
              ("image_size", -24), ("image_size", 10**30), ("num_channels", 0), ("num_attention_heads", 7),
              ("hidden_size", 32.0), ("patch_size", True)]  # fmt: skip


@pytest.mark.parametrize("field, value", SIZE_CASES)
@pytest.mark.parametrize("kind", ["bagel", "stock"])
def test_absurd_config_sizes_are_one_paragraph_naming_field_and_file(tmp_path, capsys, field, value, kind):
    if kind == "bagel":
        src, _ = make_bagel(tmp_path)
        cfg_file = src / "vit_config.json"
    else:
        src, _ = write_stock(tmp_path, "vision-4x")
        cfg_file = src / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg[field] = value
    cfg_file.write_text(json.dumps(cfg))
    assert convert("--src", src, "--out", unique_dir(tmp_path, "o")) == 1
    err = one_paragraph(capsys.readouterr().err)
    assert f"`{field}`" in err and cfg_file.name in err, err


@pytest.mark.parametrize("field, value", [("num_hidden_layers", -3), ("num_hidden_layers", 10**40),
                                          ("num_hidden_layers", "3"), ("hidden_act", "no_such_act"),
                                          ("num_hidden_layers", None)])  # fmt: skip
def test_other_bad_config_values_are_clear(tmp_path, capsys, field, value):
    src, _ = make_bagel(tmp_path)
    cfg = json.loads((src / "vit_config.json").read_text())
    cfg[field] = value
    (src / "vit_config.json").write_text(json.dumps(cfg))
    assert convert("--src", src, "--out", unique_dir(tmp_path, "o")) == 1
    err = one_paragraph(capsys.readouterr().err)
    assert "vit_config.json" in err


# ---- item 3: size options -----------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["0", "-1", "-5MiB", "10", "1000TB", "9" * 40, "1e9", "abc", "0.5"])
@pytest.mark.parametrize("flag", ["--read-chunk-size", "--max-shard-size"])
def test_size_options_name_themselves(tmp_path, capsys, flag, value):
    if flag == "--max-shard-size" and value in ("10", "1000TB"):
        return  # valid shard sizes (10 bytes: one tensor per shard; 1000TB: one shard)
    assert convert("--src", tmp_path / "nope", "--out", tmp_path / "o", f"{flag}={value}") == 1
    err = one_paragraph(capsys.readouterr().err)
    other = "--max-shard-size" if flag == "--read-chunk-size" else "--read-chunk-size"
    assert flag in err and other not in err


# ---- item 3: a tensor larger than the read chunk is streamed ------------------------------------------------
@pytest.mark.parametrize("dtype_args", [[], ["--dtype", "bfloat16"]])
def test_tensors_larger_than_the_chunk_are_streamed(tmp_path, monkeypatch, dtype_args):
    src, stock = write_stock(tmp_path, "vision-4x")  # fp32: patch conv 6 KiB, fc1 6 KiB, position table 4.5 KiB
    ref_out = unique_dir(tmp_path, "whole")
    assert convert("--src", src, "--out", ref_out, *dtype_args) == 0
    reads, writes = [], []
    real_read, real_write = locations.ByteReader.read, st_io._write_tensor_data
    monkeypatch.setattr(locations.ByteReader, "read",
                        lambda self, start, n: reads.append((self.loc.name, start, n)) or real_read(self, start, n))
    monkeypatch.setattr(st_io, "_write_tensor_data", lambda f, data: writes.append(len(data)) or real_write(f, data))
    out = unique_dir(tmp_path, "chunked")
    assert convert("--src", src, "--out", out, "--read-chunk-size", "1KiB", *dtype_args) == 0
    header_len = struct.unpack("<Q", (src / "model.safetensors").read_bytes()[:8])[0]
    data_reads = [n for name, start, n in reads if start >= 8 + header_len]
    assert data_reads and max(data_reads) <= 1024  # source and read-back verification alike
    assert writes and max(writes) <= 1024
    whole, chunked = tensors_of(ref_out), tensors_of(out)
    assert whole.keys() == chunked.keys()
    for key in whole:  # bit-identical to the unchunked conversion (conv -> linear re-layout included)
        assert torch.equal(whole[key], chunked[key]), key


# ---- item 3: leftovers of killed runs -----------------------------------------------------------------------
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _plant_tmp(out, tag, marker_pid=None):
    tmp = out.parent / f".{out.name}.tmp-{tag}"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"partial")
    if marker_pid is not None:
        (tmp / atomic.DIR_MARKER).write_text(f"{socket.gethostname()} {marker_pid}\n")
    return tmp


def test_stale_temporaries_of_ours_are_removed_and_said(tmp_path, capsys):
    src, _ = make_bagel(tmp_path)
    parent = unique_dir(tmp_path, "parent")
    parent.mkdir()
    out = parent / "out"
    dead = _plant_tmp(out, "0123abcd", _dead_pid())
    foreign = _plant_tmp(out, "deadbeef")  # no marker: not ours
    live = _plant_tmp(out, "cafe0001", os.getpid())  # a run that is still going
    assert convert("--src", src, "--out", out) == 0
    err = capsys.readouterr().err
    assert f"remove {dead.name}" in err and "interrupted run" in err and not dead.exists()
    assert foreign.exists() and live.exists() and f"left {live.name} alone" in err
    assert not (out / atomic.DIR_MARKER).exists()  # the marker never reaches the output


def test_crash_between_force_renames_is_restored_first(tmp_path, capsys):
    src, _ = make_bagel(tmp_path)
    parent = unique_dir(tmp_path, "parent")
    parent.mkdir()
    out = parent / "out"
    old = parent / ".out.old-1234abcd"
    old.mkdir()
    (old / "old.txt").write_text("old output")
    assert convert("--src", src, "--out", out, "--dry-run") == 0
    assert "would restore" in capsys.readouterr().err and old.exists() and not out.exists()
    assert convert("--src", src, "--out", out) == 1  # restored first, then: not empty, needs --force
    err = capsys.readouterr().err
    assert "restore" in err and old.name in err and "--force" in err
    assert (out / "old.txt").read_text() == "old output" and not old.exists()
    old2, old3 = parent / ".out2.old-00000001", parent / ".out2.old-00000002"
    old2.mkdir(), old3.mkdir()
    assert convert("--src", src, "--out", parent / "out2") == 0  # several parked: left alone, said
    assert "several parked outputs" in capsys.readouterr().err and old2.exists() and old3.exists()


def test_old_output_deletion_killed_halfway_is_never_restored(tmp_path, monkeypatch):
    """After the second rename the old output is re-parked as a marked temporary before it is deleted: a deletion
    killed halfway leaves a dead run's `.OUT.tmp-*` (removed next time), never a `.OUT.old-*` that looks like a
    complete previous output and would be "restored" over a missing --out."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    new = tmp_path / ".out.tmp-0000beef"
    new.mkdir()
    (new / "new.txt").write_text("new")

    def killed(path, ignore_errors=False):
        (pathlib.Path(path) / "old.txt").unlink()  # half of the deletion happened, then the process died
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        atomic.replace_directory(new, out)
    monkeypatch.undo()
    assert (out / "new.txt").read_text() == "new"
    assert not list(tmp_path.glob(".out.old-*"))
    leftovers = list(tmp_path.glob(".out.tmp-*"))
    assert len(leftovers) == 1 and (leftovers[0] / atomic.DIR_MARKER).is_file()
    marker = leftovers[0] / atomic.DIR_MARKER
    marker.write_text(f"{socket.gethostname()} {_dead_pid()}\n")  # as seen by the next run: its owner is gone
    shutil.rmtree(out)  # even with --out missing, nothing is "restored"
    lines = atomic.recover_leftovers(out)
    assert not out.exists() and not leftovers[0].exists()
    assert any("remove" in line for line in lines) and not any("restore" in line for line in lines)


def test_temporary_directory_carries_a_marker_until_renamed(tmp_path):
    out = tmp_path / "o"
    with atomic.temporary_directory(out) as tmp:
        assert (tmp / atomic.DIR_MARKER).read_text().split()[1] == str(os.getpid())
        (tmp / "f").write_text("x")
        atomic.replace_directory(tmp, out)
    assert sorted(p.name for p in out.iterdir()) == ["f"]


# ---- item 3: a target that cannot be written ----------------------------------------------------------------
REASONS = {errno.ENOSPC: "no space left on device", errno.EROFS: "read-only file system",
           errno.EACCES: "permission denied", errno.EDQUOT: "disk quota exceeded"}  # fmt: skip


@pytest.mark.parametrize("code", list(REASONS))
@pytest.mark.parametrize("where", ["tensor", "side_file", "tmpdir"])
def test_unwritable_target_is_one_paragraph(tmp_path, capsys, monkeypatch, code, where):
    src, _ = make_bagel(tmp_path)
    out = unique_dir(tmp_path, "full")
    out.mkdir()
    (out / "keep.txt").write_text("previous")

    def fail(*a, **k):
        raise OSError(code, os.strerror(code))

    if where == "tensor":
        monkeypatch.setattr(st_io, "_write_tensor_data", fail)
    elif where == "side_file":
        monkeypatch.setattr("siglip_navit_tools.convert.write.shutil.copyfile", fail)
    else:
        real_mkdir = pathlib.Path.mkdir
        monkeypatch.setattr(pathlib.Path, "mkdir",
                            lambda self, *a, **k: fail() if ".tmp-" in self.name else real_mkdir(self, *a, **k))
    assert convert("--src", src, "--out", out, "--force") == 1
    err = one_paragraph(capsys.readouterr().err)
    assert f"{REASONS[code]} while writing" in err and "nothing was changed at --out" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and leftovers(tmp_path) == []
