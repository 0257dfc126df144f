"""Every step of a request is bounded by its deadline (--request-timeout from arrival): the server's `run` (a step
on a worker thread: parsing the body, opening the images, encoding the response) answers 504 when the deadline
passes, however long the step itself goes on. The real `Server` over a real tiny model, without HTTP (the HTTP
timeouts are in test_serve_overload.py), because a step that outlasts the deadline on purpose is easiest to make here.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from siglip_navit_tools import testing
from siglip_navit_tools.serve.app import Record, Server
from siglip_navit_tools.serve.engine import Engine
from siglip_navit_tools.serve.options import ServeOptions
from siglip_navit_tools.serve.protocol import ApiError

WORKERS = 3


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = testing.unique_dir(tmp_path_factory.mktemp("serve"), "serve_deadlines")
    repo: Path = testing.tiny_converted_repo(folder)
    options = ServeOptions(model=str(repo), dtype="float32", device="cpu", workers=WORKERS, request_timeout=0.5)
    server = Server(Engine.load(options), options)
    server.start()
    yield server
    server.stop()


def test_a_step_longer_than_the_deadline_is_504_at_the_deadline(server):
    release = threading.Event()

    async def call() -> float:
        loop = asyncio.get_running_loop()
        record = Record("r", "/v1/features", deadline=loop.time() + 0.5)
        start = time.monotonic()
        with pytest.raises(ApiError) as caught:
            await server.run(record, server.body_pool, release.wait, 30)
        assert (caught.value.status, caught.value.code) == (504, "timeout")
        assert "--request-timeout 0.5 s" in caught.value.message
        return time.monotonic() - start

    try:
        seconds = asyncio.run(call())
    finally:
        release.set()
    assert 0.4 <= seconds < 2.0, seconds


def test_a_step_after_the_deadline_is_not_started(server):
    ran = []

    async def call() -> None:
        record = Record("r", "/v1/features", deadline=asyncio.get_running_loop().time() - 0.01)
        with pytest.raises(ApiError, match="--request-timeout"):
            await server.run(record, server.pool, ran.append, 1)

    asyncio.run(call())
    time.sleep(0.1)
    assert ran == []


def test_both_pools_are_sized_from_workers(server):
    """Bodies (32 MB of JSON in, a grid's base64 out) and images each get --workers threads: one large response
    does not hold up half of the others."""
    assert server.pool._max_workers == WORKERS and server.body_pool._max_workers == WORKERS
