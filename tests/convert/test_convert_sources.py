"""The converter's --src: single files, sharded folders (only the ViT's shards opened), custom prefixes, pickles
(weights_only, never executed), truncated or corrupt files, deeply nested JSON, remote sources through fsspec
(the header and the ViT's byte ranges, nothing else), and a sharded index that may not leave the source folder."""

import json
import os
import shutil
import struct

import pytest
import torch
from _convert_helpers import (
    assert_same_outputs,
    convert,
    leftovers,
    load_ours,
    make_bagel,
    one_paragraph,
    ours_on_native_grid,
    stock_on_image,
    stock_state,
    tensors_of,
    write_stock,
)
from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractBufferedFile
from safetensors.torch import load_file, save_file

from siglip_navit_tools.io import locations
from siglip_navit_tools.testing import unique_dir


# ---- files, shards, prefixes -------------------------------------------------------------------------------------
def test_bagel_single_file_and_config_rules(tmp_path):
    src, ref = make_bagel(tmp_path)
    out = unique_dir(tmp_path, "single")
    assert convert("--src", src / "ema.safetensors", "--out", out) == 0  # vit_config.json found beside the file
    assert_same_outputs(ref, load_ours(out), ref.config)

    # the same file alone: a tiny geometry cannot be inferred (heads) -> clear error, then --config works
    alone = unique_dir(tmp_path, "alone")
    alone.mkdir()
    shutil.copy(src / "ema.safetensors", alone / "ema.safetensors")
    out2 = unique_dir(tmp_path, "alone_out")
    assert convert("--src", alone / "ema.safetensors", "--out", out2) == 1
    assert not out2.exists()
    assert convert("--src", alone / "ema.safetensors", "--out", out2, "--config", src / "vit_config.json") == 0
    assert tensors_of(out2).keys() == tensors_of(out).keys()


