# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""The main() skeleton both commands share: run one library call, map known errors to exit codes.

Owns: mapping the user-facing errors (`ToolError`, defined low in `errors.py`: one paragraph, its own exit code) to
exit codes, Ctrl-C / SIGTERM handling (both unwind as KeyboardInterrupt so no temporary file is left behind; exit
130), the name the command was called by, and the log format. It must not parse arguments or know anything about a
particular tool: the entry points pass their messages in. Nothing below the entry points imports it.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Callable, Optional

from .errors import ToolError  # re-exported: the skeleton's contract with the entry points


def _sigterm_as_interrupt(signum, frame):
    """SIGTERM (what torchrun sends its workers on Ctrl-C, and what `kill` sends) unwinds like Ctrl-C."""
    raise KeyboardInterrupt


def install_sigterm_handler() -> None:
    """Turn SIGTERM into KeyboardInterrupt (main thread only: signal handlers cannot be set elsewhere)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _sigterm_as_interrupt)


def command_name(argv: Optional[object], default: str) -> str:
    """The name this command was called by, for `--help`, usage and error lines: when this process is the command
    (`argv` None) the file it was started as, i.e. the console script (`siglip-navit-convert`) or the entry file
    (`convert_checkpoint.py`, also under torchrun); `default` when `main(argv)` is called as a function, or when
    `sys.argv[0]` names no file (`python -c`)."""
    name = os.path.basename(sys.argv[0]) if argv is None and sys.argv and sys.argv[0] else ""
    return name if name and name not in ("-c", "-m", "__main__.py") else default


def how_to_run(prog: str) -> str:
    """What a user types to run `prog`: `python convert_checkpoint.py` for a file, the console script's name as is."""
    return f"python {prog}" if prog.endswith(".py") else prog


def setup_logging(fmt: str = "%(levelname)s %(message)s", level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format=fmt)


def run_main(
    body: Callable[[], int],
    *,
    error_prefix: str,
    interrupted: str,
    unexpected: Optional[str] = None,
    debug: bool = False,
    cleanup: Optional[Callable[[], None]] = None,
) -> int:
    """Run `body()` and return its exit status; a `ToolError` prints `error_prefix + message` and returns its
    `exit_code`, Ctrl-C/SIGTERM prints the `interrupted` line as given and returns 130. With `unexpected` set, any other exception
    prints one paragraph (`error_prefix + "unexpected <Type>: <msg>. " + unexpected`) and returns 1, unless `debug`
    asks for the traceback; without it, other exceptions propagate. `cleanup` always runs last."""
    try:
        return body()
    except ToolError as exc:
        print(f"{error_prefix}{exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - unexpected: one paragraph, traceback on request
        if unexpected is None or debug:
            raise
        print(f"{error_prefix}unexpected {type(exc).__name__}: {exc}. {unexpected}", file=sys.stderr)
        return 1
    finally:
        if cleanup is not None:
            cleanup()
