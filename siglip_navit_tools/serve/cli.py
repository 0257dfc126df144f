# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""The `serve.py` / `siglip-navit-serve` command: argparse -> ServeOptions -> `serve()`.

Owns the flags (names, help, defaults shown from ServeOptions) and main(): errors -> exit codes through the tools'
shared skeleton (`siglip_navit_tools.cli.run_main`: UsageError 2) and the log format. Signals are the server's own
(SIGTERM / Ctrl-C drain, then exit 0). Must not hold serving logic: everything testable is in the library.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
from typing import Optional, Sequence

from .. import cli
from ..extract.options import ATTN_IMPLEMENTATIONS, DTYPE_CHOICES
from .options import API_KEY_ENV, BATCHING_MODES, LOG_LEVELS, ServeOptions
from .run import serve

PROG = "serve.py"
_DEFAULTS = ServeOptions(model="")


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The flags; `prog` is the name the command was called by (`siglip-navit-serve` or `serve.py`). Each help text
    states its own default, once."""
    d = _DEFAULTS
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve SigLIP-NaViT image embeddings over HTTP (OpenAI's embeddings API), packing the images of "
        f"concurrent requests into shared forwards. Set {API_KEY_ENV} to require 'Authorization: Bearer <key>'.",
    )
    add = parser.add_argument
    add("--model", required=True, help="converted model folder or Hub repo id")
    add("--host", default=d.host, help="address to bind (0.0.0.0: every interface; default: %(default)s)")
    add("--port", type=int, default=d.port, help="TCP port (0: any free port, logged; default: %(default)s)")
    add("--served-model-name", default=None, help="the model's id in requests (default: the folder's name)")
    add("--dtype", choices=list(DTYPE_CHOICES), default=d.dtype,
        help="model dtype; auto: bfloat16 on CUDA and on CPUs with native bf16, float32 elsewhere (default: "
        "%(default)s)")  # fmt: skip
    add("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    add("--attn-implementation", choices=list(ATTN_IMPLEMENTATIONS), default=d.attn_implementation,
        help="attention backend (default: %(default)s)")  # fmt: skip
    add("--revision", default=None, help="model revision (branch, tag or commit) on the Hub")
    add("--trust-remote-code", action="store_true", help="run the code of --model's repo (default: this checkout's)")
    add("--batching", choices=list(BATCHING_MODES), default=d.batching,
        help="continuous: pack the images of all in-flight requests into each forward; none: one request at a "
        "time (default: %(default)s)")  # fmt: skip
    add("--max-patches-per-batch", type=int, default=d.max_patches_per_batch,
        help="token budget of one forward (default: %(default)s)")  # fmt: skip
    add("--max-wait-ms", type=float, default=d.max_wait_ms,
        help="longest a waiting image waits for others to share its forward (only while admitted images are still "
        "being decoded; default: %(default)s)")  # fmt: skip
    add("--max-queue-patches", type=int, default=d.max_queue_patches,
        help="patches admitted but not yet encoded; a request that would overflow it gets 503 + "
        "Retry-After (default: %(default)s)")  # fmt: skip
    add("--max-request-bytes", type=int, default=d.max_request_bytes,
        help="largest request body (413 above; default: %(default)s)")  # fmt: skip
    add("--max-images-per-request", type=int, default=d.max_images_per_request,
        help="most images in one request (413 above; default: %(default)s)")  # fmt: skip
    add("--max-image-pixels", type=int, default=d.max_image_pixels,
        help="largest image, width x height, read from its header before decoding (413 above; default: "
        "%(default)s)")  # fmt: skip
    add("--max-response-values", type=int, default=d.max_response_values,
        help="numbers in one response: C per pooled image, h*w*C per grid (413 above; default: "
        "%(default)s)")  # fmt: skip
    add("--max-concurrent-requests", type=int, default=d.max_concurrent_requests,
        help="requests in flight (503 + Retry-After above; default: %(default)s)")  # fmt: skip
    add("--request-timeout", type=float, default=d.request_timeout,
        help="seconds from arrival until a request gets 504 (default: %(default)s)")  # fmt: skip
    add("--drain-timeout", type=float, default=d.drain_timeout,
        help="seconds SIGTERM / Ctrl-C wait for accepted requests before exiting (default: %(default)s)")  # fmt: skip
    add("--workers", type=int, default=None,
        help="threads decoding / preprocessing images, and as many parsing / encoding bodies (default: CPU cores, "
        "at most 8)")  # fmt: skip
    add("--log-level", choices=list(LOG_LEVELS), default=d.log_level, help="(default: %(default)s)")
    return parser


def options_from_args(args: argparse.Namespace) -> ServeOptions:
    names = {f.name for f in dataclasses.fields(ServeOptions)}
    return ServeOptions(**{name: value for name, value in vars(args).items() if name in names})


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command; returns the exit status (0 after a graceful SIGTERM / Ctrl-C drain). Called with no `argv`
    (a real command line: this process is the server's own), a repeated SIGTERM / Ctrl-C after the drain is ignored:
    the process is only tearing down, and must still exit 0."""
    prog = cli.command_name(argv, PROG)
    options = options_from_args(build_parser(prog).parse_args(argv))
    cli.setup_logging("%(asctime)s %(levelname)s %(message)s", level=options.log_level.upper())

    def body() -> int:
        status = serve(options, own_process=argv is None)
        if argv is None:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)
        return status

    return cli.run_main(
        body,
        error_prefix=f"{prog}: error: ",
        interrupted=f"{prog}: interrupted while starting",
        unexpected="Rerun with --log-level debug for the traceback.",
        debug=options.log_level == "debug",
    )
