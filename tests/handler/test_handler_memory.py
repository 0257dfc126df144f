"""The Inference Endpoints handler releases each decoded image once the pipeline has preprocessed it: a request's
memory does not grow with its number of large images (this process's resident memory, VmRSS from /proc, read each
time the pipeline preprocesses an image).

A 20000x1000 grayscale PNG of one colour is ~20 KB of base64 and 20 MB decoded: the request's images used to stay
decoded until the whole call returned (the handler's list held them), +20 MB per image; now the handler closes each
one it opened when the pipeline asks for the next. A PIL image given by the caller is the caller's: not closed.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import re
from pathlib import Path

import PIL.Image
import pytest
import torch

from siglip_navit_tools import testing
from siglip_navit_tools.io.files import read_regular_text

WIDTH, HEIGHT = 20000, 1000
DECODED_MB = WIDTH * HEIGHT / 2**20  # one image decoded (mode L: one byte a pixel), ~19 MB
IMAGES = 12


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return testing.saved_repo(testing.unique_dir(tmp_path_factory.mktemp("memory"), "handler_memory"),
                              testing.tiny_config())  # fmt: skip


@pytest.fixture(scope="module")
def handler(repo):
    spec = importlib.util.spec_from_file_location("handler", repo / "handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.EndpointHandler(str(repo), dtype=torch.float32)


def resident_mb() -> float:
    return int(re.search(r"VmRSS:\s+(\d+)", read_regular_text("/proc/self/status")).group(1)) / 1024


def wide_png(shade: int) -> str:
    buffer = io.BytesIO()
    PIL.Image.new("L", (WIDTH, HEIGHT), shade).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture
def resident_at_each_image(handler, monkeypatch) -> list[float]:
    """VmRSS each time the pipeline preprocesses an image (by then every earlier image has been decoded)."""
    seen: list[float] = []
    preprocess = handler.pipeline.preprocess

    def spy(image, *args, **kwargs):
        seen.append(resident_mb())
        return preprocess(image, *args, **kwargs)

    monkeypatch.setattr(handler.pipeline, "preprocess", spy)
    return seen


def test_a_requests_decoded_images_do_not_pile_up(handler, resident_at_each_image):
    out = handler({"inputs": [wide_png(10 + 7 * i) for i in range(IMAGES)], "parameters": {"pool": True}})
    assert len(out) == IMAGES
    seen = resident_at_each_image
    assert len(seen) == IMAGES
    growth = max(seen) - seen[0]
    print(f"resident memory at each image: {seen[0]:.0f} MB first, {max(seen):.0f} MB at most")
    # before: +20 MB per image (~+200 MB by the last); after: the memory of one image, reused
    assert growth < 2 * DECODED_MB, f"resident memory {seen[0]:.0f} MB at the first image, {max(seen):.0f} MB later"


def test_images_the_caller_gave_are_not_closed_and_opened_ones_are(handler, monkeypatch):
    given = PIL.Image.new("RGB", (30, 20), (200, 10, 10))
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (20, 30), (10, 200, 10)).save(buffer, format="PNG")
    seen = []
    preprocess = handler.pipeline.preprocess

    def spy(image, *args, **kwargs):
        seen.append(image)
        return preprocess(image, *args, **kwargs)

    monkeypatch.setattr(handler.pipeline, "preprocess", spy)
    out = handler({"inputs": [given, base64.b64encode(buffer.getvalue()).decode()]})
    assert len(out) == 2 and seen[0] is given
    assert given.getpixel((0, 0)) == (200, 10, 10)  # still usable: the caller's image is the caller's
    with pytest.raises(ValueError, match="closed"):  # the one the handler opened from base64 is freed
        seen[1].getpixel((0, 0))
