"""The one safetensors header parser: the length limit safetensors itself accepts, any transport (bytes or a
ByteReader reading the header only), and its integrity checks."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from siglip_navit_tools.io.locations import ByteReader, Location
from siglip_navit_tools.io.safetensors import MAX_HEADER_BYTES, SafetensorsError, parse_header


def _reader_of(data: bytes):
    return lambda start, length: data[start : start + length]


def test_header_limit_is_what_safetensors_accepts():
    assert MAX_HEADER_BYTES == 100_000_000
    ok_len = struct.pack("<Q", MAX_HEADER_BYTES)  # accepted as a length: the (tiny) file is then too short for it
    with pytest.raises(SafetensorsError, match="is truncated: the header alone needs 100000008 bytes"):
        parse_header(_reader_of(ok_len + b"{}"), 10, "f")
    too_long = struct.pack("<Q", MAX_HEADER_BYTES + 1)
    with pytest.raises(SafetensorsError, match=r"corrupt safetensors header.*expected 1\.\.100000000"):
        parse_header(_reader_of(too_long + b"{}"), 10, "f")


def test_header_parser_is_transport_independent(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.zeros(3, 2), "b": torch.ones(5, dtype=torch.bfloat16)}, str(path), metadata={"format": "pt"})
    data = path.read_bytes()
    from_bytes = parse_header(_reader_of(data), len(data), "bytes")
    reader = ByteReader(Location.parse(str(path)))
    from_file = parse_header(reader.read, reader.size, "file")
    assert from_bytes == from_file
    assert reader.bytes_read == from_file.nbytes  # the header only, no tensor data
    assert from_file.metadata == {"format": "pt"}
    assert {k: (t.dtype, t.shape, t.nbytes) for k, t in from_file.tensors.items()} == {
        "a": (torch.float32, (3, 2), 24),
        "b": (torch.bfloat16, (5,), 10),
    }
    reader.close()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda h: h["a"].update(dtype="F12"), "unknown dtype 'F12'"),
        (lambda h: h["a"].update(shape=[3, -2]), "bad shape"),
        (lambda h: h["a"].update(data_offsets=[0]), "bad data_offsets"),
        (lambda h: h.pop("b"), "unexpected bytes after the last tensor"),
        (lambda h: h["b"].update(data_offsets=[20, 30]), "overlapping"),
    ],
)
def test_header_integrity_checks(tmp_path, edit, message):
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.zeros(3, 2), "b": torch.ones(5, dtype=torch.bfloat16)}, str(path))
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    blob = struct.pack("<Q", len(raw)) + raw + data[8 + n :]
    with pytest.raises(SafetensorsError, match=message):
        parse_header(_reader_of(blob), len(blob), "t")
