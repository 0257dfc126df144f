# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""What `--input` names: the list of image ids, each image's size (from its header alone) and its decoded pixels.

Owns the source interface and the in-memory sources (files: an id is the path as found; a `datasets` image column:
an id is the row index), how a spec string is resolved to a source (the streamed ones, webdataset tars and parquet
files, live in `tar_input` and `parquet_input`), and the bad-image policy (which errors skip an image, which stop
the run). Every source has the same small interface: `ids` (the inputs the run's plan splits into shards: images,
or for a streamed source its files, one per shard), `items(inputs)` (a shard's images as `Item`s, in input order),
`size(payload)` (width, height from the header or the encoded bytes) and `load(payload)` (the decoded image). Nothing
under --output is ever an input (a glob or folder covering it would read the run's own results). Files are
listed once per real file (the first spelling is the id; later spellings of the same file -- `d/./x.png`,
`d/../d/x.png`, a symlink to it, a repeated list line -- are dropped and reported) and only regular files are ever
opened: a FIFO, a socket, a device, a directory or a dangling symlink is skipped with its reason, never read (opening
a FIFO blocks).
Must not preprocess, pack or encode anything: the processor and the pipeline do.
"""

from __future__ import annotations

import codecs
import errno
import glob
import gzip
import io
import logging
import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, NamedTuple, Optional, Union

import PIL.Image

from ..errors import ToolError
from ..io.files import NotARegularFile as NotAnImageFile  # a ValueError: a bad image, skipped unopened
from ..io.files import glob_files, open_regular_file, tree_entries
from .options import DEFAULT_IMAGE_KEY, UsageError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
LIST_EXTENSIONS = (".txt", ".lst")
TAR_EXTENSIONS = (".tar", ".tar.gz", ".tgz")
PARQUET_EXTENSIONS = (".parquet",)
ImageId = Union[str, int]


class Item(NamedTuple):
    """One image of a shard: its id and what `size` / `load` take (a path, a row, the encoded bytes), or, when it
    cannot be used at all (a sample without an image, a damaged tar), `error` saying why (payload None)."""

    id: ImageId
    payload: Any
    error: Optional[str] = None

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


# Missing / unreadable by their type, with or without an errno (fsspec raises FileNotFoundError(url) for an HTTP 404).
_SKIPPABLE_OSERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
# OSErrors without an errno that say the BYTES are bad: PIL's decode errors and pyarrow's are plain OSErrors ("image
# file is truncated", "Invalid page header"), plus these subclasses. Every other errno-less OSError -- the Hub's
# HfHubHTTPError (429, 5xx), TimeoutError, a dropped connection -- is the network's fault, not the file's.
_FORMAT_OSERRORS = (PIL.UnidentifiedImageError, gzip.BadGzipFile)


def is_bad_image_error(exc: BaseException) -> bool:
    """True for errors that mean "this image cannot be used" (corrupt, truncated, unsupported, missing,
    unreadable, too large); False for everything else (bugs, out of memory, I/O and network failures: a timeout, an
    HTTP error), which stop the run, so a rerun reads the image (or the tar / parquet file) again."""
    if isinstance(exc, _SKIPPABLE_OSERRORS):
        return True
    if isinstance(exc, OSError):
        if exc.errno is not None:
            return exc.errno in _SKIPPABLE_ERRNOS
        if type(exc) is not OSError and not isinstance(exc, _FORMAT_OSERRORS):
            return False
        return exc.__cause__ is None or is_bad_image_error(exc.__cause__)  # `raise OSError(...) from timeout`
    return isinstance(
        exc, (ValueError, SyntaxError, EOFError, struct.error, zlib.error, PIL.Image.DecompressionBombError)
    )


class InputReadError(ToolError):
    """Reading a tar / parquet file of --input failed for a reason that is not the file's (a network or file-system
    error): the run stops with one paragraph (exit 1) and a rerun reads the file again; nothing of its shard is
    written."""


def read_failure(name: str, exc: BaseException) -> InputReadError:
    """The one paragraph for a file of --input whose reading failed through no fault of its own."""
    return InputReadError(
        f"reading --input file {name!r} failed ({error_text(exc)}); that is a network or file-system error, not "
        "damage, so the file is not listed as skipped and nothing of its shard was written. The finished shards "
        "are kept: rerun the same command to resume (it reads this file again)."
    )


def error_text(exc: BaseException) -> str:
    """How a skipped image's error is logged and listed in the manifest (the processor saw the image alone, so its
    "image 0: " prefix says nothing: the id is listed beside the error)."""
    text = str(exc)
    text = text[len("image 0: "):] if text.startswith("image 0: ") else text
    text = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "(the image's bytes)", text)  # PIL names no file then
    return f"{type(exc).__name__}: {text}".strip()


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
    streaming = False  # ids are the images; a shard is a slice of them

    def __init__(self, paths: list[str]):
        self.ids: list[ImageId]
        self.ids, self.duplicates = unique_files(paths)
        if self.duplicates:
            logger.info(
                "--input: %d path(s) name a file already listed under another spelling, encoded once (first: %r, same "
                "file as %r)", len(self.duplicates), self.duplicates[0]["id"], self.duplicates[0]["same_as"],
            )  # fmt: skip
        # the ids (paths) themselves are fingerprinted; relative ones name other files from another directory
        relative = any(not os.path.isabs(str(image_id)) for image_id in self.ids)
        self.identity: dict = {"kind": "files", **({"cwd": os.getcwd()} if relative else {})}

    def items(self, ids: Iterable[ImageId]) -> Iterator[Item]:
        return (Item(image_id, image_id) for image_id in ids)

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
    streaming = False  # ids are the rows; a shard is a slice of them

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

    def items(self, ids: Iterable[ImageId]) -> Iterator[Item]:
        return (Item(image_id, image_id) for image_id in ids)

    def _value(self, image_id: ImageId) -> dict:
        return checked_image_value(self.dataset[int(image_id)][self.column], f"row {image_id}: column {self.column!r}")

    def size(self, image_id: ImageId) -> tuple[int, int]:
        return image_value_size(self._value(image_id), lambda: self.load(image_id))

    def load(self, image_id: ImageId) -> PIL.Image.Image:
        return self.decoder.decode_example(self._value(image_id))


def checked_image_value(value: Any, where: str) -> dict:
    """A `datasets` image value ({"bytes", "path"}) that holds an image; a local path is checked to be a regular
    file (never open a FIFO & co.). ValueError naming `where` when it holds none."""
    if not isinstance(value, dict) or (value.get("bytes") is None and not value.get("path")):
        raise ValueError(f"{where} holds no image")
    if value.get("bytes") is None and os.path.lexists(value["path"]):
        open_regular_file(value["path"]).close()
    return value


def image_value_size(value: dict, load: Any) -> tuple[int, int]:
    """(width, height) of a `datasets` image value from its header; `load()` decodes it when it is a remote path."""
    # The header suffices: the EXIF rotation `datasets` applies at decode time only transposes the size, and the
    # resize rule is symmetric in (width, height), so the patch COUNT (all the plan needs) is the same.
    if value.get("bytes") is not None:
        fp: Any = io.BytesIO(value["bytes"])
    elif os.path.isfile(value["path"]):
        fp = value["path"]
    else:  # a remote path: let datasets fetch and decode it
        return load().size
    with PIL.Image.open(fp) as image:
        return image.size


Source = Any  # FileSource, DatasetSource, tar_input.TarSource or parquet_input.ParquetSource (same interface)


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


@dataclass
class _Listing:
    """How a spec's files become a source: what to call them in messages, which options apply, what to leave out."""

    spec: str
    image_key: str
    image_column: Optional[str]
    exclude: Optional[str]  # --output: nothing inside it is an input

    def without_output(self, paths: list[str]) -> list[str]:
        """`paths` minus those inside --output (the run's own results are never its inputs), logged."""
        if self.exclude is None:
            return paths
        output = os.path.realpath(self.exclude)
        kept = [p for p in paths if "://" in p or not _is_within(os.path.realpath(p), output)]
        if len(kept) < len(paths):
            logger.info("--input %r: %d path(s) inside --output %r left out (the run's own results are no input)",
                        self.spec, len(paths) - len(kept), self.exclude)  # fmt: skip
        return kept

    def source(self, paths: list[str], what: str) -> Source:
        """Listed paths -> TarSource (every one a tar), ParquetSource (every one a parquet file) or FileSource."""
        kinds = {_file_kind(p) for p in paths}
        if kinds == {"tar"} or kinds == {"parquet"}:
            check_protocols(paths, f"{what} {self.spec!r}")
            locations = _unique_locations(paths)
            if self.image_column is not None and kinds == {"tar"}:
                raise UsageError(f"--image-column applies to datasets and parquet input; {what} {self.spec!r} names "
                                 "tar shards, whose image is chosen with --image-key")  # fmt: skip
            if kinds == {"tar"}:
                from .tar_input import TarSource

                return TarSource(locations, self.image_key)
            from .parquet_input import ParquetSource

            return ParquetSource(locations, self.image_column)
        if kinds & {"tar", "parquet"}:
            odd = next(p for p in paths if _file_kind(p) == "other")
            raise UsageError(
                f"{what} {self.spec!r} names tar / parquet files and other files together (e.g. {odd!r}); name one "
                "kind: image files, webdataset .tar shards, or parquet files"
            )
        if any("://" in p for p in paths):
            raise UsageError(f"{what} {self.spec!r}: URLs are read for tar and parquet input only; image files must "
                             "be local paths")  # fmt: skip
        return FileSource(paths)


