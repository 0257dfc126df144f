"""Helpers of the corpora tests (webdataset tars, parquet in; safetensors, parquet, npy out): a tiny model folder,
encoded test images, tars written with `tarfile`, the one-forward-per-image reference, and each format read back
through its own consumer."""

import io
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from siglip_navit_tools import repo_code
from siglip_navit_tools.extract import cli as extract_cli
from _extract_helpers import PROCESSOR, read_outputs, tiny_model_dir  # noqa: F401  (re-exported for the corpora tests)

ROOT = repo_code.REPO_ROOT



def image_bytes(width: int, height: int, seed: int, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar with these (name, bytes) members, in this order (what webdataset's writers make)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def member_offset(path: Path, name: str) -> int:
    """Where member `name`'s data starts in the tar."""
    with tarfile.open(path) as tar:
        return tar.getmember(name).offset_data


def extract(model_dir, input_spec, output, *extra) -> int:
    argv = ["--model", str(model_dir), "--input", str(input_spec), "--output", str(output), "--num-workers", "0",
            "--no-progress", *map(str, extra)]  # fmt: skip
    return extract_cli.main(argv)


def script_env(**extra) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.environ.get("PYTHONPATH", ""), **extra)


# Runs the extractor with some ranks slowed down from outside: `SLOW_RANK_WORKER RANK:SECONDS[,...] <args>`.
SLOW_RANK_WORKER = ROOT / "tests" / "extract" / "_extract_slow_rank_worker.py"


def torchrun(model_dir, input_spec, output, *extra, slow: str = "") -> list[str]:
    """A 2-rank torchrun of the extractor; `slow` ("RANK:SECONDS"): that rank sleeps before each shard."""
    entry = [str(SLOW_RANK_WORKER), slow] if slow else [str(ROOT / "extract_features.py")]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
            *entry, "--model", str(model_dir), "--input", str(input_spec), "--output", str(output),
            "--num-workers", "0", "--device", "cpu", "--no-progress", *map(str, extra)]  # fmt: skip


def reference(model_dir, images: dict) -> dict:
    """{id: (pooled, (h, w), map)} from one plain forward per image (no packing, no extractor)."""
    from transformers import AutoImageProcessor, AutoModel

    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(model_dir, trust_remote_code=True)
    out = {}
    with torch.no_grad():
        for image_id, image in images.items():
            inputs = processor(images=image)
            hidden = model(**inputs).last_hidden_state
            h, w = inputs["image_grid_hw"][0].tolist()
            out[image_id] = (hidden.mean(0), (h, w), hidden.reshape(h, w, -1))
    return out


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def assert_matches_reference(found: dict, ref: dict, grids: bool = True) -> None:
    assert sorted(found) == sorted(ref)
    for image_id, (pooled, grid, fmap) in found.items():
        assert grid == ref[image_id][1], image_id
        torch.testing.assert_close(pooled, ref[image_id][0], atol=1e-5, rtol=1e-5)
        if grids:
            torch.testing.assert_close(fmap, ref[image_id][2], atol=1e-5, rtol=1e-5)


class CountingFile(io.RawIOBase):
    """A file that counts the bytes read from it."""

    def __init__(self, path):
        self.file, self.read_bytes = open(path, "rb"), 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, offset, whence=0):
        return self.file.seek(offset, whence)

    def tell(self):
        return self.file.tell()

    def readinto(self, buffer):
        n = self.file.readinto(buffer)
        self.read_bytes += n
        return n

    def close(self):
        self.file.close()
        super().close()


def counting_opens(monkeypatch, module) -> list:
    """From now on `module.open_stream` opens a CountingFile; returns the list each one opened is appended to."""
    opened = []

    def counting_open(location):
        opened.append(CountingFile(location))
        return opened[-1]

    monkeypatch.setattr(module, "open_stream", counting_open)
    return opened
