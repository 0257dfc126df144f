# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""The HTTP layer: a FastAPI app with the endpoints, auth, OpenAI-shaped errors, metrics and a log line per request.

    POST /v1/embeddings   OpenAI's embeddings API (the `openai` client works unchanged): pooled float32 vectors
    POST /v1/features     per-image (h, w, C) grids (or pooled vectors) as base64 little-endian bytes
    GET  /v1/models       OpenAI's model list: the served model
    GET  /health          200 while serving (no auth); 503 once draining
    GET  /metrics         Prometheus text

A request's path: auth -> draining / concurrency -> body (bounded) -> JSON parsed on a body thread -> fields ->
images opened on a worker thread (base64 decoded, limits, patch grids from headers) -> admitted to the batcher (503 +
Retry-After if the queue would overflow) -> each image decoded and preprocessed on a worker thread, then queued (and
closed: its pixels freed) -> the model thread packs it -> the response is encoded on a body thread. Nothing heavy runs
on the event loop, and every step is awaited no longer than the request's deadline (--request-timeout: 504). Owns
the order of these steps, the status codes and the metrics; must not parse image data (handler.py's format, through
`Engine`), pack images (`Batcher`) or run the model (`Engine`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from . import protocol
from .batcher import DROPPED, PREPARING, Batcher, Closed, QueueFull, Ticket, TooLarge, Waiting
from .engine import BadImage, Engine, OverLimit, Prepared, RequestImages
from .options import ServeOptions
from .protocol import ApiError

logger = logging.getLogger("siglip_navit_tools.serve")

DISCONNECT_POLL_SECONDS = 0.1  # how often a waiting request checks that its client is still there
STOP_GRACE_SECONDS = 0.2  # past --drain-timeout, for a model thread finishing up (after that: exit regardless)
PATCH_BUCKETS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """The Prometheus metrics of one app, in their own registry."""

    def __init__(self, batcher: Batcher):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("siglip_navit_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.images = Counter("siglip_navit_images", "images encoded", registry=r)
        self.patches = Counter("siglip_navit_patches", "patches encoded", registry=r)
        self.forwards = Counter("siglip_navit_forwards", "packed forwards run", registry=r)
        self.queue_patches = Gauge("siglip_navit_queue_patches", "patches admitted, not yet in a forward", registry=r)
        self.queue_patches.set_function(lambda: batcher.queued_patches)
        self.running = Gauge("siglip_navit_forward_running_patches", "patches in the forward now running", registry=r)
        self.running.set_function(lambda: batcher.running_patches)
        self.in_flight = Gauge("siglip_navit_requests_in_flight", "requests being handled", registry=r)
        self.request_seconds = Histogram(
            "siglip_navit_request_seconds", "request latency", ["endpoint"], buckets=SECONDS_BUCKETS, registry=r
        )
        self.forward_patches = Histogram(
            "siglip_navit_forward_patches", "patches per forward", buckets=PATCH_BUCKETS, registry=r
        )
        self.forward_seconds = Histogram(
            "siglip_navit_forward_seconds", "seconds per forward", buckets=SECONDS_BUCKETS, registry=r
        )
        self.budget = Gauge("siglip_navit_max_patches_per_batch", "token budget of one forward", registry=r)
        self.budget.set(batcher.budget)

    def forward_ran(self, items: list[Waiting], seconds: float) -> None:
        patches = sum(item.patches for item in items)
        self.forwards.inc()
        self.images.inc(len(items))
        self.patches.inc(patches)
        self.forward_patches.observe(patches)
        self.forward_seconds.observe(seconds)


@dataclass
class Record:
    """What the log line of one request says."""

    request_id: str
    endpoint: str
    deadline: float = 0.0  # event-loop time by which it must be answered (--request-timeout from its arrival)
    images: int = 0
    patches: int = 0
    ticket: Optional[Ticket] = None
    status: int = 0
    notes: list = field(default_factory=list)


class ClientGone(Exception):
    """The client disconnected while its request waited."""


class Server:
    """One app's state: the engine, the batcher, the worker pool, the metrics and the draining flag."""

    def __init__(self, engine: Engine, options: ServeOptions, api_key: Optional[str] = None):
        self.engine, self.options = engine, options
        self.api_key = api_key.encode() if api_key else None
        self.batcher = Batcher(
            engine.forward, options.max_patches_per_batch, options.max_queue_patches, options.max_wait_ms / 1000,
            mode=options.batching,
        )  # fmt: skip
        self.metrics = Metrics(self.batcher)
        self.batcher.on_forward = self.metrics.forward_ran
        # decoding a request's images (base64, headers, then pixels) and preprocessing them: --workers threads
        self.pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
        # parsing bodies and encoding responses (up to --max-request-bytes of JSON in, a feature grid's base64 out),
        # another --workers threads: a packed forward finishes many requests at once, and their answers should not
        # queue behind other requests' images
        self.body_pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self.workers = options.workers
        self.draining = False
        self.drain_deadline: Optional[float] = None  # time.monotonic() by which shutdown must be over (--drain-timeout)
        self.in_flight = 0
        self.model_busy = False  # after stop(): the model thread was still inside a forward nobody waits for
        self.created = int(time.time())

    # ---- lifecycle --------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.pool = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="siglip-navit-prepare")
        self.body_pool = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="siglip-navit-body")
        self.batcher.start()

    def stop(self) -> None:
        """After uvicorn's graceful shutdown (every request answered, or cut at --drain-timeout): finish whatever is
        still admitted in the time the drain has left (nobody waits for it any more), stop the threads."""
        self.start_draining()
        left = max(0.0, self.drain_deadline - time.monotonic())
        for pool in (self.pool, self.body_pool):  # images not yet being prepared are never needed now
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        self.model_busy = not self.batcher.close(timeout=left + STOP_GRACE_SECONDS)
        if self.model_busy:
            logger.warning("the model thread was still busy after --drain-timeout; exiting anyway")

    def start_draining(self) -> None:
        """SIGTERM / Ctrl-C: new requests get 503 from now on; accepted ones finish (until --drain-timeout)."""
        if not self.draining:
            logger.info("draining: finishing accepted requests, refusing new ones")
            self.drain_deadline = time.monotonic() + self.options.drain_timeout
        self.draining = True

    async def run(self, record: Record, pool: concurrent.futures.Executor, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` on a thread of `pool` (never on the event loop), awaited no longer than the request's deadline:
        504 then (the thread finishes its step; its result is dropped)."""
        loop = asyncio.get_running_loop()
        remaining = record.deadline - loop.time()
        if remaining <= 0:
            raise self._timeout()
        try:
            return await asyncio.wait_for(loop.run_in_executor(pool, fn, *args), remaining)
        except asyncio.TimeoutError:
            raise self._timeout() from None

    # ---- one request --------------------------------------------------------------------------------------------
    async def handle(
        self, request: Request, endpoint: str, work: Callable[[Request, Record], Awaitable[Response]], *, admit=True
    ) -> Response:
        """Auth, draining and concurrency checks around `work`, its errors in OpenAI's shape, metrics, the log line."""
        loop = asyncio.get_running_loop()
        request_id = getattr(request.state, "request_id", None) or new_request_id()  # RequestIds gave it one
        record = Record(request_id, endpoint, deadline=loop.time() + self.options.request_timeout)
        start = time.perf_counter()
        counted = False
        try:
            self.check_auth(request)
            if admit:
                if self.draining:
                    raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down",
                                   headers={"Retry-After": "1"})  # fmt: skip
                if self.in_flight >= self.options.max_concurrent_requests:
                    raise ApiError(503, f"the server is handling {self.in_flight} requests, its limit "
                                   "(--max-concurrent-requests); retry later", type="server_error",
                                   code="overloaded", headers={"Retry-After": "1"})  # fmt: skip
                self.in_flight += 1
                self.metrics.in_flight.inc()
                counted = True
            response = await work(request, record)
        except ApiError as err:
            response = JSONResponse(err.body(), status_code=err.status, headers=err.headers)
        except ClientGone:
            response = Response(status_code=499)  # nginx's "client closed request": nobody reads it
        except asyncio.CancelledError:
            if not self.draining:
                raise
            # uvicorn cancels what still runs at --drain-timeout: answer it (the connection is still open), log it
            _uncancel()
            record.notes.append("drain_timeout")
            error = ApiError(503, f"the server shut down before this request finished (--drain-timeout "
                             f"{self.options.drain_timeout} s); retry it", type="server_error", code="shutting_down",
                             headers={"Retry-After": "1"})  # fmt: skip
            response = JSONResponse(error.body(), status_code=error.status, headers=error.headers)
        except Exception:  # noqa: BLE001 - never a stack trace to the client; the log has it
            logger.exception("request %s failed", record.request_id)
            response = JSONResponse(
                ApiError(500, f"internal error (request {record.request_id}; see the server log)", type="server_error",
                         code="internal_error").body(), status_code=500)  # fmt: skip
        finally:
            if counted:
                self.in_flight -= 1
                self.metrics.in_flight.dec()
        seconds = time.perf_counter() - start
        self.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        if admit:
            self.metrics.request_seconds.labels(endpoint).observe(seconds)
            self.log(record, response.status_code, seconds)
        return response

    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})  # fmt: skip

    def log(self, record: Record, status: int, seconds: float) -> None:
        ticket = record.ticket
        wait = ticket.queue_wait * 1000 if ticket else 0.0
        forward = ticket.forward_seconds * 1000 if ticket else 0.0
        forwards = ticket.forwards if ticket else 0
        logger.info(
            "request %s %s status=%d images=%d patches=%d queue_wait_ms=%.1f forward_ms=%.1f forwards=%d "
            "seconds=%.3f%s",
            record.request_id, record.endpoint, status, record.images, record.patches, wait, forward, forwards,
            seconds, "".join(f" {note}" for note in record.notes),
        )  # fmt: skip

    async def read_json(self, request: Request, record: Record) -> Any:
        """The body, at most --max-request-bytes (413), by the request's deadline (504: a client trickling its body
        cannot hold a slot for ever), parsed on a worker thread."""
        limit = self.options.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise protocol.bad_request(f"bad Content-Length header {declared[:40]!r}")
            if int(declared) > limit:
                raise _too_large(
                    f"the request body is {int(declared):,} bytes, more than --max-request-bytes {limit:,}"
                )

        async def read() -> bytes:
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _too_large(f"the request body is more than --max-request-bytes {limit:,} bytes")
                chunks.append(chunk)
            return b"".join(chunks)

        try:
            body = await asyncio.wait_for(read(), max(0.0, record.deadline - asyncio.get_running_loop().time()))
        except asyncio.TimeoutError:
            raise self._timeout() from None
        except ClientDisconnect:  # the client left while sending its body
            record.notes.append("client_gone while sending")
            raise ClientGone() from None
        return await self.run(record, self.body_pool, protocol.parse_json, body)

    def _timeout(self) -> ApiError:
        return ApiError(504, f"the request took more than --request-timeout {self.options.request_timeout} s",
                        type="timeout_error", code="timeout")  # fmt: skip

    def check_model(self, name: str) -> None:
        if name != self.engine.name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {self.engine.name!r}",
                           param="model", code="model_not_found")  # fmt: skip

    async def encode(self, request: Request, record: Record, inputs: list, output: str) -> tuple[RequestImages, list]:
        """Open, admit, prepare and encode a request's images; returns (the images, one result per image)."""
        try:
            images = await self.run(record, self.pool, self.engine.open_images, inputs, output == "pooled")
        except OverLimit as err:
            raise _too_large(str(err), param="input") from err
        except BadImage as err:
            raise protocol.bad_request(str(err), param="input", code="invalid_image") from err
        record.images, record.patches = len(images.images), sum(images.patches)
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def on_done(ticket: Ticket) -> None:  # on the model thread (or a worker thread, for a failure)
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(ticket))

        try:
            ticket = self.batcher.admit(record.request_id, images.patches, on_done)
        except QueueFull as err:
            raise ApiError(503, f"the server is busy ({err}); retry after {err.retry_after} s", type="server_error",
                           code="overloaded", headers={"Retry-After": str(err.retry_after)}) from err  # fmt: skip
        except TooLarge as err:
            raise _too_large(str(err), param="input") from err
        except Closed as err:
            raise ApiError(503, str(err), type="server_error", code="shutting_down",
                           headers={"Retry-After": "1"}) from err  # fmt: skip
        record.ticket = ticket
        opened = images.hand_over()  # each work item holds its image until it is preprocessed, then closes it
        for index, (where, grid) in enumerate(zip(images.where, images.grids)):
            image, opened[index] = opened[index], None
            self.pool.submit(self.prepare, ticket, index, image, where, grid, output)
        del opened, image
        try:
            await self.wait(request, record, ticket, done)
        except asyncio.CancelledError:  # uvicorn gave up on it (--drain-timeout): its queued images leave the queue
            self.batcher.cancel(ticket)
            raise
        if ticket.error is not None:
            raise _error_response(ticket.error, record)
        return images, ticket.results

    def prepare(self, ticket: Ticket, index: int, image: Any, where: str, grid: tuple, output: str) -> None:
        """Worker thread: decode + preprocess one image and queue it; a failure fails its request."""
        if ticket.cancelled:
            image.close()
            self.batcher.abandon(ticket, index)
            return
        try:
            prepared: Prepared = self.engine.prepare(image, where, grid, output)
        except Exception as exc:  # noqa: BLE001 - reported to the request (BadImage: 400; anything else: 500)
            self.batcher.abandon(ticket, index)
            self.batcher.fail(ticket, exc)
            return
        self.batcher.put(ticket, index, prepared)

    async def wait(self, request: Request, record: Record, ticket: Ticket, done: asyncio.Future) -> None:
        """Until the ticket is done; 504 at the request's deadline; a client that leaves has its images dropped
        (in both cases the images that had not started a forward leave the queue)."""
        loop = asyncio.get_running_loop()
        while not done.done():
            remaining = record.deadline - loop.time()
            if remaining <= 0:
                self.batcher.cancel(ticket)
                record.notes.append(f"not_started={_not_started(ticket)}")
                raise self._timeout()
            await asyncio.wait({done}, timeout=min(DISCONNECT_POLL_SECONDS, remaining))
            if not done.done() and await request.is_disconnected():
                self.batcher.cancel(ticket)
                record.notes.append(f"client_gone not_started={_not_started(ticket)}")
                raise ClientGone()


def _uncancel() -> None:
    """The current task caught its cancellation and carries on (to answer its request): clear the request."""
    task = asyncio.current_task()
    if task is not None and hasattr(task, "uncancel"):  # Python 3.11+
        task.uncancel()


def _not_started(ticket: Ticket) -> int:
    """Images of a cancelled request that never reached a forward (dropped from the queue, or never queued)."""
    return sum(state in (DROPPED, PREPARING) for state in ticket.states)


def _too_large(message: str, param: Optional[str] = None) -> ApiError:
    return ApiError(413, message, param=param, code="request_too_large")


def _error_response(error: BaseException, record: Record) -> Exception:
    """A failed request's error as the client should see it: a bad image 400, a limit 413, anything else 500."""
    if isinstance(error, BadImage):
        return protocol.bad_request(str(error), param="input", code="invalid_image")
    if isinstance(error, OverLimit):
        return _too_large(str(error), param="input")
    record.notes.append(f"error={type(error).__name__}")
    logger.error("request %s failed: %s: %s", record.request_id, type(error).__name__, error)
    return ApiError(500, f"internal error (request {record.request_id}; see the server log)", type="server_error",
                    code="internal_error")  # fmt: skip


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


class RequestIds:
    """ASGI middleware: every HTTP request gets an id (`request.state.request_id`, the one its log line names) and
    every response carries it in `x-request-id`: /health, unknown paths and wrong methods included. Plain ASGI, not
    Starlette's BaseHTTPMiddleware, which runs the endpoint in another task (cancellation and streaming suffer)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", request_id.encode())]}
            await send(message)

        await self.app(scope, receive, send_with_id)


# --------------------------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------------------------
def create_app(server: Server) -> FastAPI:
    """The FastAPI app over `server` (its threads start and stop with the app's lifespan)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        server.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, server.stop)

    app = FastAPI(title="siglip-navit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_middleware(RequestIds)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:  # unknown path, method
        error = ApiError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)
        return JSONResponse(error.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        error = ApiError(500, "internal error (see the server log)", type="server_error", code="internal_error")
        return JSONResponse(error.body(), status_code=500)

    @app.get("/health")
    async def health() -> JSONResponse:
        if server.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok", "model": server.engine.name})

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        async def work(request: Request, record: Record) -> Response:
            return JSONResponse(protocol.models_body(server.engine.name, server.created))

        return await server.handle(request, "/v1/models", work, admit=False)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        async def work(request: Request, record: Record) -> Response:
            return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

        return await server.handle(request, "/metrics", work, admit=False)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        async def work(request: Request, record: Record) -> Response:
            parsed = protocol.parse_embeddings(await server.read_json(request, record))
            server.check_model(parsed.model)
            if parsed.user:
                record.notes.append(f"user={parsed.user[:64]!r}")
            images, vectors = await server.encode(request, record, parsed.inputs, "pooled")
            body = await server.run(
                record, server.body_pool,
                protocol.embeddings_body, vectors, server.engine.name, record.patches, parsed.encoding_format,
            )  # fmt: skip
            return Response(body, media_type="application/json")

        return await server.handle(request, "/v1/embeddings", work)

    @app.post("/v1/features")
    async def features(request: Request) -> Response:
        async def work(request: Request, record: Record) -> Response:
            parsed = protocol.parse_features(await server.read_json(request, record))
            server.check_model(parsed.model)
            output = "pooled" if parsed.pool else parsed.dtype
            images, results = await server.encode(request, record, parsed.inputs, output)
            body = await server.run(
                record, server.body_pool,
                protocol.features_body, results, images.grids, server.engine.name, record.patches, parsed.dtype,
            )  # fmt: skip
            return Response(body, media_type="application/json")

        return await server.handle(request, "/v1/features", work)

    return app
