# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""Atomic, durable replacement of files and directories: ONE scheme for both tools.

A result is first written completely under a temporary name beside its target (same directory, so the final
rename cannot cross file systems), made durable (fsync of the file, or of every file in a directory), renamed
over the target, and the rename itself made durable (fsync of the parent directory). Readers therefore see the
old result or the new one, never a half-written one. This module must not know what it is writing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

TMP_MARK = ".tmp-"  # temporaries are `.NAME.tmp-<tag>`: hidden, and recognisable as leftovers
OLD_MARK = ".old-"  # a directory being replaced is parked as `.NAME.old-<tag>` between the two renames

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


@contextlib.contextmanager
def temporary_directory(path: Path) -> Iterator[Path]:
    """A fresh, empty directory beside `path` (`.NAME.tmp-<random>`) to build a result in; removed on exit unless it
    was moved into place (`replace_directory`) inside the block. The parent of `path` is created if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path, uuid.uuid4().hex[:8])
    tmp.mkdir()
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def replace_directory(tmp: Path, out: Path) -> None:
    """Move the finished directory `tmp` to `out`, replacing whatever is there: the old `out` is parked beside it
    (`.OUT.old-TAG`) until the new one is in place, then removed; if the second rename fails the old one is put
    back. The files of `tmp` must already be durable (`fsync_tree`)."""
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
            shutil.rmtree(backup, ignore_errors=True)
        else:
            backup.unlink()
    else:
        os.rename(tmp, out)
        fsync_parent(out)
