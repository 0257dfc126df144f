# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""Parquet files as a source: one file is one unit of work (one output shard), its rows streamed.

Owns which column holds the images (`--image-column`, else the first `datasets` Image feature the file's metadata
declares, else the first Hugging Face `{"bytes", "path"}` struct, else the first binary column), reading a file
`ROWS_PER_READ` rows of the image column at a time, page by page (pyarrow's buffered reader: never a whole file,
nor a whole row group, in memory), and the ids: "<file name>:<row>", the file name being its path below the folder
all the run's files share. A row without an image is listed as skipped; a
file that cannot be read (not parquet, no such column, damaged) is listed under its own name, with what was read
before the damage still encoded. Rows are decoded by `datasets`, exactly as `load_dataset("parquet", ...)[i][column]`
(EXIF orientation applied). Must not decode images while listing (the pipeline's workers do) nor pack them.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Iterator, Optional

import PIL.Image

from .inputs import (
    Item,
    checked_image_value,
    error_text,
    image_value_size,
    is_bad_image_error,
    open_stream,
    read_failure,
    unit_folder,
    unit_names,
)
from .options import UsageError

ROWS_PER_READ = 64  # rows converted to Python at a time
READ_BUFFER_BYTES = 1 << 20  # pyarrow's buffered column reader: the file is read in pieces of this size (plus a page)


class NoImageColumn(ValueError):
    """A parquet file has no (such) image column."""


def image_column(schema: Any, requested: Optional[str], where: str) -> str:
    """The image column of a parquet file's arrow `schema`: `requested` when it is one, else the first image column
    (a `datasets` Image feature in the file's metadata, a {"bytes", "path"} struct, a binary column)."""
    import pyarrow as pa

    def is_binary(arrow_type: Any) -> bool:
        return pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type)

    def is_image(arrow_type: Any) -> bool:
        if pa.types.is_struct(arrow_type):
            index = arrow_type.get_field_index("bytes")
            return index >= 0 and is_binary(arrow_type.field(index).type)
        return is_binary(arrow_type)

    if requested is not None:
        if requested not in schema.names:
            raise NoImageColumn(f"{where}: --image-column {requested!r} is not a column (columns: {schema.names})")
        if not is_image(schema.field(requested).type):
            raise NoImageColumn(f"{where}: --image-column {requested!r} is {schema.field(requested).type}, not a "
                                "binary column or a {'bytes', 'path'} image struct")  # fmt: skip
        return requested
    declared = _declared_image_columns(schema)
    ordered = [name for name in declared if name in schema.names] + schema.names
    candidates = [name for name in ordered if is_image(schema.field(name).type)]
    if not candidates:
        raise NoImageColumn(f"{where} has no image column (a binary column or a {{'bytes', 'path'}} struct; columns: "
                            f"{schema.names}); name one with --image-column")  # fmt: skip
    return candidates[0]


def _declared_image_columns(schema: Any) -> list[str]:
    """The columns a `datasets`-written file declares as Image features (its "huggingface" schema metadata)."""
    try:
        features = json.loads((schema.metadata or {})[b"huggingface"])["info"]["features"]
        return [name for name, value in features.items() if isinstance(value, dict) and value.get("_type") == "Image"]
    except (KeyError, ValueError, TypeError, AttributeError):
        return []


