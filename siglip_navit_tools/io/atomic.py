# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""Atomic, durable replacement of files and directories: ONE scheme for both tools.

A result is first written completely under a temporary name beside its target (same directory, so the final
rename cannot cross file systems), made durable (fsync of the file, or of every file in a directory), renamed
over the target, and the rename itself made durable (fsync of the parent directory). Readers therefore see the
old result or the new one, never a half-written one. This module must not know what it is writing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import uuid
from pathlib import Path
from typing import Iterator, Optional

from ..errors import ToolError
from .files import FileTooLarge, NotARegularFile, read_regular_text

TMP_MARK = ".tmp-"  # temporaries are `.NAME.tmp-<tag>`: hidden, and recognisable as leftovers
OLD_MARK = ".old-"  # a directory being replaced is parked as `.NAME.old-<tag>` between the two renames
# Inside every temporary DIRECTORY this module makes (removed just before it is renamed into place): what tells a
# leftover of ours (safe to delete once its process is gone) from anything else that happens to match the name.
DIR_MARKER = ".siglip-navit-partial"
_TAG = re.compile(r"[0-9a-f]{8}")
_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def describe_os_error(exc: OSError) -> str:
    """An OSError's cause in words ("read-only file system", "no space left on device", ...)."""
    return _REASONS.get(exc.errno) or exc.strerror or str(exc) or type(exc).__name__


class TargetWriteError(ToolError):
    """Writing the result failed in the operating system (disk full, read-only, no permission): `path` is what was
    being written, `errno` the cause. The callers say what that means for the target."""

    def __init__(self, path: Path, exc: OSError):
        self.path = Path(path)
        self.errno = exc.errno
        self.reason = describe_os_error(exc)
        super().__init__(f"{self.reason} while writing {self.path}")


class TargetAppeared(ToolError):
    """Something appeared at the target while the result was being written, and it was not to be replaced: the
    result was not moved into place and the newcomer was left as it is."""

    def __init__(self, path: Path):
        self.path = Path(path)
        super().__init__(f"{self.path} appeared while the result was being written and is not empty; left as it is")


@contextlib.contextmanager
def target_errors(path: Path) -> Iterator[None]:
    """Turn an OSError of writing `path` into a TargetWriteError naming it (a TargetWriteError passes through)."""
    try:
        yield
    except TargetWriteError:
        raise
    except OSError as exc:
        raise TargetWriteError(path, exc) from exc

_UMASK = os.umask(0o022)
os.umask(_UMASK)


