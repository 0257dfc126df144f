# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""The output folder's lock: one run at a time per --output, and the lock dies with the process that took it.

An exclusive, non-blocking `flock` on `output/.lock` (the file stays: a waiter and the holder share one inode). A
flock belongs to the open file description, so every process holding a copy of the descriptor holds the lock: the
descriptor is therefore opened close-on-exec (spawned / exec'd children never get it) and closed in every FORKED
child right after the fork (`os.register_at_fork`), before any of the child's own code runs. DataLoader workers
(forked on Linux) thus never hold it, and after `kill -9` of the main process the kernel frees the lock at once,
however long orphaned workers linger. Must not know what the folder holds (shards.py does).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Optional

from .options import UsageError

try:
    import fcntl
except ImportError:  # not POSIX: filelock's portable lock (workers are spawned there, so none inherits it)
    fcntl = None

LOCK = ".lock"
_HELD: set[int] = set()  # this process's lock descriptors, closed in forked children


def _close_in_forked_child() -> None:
    # close only: LOCK_UN here would unlock the PARENT's lock (the description is shared)
    for fd in list(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_forked_child)


def _in_use(output: Path) -> UsageError:
    return UsageError(f"--output {str(output)!r} is in use by another extract_features.py run")


def _no_locks(output: Path, exc: OSError) -> UsageError:
    return UsageError(
        f"--output {str(output)!r} is on a file system without file locks ({exc.strerror}); use a folder on one with "
        "them (NFSv4, Lustre mounted with -o flock, CephFS, GPFS, any local disk), which one run at a time relies on"
    )


class OutputLock:
    """An exclusive lock on `output/.lock`, held by this process alone until `release()` or the process's end."""

    def __init__(self, output: Path):
        self.path = output / LOCK
        self.fd: Optional[int] = None
        self._portable = None
        if fcntl is None:
            import filelock

            self._portable = filelock.FileLock(str(self.path), thread_local=False)
            try:
                self._portable.acquire(blocking=False)
            except filelock.Timeout as exc:
                raise _in_use(output) from exc
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise _in_use(output) from exc
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise _no_locks(output, exc) from exc
            raise
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        _HELD.add(fd)

    def release(self) -> None:
        if self._portable is not None:
            self._portable.release()
            self._portable = None
        if self.fd is not None:
            _HELD.discard(self.fd)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def lock_output(output: Path) -> OutputLock:
    """Rank 0 holds an exclusive lock on `output` for the whole run: a second run into the same folder is refused
    (UsageError "in use") instead of deleting the first one's temporary files."""
    return OutputLock(output)
