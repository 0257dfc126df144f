# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""`ServerProcess`: `serve.py` started as a child process on a free loopback port, as a user starts it.

Owns starting the command (`python <repo root>/serve.py --model ... --port 0 ...` in the caller's working directory
or `cwd`;
serve.py's folder puts the package on the path, so no install is needed),
learning its port from the server's "listening on" line, waiting for /health, keeping its log lines, and stopping it
(SIGTERM: the server drains and exits 0). Used by the tests and the benchmarks; must not talk the API itself.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Optional, Sequence

from ..io.files import read_regular_text
from ..repo_code import REPO_ROOT

RUNNING = re.compile(r"serve\.py: listening on http://([^:\s]+):(\d+)")  # run.LISTENING


class ServerProcess:
    """`serve.py --model MODEL --port 0 *args` in a child process; a context manager that always ends it."""

    def __init__(
        self,
        model: str,
        args: Sequence[str] = (),
        env: Optional[dict] = None,
        python: str = sys.executable,
        cwd: Optional[str] = None,
    ):
        self.command = [python, str(REPO_ROOT / "serve.py"), "--model", str(model), "--port", "0", *args]
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd  # the working directory to start it in (None: the caller's)
        self.lines: list[str] = []
        self.url = ""
        self.process: Optional[subprocess.Popen] = None
        self._running = threading.Event()
        self._reader: Optional[threading.Thread] = None

    def start(self, timeout: float = 180.0) -> "ServerProcess":
        """Start it and wait until /health answers 200; raises with the log if it exits or times out first."""
        self.process = subprocess.Popen(
            self.command, env=self.env, cwd=self.cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        while not self._running.wait(0.1):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"serve.py did not start (exit {self.process.returncode}):\n{self.log()}")
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
                    if response.status == 200 and json.loads(response.read()).get("status") == "ok":
                        return self
            except OSError:
                time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"serve.py never became healthy:\n{self.log()}")

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))
            found = RUNNING.search(line)
            if found and not self._running.is_set():
                self.url = f"http://{found.group(1)}:{found.group(2)}"
                self._running.set()

    def log(self, last: int = 200) -> str:
        return "\n".join(self.lines[-last:])

    @property
    def pid(self) -> int:
        return self.process.pid

    def terminate(self, timeout: float = 120.0) -> int:
        """SIGTERM, then wait for the exit status (the server drains first)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            status = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        if self._reader is not None:
            self._reader.join(10)
        return status

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)

    def peak_rss_mb(self) -> float:
        """The child's peak resident memory so far (Linux VmHWM), in MB."""
        status = read_regular_text(f"/proc/{self.pid}/status")
        return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()
