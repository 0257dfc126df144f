# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""WebDataset tar shards as a source: one tar is one unit of work (one output shard), its samples streamed.

Owns what a tar's samples are, by webdataset's own conventions: members are grouped by key (`base_plus_ext`: the
key is the member's path up to the first dot of its file name, the rest is the extension, lower-cased), consecutive
members with one key form a sample, `__*__` names and non-files are no samples, and the image is the sample's first
entry among `--image-key`'s `;`-separated extensions. An image's id is "<tar name>/<__key__>", the tar name being
its path below the folder all the run's tars share. Owns how a bad tar is reported: a sample without an image, a
repeated key, the sample a damaged or truncated tar breaks inside, and the tar itself (id "<tar name>") are listed
with their reason (a tar must end with its end-of-archive block: one cut where a member header should be is
truncated, not shorter); what was read before the damage is still encoded. Memory: one member at a time, and only the
image entries of the sample being read. Must not decode images (the pipeline's workers do) nor pack them.
"""

from __future__ import annotations

import gzip
import io
import lzma
import re
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Iterable, Iterator, Optional

import PIL.Image

from .inputs import Item, error_text, is_bad_image_error, open_stream, read_failure, unit_folder, unit_names

# webdataset's `tar_file_iterator` streams too, but on a truncated or damaged tar it loses which member broke and ends
# with the sample in progress looking complete, and a repeated extension stops the whole stream; to list each
# affected sample with its reason, the loop over `tarfile` is ours, with webdataset's own key rule (`base_plus_ext`)
# and meta-file rule (below).
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's default `skip_meta`: `__key__`-style names are no samples
# What a damaged, truncated or mis-compressed tar raises while it is read (gzip.BadGzipFile is an OSError without an
# errno); any other OSError (EIO, an HTTP error, a timeout) is the file system's or the network's fault and stops the
# run (`inputs.is_bad_image_error`).
_DAMAGE = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile)


@dataclass
class _Sample:
    """The members of one key read so far: the image entries' bytes (only `--image-key`'s extensions are kept) and
    every extension's name (for the reason when no image is among them)."""

    key: str
    images: dict = field(default_factory=dict)
    extensions: list = field(default_factory=list)
    problem: Optional[str] = None


class TarSource:
    """WebDataset tar shards (local paths or fsspec URLs); `ids` are the tars (one shard each), `items` streams a
    tar's samples. Images are read as stored (EXIF orientation is not applied), like webdataset's "pil" decoder."""

    kind = "webdataset"
    streaming = True  # ids are files of images; a shard is one of them

    def __init__(self, locations: list[str], image_key: str):
        self.ids: list = unit_names(locations)
        self.locations = dict(zip(self.ids, locations))
        self.choices = image_key.lower().split(";")  # extensions are lower-cased (webdataset's rule): so are these
        self.duplicates: list[dict] = []
        folder = unit_folder(locations, self.ids)
        self.identity = {"kind": "webdataset", "image_key": ";".join(self.choices), "folder": folder}

    # ---- the source interface ------------------------------------------------------------------------------------
    def items(self, tars: Iterable[str]) -> Iterator[Item]:
        for tar in tars:
            yield from self._tar_items(tar)

    def size(self, payload: bytes) -> tuple[int, int]:
        with PIL.Image.open(io.BytesIO(payload)) as image:
            return image.size

    def load(self, payload: bytes) -> PIL.Image.Image:
        with PIL.Image.open(io.BytesIO(payload)) as image:
            image.load()
        return image

    # ---- one tar ---------------------------------------------------------------------------------------------------
    def _tar_items(self, tar: str) -> Iterator[Item]:
        try:
            stream = open_stream(self.locations[tar])
        except Exception as exc:
            if not is_bad_image_error(exc):
                if isinstance(exc, OSError):
                    raise read_failure(tar, exc) from exc
                raise
            yield Item(tar, None, f"cannot open the tar: {error_text(exc)}")
            return
        with stream:
            yield from self._samples(tar, stream)

    def _samples(self, tar: str, stream: BinaryIO) -> Iterator[Item]:
        """The tar's samples as Items, in tar order (each key once); damage ends the tar with its reasons listed."""
        seen: set[str] = set()
        sample: Optional[_Sample] = None
        where = _Position()
        try:
            for name, data in _members(stream, self._wanted, where):
                key, extension = _base_plus_ext(name)
                if key is None:
                    continue  # no extension: webdataset ignores the member
                if sample is None or key != sample.key:
                    if sample is not None:
                        yield self._finish(tar, sample, seen)
                    sample = _Sample(key)
                _add(sample, name, extension, data)
        except (*_DAMAGE, OSError) as exc:
            if isinstance(exc, OSError) and not isinstance(exc, _DAMAGE) and not is_bad_image_error(exc):
                raise read_failure(tar, exc) from exc  # the network's fault (HTTP error, timeout): a rerun reads it
            yield from self._damaged(tar, sample, seen, where, exc)
            return
        if sample is not None:
            yield self._finish(tar, sample, seen)

    def _wanted(self, name: str) -> bool:
        """Whether a member's bytes are read (the image entries); the others are only named."""
        _, extension = _base_plus_ext(name)
        return extension is not None and extension.lower() in self.choices

    def _finish(self, tar: str, sample: _Sample, seen: set[str]) -> Item:
        image_id = f"{tar}/{sample.key}"
        if sample.key in seen:
            return Item(image_id, None, f"duplicate key {sample.key!r}: a later sample of this tar with the key of an "
                                        "earlier one (their members are not next to each other); the id stands for the "
                                        "earlier sample, this later one is not encoded")  # fmt: skip
        seen.add(sample.key)
        if sample.problem is not None:
            return Item(image_id, None, sample.problem)
        for choice in self.choices:
            if choice in sample.images:
                return Item(image_id, sample.images[choice])
        return Item(image_id, None, self._no_image(sample))

    def _no_image(self, sample: _Sample) -> str:
        text = f"no image entry: none of {';'.join(self.choices)} among the sample's entries {sample.extensions}"
        dotted = [e for e in sample.extensions if "." in e and e.rsplit(".", 1)[1] in self.choices]
        if dotted:  # "a.v2.jpg": webdataset's key is "a", the extension "v2.jpg"
            text += (f" (webdataset's key ends at the first dot of a file name: this sample's key is {sample.key!r}; "
                     f"to use {dotted[0]!r}, pass --image-key {dotted[0]})")  # fmt: skip
        return text

    def _damaged(
        self, tar: str, sample: Optional[_Sample], seen: set[str], where: "_Position", exc: BaseException
    ) -> Iterator[Item]:
        """The tar cannot be read past this point: the sample it breaks inside (or right after: the next member's
        header, or a member passed over unread, may belong to it) is skipped, a complete sample before it is
        encoded; then the tar itself is listed with where reading stopped."""
        reason = error_text(exc)
        broken_key = _base_plus_ext(where.reading)[0] if where.reading is not None else None
        if sample is not None and broken_key is not None and broken_key != sample.key:
            yield self._finish(tar, sample, seen)  # complete: the broken member starts another sample
            sample = _Sample(broken_key)
        if where.reading is not None:
            place = f"in member {where.reading!r}"
            inside = f"inside this sample ({place}: {reason})"
        else:
            place = f"after member {where.last!r}" if where.last is not None else "at its start (is it a tar?)"
            inside = f"right after this sample's member {where.last!r}, so the sample may be incomplete ({reason})"
        if sample is not None:
            yield Item(f"{tar}/{sample.key}", None, f"the tar is damaged or truncated {inside}")
        yield Item(tar, None, f"damaged or truncated tar: reading stopped {place} ({reason}); the samples before it "
                              "are encoded, nothing after it can be read")  # fmt: skip


def _base_plus_ext(name: str) -> tuple[Optional[str], Optional[str]]:
    from webdataset.tariterators import base_plus_ext

    return base_plus_ext(name)


def _add(sample: _Sample, name: str, extension: str, data: Optional[bytes]) -> None:
    """One member into its sample (webdataset lower-cases extensions; a repeated one spoils the sample)."""
    extension = extension.lower()
    if extension in sample.extensions:
        sample.problem = f"two members named {name!r} (extension {extension!r}) in one sample"
        return
    sample.extensions.append(extension)
    if data is not None:
        sample.images[extension] = data


@dataclass
class _Position:
    """Where `_members` is, so a failure can be placed: the member whose bytes are being read, the last one seen."""

    reading: Optional[str] = None
    last: Optional[str] = None


class TruncatedTar(tarfile.ReadError):
    """A tar that ends (or breaks) where a member header should be, without the end-of-archive zero block."""


def _header_class(ends: list) -> type:
    """A TarInfo whose `fromtarfile` (tarfile's documented header reader) records why reading headers stopped."""

    class _Header(tarfile.TarInfo):
        @classmethod
        def fromtarfile(cls, archive: tarfile.TarFile) -> tarfile.TarInfo:
            try:
                return super().fromtarfile(archive)
            except tarfile.HeaderError as exc:
                ends.append(exc)
                raise

    return _Header


def _check_end(ends: list) -> None:
    """TruncatedTar (ReadError for a damaged header) unless the headers ended with the end-of-archive zero block.
    tarfile's stream mode takes a missing, short or invalid header after the first member for the end of the archive,
    which would drop every member after a cut silently (and commit the tar as complete)."""
    end = ends[-1] if ends else None
    if isinstance(end, tarfile.EOFHeaderError):
        return
    if isinstance(end, tarfile.EmptyHeaderError):
        raise TruncatedTar("no end-of-archive marker: the file ends where the next member header should be")
    if isinstance(end, tarfile.TruncatedHeaderError):
        raise TruncatedTar("no end-of-archive marker: the file ends inside a member header")
    raise tarfile.ReadError(f"damaged member header ({end}), and no end-of-archive marker before it")


def _members(stream: BinaryIO, wanted: Any, where: _Position) -> Iterator[tuple[str, Optional[bytes]]]:
    """(name, bytes or None) of a tar's sample members in order, streamed (tarfile's "r|*": no seeking, any
    compression); only the `wanted` members' bytes are read, the others are passed over. TruncatedTar when the tar
    does not end with its end-of-archive block."""
    ends: list = []
    with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_header_class(ends)) as archive:
        for info in archive:
            name = where.last = info.name
            if not info.isreg() or _META.match(name) or (name.startswith("__") and name.endswith("__")):
                continue
            data = None
            if wanted(name):
                where.reading = name
                data = archive.extractfile(info).read()
                where.reading = None
            yield name, data
            archive.members = []  # tarfile keeps every header otherwise (webdataset does the same)
    _check_end(ends)
