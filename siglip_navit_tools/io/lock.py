# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""An exclusive lock on a file: one writer at a time per output, and the lock dies with the process that took it.

ONE implementation for both tools (the extractor locks `--output/.lock`, the converter `.OUT.lock` beside `--out`).
An exclusive, non-blocking `flock` on the lock file. A flock belongs to the open file description, so every process
holding a copy of the descriptor holds the lock: the descriptor is therefore opened close-on-exec (spawned / exec'd
children never get it) and closed in every FORKED child right after the fork (`os.register_at_fork`), before any of
the child's own code runs. DataLoader workers (forked on Linux) thus never hold it, and after `kill -9` of the
holder the kernel frees the lock at once, however long orphaned children linger.

The lock file is only ever a regular file of ours: a directory, FIFO, device or symlink at its name is refused
(`NotARegularFile`), never opened. By default the file stays after release (a waiter and the holder share one inode);
with `remove=True` the holder unlinks it before unlocking, and a taker checks after locking that the name still
leads to the inode it locked (else it lost a race with such a removal and tries again), so no file is left behind.
Not the `filelock` package on POSIX: its lock stays held by forked children (DataLoader workers) and it cannot refuse
a non-regular lock file; it is the fallback where fcntl does not exist. Must not know what the lock protects, nor
word the errors its callers show.
"""

from __future__ import annotations

import errno
import contextlib
import os
from pathlib import Path
from typing import Optional

from .files import NotARegularFile, file_kind

try:
    import fcntl
except ImportError:  # not POSIX: filelock's portable lock (workers are spawned there, so none inherits it)
    fcntl = None

_HELD: set[int] = set()  # this process's lock descriptors, closed in forked children
_RETRIES = 100  # takes that lose a race with a removing holder before giving up (each loss means progress elsewhere)


class LockBusy(Exception):
    """Another process holds the lock (callers turn this into their own message)."""


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


def _refuse_non_regular(path: Path, mode: int) -> None:
    kind = file_kind(mode)
    if kind is not None:
        raise NotARegularFile(path, f"not a regular file ({kind})", kind)


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


class FileLock:
    """An exclusive lock on `path`, held by this process alone until `release()` or the process's end. Raises
    LockBusy when another process holds it, NotARegularFile when `path` is not a regular file, and the OSError of
    creating it otherwise (a read-only or full file system, no permission)."""

    def __init__(self, path: Path, remove: bool = False):
        self.path = Path(path)
        self.remove = remove
        self.fd: Optional[int] = None
        self._portable = None
        if fcntl is None:
            self._take_portable()
            return
        for _ in range(_RETRIES):
            fd = self._open()
            if self._lock(fd):
                return
        raise LockBusy(str(self.path))

    def _take_portable(self) -> None:
        import filelock

        self._portable = filelock.FileLock(str(self.path), thread_local=False)
        try:
            self._portable.acquire(blocking=False)
        except filelock.Timeout as exc:
            raise LockBusy(str(self.path)) from exc

    def _open(self) -> int:
        """The lock file's descriptor (created when missing); never follows a symlink nor opens a non-regular file."""
        try:
            _refuse_non_regular(self.path, os.stat(self.path, follow_symlinks=False).st_mode)
        except FileNotFoundError:
            pass
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(self.path, flags | getattr(os, "O_NONBLOCK", 0), 0o666)
        except OSError as exc:
            kind = {errno.ELOOP: "a symlink", errno.EISDIR: "a directory"}.get(exc.errno)
            if kind is not None:  # swapped for a symlink / directory since the check
                raise NotARegularFile(self.path, f"not a regular file ({kind})", kind) from None
            raise
        try:
            _refuse_non_regular(self.path, os.fstat(fd).st_mode)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _lock(self, fd: int) -> bool:
        """Lock `fd`; True when held (and, with `remove`, still the file at `path`), False to try again."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise LockBusy(str(self.path)) from exc
        except BaseException:
            os.close(fd)
            raise
        if self.remove and not _same_file(fd, self.path):  # a removing holder unlinked it between our open and lock
            os.close(fd)
            return False
        self.fd = fd
        _HELD.add(fd)
        return True

    def release(self) -> None:
        if self._portable is not None:
            self._portable.release()
            self._portable = None
        if self.fd is not None:
            if self.remove and _same_file(self.fd, self.path):
                with contextlib.suppress(OSError):  # while still locked: a taker that opened it sees it gone, retries
                    os.unlink(self.path)
            _HELD.discard(self.fd)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "FileLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
