"""The hashed streaming safetensors writer: what safetensors reads back, verify_file catching a flipped byte, tensors
in order, pieces adding up."""

import pytest
import torch
from safetensors.torch import load_file

from siglip_navit_tools.io.safetensors import SafetensorsWriter, TensorSpec, verify_file


def test_writer_matches_reference_reader_and_verify_catches_a_flipped_byte(tmp_path):
    tensors = {"x": torch.randn(4, 3), "y": torch.arange(6, dtype=torch.float16).reshape(2, 3), "z": torch.zeros(0)}
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    path = tmp_path / "w.safetensors"
    with SafetensorsWriter(path, specs) as writer:
        digests = {k: writer.write(k, v) for k, v in tensors.items()}
    loaded = load_file(str(path))
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    expected = {s.key: (s, digests[s.key]) for s in specs}
    verify_file(path, expected, chunk_bytes=5)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # the last byte of "y"
    path.write_bytes(bytes(data))
    with pytest.raises(Exception, match="tensor y in w.safetensors does not match what was written"):
        verify_file(path, expected, chunk_bytes=5)


def test_writer_refuses_out_of_order_tensors(tmp_path):
    specs = [TensorSpec("a", torch.float32, (2,)), TensorSpec("b", torch.float32, (2,))]
    with pytest.raises(ValueError, match="expected"):
        with SafetensorsWriter(tmp_path / "o.safetensors", specs) as writer:
            writer.write("b", torch.zeros(2))


def test_writer_pieces_must_add_up(tmp_path):
    spec = TensorSpec("a", torch.float32, (4,))
    with pytest.raises(ValueError, match="8 bytes written, expected 16"):
        with SafetensorsWriter(tmp_path / "p.safetensors", [spec]) as writer:
            writer.write_pieces("a", [torch.zeros(1), torch.zeros(1)])
    with SafetensorsWriter(tmp_path / "q.safetensors", [spec]) as writer:
        writer.write_pieces("a", [torch.arange(3.0), torch.tensor([3.0])])
    assert torch.equal(load_file(str(tmp_path / "q.safetensors"))["a"], torch.arange(4.0))
