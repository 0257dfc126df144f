"""The image-embedding server, for real: `serve.py` in a child process on a free loopback port (one per module), a
tiny converted repo, and real clients over HTTP -- the `openai` client, `httpx`, and 24 concurrent clients.

Every embedding and feature grid is compared with the model's own forward on that image alone (fp32, max|diff| <=
1e-5), whatever it was packed with; the metrics show the packing; every bad input gets its documented status and
OpenAI's error shape, never a 500 or a stack trace; the API key guards every endpoint but /health."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import re
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import openai
import PIL.Image
import pytest
import torch

from siglip_navit_tools import repo_code, testing
from siglip_navit_tools.serve.options import API_KEY_ENV
from siglip_navit_tools.serve.process import ServerProcess

TOL = 1e-5
API_KEY = "key-" + uuid.uuid4().hex
NAME = "tiny-siglip"
MAX_IMAGES = 16


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return testing.tiny_converted_repo(testing.unique_dir(tmp_path_factory.mktemp("serve"), "serve_http"))


@pytest.fixture(scope="module")
def server(repo):
    args = ["--dtype", "float32", "--served-model-name", NAME, "--max-wait-ms", "50",
            "--max-images-per-request", str(MAX_IMAGES), "--workers", "2"]  # fmt: skip
    with ServerProcess(repo, args, env={API_KEY_ENV: API_KEY, "HF_HUB_OFFLINE": "1"}) as process:
        yield process


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def model_and_processor(repo):
    model = repo_code.modeling().SiglipVisionModel.from_pretrained(repo, **{testing.dtype_kwarg(): torch.float32})
    processor = repo_code.image_processing().SiglipNaViTImageProcessor.from_pretrained(repo)
    return model.eval(), processor


@pytest.fixture(scope="module")
def reference(model_and_processor):
    """Image file bytes -> the model's forward on that image alone: its (h, w, C) grid."""
    model, processor = model_and_processor

    def grid(data: bytes) -> torch.Tensor:
        inputs = processor(PIL.Image.open(io.BytesIO(data)))
        with torch.no_grad():
            return processor.unpack(model(**inputs).last_hidden_state, inputs)[0]

    return grid


