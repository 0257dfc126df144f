"""Small promises of the server, over HTTP to a real `serve.py` child process: every response carries its request id
in `x-request-id` (/health, /metrics, unknown paths and wrong methods too; a handled request's id is the one its log
line names); `"pool": null` in /v1/features means the default, as `"dtype": null` does; and `--model .` serves the
model under the folder's name, never '.'."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import httpx
import numpy as np
import PIL.Image
import pytest

from siglip_navit_tools import testing
from siglip_navit_tools.serve.options import ServeOptions
from siglip_navit_tools.serve.process import ServerProcess


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return testing.tiny_converted_repo(testing.unique_dir(tmp_path_factory.mktemp("serve"), "serve_request_ids"))


@pytest.fixture(scope="module")
def server(repo):
    """Started in the model folder with `--model .`, as a user standing in it would."""
    with ServerProcess(".", ["--dtype", "float32", "--workers", "1"], env={"HF_HUB_OFFLINE": "1"}, cwd=repo) as process:
        yield process


def png(seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize(
    "method, path, status",
    [("GET", "/health", 200), ("GET", "/metrics", 200), ("GET", "/v1/models", 200), ("GET", "/nowhere", 404),
     ("GET", "/v1/embeddings", 405), ("POST", "/v1/embeddings", 400)],
)  # fmt: skip
def test_every_response_carries_a_request_id(server, method, path, status):
    response = httpx.request(method, server.url + path, content=b"{}", timeout=60)
    assert response.status_code == status, response.text
    assert re.fullmatch(r"[0-9a-f]{16}", response.headers.get("x-request-id", "")), dict(response.headers)
    assert response.headers.get_list("x-request-id") == [response.headers["x-request-id"]]  # once


def test_the_request_id_is_the_one_the_log_names(server, repo):
    body = {"model": repo.name, "input": [png(0)]}
    response = httpx.post(server.url + "/v1/embeddings", json=body, timeout=60)
    assert response.status_code == 200, response.text
    rid = response.headers["x-request-id"]
    ids = [httpx.get(server.url + "/health").headers["x-request-id"] for _ in range(3)]
    assert len(set(ids + [rid])) == 4  # a new id each time
    assert any(re.search(rf"request {rid} /v1/embeddings status=200 images=1 ", line) for line in server.lines)


def test_model_dot_is_served_under_the_folders_name(server, repo):
    assert httpx.get(server.url + "/v1/models").json()["data"][0]["id"] == repo.name


def test_model_name_of_a_relative_folder(tmp_path, monkeypatch):
    (tmp_path / "my-model").mkdir()
    monkeypatch.chdir(tmp_path / "my-model")
    assert ServeOptions(model=".").model_name() == "my-model"
    assert ServeOptions(model="./").model_name() == "my-model"
    assert ServeOptions(model="..").model_name() == tmp_path.name
    assert ServeOptions(model="org/not-here").model_name() == "org/not-here"  # a Hub id, as it is


def test_pool_null_means_the_default(server, repo):
    image = png(1)
    answers = {}
    for pool in (None, False, True):
        body = {"model": repo.name, "input": [image], "pool": pool, "dtype": None}
        response = httpx.post(server.url + "/v1/features", json=body, timeout=60)
        assert response.status_code == 200, response.text
        answers[pool] = response.json()["data"][0]
    assert answers[None] == answers[False]
    assert answers[None]["shape"] == [*answers[None]["grid_hw"], answers[True]["shape"][0]]
