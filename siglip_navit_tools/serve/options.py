# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""The server's options: one dataclass a newcomer can read every knob from, and its own checks.

Owns the defaults (the request limits' defaults come from their one owner, `handler.RequestLimits`) and the checks
that need nothing but the options themselves (`ServeOptions.validate`). Must not parse command lines (the CLI builds
the object), load models or open sockets.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from .. import repo_code
from ..extract.options import ATTN_IMPLEMENTATIONS, DTYPE_CHOICES, UsageError

BATCHING_MODES = ("continuous", "none")  # none: each request alone in its forwards (the baseline)
LOG_LEVELS = ("debug", "info", "warning", "error")
API_KEY_ENV = "SIGLIP_NAVIT_API_KEY"  # set: every endpoint but /health needs `Authorization: Bearer <key>`
_LIMITS = repo_code.handler().DEFAULT_LIMITS  # the request limits' one owner (shared with the Endpoints handler)


def default_workers() -> int:
    """Decoding / preprocessing threads: one per CPU core, at most 8 (PIL and numpy release the GIL)."""
    return max(1, min(8, os.cpu_count() or 1))


@dataclass
class ServeOptions:
    """What one server serves, where, and under which limits."""

    # model folder or Hub repo id (config + weights + preprocessor_config.json), a converted repo
    model: str
    # address to bind; 127.0.0.1 (this machine only) unless told otherwise, e.g. 0.0.0.0 behind a load balancer
    host: str = "127.0.0.1"
    # TCP port; 0: any free port (the log says which)
    port: int = 8000
    # the model's id in requests and in GET /v1/models; None: the model folder's name (or the Hub id)
    served_model_name: Optional[str] = None
    # model dtype: float32 / bfloat16 / float16, or auto (bfloat16 on CUDA and on CPUs with native bf16, else float32)
    dtype: str = "auto"
    # torch device; None: cuda when available, else cpu
    device: Optional[str] = None
    # attention backend: sdpa, flash_attention_2 or eager
    attn_implementation: str = "sdpa"
    # model revision (branch, tag or commit) on the Hub
    revision: Optional[str] = None
    # run the code of `model`'s own repo (through the Auto classes) instead of this checkout's
    trust_remote_code: bool = False
    # continuous: images of all in-flight requests packed first-fit into each forward; none: one request at a time
    batching: str = "continuous"
    # token budget of one forward, in patches (never exceeded; an image is never split across forwards)
    max_patches_per_batch: int = _LIMITS.max_patches_per_batch
    # a forward starts when the budget is full, when no admitted image is still being decoded, or this long after
    # the oldest waiting image arrived (milliseconds)
    max_wait_ms: float = 5.0
    # patches admitted but not yet in a forward; a request that would overflow it gets 503 + Retry-After at once
    max_queue_patches: int = 65536
    # bytes of one request's body (413 above)
    max_request_bytes: int = _LIMITS.max_request_bytes
    # images in one request (413 above)
    max_images_per_request: int = _LIMITS.max_images_per_request
    # pixels of one image, read from its header BEFORE decoding (413 above)
    max_image_pixels: int = _LIMITS.max_image_pixels
    # numbers in one response: channels per pooled image, patches x channels per feature grid (413 above)
    max_response_values: int = _LIMITS.max_response_values
    # requests being handled at once (reading, waiting, encoding); more get 503 + Retry-After
    max_concurrent_requests: int = 256
    # seconds a request may take from arrival to response; then 504 and its not-yet-started images are dropped
    request_timeout: float = 60.0
    # seconds SIGTERM / Ctrl-C wait for accepted requests to finish before the server exits anyway
    drain_timeout: float = 30.0
    # threads decoding and preprocessing images (as many again parse bodies and encode responses); None:
    # default_workers()
    workers: Optional[int] = None
    # log level of the server's own lines and uvicorn's: debug, info, warning, error
    log_level: str = "info"

    def validate(self) -> None:
        """Raise UsageError for values no server can use (the checks that need the model come when it is loaded)."""
        positive_ints = (
            "max_patches_per_batch", "max_queue_patches", "max_request_bytes", "max_images_per_request",
            "max_image_pixels", "max_response_values", "max_concurrent_requests",
        )  # fmt: skip
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.max_queue_patches < self.max_patches_per_batch:
            raise UsageError(
                f"--max-queue-patches ({self.max_queue_patches}) must hold at least one full forward "
                f"(--max-patches-per-batch {self.max_patches_per_batch})"
            )
        for name in ("max_wait_ms", "request_timeout", "drain_timeout"):
            value = getattr(self, name)
            if not value >= 0 or value == float("inf"):  # also NaN
                raise UsageError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value!r}")
        if self.request_timeout == 0:
            raise UsageError("--request-timeout must be more than 0 seconds")
        if not 0 <= self.port <= 65535:
            raise UsageError(f"--port must be in 0..65535, got {self.port}")
        if self.workers is not None and self.workers <= 0:
            raise UsageError(f"--workers must be a positive number of threads, got {self.workers}")
        choices = (
            ("batching", BATCHING_MODES), ("dtype", DTYPE_CHOICES), ("attn_implementation", ATTN_IMPLEMENTATIONS),
            ("log_level", LOG_LEVELS),
        )  # fmt: skip
        for name, allowed in choices:
            value = getattr(self, name)
            if value not in allowed:
                raise UsageError(f"--{name.replace('_', '-')} must be one of {list(allowed)}, got {value!r}")
        if self.served_model_name is not None and not self.served_model_name.strip():
            raise UsageError("--served-model-name must not be empty")

    def request_limits(self):
        """The shared request limits (`handler.RequestLimits`) these options set."""
        return repo_code.handler().RequestLimits(
            max_request_bytes=self.max_request_bytes,
            max_images_per_request=self.max_images_per_request,
            max_image_pixels=self.max_image_pixels,
            max_patches_per_batch=self.max_patches_per_batch,
            max_response_values=self.max_response_values,
        )

    def model_name(self) -> str:
        """The served model's id: --served-model-name, else the folder's name (of its absolute path: `--model .` is
        served under the current folder's name, not '.'), or a Hub id as it is."""
        if self.served_model_name:
            return self.served_model_name
        path = self.model.rstrip("/\\") or self.model
        if not os.path.isdir(path):
            return path
        return os.path.basename(os.path.abspath(path)) or path  # the root folder has no name