class ParquetSource:
    """Parquet files (local paths or fsspec URLs) with an image column; `ids` are the files (one shard each), `items`
    streams a file's rows."""

    kind = "parquet"
    streaming = True  # ids are files of images; a shard is one of them

    def __init__(self, locations: list[str], requested_column: Optional[str]):
        import datasets

        self.ids: list = unit_names(locations)
        self.locations = dict(zip(self.ids, locations))
        self.requested = requested_column
        self.duplicates: list[dict] = []
        self.decoder = datasets.Image()
        self.column = self._first_file_column()
        self.identity = {"kind": "parquet", "column": self.column, "folder": unit_folder(locations, self.ids)}

    def _first_file_column(self) -> str:
        """The image column, from the footer of the first file that can be read (a clear error before anything runs;
        an unreadable file is listed when its shard is encoded)."""
        import pyarrow.parquet as pq

        problems = []
        for name in self.ids:
            try:
                with open_stream(self.locations[name]) as stream:
                    schema = pq.ParquetFile(stream).schema_arrow
            except Exception as exc:
                if not is_bad_image_error(exc):
                    if isinstance(exc, OSError):
                        raise read_failure(name, exc) from exc
                    raise
                problems.append(f"{name!r}: {error_text(exc)}")
                continue
            try:
                return image_column(schema, self.requested, f"--input file {name!r}")
            except NoImageColumn as exc:
                raise UsageError(str(exc)) from exc
        raise UsageError(f"--input {len(self.ids)} parquet file(s), none readable as parquet (first: {problems[0]})")

    # ---- the source interface ------------------------------------------------------------------------------------
    def items(self, files: Iterable[str]) -> Iterator[Item]:
        for name in files:
            yield from self._rows(name)

    def size(self, payload: dict) -> tuple[int, int]:
        return image_value_size(payload, lambda: self.load(payload))

    def load(self, payload: dict) -> PIL.Image.Image:
        return self.decoder.decode_example(payload)

    # ---- one file --------------------------------------------------------------------------------------------------
    def _column_of(self, schema: Any, name: str) -> str:
        """This file's image column: --image-column, else the first file's (every file of a run uses one column)."""
        if self.requested is not None:
            return image_column(schema, self.requested, f"file {name!r}")
        try:
            return image_column(schema, self.column, f"file {name!r}")
        except NoImageColumn:
            raise NoImageColumn(f"file {name!r} has no image column {self.column!r} (the first file's; columns: "
                                f"{schema.names}); name one with --image-column") from None  # fmt: skip

    def _rows(self, name: str) -> Iterator[Item]:
        import pyarrow.parquet as pq

        row = 0
        try:
            with open_stream(self.locations[name]) as stream:
                # buffered, not pre-buffered: the column is read page by page as batches are taken, not a whole row
                # group's column chunk at once (`read_row_group`), so memory is bounded by a page, not a row group
                parquet = pq.ParquetFile(stream, buffer_size=READ_BUFFER_BYTES, pre_buffer=False)
                column = self._column_of(parquet.schema_arrow, name)
                for group in range(parquet.num_row_groups):  # one group at a time: a batch never joins two of them
                    batches = parquet.iter_batches(batch_size=ROWS_PER_READ, row_groups=[group], columns=[column],
                                                   use_threads=False)  # fmt: skip
                    for batch in batches:
                        for value in batch.column(0).to_pylist():
                            yield _row_item(f"{name}:{row}", value, column)
                            row += 1
        except NoImageColumn as exc:
            yield Item(name, None, str(exc))
        except Exception as exc:
            if not is_bad_image_error(exc):  # the network's fault (HTTP error, timeout): a rerun reads the file again
                if isinstance(exc, OSError):
                    raise read_failure(name, exc) from exc
                raise
            stopped = f"reading stopped at row {row} ({error_text(exc)}); the rows before it are encoded" if row else (
                f"cannot be read: {error_text(exc)}")  # fmt: skip
            yield Item(name, None, f"parquet file {stopped}")


def _row_item(image_id: str, value: Any, column: str) -> Item:
    """One row's image value as an Item ({"bytes", "path"}; a binary column's bytes become {"bytes": b})."""
    if isinstance(value, (bytes, bytearray)):
        value = {"bytes": bytes(value), "path": None}
    try:
        return Item(image_id, checked_image_value(value, f"column {column!r}"))
    except Exception as exc:
        if not is_bad_image_error(exc):
            raise
        return Item(image_id, None, error_text(exc))
