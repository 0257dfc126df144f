# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""What `--input` names: the list of image ids, each image's size (from its header alone) and its decoded pixels.

Owns the sources (files: an id is the path as found; a `datasets` image column: an id is the row index), how a
spec string is resolved to one, and the bad-image policy (which errors skip an image, which stop the run). Files are
listed once per real file (the first spelling is the id; later spellings of the same file -- `d/./x.png`,
`d/../d/x.png`, a symlink to it, a repeated list line -- are dropped and reported) and only regular files are ever
opened: a FIFO, a socket, a device, a directory or a dangling symlink is skipped with its reason, never read (opening
a FIFO blocks).
Must not preprocess, pack or encode anything: the processor and the pipeline do.
"""

from __future__ import annotations

import errno
import glob
import io
import logging
import os
import struct
import zlib
from pathlib import Path
from typing import Any, Optional, Union

import PIL.Image

from ..io.files import NotARegularFile as NotAnImageFile  # a ValueError: a bad image, skipped unopened
from ..io.files import glob_files, open_regular_file, tree_entries
from .options import UsageError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
LIST_EXTENSIONS = (".txt", ".lst")
ImageId = Union[str, int]

# OSErrors of the file system that are NOT the image's fault: the run stops (a rerun resumes) instead of recording
# the image as skipped for good. Missing / unreadable files are skipped (logged and listed), like corrupt ones.
_SKIPPABLE_ERRNOS = {
    errno.ENOENT,
    errno.EACCES,
    errno.EPERM,
    errno.EISDIR,
    errno.ENOTDIR,
    errno.ELOOP,
    errno.ENAMETOOLONG,
}


def is_bad_image_error(exc: BaseException) -> bool:
    """True for errors that mean "this image cannot be used" (corrupt, truncated, unsupported, missing,
    unreadable, too large); False for everything else (bugs, out of memory, I/O failures), which stop the run."""
    if isinstance(exc, OSError):  # PIL's decode errors are OSErrors without an errno ("image file is truncated")
        return exc.errno is None or exc.errno in _SKIPPABLE_ERRNOS
    return isinstance(
        exc, (ValueError, SyntaxError, EOFError, struct.error, zlib.error, PIL.Image.DecompressionBombError)
    )


def error_text(exc: BaseException) -> str:
    """How a skipped image's error is logged and listed in the manifest (the processor saw the image alone, so its
    "image 0: " prefix says nothing: the id is listed beside the error)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text[len('image 0: '):] if text.startswith('image 0: ') else text}".strip()


def unique_files(paths: list[str]) -> tuple[list[str], list[dict]]:
    """One path per real file, in the given order: the first spelling of a file is kept (it becomes the id); later
    spellings of the same file (`./`, `..`, symlinks, repeated lines) are returned as {"id", "same_as"} entries."""
    first: dict[str, str] = {}
    kept, duplicates = [], []
    for path in paths:
        real = os.path.realpath(path)
        if real in first:
            duplicates.append({"id": path, "same_as": first[real]})
        else:
            first[real] = path
            kept.append(path)
    return kept, duplicates


class FileSource:
    """Image files; an image's id is its path as found (the first spelling, see `unique_files`). Images are read as
    stored (EXIF orientation is not applied), exactly as `processor(Image.open(path))` and BAGEL read them; only
    regular files are opened (`open_regular_file`)."""

    kind = "files"

    def __init__(self, paths: list[str]):
        self.ids: list[ImageId]
        self.ids, self.duplicates = unique_files(paths)
        if self.duplicates:
            logger.info(
                "--input: %d path(s) name a file already listed under another spelling, encoded once (first: %r, same "
                "file as %r)", len(self.duplicates), self.duplicates[0]["id"], self.duplicates[0]["same_as"],
            )  # fmt: skip
        self.identity: dict = {"kind": "files"}  # the ids (paths) themselves are fingerprinted

    def size(self, image_id: ImageId) -> tuple[int, int]:
        with open_regular_file(str(image_id)) as f, PIL.Image.open(f) as image:
            return image.size

    def load(self, image_id: ImageId) -> PIL.Image.Image:
        with open_regular_file(str(image_id)) as f, PIL.Image.open(f) as image:
            image.load()  # decodes; the file is closed on leaving the block, the pixels stay
        return image


class DatasetSource:
    """A `datasets.Dataset`'s image column; an image's id is its row index. Rows are read undecoded (bytes / path,
    that column alone) and decoded by `datasets` itself, so an image is exactly `dataset[i][column]` (EXIF
    orientation applied, remote paths opened by `datasets`), and a corrupt image is one skipped row."""

    kind = "dataset"

    def __init__(self, dataset: Any, column: str, identity: dict):
        import datasets

        self.column = column
        self.dataset = dataset.select_columns([column]).cast_column(column, datasets.Image(decode=False))
        self.decoder = datasets.Image()
        self.ids: list[ImageId] = list(range(len(dataset)))
        self.duplicates: list[dict] = []
        # `_fingerprint` is datasets' own hash of the data (and of its transforms): a different dataset of the same
        # length must not pass for this one when a run resumes
        self.identity = {
            "kind": "dataset",
            **identity,
            "column": column,
            "data": getattr(dataset, "_fingerprint", None),
        }

    def _value(self, image_id: ImageId) -> dict:
        value = self.dataset[int(image_id)][self.column]
        if value is None or (value.get("bytes") is None and not value.get("path")):
            raise ValueError(f"row {image_id}: column {self.column!r} holds no image")
        if value.get("bytes") is None and os.path.lexists(value["path"]):  # a local file: never open a FIFO & co.
            open_regular_file(value["path"]).close()
        return value

    def size(self, image_id: ImageId) -> tuple[int, int]:
        value = self._value(image_id)
        # The header suffices: the EXIF rotation `datasets` applies at decode time only transposes the size, and the
        # resize rule is symmetric in (width, height), so the patch COUNT (all the plan needs) is the same.
        if value.get("bytes") is not None:
            fp: Any = io.BytesIO(value["bytes"])
        elif os.path.isfile(value["path"]):
            fp = value["path"]
        else:  # a remote path: let datasets fetch and decode it
            return self.load(image_id).size
        with PIL.Image.open(fp) as image:
            return image.size

    def load(self, image_id: ImageId) -> PIL.Image.Image:
        return self.decoder.decode_example(self._value(image_id))