def fsync_path(path: Path) -> None:
    """fsync a file or (on POSIX) a directory by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_parent(path: Path) -> None:
    """Make a rename inside `path.parent` durable (a no-op where directories cannot be opened)."""
    if os.name == "posix":
        fsync_path(path.parent)


def temporary_sibling(path: Path, tag: str | None = None) -> Path:
    """A hidden temporary name beside `path` (`.NAME.tmp-TAG`; default tag: this process id)."""
    return path.with_name(f".{path.name}{TMP_MARK}{tag if tag is not None else os.getpid()}")


def replace_file(tmp: Path, path: Path) -> None:
    """Give `tmp` the usual permissions (some writers, e.g. safetensors, create files 0600), make it durable, rename
    it over `path` (atomic on POSIX) and make the rename durable."""
    os.chmod(tmp, 0o666 & ~_UMASK)
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_parent(path)


def write_text(path: Path, text: str) -> None:
    """Write `text` to `path` atomically; an interrupted write leaves no temporary behind."""
    tmp = temporary_sibling(path)
    try:
        tmp.write_text(text)
        replace_file(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_tree(directory: Path) -> None:
    """fsync every file of a freshly written directory, then the directory itself."""
    for root, _, files in os.walk(directory):
        for name in files:
            fsync_path(Path(root) / name)
    if os.name == "posix":
        fsync_path(directory)


def make_parents(path: Path) -> list[Path]:
    """Create the missing parent directories of `path`; returns the ones created, deepest first (what
    `remove_made_parents` may take away again when nothing was put in them)."""
    made, parent = [], path.parent
    while not parent.exists() and parent != parent.parent:
        made.append(parent)
        parent = parent.parent
    path.parent.mkdir(parents=True, exist_ok=True)
    return made


def remove_made_parents(made: list[Path]) -> None:
    """Remove the directories `make_parents` created, deepest first, as long as they are empty."""
    for directory in made:
        try:
            directory.rmdir()
        except OSError:
            return


@contextlib.contextmanager
def temporary_directory(path: Path) -> Iterator[Path]:
    """A fresh, empty directory beside `path` (`.NAME.tmp-<random>`, holding only DIR_MARKER) to build a result in;
    removed on exit unless it was moved into place (`replace_directory`) inside the block. The parent of `path` is
    created if needed."""
    with target_errors(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path, uuid.uuid4().hex[:8])
    with target_errors(tmp):
        tmp.mkdir()
        (tmp / DIR_MARKER).write_text(f"{socket.gethostname()} {os.getpid()}\n")
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def replace_directory(tmp: Path, out: Path, replace: bool = True) -> None:
    """Move the finished directory `tmp` to `out`. With `replace`, whatever is there is replaced: the old `out` is
    parked beside it (`.OUT.old-TAG`) until the new one is in place, then removed; if the second rename fails the old
    one is put back. Without it, one rename that the kernel refuses unless `out` is missing or an empty directory
    (checked at the rename itself, so nothing that appeared meanwhile is ever replaced): TargetAppeared then. The
    files of `tmp` must already be durable (`fsync_tree`); its DIR_MARKER is removed first."""
    (tmp / DIR_MARKER).unlink(missing_ok=True)
    if not replace:
        try:
            os.rename(tmp, out)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise TargetAppeared(out) from None
            raise
        fsync_parent(out)
        return
    if out.is_symlink() or out.exists():
        backup = out.parent / f".{out.name}{OLD_MARK}{uuid.uuid4().hex[:8]}"
        os.rename(out, backup)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(backup, out)
            raise
        fsync_parent(out)
        if backup.is_dir() and not backup.is_symlink():
            # Re-park the old output as one of OUR marked temporaries before deleting it: a `.OUT.old-*` then exists
            # only between the two renames above, so a deletion killed halfway is cleaned up by the next run instead
            # of being "restored" as if it were a complete previous output.
            doomed = temporary_sibling(out, uuid.uuid4().hex[:8])
            os.rename(backup, doomed)
            (doomed / DIR_MARKER).write_text(f"{socket.gethostname()} {os.getpid()}\n")
            shutil.rmtree(doomed, ignore_errors=True)
        else:
            backup.unlink()
    else:
        os.rename(tmp, out)
        fsync_parent(out)


# ---- leftovers of interrupted runs ------------------------------------------------------------------------------
def _leftovers(out: Path, mark: str) -> list[Path]:
    """`.OUT<mark><8 hex>` entries beside `out` (the names this module makes), sorted."""
    prefix = f".{out.name}{mark}"
    if not out.parent.is_dir():
        return []
    return sorted(p for p in out.parent.iterdir() if p.name.startswith(prefix) and _TAG.fullmatch(p.name[len(prefix):]))


def _owner_alive(tmp: Path) -> Optional[bool]:
    """None: not ours (no marker); True: its process still runs on this host; False: a dead run's leftover."""
    try:  # a regular file of at most a line: a FIFO or a huge file planted under the marker's name is not ours
        host, pid = read_regular_text(tmp / DIR_MARKER, limit=4096).split()
        pid_n = int(pid)
    except (OSError, ValueError, NotARegularFile, FileTooLarge):
        return None
    if host != socket.gethostname():
        return True  # another machine's run on a shared file system: never ours to judge
    try:
        os.kill(pid_n, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def recover_leftovers(out: Path, dry_run: bool = False) -> list[str]:
    """Repair what an interrupted run left beside `out`, before anything else; returns one log line per action.
    A missing `out` with exactly one parked `.OUT.old-*` (a crash between replace_directory's two renames) is put
    back; our `.OUT.tmp-*` directories whose process is gone are removed. Nothing else is touched: other matching
    names, a live run's temporary, several parked outputs (which one is newest is not ours to guess) are only
    reported. With `dry_run`, says what it would do and does nothing."""
    lines: list[str] = []
    would = "would " if dry_run else ""
    olds = [p for p in _leftovers(out, OLD_MARK) if p.is_dir() and not p.is_symlink()]
    if olds and not (out.exists() or out.is_symlink()):
        if len(olds) == 1:
            if not dry_run:
                os.rename(olds[0], out)
                fsync_parent(out)
            lines.append(f"{would}restore {out} from {olds[0].name}: an earlier --force run was interrupted between "
                         "its two renames and had parked the previous output there.")  # fmt: skip
        else:
            names = ", ".join(p.name for p in olds)
            lines.append(f"{out} is missing and several parked outputs exist ({names}): left as they are; move the "
                         f"one you want back to {out}.")  # fmt: skip
    elif olds:
        names = ", ".join(p.name for p in olds)
        lines.append(f"found {names} beside {out}: an old output parked by an interrupted --force run after the new "
                     "one was in place; remove it when you no longer need it.")  # fmt: skip
    for tmp in _leftovers(out, TMP_MARK):
        alive = _owner_alive(tmp) if tmp.is_dir() and not tmp.is_symlink() else None
        if alive is False:
            if not dry_run:
                shutil.rmtree(tmp, ignore_errors=True)
            lines.append(f"{would}remove {tmp.name}: the partial output of an interrupted run.")
        elif alive is True:
            lines.append(f"left {tmp.name} alone: the run writing it is still running.")
        else:
            lines.append(f"left {tmp.name} alone: not marked as made by this tool; remove it if it is a leftover.")
    return lines