# ---- images -------------------------------------------------------------------------------------------------------
def encode(image: PIL.Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def photo(width: int, height: int, seed: int) -> PIL.Image.Image:
    """A smooth colour field plus grain (compresses and decodes like a photo)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, height // 40), max(2, width // 40), 3), dtype=np.uint8)
    smooth = np.asarray(PIL.Image.fromarray(coarse).resize((width, height), PIL.Image.BICUBIC), dtype=np.int16)
    grain = rng.integers(-8, 9, (height, width, 3), dtype=np.int16)
    return PIL.Image.fromarray((smooth + grain).clip(0, 255).astype(np.uint8))


def mixed_images(n: int, seed: int = 0) -> list[bytes]:
    """Small (224-448 px) and photo-sized images, PNG and JPEG, some RGBA."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if (seed + i) % 8 == 7:
            w, h = int(rng.integers(560, 760)), int(rng.integers(420, 560))
        else:
            w, h = int(rng.integers(224, 449)), int(rng.integers(224, 449))
        image = photo(w, h, seed * 1000 + i)
        if i % 5 == 2:
            image = image.convert("RGBA")
        out.append(encode(image, "JPEG" if i % 3 == 1 and image.mode == "RGB" else "PNG"))
    return out


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def data_url(data: bytes) -> str:
    kind = "jpeg" if data[:2] == b"\xff\xd8" else "png"
    return f"data:image/{kind};base64,{b64(data)}"


def close(got, want: torch.Tensor, tol: float = TOL) -> None:
    got = torch.tensor(np.asarray(got, dtype=np.float32))
    assert got.shape == want.shape, (got.shape, want.shape)
    assert (got - want).abs().max().item() <= tol


def pooled(grid: torch.Tensor) -> torch.Tensor:
    return grid.flatten(0, 1).mean(0)


def metrics(client) -> dict[str, float]:
    text = client.get("/metrics").text
    found = re.findall(r"^(siglip_navit_\w+(?:\{[^}]*\})?) ([0-9.e+-]+)$", text, flags=re.M)
    return {name: float(value) for name, value in found}


def assert_error(response: httpx.Response, status: int, message: str, code=None, param=None) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert re.search(message, error["message"]), error["message"]
    assert "Traceback" not in response.text and 'File "' not in response.text
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error


# ---- the endpoints ------------------------------------------------------------------------------------------------
def test_health_needs_no_key_and_models_lists_the_served_model(server, client):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    listing = client.get("/v1/models").json()
    assert listing["object"] == "list" and [m["id"] for m in listing["data"]] == [NAME]
    assert listing["data"][0]["object"] == "model"


def test_openai_client_embeddings_equal_the_forward_alone(server, reference):
    images = mixed_images(6, seed=1)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    inputs = [data_url(d) if i % 2 else b64(d) for i, d in enumerate(images)]
    response = client.embeddings.create(model=NAME, input=inputs)  # the client asks for base64 and decodes it
    assert response.model == NAME and [item.index for item in response.data] == list(range(6))
    grids = [reference(d) for d in images]
    for item, grid in zip(response.data, grids):
        close(item.embedding, pooled(grid))
    patches = sum(g.shape[0] * g.shape[1] for g in grids)
    assert response.usage.prompt_tokens == response.usage.total_tokens == patches
    one = client.embeddings.create(model=NAME, input=b64(images[0]), encoding_format="float")  # a single string
    close(one.data[0].embedding, pooled(grids[0]))


def test_float_and_base64_encodings_carry_the_same_float32(client, reference):
    data = mixed_images(2, seed=2)
    want = [pooled(reference(d)) for d in data]
    floats = client.post("/v1/embeddings", json={"model": NAME, "input": [b64(d) for d in data]}).json()
    packed = client.post("/v1/embeddings", json={"model": NAME, "input": [b64(d) for d in data],
                                                 "encoding_format": "base64"}).json()  # fmt: skip
    assert floats["object"] == "list" and floats["data"][0]["object"] == "embedding"
    for f, p, w in zip(floats["data"], packed["data"], want):
        as_bytes = np.frombuffer(base64.b64decode(p["embedding"]), dtype="<f4")
        assert np.array_equal(np.asarray(f["embedding"], dtype=np.float32), as_bytes)
        close(as_bytes, w)


def test_features_endpoint_grids_pooled_and_float16(client, reference):
    data = mixed_images(4, seed=3)
    grids = [reference(d) for d in data]
    body = client.post("/v1/features", json={"model": NAME, "input": [b64(d) for d in data]}).json()
    for item, grid in zip(body["data"], grids):
        assert item["grid_hw"] == list(grid.shape[:2]) and item["dtype"] == "float32"
        got = np.frombuffer(base64.b64decode(item["features"]), dtype="<f4").reshape(item["shape"])
        close(got, grid)
    half = client.post("/v1/features", json={"model": NAME, "input": [b64(data[0])], "dtype": "float16"}).json()
    got = np.frombuffer(base64.b64decode(half["data"][0]["features"]), dtype="<f2").reshape(half["data"][0]["shape"])
    assert half["data"][0]["dtype"] == "float16"
    close(got, grids[0], tol=grids[0].abs().max().item() * 2**-10)  # fp16's rounding
    pool = client.post("/v1/features", json={"model": NAME, "input": [b64(data[1])], "pool": True}).json()
    close(np.frombuffer(base64.b64decode(pool["data"][0]["features"]), dtype="<f4"), pooled(grids[1]))
    assert body["usage"]["total_tokens"] == sum(g.shape[0] * g.shape[1] for g in grids)


def test_24_concurrent_mixed_requests_share_forwards_and_stay_exact(server, client, reference):
    requests = [mixed_images(1 + r % 2, seed=100 + r) for r in range(24)]
    before = metrics(client)

    def call(images: list[bytes]) -> tuple[int, dict]:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
            response = c.post("/v1/embeddings", json={"model": NAME, "input": [b64(d) for d in images]})
            return response.status_code, response.json()

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(call, requests))
    after = metrics(client)
    for (status, body), images in zip(answers, requests):
        assert status == 200, body
        for item, data in zip(body["data"], images):
            close(item["embedding"], pooled(reference(data)))
    images = sum(map(len, requests))
    forwards = after["siglip_navit_forwards_total"] - before["siglip_navit_forwards_total"]
    assert after["siglip_navit_images_total"] - before["siglip_navit_images_total"] == images
    assert 1 <= forwards < images, (forwards, images)
    assert after["siglip_navit_queue_patches"] == 0


def test_a_log_line_per_request(server, client):
    response = client.post("/v1/embeddings", json={"model": NAME, "input": [b64(mixed_images(1, 9)[0])] * 2})
    rid = response.headers["x-request-id"]
    time.sleep(0.2)
    line = next(line for line in server.lines if f"request {rid} " in line)
    assert re.search(r"/v1/embeddings status=200 images=2 patches=\d+ queue_wait_ms=[\d.]+ forward_ms=[\d.]+", line)


# ---- auth -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY},
                                     {"Authorization": f"Basic {API_KEY}"}])  # fmt: skip
def test_every_endpoint_but_health_needs_the_key(server, headers):
    for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/embeddings"),
                         ("POST", "/v1/features")):  # fmt: skip
        response = httpx.request(method, server.url + path, headers=headers, json={"model": NAME, "input": "x"})
        assert_error(response, 401, "missing or wrong API key", code="invalid_api_key")
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.embeddings.create(model=NAME, input=["x"])


# ---- bad input --------------------------------------------------------------------------------------------------
GOOD = b64(encode(photo(300, 240, 5)))
TRUNCATED = encode(photo(300, 240, 6))[:-200]


