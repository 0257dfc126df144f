"""A request still running when `--drain-timeout` expires: it gets 503 `shutting_down` in OpenAI's error shape (logged
and counted like any other answer, never uvicorn's plain-text 500 with a CancelledError traceback), and the process
exits 0 about `--drain-timeout` after SIGTERM (not twice that: the model thread is given only the time left).

A real `serve.py` child process with a six-layer tiny model: ten 980x980 images (4,900 patches each, one forward of
a second or more apiece, three to a forward) take far longer than the 2 s drain, and the forward running when it
expires still has seconds to go."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import re
import time
from pathlib import Path

import httpx
import numpy as np
import PIL.Image
import pytest

from siglip_navit_tools import testing
from siglip_navit_tools.serve.process import ServerProcess

DRAIN = 2.0
SLACK = 2.5  # seconds past the drain: tearing down (the pools, the interpreter) on two shared cores


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    folder = testing.unique_dir(tmp_path_factory.mktemp("serve"), "serve_drain_timeout")
    return testing.tiny_converted_repo(folder, layers=6)


def smooth_png(side: int, seed: int) -> str:
    coarse = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(coarse).resize((side, side), PIL.Image.BICUBIC).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def gauge(url: str, name: str) -> float:
    return float(re.search(rf"^{name} ([0-9.e+-]+)$", httpx.get(url + "/metrics").text, flags=re.M).group(1))


def test_a_request_cut_by_the_drain_timeout_gets_503_and_the_exit_is_prompt(repo):
    images = [smooth_png(980, seed) for seed in range(10)]
    args = ["--dtype", "float32", "--drain-timeout", str(DRAIN), "--workers", "2"]
    with ServerProcess(repo, args, env={"HF_HUB_OFFLINE": "1"}) as server:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            slow = pool.submit(httpx.post, server.url + "/v1/embeddings",
                               json={"model": repo.name, "input": images}, timeout=120)  # fmt: skip
            deadline = time.monotonic() + 60
            while gauge(server.url, "siglip_navit_forward_running_patches") == 0:  # its first forward runs
                assert time.monotonic() < deadline and not slow.done()
                time.sleep(0.01)
            signalled = time.monotonic()
            server.process.send_signal(15)
            response = slow.result()
            answered = time.monotonic() - signalled
            status = server.process.wait(60)
            exited = time.monotonic() - signalled
        server.terminate()
    log = server.log(400)
    print(f"SIGTERM -> answer {answered:.1f} s ({response.status_code}), exit {exited:.1f} s (status {status})")
    assert status == 0, log
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "shutting_down"), error
    assert f"--drain-timeout {DRAIN}" in error["message"], error
    assert DRAIN - 0.5 <= answered < DRAIN + SLACK, answered
    assert exited < DRAIN + SLACK, (exited, log)
    assert re.search(r"request \w+ /v1/embeddings status=503 images=10 patches=49000 .* drain_timeout", log), log
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log
