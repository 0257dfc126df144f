"""The converter's streaming write: --dtype (fp16 overflow and NaN are errors), tensors larger than the read
chunk streamed in pieces, and the read-back hash verification catching a corrupted output."""

import json
import struct

import pytest
import torch
from _convert_helpers import convert, leftovers, load_ours, make_bagel, tensors_of, write_stock
from safetensors.torch import load_file

from siglip_navit_tools.io import safetensors as st_io
from siglip_navit_tools.io import locations
from siglip_navit_tools.testing import make_model, unique_dir


@pytest.mark.parametrize("dtype", ["keep", "float32", "float16", "bfloat16"])
def test_dtype(tmp_path, dtype):
    src, ref = make_bagel(tmp_path, dtype=torch.float32)
    out = unique_dir(tmp_path, f"dtype_{dtype}")
    assert convert("--src", src, "--out", out, "--dtype", dtype) == 0
    want = {"keep": torch.float32, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == str(want).split(".")[1]
    source = load_file(str(src / "ema.safetensors"))
    for key, value in tensors_of(out).items():
        assert value.dtype == want
        assert torch.equal(value, source["vit_model." + key].to(want)), key
    load_ours(out)


def test_fp16_overflow_is_an_error(tmp_path, capsys):
    big = make_model().state_dict()["vision_model.encoder.layers.0.mlp.fc1.weight"].clone()
    big[0, 0] = 1e6
    src, _ = make_bagel(tmp_path, dtype=torch.float32, extra={"vit_model.vision_model.encoder.layers.0.mlp.fc1.weight": big})
    out = unique_dir(tmp_path, "overflow")
    assert convert("--src", src, "--out", out, "--dtype", "float16") == 1
    assert "overflow" in capsys.readouterr().err and not out.exists() and leftovers(tmp_path) == []


def test_nan_in_source_is_corruption(tmp_path, capsys):
    w = make_model().state_dict()["vision_model.post_layernorm.weight"].clone()
    w[3] = float("nan")
    src, _ = make_bagel(tmp_path, extra={"vit_model.vision_model.post_layernorm.weight": w.to(torch.bfloat16)})
    out = unique_dir(tmp_path, "nan")
    assert convert("--src", src, "--out", out) == 1
    assert "NaN" in capsys.readouterr().err and not out.exists() and leftovers(tmp_path) == []


def test_hash_verification_catches_corrupted_output(tmp_path, monkeypatch, capsys):
    src, _ = make_bagel(tmp_path)
    calls = []

    def corrupting_write(f, data):
        calls.append(1)
        if len(calls) == 7:  # a disk / filesystem error on one tensor
            data = bytearray(data)
            data[0] ^= 0xFF
        f.write(data)

    monkeypatch.setattr(st_io, "_write_tensor_data", corrupting_write)
    out = unique_dir(tmp_path, "corrupted_out")
    assert convert("--src", src, "--out", out) == 1
    err = capsys.readouterr().err
    assert "verification failed" in err and "sha256" in err
    assert not out.exists() and leftovers(tmp_path) == []


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


def test_piece_bounds_rows_for_relayouts_and_flat_otherwise():
    from types import SimpleNamespace

    from siglip_navit_tools.convert.write import piece_bounds
    from siglip_navit_tools.io.safetensors import TensorInfo

    info = TensorInfo("w", torch.float32, (8, 3, 2, 2), 0, 8 * 12 * 4)
    item = SimpleNamespace(entry=SimpleNamespace(info=info), transform="conv2d_to_linear")
    rows = list(piece_bounds(item, 100))
    assert rows == [(0, 24, (2, 3, 2, 2)), (24, 48, (2, 3, 2, 2)), (48, 72, (2, 3, 2, 2)), (72, 96, (2, 3, 2, 2))]
    flat = list(piece_bounds(SimpleNamespace(entry=SimpleNamespace(info=info), transform=None), 100))
    assert [b - a for a, b, _ in flat] == [25, 25, 25, 21] and all(s == (b - a,) for a, b, s in flat)