def check_protocols(locations: list[str], where: str) -> None:
    """UsageError naming `where` unless fsspec can read every URL's protocol here (its backend package installed), so
    a missing s3fs / aiohttp is one line before anything runs, not a traceback once the model is loaded."""
    import fsspec

    for protocol in sorted({location.split("://", 1)[0] for location in locations if "://" in location}):
        try:
            fsspec.get_filesystem_class(protocol)
        except ImportError as exc:
            raise UsageError(f"{where}: reading {protocol}:// URLs needs a package that is not installed ({exc}); "
                             "install it, or copy the files to a local folder") from exc  # fmt: skip
        except ValueError as exc:
            raise UsageError(f"{where}: fsspec knows no protocol {protocol!r} ({exc}); name local files, or URLs "
                             "fsspec can read (s3://, gs://, hf://, https://, ...)") from exc  # fmt: skip


def _is_within(real: str, folder: str) -> bool:
    return real == folder or real.startswith(folder.rstrip(os.sep) + os.sep)


def _file_kind(path: str) -> str:
    """"tar", "parquet" or "other", from the name."""
    name = path.lower()
    return "tar" if name.endswith(TAR_EXTENSIONS) else "parquet" if name.endswith(PARQUET_EXTENSIONS) else "other"


def _unique_locations(paths: list[str]) -> list[str]:
    """Tar / parquet files listed once each (a repeated list line or brace item, another spelling of a local file)."""
    seen, kept = set(), []
    for path in paths:
        key = path if "://" in path else os.path.realpath(path)
        if key not in seen:
            seen.add(key)
            kept.append(path)
    return kept


