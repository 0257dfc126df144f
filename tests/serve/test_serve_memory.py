"""A request's decoded images are released once preprocessed: the server's peak memory does not grow with the number
of large images in a request (a real `serve.py` child process; its peak resident memory, VmHWM, read from /proc).

A 20000x1000 grayscale PNG of one colour is ~20 KB to send, 20 MB decoded, and only a handful of patches: the
cheapest way for a client to make the server hold memory. Each image used to stay decoded until its whole request
was answered (16 of them: ~+390 MB); now each is closed once its pack is made, so the peak is about one decoded
image per worker thread, whatever the request holds.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
import PIL.Image
import pytest

from siglip_navit_tools import testing
from siglip_navit_tools.serve.process import ServerProcess

WIDTH, HEIGHT = 20000, 1000
DECODED_MB = WIDTH * HEIGHT / 2**20  # one image decoded (mode L: one byte a pixel), ~19 MB
WORKERS = 2


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return testing.tiny_converted_repo(testing.unique_dir(tmp_path_factory.mktemp("serve"), "serve_memory"))


def wide_png(shade: int) -> str:
    buffer = io.BytesIO()
    PIL.Image.new("L", (WIDTH, HEIGHT), shade).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_peak_memory_does_not_grow_with_the_images_of_a_request(repo):
    images = [wide_png(10 + 7 * i) for i in range(16)]
    with ServerProcess(repo, ["--dtype", "float32", "--workers", str(WORKERS)], env={"HF_HUB_OFFLINE": "1"}) as server:

        def peak_after(inputs: list[str]) -> float:
            body = {"model": repo.name, "input": inputs}
            response = httpx.post(server.url + "/v1/embeddings", json=body, timeout=120)
            assert response.status_code == 200, response.text
            assert len(response.json()["data"]) == len(inputs)
            return server.peak_rss_mb()

        peak_small = peak_after(images[:WORKERS])  # one image on each worker thread: the most that is ever decoded
        peak_large = peak_after(images)  # 16: eight times as many
        server.terminate()
    growth = peak_large - peak_small
    print(f"peak resident memory: {peak_small:.0f} MB after {WORKERS} images, {peak_large:.0f} MB after 16")
    # before: ~+24 MB per extra image (~+340 MB here); after: noise (allocator arenas), well under two images' worth
    assert growth < 2 * DECODED_MB, f"peak {peak_small:.0f} MB -> {peak_large:.0f} MB (+{growth:.0f} MB)"