@pytest.mark.parametrize(
    "path, body, status, message, code, param",
    [
        ("/v1/embeddings", {"model": NAME, "input": [GOOD, "not base64!!"]}, 400, r"^input\[1\]: not valid base64",
         "invalid_image", "input"),
        ("/v1/embeddings", {"model": NAME, "input": [b64(b"hello world, not a picture")]}, 400,
         r"^input\[0\]: not an image", "invalid_image", "input"),
        ("/v1/embeddings", {"model": NAME, "input": [b64(TRUNCATED)]}, 400,
         r"^input\[0\]: the image data cannot be decoded", "invalid_image", "input"),
        ("/v1/embeddings", {"model": NAME, "input": [b64(b"%!PS-Adobe-3.0 EPSF-3.0\nshowpage\n")]}, 400,
         r"^input\[0\]: not an image", "invalid_image", "input"),
        ("/v1/embeddings", {"model": NAME, "input": ["/etc/hosts"]}, 400, r"^input\[0\]: not valid base64", None, None),
        ("/v1/embeddings", {"model": NAME, "input": ["https://example.com/cat.png"]}, 400,
         r"^input\[0\]: 'https://example.com/cat.png' is a URL; images are not fetched from URLs", "invalid_image",
         "input"),
        ("/v1/embeddings", {"model": NAME, "input": [GOOD] * (MAX_IMAGES + 1)}, 413,
         rf"^'input' holds {MAX_IMAGES + 1} images, more than max_images_per_request={MAX_IMAGES}$",
         "request_too_large", "input"),
        ("/v1/embeddings", {"model": NAME, "input": [GOOD], "dimensions": 8}, 400,
         r"does not support the field\(s\) \['dimensions'\]", "unsupported_parameter", "dimensions"),
        ("/v1/embeddings", {"model": NAME, "input": [GOOD], "encoding_format": "bits"}, 400,
         r"'encoding_format' must be one of \['float', 'base64'\]", None, "encoding_format"),
        ("/v1/embeddings", {"model": "other", "input": [GOOD]}, 404, r"the model 'other' does not exist",
         "model_not_found", "model"),
        ("/v1/embeddings", {"input": [GOOD]}, 400, r"'model' must name the served model", None, "model"),
        ("/v1/embeddings", {"model": NAME}, 400, r"'input' is missing", None, "input"),
        ("/v1/embeddings", {"model": NAME, "input": []}, 400, r"'input' is an empty list", None, "input"),
        ("/v1/embeddings", {"model": NAME, "input": [[101, 2023]]}, 400, r"^input\[0\]: expected an image .* got list",
         None, "input"),
        ("/v1/embeddings", {"model": NAME, "input": 3}, 400, r"'input' must be a string or a list of strings, got int",
         None, "input"),
        ("/v1/embeddings", [1, 2], 400, r"the request body must be a JSON object, got list", None, None),
        ("/v1/features", {"model": NAME, "input": [GOOD], "pool": "yes"}, 400, r"'pool' must be true or false", None,
         "pool"),
        ("/v1/features", {"model": NAME, "input": [GOOD], "dtype": "int8"}, 400, r"'dtype' must be one of", None,
         "dtype"),
    ],
)  # fmt: skip
def test_bad_requests_get_their_status_in_openais_shape(client, path, body, status, message, code, param):
    assert_error(client.post(path, json=body), status, message, code, param)


def test_bad_bodies_and_routes(client):
    assert_error(client.post("/v1/embeddings", content=b"{not json"), 400, r"not valid JSON", code="invalid_json")
    assert_error(client.post("/v1/embeddings", content=b"\xff\xfe"), 400, r"not valid JSON")
    deep = b"[" * 100_000 + b"]" * 100_000  # deeper than the JSON parser recurses
    assert_error(client.post("/v1/embeddings", content=deep), 400, r"not valid JSON \(RecursionError",
                 code="invalid_json")  # fmt: skip
    huge = b"x" * (32 * 1024 * 1024 + 1)
    assert_error(client.post("/v1/embeddings", content=huge), 413, r"more than --max-request-bytes",
                 code="request_too_large")  # fmt: skip
    assert_error(client.get("/v1/nowhere"), 404, r"Not Found")
    assert_error(client.get("/v1/embeddings"), 405, r"Method Not Allowed")


def test_a_decompression_bomb_is_refused_from_its_header(server, client):
    bomb = b64(testing.png_bomb(12000, 12000))  # 561 KB of base64, 432 MB decoded
    clear_refs = Path(f"/proc/{server.pid}/clear_refs")
    try:
        clear_refs.write_text("5")  # reset the server's peak RSS, so the growth below is this request's own
    except OSError:
        pass
    before = server.peak_rss_mb()
    start = time.perf_counter()
    response = client.post("/v1/embeddings", json={"model": NAME, "input": [GOOD, bomb]})
    seconds = time.perf_counter() - start
    assert_error(response, 413, r"^input\[1\]: the image is 12000x12000 = 144,000,000 pixels, more than "
                 r"max_image_pixels=50,000,000", code="request_too_large")  # fmt: skip
    assert seconds < 2.0, seconds  # decoding it alone takes seconds on this machine
    assert server.peak_rss_mb() - before < 100, (before, server.peak_rss_mb())
