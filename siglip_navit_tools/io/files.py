# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""Local files, read safely: only regular files are ever opened, and listings always end. ONE helper for both tools.

Owns `open_regular_file` (and the small readers on top of it): a path is checked to name a regular file (after
following symlinks) before it is opened, and again on the opened descriptor, which is opened non-blocking, so a FIFO,
socket, device or directory -- named by mistake or swapped in between -- is refused with its reason instead of
hanging the tool on a read that never comes (opening a FIFO blocks until a writer appears). Owns the listings too:
`glob_files` (glob.glob's syntax) and `tree_entries` (a folder, recursively) never descend into a symlinked
directory below a `**` / the folder, and never list one real directory twice, so a symlink loop (or a bind mount
of a folder inside itself) cannot make a listing endless. Must not know what the files hold.
"""

from __future__ import annotations

import glob
import logging
import os
import stat
from pathlib import Path
from typing import BinaryIO, Iterator, Optional, Union

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISLNK, "a symlink"))  # fmt: skip


class NotARegularFile(ValueError):
    """`path` names no regular file (a FIFO, socket, device, directory, or a dangling symlink): never opened. The
    message is the reason alone (callers name the file in their own words); `path` and `kind` say more."""

    def __init__(self, path: PathLike, reason: str, kind: str = ""):
        super().__init__(reason)
        self.path = os.fspath(path)
        self.kind = kind


class FileTooLarge(ValueError):
    """A bounded read (`read_regular_bytes(limit=...)`) of a file larger than the bound."""


def file_kind(mode: int) -> Optional[str]:
    """What a non-regular st_mode is, in words ("a FIFO", "a directory", ...); None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _FILE_KINDS if test(mode)), f"file type {stat.S_IFMT(mode):o}")


def _not_regular(mode: int) -> Optional[str]:
    """Why a file of this st_mode cannot be read as a file, or None for a regular file."""
    kind = file_kind(mode)
    return None if kind is None else f"not a regular file ({kind})"


def check_regular_file(path: PathLike) -> None:
    """NotARegularFile unless `path` (symlinks followed) is a regular file; FileNotFoundError when it is missing.
    For readers that must be given a path (a memory map); everything else opens with `open_regular_file`."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            reason = f"dangling symlink (its target {os.readlink(path)!r} does not exist)"
            raise NotARegularFile(path, reason, "a dangling symlink") from None
        raise
    reason = _not_regular(mode)
    if reason is not None:
        raise NotARegularFile(path, reason, file_kind(mode) or "")


def is_regular_file(path: PathLike) -> bool:
    """True for a regular file (symlinks followed); False for anything else, a missing path included."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def open_regular_file(path: PathLike) -> BinaryIO:
    """`path` opened for reading (binary) if it is a regular file (after following symlinks); else NotARegularFile
    with the reason. Never blocks: the type is checked before opening, and again on the opened descriptor (opened
    O_NONBLOCK, so a FIFO swapped in between cannot hang the caller)."""
    check_regular_file(path)
    f = open(path, "rb", opener=lambda name, flags: os.open(name, flags | getattr(os, "O_NONBLOCK", 0)))
    try:
        mode = os.fstat(f.fileno()).st_mode
    except BaseException:
        f.close()
        raise
    reason = _not_regular(mode)
    if reason is not None:
        f.close()
        raise NotARegularFile(path, reason, file_kind(mode) or "")
    return f  # named `path` (error messages name the file)


def read_regular_bytes(path: PathLike, limit: Optional[int] = None) -> bytes:
    """The whole of a regular file (`open_regular_file`); with `limit`, FileTooLarge for a file above it (read no
    further than limit + 1 bytes, so a huge file costs nothing)."""
    with open_regular_file(path) as f:
        data = f.read() if limit is None else f.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise FileTooLarge(f"larger than {limit} bytes")
    return data


def read_regular_text(path: PathLike, limit: Optional[int] = None) -> str:
    """`read_regular_bytes` decoded as UTF-8 (UnicodeDecodeError, a ValueError, for anything else)."""
    return read_regular_bytes(path, limit).decode("utf-8")


# ---- listings that end -------------------------------------------------------------------------------------------
def _dir_id(path: str, follow: bool) -> Optional[tuple[int, int]]:
    try:
        st = os.stat(path, follow_symlinks=follow)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


def _walk_dirs(top: str, include_hidden: bool, seen: set) -> Iterator[str]:
    """`top` and every directory below it, spelled from `top`; symlinked directories are not entered, and a real
    directory already listed (a bind-mount loop) is not listed again. Unreadable directories are passed over, each
    with a warning naming it (what is inside is not listed)."""
    stack = [top]
    while stack:
        current = stack.pop()
        ident = _dir_id(current or ".", follow=True)
        if ident is None or ident in seen:
            continue
        seen.add(ident)
        yield current
        try:
            with os.scandir(current or ".") as entries:
                names = sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
        except OSError as exc:
            _unreadable(current or ".", exc)
            continue
        stack.extend(os.path.join(current, n) for n in reversed(names) if include_hidden or not n.startswith("."))


def glob_files(pattern: str) -> list[str]:
    """`glob.glob(pattern, recursive=True)`, except that a `**` component never descends into a symlinked directory
    (as pathlib's `rglob`, `find` and Python 3.13's `Path.glob` do) and never lists one real directory twice: a
    symlink loop cannot make the listing endless. Components without `**` are glob's own (one level each: always
    finite). Paths are spelled as glob spells them; duplicates are dropped, order is glob's then walk order."""
    # Our own `**`: Python 3.11's glob.glob follows symlinked directories under ** (endless on a loop), pathlib's glob
    # spells paths differently and gained recurse_symlinks only in 3.13, and wcmatch is not a dependency.
    parts = pattern.split(os.sep)
    if "**" not in parts:
        return glob.glob(pattern)
    i = parts.index("**")
    head, tail = os.sep.join(parts[:i]), parts[i + 1 :] or ["*"]
    if i == 1 and parts[0] == "":
        head = os.sep  # "/**/x": the root
    heads = glob.glob(head) if glob.has_magic(head) else [head]
    found: dict[str, None] = {}
    for top in heads:
        if top and not os.path.isdir(top):
            continue
        for directory in _walk_dirs(top, include_hidden=False, seen=set()):
            prefix = glob.escape(directory) if directory else ""
            sub = os.path.join(prefix, *tail) if prefix else os.path.join(*tail)
            found.update(dict.fromkeys(glob_files(sub)))
    return list(found)


def tree_entries(folder: PathLike) -> list[Path]:
    """Every entry below `folder` (files, directories, symlinks; hidden ones too), as `Path(folder).rglob("*")`
    lists them: symlinked directories are listed but not entered, and a real directory is listed once."""
    top = os.fspath(folder)
    out: list[Path] = []
    for directory in _walk_dirs(top, include_hidden=True, seen=set()):
        try:
            with os.scandir(directory) as entries:
                out.extend(Path(directory, e.name) for e in entries)
        except OSError:
            continue  # _walk_dirs, scanning the same folder next, warns about it (once)
    return out


def _unreadable(directory: str, exc: OSError) -> None:
    logger.warning("cannot list folder %r (%s: %s): the files inside it are left out", directory,
                   type(exc).__name__, exc.strerror or exc)  # fmt: skip