Source = Union[FileSource, DatasetSource]


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any(
        (path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json")
    )


def _pick_split(dataset: Any, split: Optional[str], spec: str) -> Any:
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        names = list(dataset.keys())
        if split is None:
            if len(names) != 1:
                raise UsageError(f"--input {spec!r} is a dataset with splits {names}: choose one with --split")
            split = names[0]
        if split not in dataset:
            raise UsageError(f"--split {split!r} is not in dataset {spec!r}; it has {names}")
        return dataset[split]
    if split is not None and not isinstance(dataset, datasets.Dataset):
        raise UsageError(f"--input {spec!r} is not a datasets.Dataset ({type(dataset).__name__})")
    return dataset


def _image_column(dataset: Any, column: Optional[str], spec: str) -> str:
    import datasets

    features = dataset.features
    if column is not None:
        if column not in features:
            raise UsageError(f"--image-column {column!r} is not a column of {spec!r}; columns: {list(features)}")
        if not isinstance(features[column], datasets.Image):
            raise UsageError(f"--image-column {column!r} of {spec!r} is {features[column]!r}, not an image column")
        return column
    image_columns = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
    if not image_columns:
        raise UsageError(
            f"dataset {spec!r} has no image column (columns: {list(features)}); name one with --image-column"
        )
    return image_columns[0]


def _dataset_source(
    dataset: Any, spec: str, split: Optional[str], image_column: Optional[str], identity: dict
) -> DatasetSource:
    dataset = _pick_split(dataset, split, spec)
    return DatasetSource(
        dataset, _image_column(dataset, image_column, spec), {"input": spec, "split": split, **identity}
    )


def _folder_source(path: Path, spec: str) -> FileSource:
    # every entry but folders: FIFOs, sockets, devices and dangling symlinks with an image name are listed, and then
    # skipped with their reason (never opened); a folder is a container, not a file that should have been an image
    found = [p for p in tree_entries(path) if not p.is_dir()]
    files = sorted(str(p) for p in found if p.suffix.lower() in IMAGE_EXTENSIONS)
    if len(files) < len(found):
        logger.info("--input folder: %d files without an image extension ignored", len(found) - len(files))
    if not files:
        raise UsageError(f"--input folder {spec!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return FileSource(files)


def _file_source(path: Path, spec: str) -> FileSource:
    """One image, or a .txt / .lst list of paths (one per line, `#` comments)."""
    if path.suffix.lower() not in LIST_EXTENSIONS:
        return FileSource([spec])
    try:
        with open_regular_file(spec) as f:
            lines = [line.strip() for line in f.read().decode().splitlines()]
    except NotAnImageFile as exc:
        raise UsageError(f"--input list {spec!r}: {exc}; write the list to a regular file") from exc
    except UnicodeDecodeError as exc:
        raise UsageError(f"--input {spec!r}: a {path.suffix} file is read as a list of paths, and is not text") from exc
    files = [line for line in lines if line and not line.startswith("#")]
    if not files:
        raise UsageError(f"--input list {spec!r} names no files")
    return FileSource(files)


def _glob_source(spec: str) -> FileSource:
    files = sorted(p for p in glob_files(spec) if not os.path.isdir(p))  # as a folder: see above
    if not files:
        raise UsageError(f"--input glob {spec!r} matches no files")
    return FileSource(files)


def _hub_dataset_source(
    spec: str, split: Optional[str], image_column: Optional[str], dataset_config: Optional[str]
) -> DatasetSource:
    try:  # a Hub dataset id (or any name `datasets.load_dataset` accepts)
        import datasets

        dataset = datasets.load_dataset(spec, name=dataset_config, split=split)
    except Exception as exc:
        raise UsageError(f"--input {spec!r} is no file, folder or glob, and no loadable dataset: {exc}") from exc
    return _dataset_source(dataset, spec, split, image_column, {"config": dataset_config})


def resolve_input(
    spec: str, split: Optional[str] = None, image_column: Optional[str] = None, dataset_config: Optional[str] = None
) -> Source:
    """`--input` -> a FileSource or DatasetSource. Tried in order: a saved `datasets` folder, a folder of images, a
    file (a .txt / .lst list of paths, one per line, relative to the working directory; anything else is one
    image), a glob, and last a Hub dataset id."""
    path = Path(spec)
    saved_dataset = _is_saved_dataset(path)
    if split is not None and not saved_dataset and (path.exists() or glob.has_magic(spec)):
        raise UsageError(f"--split {split!r} applies to datasets input only; --input {spec!r} is files")
    if saved_dataset:
        import datasets

        return _dataset_source(datasets.load_from_disk(str(path)), spec, split, image_column, {})
    if path.is_dir():
        return _folder_source(path, spec)
    if path.is_file() or os.path.lexists(spec):  # one image or a list; a FIFO & co. as one image: skipped unopened
        return _file_source(path, spec)
    if glob.has_magic(spec):
        return _glob_source(spec)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:  # a path, not an "owner/name" Hub id
        raise UsageError(f"--input {spec!r}: no such file, folder or glob")
    return _hub_dataset_source(spec, split, image_column, dataset_config)
