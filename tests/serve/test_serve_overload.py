"""The server under more load than its queue holds, and requests that outlive their time or their client: a real
`serve.py` child process (one for the module) over HTTP.

- overload: a queue of 4,900 patches and a burst of 16 concurrent requests of 5 images: some get 503 with
  Retry-After at once, every 200 is still the model's forward on each image alone;
- a request larger than the whole queue: 413, never admitted;
- --request-timeout counts from arrival: a client that stops sending its body gets 504 (it cannot hold a slot);
- a client that disconnects while its images wait behind a long forward has them dropped from the queue: they are
  never encoded.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import re
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import PIL.Image
import pytest
import torch

from siglip_navit_tools import repo_code, testing
from siglip_navit_tools.serve.process import ServerProcess

TOL = 1e-5
QUEUE = 4900  # one 980 px image (the BAGEL processor's largest), three requests of 5 small images
TIMEOUT = 8.0  # generous: the whole suite may share two cores with others


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """Six layers: a 4,900-patch forward takes a second or more here (attention-bound), long enough to queue behind."""
    return testing.tiny_converted_repo(testing.unique_dir(tmp_path_factory.mktemp("serve"), "serve_overload"), layers=6)


@pytest.fixture(scope="module")
def server(repo):
    args = ["--dtype", "float32", "--max-patches-per-batch", str(QUEUE), "--max-queue-patches", str(QUEUE),
            "--request-timeout", str(TIMEOUT), "--workers", "2"]  # fmt: skip
    with ServerProcess(repo, args, env={"HF_HUB_OFFLINE": "1"}) as process:
        yield process


@pytest.fixture(scope="module")
def name(repo) -> str:
    return repo.name  # the default served name: the folder's


@pytest.fixture(scope="module")
def reference(repo):
    """Image bytes -> the model's forward on that image alone, pooled."""
    model = repo_code.modeling().SiglipVisionModel.from_pretrained(repo, **{testing.dtype_kwarg(): torch.float32})
    processor = repo_code.image_processing().SiglipNaViTImageProcessor.from_pretrained(repo)

    def pooled(data: bytes) -> torch.Tensor:
        inputs = processor(PIL.Image.open(io.BytesIO(data)))
        with torch.no_grad():
            return model.eval()(**inputs).last_hidden_state.mean(0)

    return pooled


def smooth_png(width: int, height: int, seed: int) -> bytes:
    """A smooth random image (small as a PNG at any size)."""
    coarse = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(coarse).resize((width, height), PIL.Image.BICUBIC).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    return {k: float(v) for k, v in re.findall(r"^(siglip_navit_\w+(?:\{[^}]*\})?) ([0-9.e+-]+)$", text, flags=re.M)}


def settle(url: str, timeout: float = 60.0) -> dict[str, float]:
    """The metrics once nothing is queued or in flight any more."""
    deadline = time.monotonic() + timeout
    while True:
        found = metrics(url)
        if found["siglip_navit_queue_patches"] == 0 and found["siglip_navit_requests_in_flight"] == 0:
            return found
        assert time.monotonic() < deadline, found
        time.sleep(0.05)


def test_overload_gets_503_with_retry_after_and_every_200_is_exact(server, name, reference):
    # 16 requests of 5 small images (1,280 patches): the queue holds three
    requests = [[smooth_png(224 + 3 * r, 224 + 2 * i, 10 * r + i) for i in range(5)] for r in range(16)]

    def call(images: list[bytes]) -> httpx.Response:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            return client.post("/v1/embeddings", json={"model": name, "input": [b64(d) for d in images]})

    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        responses = list(pool.map(call, requests))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, [r.text for r in responses if r.status_code not in (200, 503)]
    assert statuses.count(200) >= 1 and statuses.count(503) >= 1, statuses
    for response, images in zip(responses, requests):
        if response.status_code == 200:
            for item, data in zip(response.json()["data"], images):
                assert (torch.tensor(item["embedding"]) - reference(data)).abs().max().item() <= TOL
        else:
            error = response.json()["error"]
            assert (error["code"], error["type"]) == ("overloaded", "server_error"), error
            assert int(response.headers["retry-after"]) >= 1
            assert re.match(rf"the server is busy \(the queue holds \d+ of {QUEUE} patches; this request needs \d+\)",
                            error["message"]), error  # fmt: skip
    assert settle(server.url)["siglip_navit_queue_patches"] == 0


