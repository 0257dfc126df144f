"""Stopping the server, and starting it wrong.

- SIGTERM under load: every request already accepted finishes with the right answer, new connections are refused
  (or answered 503), and the process exits 0 (uvicorn re-raises the signal after its graceful shutdown; ours does
  not). The server runs `--batching none` (the baseline: each request in its own forwards, even when concurrent).
- Usage errors: one line naming the flag, exit status 2, before any model is loaded or socket bound.
"""

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
import torch

from siglip_navit_tools import repo_code, testing
from siglip_navit_tools.serve.cli import main
from siglip_navit_tools.serve.process import ServerProcess

TOL = 1e-5


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return testing.tiny_converted_repo(testing.unique_dir(tmp_path_factory.mktemp("serve"), "serve_shutdown"))


def photo_png(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 32, width // 32, 3), dtype=np.uint8)
    pixels = np.asarray(PIL.Image.fromarray(coarse).resize((width, height), PIL.Image.BICUBIC), dtype=np.int16)
    pixels = (pixels + rng.integers(-6, 7, pixels.shape)).clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    return {k: float(v) for k, v in re.findall(r"^(siglip_navit_\w+(?:\{[^}]*\})?) ([0-9.e+-]+)$", text, flags=re.M)}


def test_sigterm_under_load_drains_accepted_requests_and_exits_0(repo):
    model = repo_code.modeling().SiglipVisionModel.from_pretrained(repo, **{testing.dtype_kwarg(): torch.float32})
    processor = repo_code.image_processing().SiglipNaViTImageProcessor.from_pretrained(repo)
    photos = [photo_png(640, 480, seed) for seed in range(6)]  # ~1,600 patches each: a forward of a second or so
    with ServerProcess(repo, ["--dtype", "float32", "--batching", "none", "--workers", "2"],
                       env={"HF_HUB_OFFLINE": "1"}) as server:  # fmt: skip
        name = repo.name

        def call(data: bytes) -> httpx.Response:
            body = {"model": name, "input": [base64.b64encode(data).decode()]}
            return httpx.post(server.url + "/v1/embeddings", json=body, timeout=120)

        # the baseline under concurrency: three concurrent one-image requests, three forwards
        before = metrics(server.url)
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            assert [r.status_code for r in pool.map(call, photos[:3])] == [200] * 3
        forwards = metrics(server.url)["siglip_navit_forwards_total"] - before["siglip_navit_forwards_total"]
        assert forwards == 3

        with concurrent.futures.ThreadPoolExecutor(len(photos)) as pool:
            futures = [pool.submit(call, data) for data in photos]
            deadline = time.monotonic() + 60
            # every request accepted (in flight, or already answered on a slow client machine), several still waiting
            while True:
                in_flight = metrics(server.url)["siglip_navit_requests_in_flight"]
                if in_flight + sum(f.done() for f in futures) >= len(photos):
                    break
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert in_flight >= 3, in_flight  # a forward takes ~1 s: at most a few were answered meanwhile
            server.process.send_signal(15)  # SIGTERM, with six requests accepted and most still waiting
            late = None
            time.sleep(0.3)
            try:
                late = httpx.post(server.url + "/v1/embeddings", json={"model": name, "input": ["x"]}, timeout=30)
            except httpx.TransportError:
                pass  # the listener is closed: refused
            responses = [f.result() for f in futures]
        deadline = time.monotonic() + 120
        while not any(line.endswith(" INFO stopped") for line in server.lines):  # drained; tearing down
            assert time.monotonic() < deadline and server.process.poll() in (None, 0), server.log()
            time.sleep(0.01)
        server.process.send_signal(15)  # a repeat while it tears down (process managers repeat) changes nothing
        status = server.process.wait(120)
    assert status == 0, server.log()
    assert late is None or late.status_code == 503, late.text
    for response, data in zip(responses, photos):
        assert response.status_code == 200, response.text
        inputs = processor(PIL.Image.open(io.BytesIO(data)))
        with torch.no_grad():
            want = model.eval()(**inputs).last_hidden_state.mean(0)
        assert (torch.tensor(response.json()["data"][0]["embedding"]) - want).abs().max().item() <= TOL
    log = server.log(400)
    assert "draining: finishing accepted requests, refusing new ones" in log
    assert len(re.findall(r"/v1/embeddings status=200 images=1 ", log)) == 3 + len(photos)
    assert "Traceback" not in log


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max-queue-patches", "100"], r"--max-queue-patches \(100\) must hold at least one full forward"),
        (["--max-wait-ms", "-1"], r"--max-wait-ms must be a finite number >= 0, got -1.0"),
        (["--request-timeout", "0"], r"--request-timeout must be more than 0 seconds"),
        (["--max-image-pixels", "0"], r"--max-image-pixels must be a positive integer, got 0"),
        (["--workers", "0"], r"--workers must be a positive number of threads, got 0"),
        (["--port", "70000"], r"--port must be in 0..65535, got 70000"),
        (["--device", "cuda:7"], r"--device 'cuda:7': this machine has (no cuda device|\d+ cuda device\(s\))"),
        (["--device", "foo"], r"--device 'foo' is not a torch device"),
        (["--device", "meta"], r"--device 'meta' holds no data"),
        (["--max-patches-per-batch", "1000"], r"--max-patches-per-batch 1000 cannot hold the largest image this "
                                              r"model's processor makes \(4900 patches\)"),
    ],
)  # fmt: skip
def test_usage_errors_are_one_line_and_exit_2(repo, capsys, args, message):
    assert main(["--model", str(repo), "--dtype", "float32", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(rf"serve.py: error: {message}", err[0]), err


def test_a_model_that_cannot_be_loaded_is_a_usage_error(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "nowhere"), "--dtype", "float32"]) == 2
    err = capsys.readouterr().err
    assert "serve.py: error: --model" in err and "could not be loaded" in err and "Traceback" not in err