def test_bagel_sharded_dir_opens_only_vit_shards(tmp_path):
    src, ref = make_bagel(tmp_path)
    tensors = load_file(str(src / "ema.safetensors"))
    (src / "ema.safetensors").unlink()
    vit = sorted(k for k in tensors if k.startswith("vit_model."))
    shards = {
        "model-00001-of-00003.safetensors": vit[: len(vit) // 2] + ["connector.fc1.weight"],
        "model-00002-of-00003.safetensors": vit[len(vit) // 2 :] + ["vit_pos_embed.pos_embed"],
        "model-00003-of-00003.safetensors": [k for k in tensors if k.startswith("language_model.")],
    }
    weight_map = {}
    for name, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(src / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
    # the language-model shard is never opened: make it garbage to prove it
    (src / "model-00003-of-00003.safetensors").write_bytes(b"\xff" * 4096)
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    out = unique_dir(tmp_path, "from_shards")
    assert convert("--src", src, "--out", out) == 0
    assert_same_outputs(ref, load_ours(out), ref.config)


def test_persistent_rope_buffers_dropped_and_custom_prefix(tmp_path):
    side = 6
    extra = {f"module.vit.vision_model.rope.{n}": torch.randn(side * side, 4) for n in ("cos_h", "sin_h", "cos_w", "sin_w")}
    src, ref = make_bagel(tmp_path, extra=extra, prefix="module.vit.")
    out = unique_dir(tmp_path, "prefix")
    assert convert("--src", src, "--out", out) == 1  # no vit_model.* tensors: not detected as BAGEL
    assert convert("--src", src, "--out", out, "--vit-prefix", "module.vit") == 0
    assert not any("rope" in k for k in tensors_of(out))
    assert_same_outputs(ref, load_ours(out), ref.config)


# ---- pickles: only with --allow-pickle, only through weights_only ------------------------------------------------
def _pickle_source(tmp_path, payload=None):
    src, stock = write_stock(tmp_path, "vision-4x")
    (src / "model.safetensors").unlink()
    torch.save(payload if payload is not None else stock_state(stock), str(src / "pytorch_model.bin"))
    return src, stock


def test_pickle_refused_without_allow_pickle(tmp_path, capsys):
    src, _ = _pickle_source(tmp_path)
    out = unique_dir(tmp_path, "pickle_refused")
    assert convert("--src", src, "--out", out) == 1
    err = capsys.readouterr().err
    assert "--allow-pickle" in err and "weights_only" in err and not out.exists()


def test_pickle_allowed_only_through_weights_only(tmp_path, monkeypatch):
    src, stock = _pickle_source(tmp_path)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    out = unique_dir(tmp_path, "pickle_ok")
    assert convert("--src", src, "--out", out, "--allow-pickle") == 0
    assert calls and all(c is True for c in calls)
    pixels = torch.randn(3, 24, 24, generator=torch.Generator().manual_seed(9))
    diff = (stock_on_image(stock, pixels) - ours_on_native_grid(load_ours(out), pixels, 4)).abs().max().item()
    assert diff <= 1e-5


class _Payload:
    """Unpickling this would create a file (stands in for arbitrary code)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_never_executed(tmp_path, capsys):
    marker = tmp_path / "pwned"
    src, _ = _pickle_source(tmp_path, payload={"vision_model.x": _Payload(str(marker))})
    out = unique_dir(tmp_path, "evil")
    assert convert("--src", src, "--out", out, "--allow-pickle") == 1
    assert not marker.exists() and not out.exists()
    assert "weights_only" in capsys.readouterr().err


# ---- broken files ------------------------------------------------------------------------------------------------
def test_truncated_source(tmp_path, capsys):
    src, _ = make_bagel(tmp_path)
    f = src / "ema.safetensors"
    data = f.read_bytes()
    out = unique_dir(tmp_path, "trunc")
    f.write_bytes(data[:-10])  # tensor data cut short
    assert convert("--src", src, "--out", out) == 1
    assert "truncated" in capsys.readouterr().err and not out.exists()
    f.write_bytes(data[:100])  # cut inside the header
    assert convert("--src", src, "--out", out) == 1
    assert "truncated" in capsys.readouterr().err and not out.exists()
    f.write_bytes(data + b"\0" * 16)  # trailing garbage
    assert convert("--src", src, "--out", out) == 1
    assert "unexpected bytes" in capsys.readouterr().err and not out.exists()
    assert leftovers(tmp_path) == []


def test_corrupt_header(tmp_path, capsys):
    src, _ = make_bagel(tmp_path)
    f = src / "ema.safetensors"
    data = bytearray(f.read_bytes())
    out = unique_dir(tmp_path, "corrupt")
    garbled = bytearray(data)
    garbled[8:16] = b"#garbage"
    f.write_bytes(bytes(garbled))
    assert convert("--src", src, "--out", out) == 1
    assert "corrupt safetensors header" in capsys.readouterr().err
    f.write_bytes(struct.pack("<Q", 2**62) + bytes(data[8:]))  # absurd header length
    assert convert("--src", src, "--out", out) == 1
    assert "corrupt safetensors header" in capsys.readouterr().err
    header_len = struct.unpack("<Q", bytes(data[:8]))[0]
    header = json.loads(bytes(data[8 : 8 + header_len]))
    key = next(k for k in header if k.startswith("vit_model."))
    header[key]["data_offsets"][1] += 2  # offsets that disagree with the shape
    raw = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(data[8 + header_len :]))
    assert convert("--src", src, "--out", out) == 1
    assert "corrupt safetensors header" in capsys.readouterr().err
    assert not out.exists() and leftovers(tmp_path) == []


# ---- remote sources through fsspec: the header and the ViT's byte ranges, nothing else ---------------------------
class CountingFile(AbstractBufferedFile):
    """A remote-style file (like HfFileSystem's): every read is a ranged fetch, and is counted."""

    def _fetch_range(self, start, end):
        with open(self.path, "rb") as f:
            f.seek(start)
            data = f.read(end - start)
        type(self.fs).ranges.append((os.path.basename(self.path), start, start + len(data)))
        return data


class CountingFileSystem(LocalFileSystem):
    protocol = "countingfs"
    root_marker = "/"
    ranges: list = []

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        if path.startswith("countingfs://"):
            path = path[len("countingfs://") :]
        return LocalFileSystem._strip_protocol(path)

    def _open(self, path, mode="rb", block_size=None, autocommit=True, cache_options=None, **kwargs):
        assert mode == "rb"
        return CountingFile(self, path, mode, block_size=block_size or 2**20, cache_options=cache_options, **kwargs)

    def cat_file(self, path, start=None, end=None, **kwargs):  # route every read through the counted file
        with self.open(path, "rb", cache_type="none") as f:
            f.seek(start or 0)
            return f.read(None if end is None else end - (start or 0))


def test_fsspec_source_reads_only_header_and_vit_ranges(tmp_path):
    import fsspec

    fsspec.register_implementation("countingfs", CountingFileSystem, clobber=True)
    src, ref = make_bagel(tmp_path)
    f = src / "ema.safetensors"
    header_len = struct.unpack("<Q", f.read_bytes()[:8])[0]
    header = json.loads(f.read_bytes()[8 : 8 + header_len])
    header.pop("__metadata__", None)
    base = 8 + header_len
    vit = {k: (base + v["data_offsets"][0], base + v["data_offsets"][1]) for k, v in header.items() if k.startswith("vit_model.")}
    other = {k: (base + v["data_offsets"][0], base + v["data_offsets"][1]) for k, v in header.items() if k not in vit}
    vit_bytes = sum(e - b for b, e in vit.values())
    assert sum(e - b for b, e in other.values()) > 5 * vit_bytes  # the language model dominates the file

    CountingFileSystem.ranges = []
    out = unique_dir(tmp_path, "remote")
    assert convert("--src", f"countingfs://{src}", "--out", out) == 0
    ranges = [(b, e) for name, b, e in CountingFileSystem.ranges if name == "ema.safetensors"]
    assert {name for name, _, _ in CountingFileSystem.ranges} <= {"ema.safetensors", "vit_config.json", "config.json"}
    read = sum(e - b for b, e in ranges)
    assert read == 8 + header_len + vit_bytes, (read, 8 + header_len + vit_bytes)  # exactly: header + ViT slice
    for b, e in ranges:
        assert not any(b < oe and ob < e for ob, oe in other.values())  # never a byte of another module
    assert_same_outputs(ref, load_ours(out), ref.config)
    assert "countingfs://" in (out / "README.md").read_text()

    local = unique_dir(tmp_path, "file_url")  # plain file:// URL of the single file (vit_config.json beside it)
    assert convert("--src", f"file://{f}", "--out", local) == 0
    first, second = tensors_of(out), tensors_of(local)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


# ---- a sharded index may only name weight files inside the source folder -----------------------------------------
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
