# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""`serve(options)`: load the model, then serve it with uvicorn until SIGTERM / Ctrl-C, drain, and return 0.

Owns the order (check the options -> load the model and its processor -> warm up -> build the app -> run uvicorn)
and the shutdown contract: on SIGTERM or Ctrl-C, new requests get 503 while every accepted request finishes (up to
--drain-timeout), then the process exits 0. uvicorn's own `capture_signals` re-raises the signal after its graceful
shutdown (so a SIGTERM'd server would die of SIGTERM); `DrainingServer` keeps the graceful part and drops the
re-raise. A request still running at --drain-timeout is answered 503 (the app does that); the model thread gets only
the time the drain has left. Must not hold request handling (app) or packing (batcher).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from typing import Iterator, Optional

import uvicorn

from .app import Server, create_app
from .engine import Engine
from .options import API_KEY_ENV, ServeOptions, default_workers

logger = logging.getLogger("siglip_navit_tools.serve")
SHUTDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM)
LISTENING = "serve.py: listening on"  # + the URL, printed once the socket is bound


class DrainingServer(uvicorn.Server):
    """uvicorn's server, telling the app to drain on the first signal and NOT re-raising the signal afterwards."""

    def __init__(self, config: uvicorn.Config, app_server: Server):
        super().__init__(config)
        self.app_server = app_server

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in SHUTDOWN_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:  # the bound address, whatever the log level (with --port 0 the OS chose the port)
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            print(f"{LISTENING} http://{host}:{port}", file=sys.stderr, flush=True)

    def handle_exit(self, sig: int, frame) -> None:
        self.app_server.start_draining()
        super().handle_exit(sig, frame)


def serve(options: ServeOptions, api_key: Optional[str] = None, *, own_process: bool = False) -> int:
    """Serve `options.model` until SIGTERM / Ctrl-C; returns 0 after a graceful drain. `api_key` (default: the
    SIGLIP_NAVIT_API_KEY environment variable) makes every endpoint but /health require it. `own_process` (the
    command line: this process is the server's own): if a forward is still running when --drain-timeout is over,
    the process exits 0 at once instead of returning."""
    options.validate()
    if options.workers is None:
        options.workers = default_workers()
    api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
    engine = Engine.load(options)
    engine.warm_up()
    server = Server(engine, options, api_key)
    config = uvicorn.Config(
        create_app(server), host=options.host, port=options.port, log_level=options.log_level, access_log=False,
        timeout_graceful_shutdown=options.drain_timeout, lifespan="on",
    )  # fmt: skip
    logger.info(
        "serving %r (%s, %s on %s) with %s batching: budget %d patches, queue %d patches, %d workers%s",
        engine.name, options.model, str(next(engine.model.parameters()).dtype).removeprefix("torch."), engine.device,
        options.batching, options.max_patches_per_batch, options.max_queue_patches, options.workers,
        ", API key required" if api_key else "",
    )  # fmt: skip
    DrainingServer(config, server).run()
    logger.info("stopped")
    if own_process and server.model_busy:
        # the model thread (a daemon) is inside a forward whose requests were answered 503: a normal interpreter exit
        # would tear torch's thread pools down under it, and the C++ runtime aborts (SIGABRT), so leave right now
        _exit_now(0)
    return 0


def _exit_now(status: int) -> None:
    """Flush the log and the standard streams, then end the process without running interpreter teardown."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)