def unit_names(locations: list[str]) -> list[str]:
    """Each file's name in ids: its path below the deepest folder all of them share (so the file name when they
    share one folder; "a/00000.tar" and "b/00000.tar" stay apart)."""
    folders = [location.split("/")[:-1] for location in locations]
    common = 0
    while all(len(f) > common for f in folders) and len({tuple(f[: common + 1]) for f in folders}) == 1:
        common += 1
    return ["/".join(location.split("/")[common:]) for location in locations]


def unit_folder(locations: list[str], names: list[str]) -> str:
    """Where the files `unit_names` named are: the folder their names are below (absolute, not symlink-resolved, as
    files' ids: every node names it the same way) or the URL prefix. Part of the input's identity, so files of the
    same names in another folder are another run's inputs."""
    folder = locations[0][: len(locations[0]) - len(names[0])]  # "" when the names are the whole locations
    return folder if "://" in folder else os.path.join(os.path.abspath(folder or "."), "")


def open_stream(location: str) -> BinaryIO:
    """A tar / parquet file opened for reading: a local path only if it is a regular file (never a FIFO & co.), a
    URL through fsspec (s3://, gs://, hf://, ... where the backend is installed)."""
    if "://" in location:
        import fsspec

        return fsspec.open(location, "rb").open()
    return open_regular_file(location)


