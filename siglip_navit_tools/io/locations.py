# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""Where bytes come from: a `Location` (local path or fsspec URL) and exact range reads of one file.

Owns the one transport every source goes through: fsspec, its LocalFileSystem included, so a local path, a
`file://` URL, `hf://` and `s3://` behave alike. A local file is opened only once it is known to be a regular file
(`io.files`: a FIFO, device or directory named as a config or weight file is refused, never opened into a read that
blocks), and a whole-file text read is bounded. Must not know what the bytes mean (no safetensors, no models) and
must never read more than it is asked for: `ByteReader` opens remote files without read-ahead.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
from typing import Any

from ..errors import ToolError
from .files import FileTooLarge, NotARegularFile, check_regular_file, open_regular_file, read_regular_text

MAX_TEXT_BYTES = 100_000_000  # a config, index or model card larger than this is not one (the header limit too)


class LocationError(ToolError):
    """A source that cannot be opened or read as asked (one paragraph, exit status 1)."""


class Location:
    """A file or directory on some fsspec filesystem; `display` is what the user wrote (or a child of it)."""

    def __init__(self, display: str, fs: Any, path: str):
        self.display = display  # for messages and the model card
        self.fs = fs  # an fsspec filesystem (LocalFileSystem for local paths)
        self.path = path  # the path on `fs` (absolute for local paths)

    @classmethod
    def parse(cls, spec: str) -> "Location":
        """A local path (`~` expanded) or an fsspec URL such as `hf://org/repo/file.safetensors`."""
        import fsspec

        if "://" not in spec:
            return cls(spec, fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(spec)))
        try:
            fs, path = fsspec.core.url_to_fs(spec)
        except (ValueError, ImportError) as exc:
            raise LocationError(
                f"cannot open {spec!r}: {exc}. Use a local path or an fsspec URL whose filesystem is installed "
                "(hf:// needs huggingface_hub)."
            ) from exc
        return cls(spec.rstrip("/"), fs, path.rstrip("/") or path)

    @property
    def is_local(self) -> bool:
        """On this machine's file system (a plain path or a file:// URL): `path` is an OS path."""
        protocol = self.fs.protocol
        return "file" in ((protocol,) if isinstance(protocol, str) else tuple(protocol))

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    def join(self, name: str) -> "Location":
        display = os.path.join(self.display, name) if "://" not in self.display else f"{self.display}/{name}"
        return Location(display, self.fs, posixpath.join(self.path, name))

    def child_within(self, name: str, what: str) -> "Location":
        """`name` (a relative path another file gave, e.g. an index's weight_map) as a Location INSIDE this folder;
        a LocationError naming `what` for an absolute path, a `..` or empty component, a backslash or NUL, or (local
        files) a symlink whose target leaves the folder. One exception, for the Hugging Face cache: a symlink from
        `snapshots/<rev>/` into the same repo's `blobs/` (how the cache stores every file) is inside."""
        parts = name.split("/") if isinstance(name, str) else []
        bad = (
            not parts or name.startswith("/") or "\\" in name or "\0" in name or ":" in parts[0]
            or any(p in ("", ".", "..") for p in parts)
        )  # fmt: skip
        if bad:
            raise LocationError(
                f"{what} names {name!r}, which is not a file inside {self.display} (absolute paths, '..', drive "
                "letters and backslashes are refused): the source's files must all live in its folder."
            )
        child = self.join(name)
        if self.is_local and not _resolves_within(self.path, child.path):
            raise LocationError(
                f"{what} names {name!r}, a symlink that leads outside {self.display} (to "
                f"{os.path.realpath(child.path)}): the source's files must all live in its folder."
            )
        return child

    def parent(self) -> "Location":
        path = posixpath.dirname(self.path)
        display = self.display.rsplit("/", 1)[0] if "://" in self.display else path
        return Location(display, self.fs, path)

    def exists(self) -> bool:
        return bool(self.fs.exists(self.path))

    def isdir(self) -> bool:
        return bool(self.fs.isdir(self.path))

    def isfile(self) -> bool:
        return bool(self.fs.isfile(self.path))

    def listdir(self) -> list[str]:
        return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.path, detail=False))

    def check_regular(self) -> None:
        """A local path must name a regular file (symlinks followed): LocationError with what it is otherwise, before
        anything opens it. Remote files are always files."""
        if not self.is_local:
            return
        try:
            check_regular_file(self.path)
        except NotARegularFile as exc:
            raise LocationError(
                f"{self.display} is {exc}: the source's files must be regular files (a FIFO, device or directory is "
                "never opened, as reading it could block forever)."
            ) from None

    def read_text(self, limit: int = MAX_TEXT_BYTES) -> str:
        """The whole file as UTF-8 text, at most `limit` bytes (FileTooLarge, a ValueError, above it); a local path
        that is no regular file is NotARegularFile (a ValueError too), never opened."""
        if self.is_local:
            return read_regular_text(self.path, limit)
        with self.fs.open(self.path, "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise FileTooLarge(f"larger than {limit} bytes")
        return data.decode("utf-8")

    def size(self) -> int:
        return int(self.fs.size(self.path))


def _resolves_within(folder: str, path: str) -> bool:
    """Does `path` (inside `folder` by name) stay inside it once symlinks are resolved? The HF cache layout
    (`<repo>/snapshots/<rev>/<file>` -> `<repo>/blobs/<hash>`) counts as inside."""
    real_folder, real = os.path.realpath(folder), os.path.realpath(path)
    roots = [real_folder]
    if os.path.basename(os.path.dirname(real_folder)) == "snapshots":
        roots.append(os.path.join(os.path.dirname(os.path.dirname(real_folder)), "blobs"))
    return any(real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


class ByteReader:
    """Exact byte ranges of one file, counting what it reads. fsspec's own readers fetch whole blocks ahead, which
    for a 29 GB file of which 0.8 GB is wanted is the difference that matters: this one reads only what is asked."""

    def __init__(self, loc: Location):
        loc.check_regular()
        self.loc = loc
        self.size = loc.size()
        self.bytes_read = 0  # what the caller asked for and got (the converter reports it)
        self._f: Any = None

    def _file(self) -> Any:
        if self._f is None and self.loc.is_local:  # checked again on the descriptor, opened non-blocking
            self._f = open_regular_file(self.loc.path)
        if self._f is None:
            try:  # "none" cache: every read is exactly the requested range (no read-ahead of unwanted bytes)
                self._f = self.loc.fs.open(self.loc.path, "rb", cache_type="none")
            except TypeError:  # pragma: no cover - a filesystem without fsspec's cache options
                self._f = self.loc.fs.open(self.loc.path, "rb")
        return self._f

    def read(self, start: int, length: int) -> bytearray:
        """`length` bytes from offset `start`; a short file is a LocationError naming what is missing."""
        buf = bytearray(length)
        if length == 0:
            return buf
        f = self._file()
        f.seek(start)
        view = memoryview(buf)
        got = 0
        while got < length:
            n = f.readinto(view[got:])
            if not n:
                break
            got += n
        self.bytes_read += got
        if got != length:
            raise LocationError(
                f"{self.loc.display} is truncated: could read only {got} of the {length} bytes at offset {start} "
                f"(file size {self.size} bytes). Re-download the file."
            )
        return buf

    def close(self) -> None:
        if self._f is not None:
            with contextlib.suppress(Exception):
                self._f.close()
            self._f = None