def test_a_request_larger_than_the_queue_is_413(server, name):
    big = b64(smooth_png(980, 980, 1))
    response = httpx.post(server.url + "/v1/embeddings", json={"model": name, "input": [big] * 3}, timeout=60)
    assert response.status_code == 413, response.text
    message = response.json()["error"]["message"]
    assert re.match(rf"the request's 14700 patches are more than the whole queue \({QUEUE}\)", message), message


def test_a_client_that_stops_sending_its_body_gets_504(server, name):
    body = json.dumps({"model": name, "input": [b64(smooth_png(300, 300, 2))]}).encode()
    url = urlparse(server.url)
    start = time.monotonic()
    with socket.create_connection((url.hostname, url.port), timeout=TIMEOUT * 4) as sock:
        head = (f"POST /v1/embeddings HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n")  # fmt: skip
        sock.sendall(head.encode() + body[: len(body) // 2])  # ... and the rest never comes
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    seconds = time.monotonic() - start
    status_line, _, rest = reply.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 504"), reply[:300]
    error = json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
    assert (error["code"], error["type"]) == ("timeout", "timeout_error")
    assert f"--request-timeout {TIMEOUT} s" in error["message"]
    assert TIMEOUT - 0.5 <= seconds < TIMEOUT + 10, seconds
    assert settle(server.url)["siglip_navit_requests_in_flight"] == 0


def test_a_client_that_leaves_has_its_waiting_images_dropped(server, name):
    """The client closes its connection once its request is admitted and waits behind a running forward: its images
    leave the queue and are never encoded."""
    before = settle(server.url)
    long_forward = [b64(smooth_png(980, 980, 3))]  # 4,900 patches: one forward of a second or more
    small = [b64(smooth_png(300, 300, 5 + i)) for i in range(3)]  # 441 patches each
    body = json.dumps({"model": name, "input": small}).encode()
    url = urlparse(server.url)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        busy = pool.submit(httpx.post, server.url + "/v1/embeddings", json={"model": name, "input": long_forward},
                           timeout=60)  # fmt: skip
        deadline = time.monotonic() + 30
        while metrics(server.url)["siglip_navit_forward_running_patches"] != 4900:  # the long forward is running
            assert time.monotonic() < deadline and not busy.done()
            time.sleep(0.005)
        with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
            head = (f"POST /v1/embeddings HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n")  # fmt: skip
            sock.sendall(head.encode() + body)
            while True:  # admitted: its 1,323 patches wait in the queue behind the running forward
                now = metrics(server.url)
                if now["siglip_navit_queue_patches"] == 3 * 441:
                    break
                assert time.monotonic() < deadline and not busy.done(), now
                time.sleep(0.005)
            assert now["siglip_navit_forward_running_patches"] == 4900  # still behind the long forward
        assert busy.result().status_code == 200
    after = settle(server.url)
    assert after["siglip_navit_images_total"] - before["siglip_navit_images_total"] == 1, (before, after)
    line = next(line for line in reversed(server.lines) if "client_gone" in line)
    assert re.search(r"status=499 images=3 patches=1323 .* client_gone not_started=3", line), line


def test_a_client_that_leaves_mid_upload_frees_its_slot_quietly(server, name):
    body = json.dumps({"model": name, "input": [b64(smooth_png(300, 300, 9))]}).encode()
    url = urlparse(server.url)
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        head = (f"POST /v1/embeddings HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n")  # fmt: skip
        sock.sendall(head.encode() + body[: len(body) // 3])
        deadline = time.monotonic() + 30
        while metrics(server.url)["siglip_navit_requests_in_flight"] != 1:
            assert time.monotonic() < deadline
            time.sleep(0.005)
    assert settle(server.url)["siglip_navit_requests_in_flight"] == 0
    time.sleep(0.2)
    line = next(line for line in reversed(server.lines) if "client_gone while sending" in line)
    assert re.search(r"status=499 images=0 ", line), line
    assert "Traceback" not in server.log(1000) and "status=500" not in server.log(1000)