def _decode_list(data: bytes) -> str:
    """A list file's text: UTF-8, with or without a byte-order mark (Windows editors write one), or UTF-16 with
    its byte-order mark; CRLF line ends are handled by the caller's splitlines."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16")
    return data.decode("utf-8-sig")


def _folder_source(path: Path, spec: str, listing: _Listing) -> Source:
    # every entry but folders: FIFOs, sockets, devices and dangling symlinks with an image name are listed, and then
    # skipped with their reason (never opened); a folder is a container, not a file that should have been an image
    found = [p for p in tree_entries(path) if not p.is_dir()]
    found = [Path(p) for p in listing.without_output([str(p) for p in found])]
    files = sorted(str(p) for p in found if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:  # no images: a folder of tar shards or of parquet files
        streamed = sorted(str(p) for p in found if _file_kind(str(p)) != "other")
        if streamed:
            return listing.source(streamed, "--input folder")
    if len(files) < len(found):
        logger.info("--input folder: %d files without an image extension ignored", len(found) - len(files))
    if not files:
        raise UsageError(f"--input folder {spec!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)}), webdataset "
                         "tar shards or parquet files")  # fmt: skip
    return FileSource(files)


def _file_source(path: Path, spec: str, listing: _Listing) -> Source:
    """One image, tar or parquet file, or a .txt / .lst list of paths (one per line, `#` comments)."""
    if path.suffix.lower() not in LIST_EXTENSIONS:
        return listing.source([spec], "--input")
    try:
        with open_regular_file(spec) as f:
            lines = [line.strip() for line in _decode_list(f.read()).splitlines()]
    except NotAnImageFile as exc:
        raise UsageError(f"--input list {spec!r}: {exc}; write the list to a regular file") from exc
    except UnicodeDecodeError as exc:
        raise UsageError(f"--input {spec!r}: a {path.suffix} file is read as a list of paths, and is not text") from exc
    files = listing.without_output([line for line in lines if line and not line.startswith("#")])
    if not files:
        raise UsageError(f"--input list {spec!r} names no files")
    return listing.source(files, "--input list")


def _glob_source(spec: str, listing: _Listing) -> Source:
    files = sorted(p for p in glob_files(spec) if not os.path.isdir(p))  # as a folder: see above
    files = listing.without_output(files)
    if not files:
        raise UsageError(f"--input glob {spec!r} matches no files")
    return listing.source(files, "--input glob")


def _expanded_source(spec: str, listing: _Listing) -> Source:
    """webdataset's conventions: `::`-separated specs and brace ranges (`shards/{00000..00099}.tar`), each piece then
    a glob, a path or (s3://, gs://, hf://, ...) an fsspec URL or URL glob. Named files that do not exist are kept
    (listed as skipped when read), as a brace range's missing shard."""
    from webdataset.shardlists import expand_urls

    paths: list[str] = []
    for piece in expand_urls(spec):
        if "://" in piece:
            paths.extend(_url_glob(piece) if glob.has_magic(piece) else [piece])
        else:
            paths.extend(sorted(p for p in glob_files(piece) if not os.path.isdir(p))
                         if glob.has_magic(piece) else [piece])  # fmt: skip
    paths = listing.without_output(paths)
    if not paths:
        raise UsageError(f"--input {spec!r} matches no files")
    return listing.source(paths, "--input")


def _url_glob(url: str) -> list[str]:
    """An fsspec URL glob -> the matching files' URLs, sorted."""
    import fsspec

    check_protocols([url], f"--input {url!r}")
    try:
        fs, pattern = fsspec.core.url_to_fs(url)
        protocol = url.split("://", 1)[0]
        return sorted(f"{protocol}://{path}" for path in fs.glob(pattern) if not fs.isdir(path))
    except (ValueError, ImportError, OSError) as exc:
        raise UsageError(f"--input {url!r} cannot be listed: {exc}") from exc


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
    spec: str,
    split: Optional[str] = None,
    image_column: Optional[str] = None,
    dataset_config: Optional[str] = None,
    image_key: str = DEFAULT_IMAGE_KEY,
    exclude: Optional[str] = None,
) -> Source:
    """`--input` -> a source. Tried in order: a saved `datasets` folder, a folder (of images; else of webdataset tars
    or of parquet files), a file (a .txt / .lst list of paths, one per line, relative to the working directory; a
    .tar or .parquet file; anything else is one image), a `file://` URL as its path, webdataset's brace ranges and
    `::` lists and fsspec URLs (tar and parquet files), a glob, and last a Hub dataset id. Nothing inside `exclude`
    (--output) is listed."""
    if spec.startswith("file://"):
        spec = spec[len("file://"):]
    listing = _Listing(spec, image_key, image_column, exclude)
    path = Path(spec)
    saved_dataset = _is_saved_dataset(path)
    expandable = not path.exists() and ("://" in spec or "::" in spec or ("{" in spec and "}" in spec))
    if split is not None and not saved_dataset and (path.exists() or glob.has_magic(spec) or expandable):
        raise UsageError(f"--split {split!r} applies to datasets input only; --input {spec!r} is files")
    if saved_dataset:
        import datasets

        return _dataset_source(datasets.load_from_disk(str(path)), spec, split, image_column, {})
    if path.is_dir():
        return _folder_source(path, spec, listing)
    if path.is_file() or os.path.lexists(spec):  # one image or a list; a FIFO & co. as one image: skipped unopened
        return _file_source(path, spec, listing)
    if expandable:
        return _expanded_source(spec, listing)
    if glob.has_magic(spec):
        return _glob_source(spec, listing)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:  # a path, not an "owner/name" Hub id
        raise UsageError(f"--input {spec!r}: no such file, folder or glob")
    return _hub_dataset_source(spec, split, image_column, dataset_config)
