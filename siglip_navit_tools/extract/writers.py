# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""The output formats: one writer per format behind one interface, and how each format's shard files are found and
read back.

    safetensors  shard-XXXXX-of-YYYYY.safetensors: `pooled` (n, C) float32, `grid_hw` (n, 2) int64 and, with
                 --save-grids, `features.{j}` (h_j, w_j, C) in the model dtype; rows in input order (the default)
    parquet      shard-XXXXX-of-YYYYY.parquet: `id` string, `pooled` fixed-size list<float32>[C], `grid_h`, `grid_w`
                 int32 and, with --save-grids, `features` binary (the (grid_h, grid_w, C) map's bytes, row-major,
                 little-endian, in the file's `features_dtype`); rows in the order they were encoded
    npy          embeddings/XXXXX.npy float32 (n, C) + metadata/XXXXX.parquet (`id`, `grid_h`, `grid_w`), same row
                 order: the layout autofaiss, embedding-reader and clip-retrieval read

A writer (`open_shard`) takes one shard: `add` each image as it is encoded (a grid goes to the shard's temporary
file at once, never held for the whole shard), then `commit` (synced, renamed into place: a shard's files exist only
once complete) or, on any failure, `discard` (its temporaries removed). Every shard stores its metadata (format,
fingerprint, plan, skipped images, and its ids) in its own files, which `read_shard` reads back: the shard files are
the run's ground truth. Must not know what makes a run (shards.py does) nor load models or read images.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from ..errors import ToolError
from ..io import atomic
from ..io.files import is_regular_file, open_regular_file

FORMAT = "siglip-navit-features/1"  # every shard's and the manifest's `format`
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}
# A streamed safetensors shard reserves room for its header (written last): per expected image, its tensor entry, id
# and list item; a header that outgrows it costs one copy of the data at commit, never a wrong file.
HEADER_BYTES_PER_IMAGE = 384
HEADER_BYTES_BASE = 65536
STREAMED_EXPECTED_IMAGES = 10000  # a tar / parquet file's image count is unknown until read (img2dataset writes 10k)
PARQUET_ROW_GROUP_BYTES = 64 * 2**20  # a parquet writer holds at most one row group (with grids: ~64 MB)
PARQUET_ROW_GROUP_ROWS = 4096
_NPY_HEADER = 128  # npy header length (magic included): room for any (n, C), rewritten in place at commit


def shard_name(k: int, num_shards: int) -> str:
    return f"shard-{k:05d}-of-{num_shards:05d}.safetensors"


class OutputWriteError(ToolError):
    """Writing into --output failed in the operating system (disk full, quota, read-only, no permission)."""


@contextlib.contextmanager
def output_errors(path: Path) -> Iterator[None]:
    """An operating-system failure of writing `path` in --output as one paragraph saying what it means for the run
    (exit status 1). safetensors' writer reports an OS error only in its message ("... (os error 28)")."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - only OS errors are turned into the paragraph; the rest is re-raised
        found = re.search(r"\(os error (\d+)\)", str(exc)) if not isinstance(exc, OSError) else None
        if not isinstance(exc, OSError) and found is None:
            raise
        os_error = exc if isinstance(exc, OSError) else OSError(int(found[1]), os.strerror(int(found[1])))
        raise OutputWriteError(
            f"{atomic.TargetWriteError(path, os_error)}; the finished shards are kept and nothing half-written is "
            "left. Fix that (free some space, or choose a writable --output) and rerun the same command to resume."
        ) from None


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    """A CPU tensor's bytes, as stored (any dtype, bfloat16 included: numpy has none)."""
    return memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


class ShardWriter:
    """One shard of one format being written (see the module docstring); use it as a context manager: leaving the
    block without `commit` discards the shard's temporaries."""

    name = ""  # the --format value

    def __init__(self, output: Path, k: int, num_shards: int, hidden_size: int, save_grids: bool, expected: int):
        self.output, self.k, self.num_shards = output, k, num_shards
        self.hidden_size, self.save_grids, self.expected = hidden_size, save_grids, expected
        self.count = 0
        self.temporaries: list[Path] = []
        self.path = shard_path(output, self.name, k, num_shards)  # the file whose existence says "complete"

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.discard()

    def add(self, image_id: Any, pooled: torch.Tensor, grid_hw: tuple[int, int], grid: Optional[torch.Tensor]) -> None:
        """One encoded image: its pooled (C,) float32 vector, its patch grid and (with --save-grids) its map."""
        self.count += 1
        with output_errors(self.path):
            self._add(image_id, pooled, grid_hw, grid)

    def commit(self, metadata: dict[str, str], order: dict) -> list:
        """Write the shard's files into place atomically, `metadata` (and the ids) stored in them. `order` maps an id
        to its input position (formats that keep input order sort by it). Returns the ids in file order."""
        with output_errors(self.path):
            ids = self._commit(metadata, order)
        self.discard()
        return ids

    def discard(self) -> None:
        """Remove this shard's temporaries (nothing is left under a final name that was not complete)."""
        self._close()
        for path in self.temporaries:
            path.unlink(missing_ok=True)
        self.temporaries = []

    def _temporary(self, path: Path, tag: str = "") -> Path:
        tmp = atomic.temporary_sibling(path, f"{os.getpid()}{tag}")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        self.temporaries.append(tmp)
        return tmp

    # per format
    def _add(self, image_id: Any, pooled: torch.Tensor, grid_hw: tuple[int, int], grid: Optional[torch.Tensor]) -> None:
        raise NotImplementedError

    def _commit(self, metadata: dict[str, str], order: dict) -> list:
        raise NotImplementedError

    def _close(self) -> None:
        pass


# ----------------------------------------------------------------------------------------------------------------
# safetensors (the default: today's layout)
# ----------------------------------------------------------------------------------------------------------------
def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a shard atomically: a temporary file in the same folder, synced, renamed over the final name once
    complete. An interrupted write (Ctrl-C, a crash) leaves no file under the final name and removes its temporary."""
    from safetensors.torch import save_file

    tmp = atomic.temporary_sibling(path)
    try:
        with output_errors(path):
            save_file(tensors, str(tmp), metadata=metadata)
            atomic.replace_file(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class _StreamedSafetensors:
    """A safetensors file whose big tensors are appended as they come: safetensors' own writers take every tensor at
    once, so a shard of grids would be held in memory. The header goes last, into room reserved at the start (the
    format allows a header padded with spaces); should it not fit, the file is rewritten once with a bigger one."""

    def __init__(self, tmp: Path, reserve: int):
        self.tmp, self.reserve = tmp, reserve - reserve % 8  # keeps the data 8-byte aligned
        self.file = open(tmp, "wb")
        self.file.write(b"\0" * (8 + self.reserve))
        self.size = 0  # bytes of data written
        self.entries: dict[str, dict] = {}

    def append(self, name: str, tensor: torch.Tensor) -> None:
        raw = _raw_bytes(tensor)
        self.file.write(raw)
        dtype = SAFETENSORS_DTYPES[tensor.dtype]
        self.entries[name] = {"dtype": dtype, "shape": list(tensor.shape), "data_offsets": [self.size, self.size + len(raw)]}
        self.size += len(raw)

    def finish(self, names: dict[str, str], small: dict[str, torch.Tensor], metadata: dict[str, str], spare: Path) -> Path:
        """Rename the appended tensors (old -> new name), add the `small` ones after them, write the header; returns
        the finished file (the temporary itself, or `spare` when the header needed the rewrite)."""
        self.entries = {names[old]: entry for old, entry in self.entries.items()}
        aligned = self.size % 8 == 0
        for name, tensor in small.items():
            self.append(name, tensor)
        header = json.dumps({**self.entries, "__metadata__": metadata}, separators=(",", ":")).encode()
        if aligned and len(header) <= self.reserve:
            self.file.seek(0)
            self.file.write(struct.pack("<Q", self.reserve) + header.ljust(self.reserve, b" "))
            self.file.close()
            return self.tmp
        self.file.close()
        return self._rewrite(small, metadata, spare)

    def _rewrite(self, small: dict[str, torch.Tensor], metadata: dict[str, str], spare: Path) -> Path:
        """The header outgrew its room (or the data is misaligned): a new file, the small tensors first, then the big
        ones copied over (their offsets shifted), each aligned to its dtype."""
        first = {name: self.entries.pop(name) for name in small}
        shift = sum(e["data_offsets"][1] - e["data_offsets"][0] for e in first.values())
        entries, position = {}, 0
        for name, entry in first.items():
            length = entry["data_offsets"][1] - entry["data_offsets"][0]
            entries[name] = {**entry, "data_offsets": [position, position + length]}
            position += length
        for name, entry in self.entries.items():
            entries[name] = {**entry, "data_offsets": [entry["data_offsets"][0] + shift, entry["data_offsets"][1] + shift]}
        header = json.dumps({**entries, "__metadata__": metadata}, separators=(",", ":")).encode()
        header = header.ljust(len(header) + (-len(header)) % 8, b" ")
        with open_regular_file(self.tmp) as src, open(spare, "wb") as dst:  # our own temporary, read back
            dst.write(struct.pack("<Q", len(header)) + header)
            big_end = 8 + self.reserve + self.size - shift
            src.seek(big_end)
            shutil.copyfileobj(src, dst)  # the small tensors (at the end) first
            src.seek(8 + self.reserve)
            _copy_range(src, dst, self.size - shift)
        return spare

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()


def _copy_range(src: Any, dst: Any, length: int, chunk: int = 16 * 2**20) -> None:
    """Copy `length` bytes from src's position to dst, `chunk` bytes at a time (bounded memory)."""
    while length > 0:
        data = src.read(min(chunk, length))
        if not data:
            raise OSError(f"{src.name} ended {length} bytes early")
        dst.write(data)
        length -= len(data)


class SafetensorsWriter(ShardWriter):
    """shard-XXXXX-of-YYYYY.safetensors, rows in input order (see the module docstring). Without grids the small
    tensors are written by safetensors' own `save_file`; with grids each map is appended to the temporary file as it
    comes (`_StreamedSafetensors`), and only `features.{j}`'s final names wait for the commit."""

    name = "safetensors"

    def __init__(self, output: Path, k: int, num_shards: int, hidden_size: int, save_grids: bool, expected: int):
        super().__init__(output, k, num_shards, hidden_size, save_grids, expected)
        self.rows: list[tuple[Any, torch.Tensor, tuple[int, int]]] = []
        self.stream: Optional[_StreamedSafetensors] = None
        if save_grids:
            reserve = HEADER_BYTES_BASE + HEADER_BYTES_PER_IMAGE * expected
            self.stream = _StreamedSafetensors(self._temporary(self.path), reserve)

    def _add(self, image_id: Any, pooled: torch.Tensor, grid_hw: tuple[int, int], grid: Optional[torch.Tensor]) -> None:
        if self.stream is not None:
            self.stream.append(f"grid.{len(self.rows)}", grid)  # renamed features.{j} at commit (input order)
        self.rows.append((image_id, pooled.float().cpu(), grid_hw))

    def _commit(self, metadata: dict[str, str], order: dict) -> list:
        arrival = sorted(range(len(self.rows)), key=lambda n: order[self.rows[n][0]])
        ids = [self.rows[n][0] for n in arrival]
        small = {  # grid_hw (int64) first: appended after the grids, both stay aligned to their dtype
            "grid_hw": torch.tensor([self.rows[n][2] for n in arrival], dtype=torch.int64).reshape(-1, 2),
            "pooled": torch.stack([self.rows[n][1] for n in arrival]) if ids else torch.zeros(0, self.hidden_size),
        }
        metadata = {**metadata, "ids": json.dumps(ids)}
        if self.stream is None:
            write_shard(self.path, small, metadata)
            return ids
        names = {f"grid.{n}": f"features.{j}" for j, n in enumerate(arrival)}
        done = self.stream.finish(names, small, metadata, self._temporary(self.path, "b"))
        atomic.replace_file(done, self.path)
        return ids

    def _close(self) -> None:
        if self.stream is not None:
            self.stream.close()


def _read_safetensors(path: Path) -> Optional[dict]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:
        return None


# ----------------------------------------------------------------------------------------------------------------
# parquet
# ----------------------------------------------------------------------------------------------------------------
def _parquet_dtype_name(dtype: Optional[torch.dtype]) -> str:
    return str(dtype).replace("torch.", "") if dtype is not None else ""


class ParquetWriter(ShardWriter):
    """shard-XXXXX-of-YYYYY.parquet (see the module docstring): rows are written a row group at a time (at most
    PARQUET_ROW_GROUP_BYTES of grids, or PARQUET_ROW_GROUP_ROWS rows, are held); the metadata goes in the footer."""

    name = "parquet"

    def __init__(self, output: Path, k: int, num_shards: int, hidden_size: int, save_grids: bool, expected: int):
        super().__init__(output, k, num_shards, hidden_size, save_grids, expected)
        self.tmp = self._temporary(self.path)
        self.writer: Any = None
        self.ids: list = []
        self.buffer: list[tuple] = []
        self.buffered_bytes = 0
        self.features_dtype: Optional[torch.dtype] = None

    def _schema(self) -> Any:
        import pyarrow as pa

        fields = [("id", pa.string()), ("pooled", pa.list_(pa.float32(), self.hidden_size)), ("grid_h", pa.int32()),
                  ("grid_w", pa.int32())]  # fmt: skip
        if self.save_grids:
            fields.append(("features", pa.binary()))
        return pa.schema(fields)

    def _open(self) -> None:
        import pyarrow.parquet as pq

        no_dictionary = ["id", "pooled", "features"] if self.save_grids else ["id", "pooled"]
        compression = {"id": "snappy", "pooled": "snappy", "grid_h": "snappy", "grid_w": "snappy", "features": "none"}
        self.writer = pq.ParquetWriter(
            str(self.tmp), self._schema(), compression={k: v for k, v in compression.items() if k in self._schema().names},
            use_dictionary=[name for name in self._schema().names if name not in no_dictionary],
        )  # fmt: skip

    def _add(self, image_id: Any, pooled: torch.Tensor, grid_hw: tuple[int, int], grid: Optional[torch.Tensor]) -> None:
        features = None
        if self.save_grids:
            self.features_dtype = grid.dtype
            features = bytes(_raw_bytes(grid))
            self.buffered_bytes += len(features)
        self.buffer.append((str(image_id), pooled.float().cpu().numpy(), grid_hw, features))
        self.ids.append(image_id)
        if self.buffered_bytes >= PARQUET_ROW_GROUP_BYTES or len(self.buffer) >= PARQUET_ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self.writer is None:
            self._open()
        if not self.buffer:
            return
        pooled = np.stack([row[1] for row in self.buffer]).astype(np.float32).reshape(-1)
        columns = {
            "id": pa.array([row[0] for row in self.buffer], pa.string()),
            "pooled": pa.FixedSizeListArray.from_arrays(pa.array(pooled, pa.float32()), self.hidden_size),
            "grid_h": pa.array([row[2][0] for row in self.buffer], pa.int32()),
            "grid_w": pa.array([row[2][1] for row in self.buffer], pa.int32()),
        }
        if self.save_grids:
            columns["features"] = pa.array([row[3] for row in self.buffer], pa.binary())
        self.writer.write_table(pa.table(columns, schema=self._schema()))
        self.buffer, self.buffered_bytes = [], 0

    def _commit(self, metadata: dict[str, str], order: dict) -> list:
        self._flush()
        if self.writer is None:
            self._open()
        layout = {"features_dtype": _parquet_dtype_name(self.features_dtype)} if self.save_grids else {}
        self.writer.add_key_value_metadata({**metadata, **layout})
        self.writer.close()
        self.writer = None
        atomic.replace_file(self.tmp, self.path)
        return self.ids

    def _close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _read_parquet_metadata(path: Path, need_ids: bool = True) -> Optional[dict]:
    """A parquet shard's footer metadata (str -> str) with its ids (the `id` column) under "ids"; None if unreadable."""
    import pyarrow.parquet as pq

    try:
        footer = pq.read_metadata(str(path)).metadata or {}
        metadata = {k.decode(): v.decode() for k, v in footer.items() if k != b"ARROW:schema"}
        if need_ids and "fingerprint" in metadata:
            metadata["ids"] = json.dumps(pq.read_table(str(path), columns=["id"]).column("id").to_pylist())
        return metadata
    except Exception:
        return None


# ----------------------------------------------------------------------------------------------------------------
# npy (autofaiss / clip-retrieval)
# ----------------------------------------------------------------------------------------------------------------
def npy_stem(k: int, num_shards: int) -> str:
    """The shards' common file stem: zero-padded so that sorted names are shard order (what embedding readers pair)."""
    return f"{k:0{max(5, len(str(num_shards - 1)))}d}"


def _npy_header(rows: int, columns: int) -> bytes:
    """A version 1.0 .npy header for a float32 (rows, columns) C-order array, _NPY_HEADER bytes long."""
    text = f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {columns}), }}"
    body = text.ljust(_NPY_HEADER - 10 - 1).encode("latin1") + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body


class NpyWriter(ShardWriter):
    """embeddings/XXXXX.npy + metadata/XXXXX.parquet (see the module docstring): each pooled row is appended to the
    .npy temporary as it comes, and its header (the row count) rewritten at commit. The embeddings file is renamed
    into place first, the metadata file (which carries the fingerprint and says the shard is complete) last."""

    name = "npy"

    def __init__(self, output: Path, k: int, num_shards: int, hidden_size: int, save_grids: bool, expected: int):
        super().__init__(output, k, num_shards, hidden_size, save_grids, expected)
        stem = npy_stem(k, num_shards)
        self.embeddings = output / "embeddings" / f"{stem}.npy"
        self.metadata = output / "metadata" / f"{stem}.parquet"
        self.tmp = self._temporary(self.embeddings)
        self.file = open(self.tmp, "wb")
        self.file.write(_npy_header(0, hidden_size))
        self.rows: list[tuple[str, int, int]] = []
        self.ids: list = []

    def _add(self, image_id: Any, pooled: torch.Tensor, grid_hw: tuple[int, int], grid: Optional[torch.Tensor]) -> None:
        self.file.write(pooled.float().cpu().numpy().astype("<f4").tobytes())
        self.rows.append((str(image_id), grid_hw[0], grid_hw[1]))
        self.ids.append(image_id)

    def _commit(self, metadata: dict[str, str], order: dict) -> list:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.file.seek(0)
        self.file.write(_npy_header(len(self.rows), self.hidden_size))
        self.file.close()
        atomic.replace_file(self.tmp, self.embeddings)
        table = pa.table(
            {
                "id": pa.array([r[0] for r in self.rows], pa.string()),
                "grid_h": pa.array([r[1] for r in self.rows], pa.int32()),
                "grid_w": pa.array([r[2] for r in self.rows], pa.int32()),
            }
        )
        tmp = self._temporary(self.metadata)
        pq.write_table(table.replace_schema_metadata({**metadata, "embeddings": f"embeddings/{self.embeddings.name}"}),
                       str(tmp))  # fmt: skip
        atomic.replace_file(tmp, self.metadata)
        return self.ids

    def _close(self) -> None:
        if not self.file.closed:
            self.file.close()


def _npy_rows(path: Path) -> Optional[int]:
    if not is_regular_file(path):
        return None
    try:
        return int(np.load(str(path), mmap_mode="r").shape[0])
    except Exception:
        return None


# ----------------------------------------------------------------------------------------------------------------
# The formats on disk: which files a folder holds, reading one shard back
# ----------------------------------------------------------------------------------------------------------------
WRITERS = {writer.name: writer for writer in (SafetensorsWriter, ParquetWriter, NpyWriter)}
_NAMES = {
    "safetensors": (re.compile(r"shard-(\d+)-of-(\d+)\.safetensors"), ""),
    "parquet": (re.compile(r"shard-(\d+)-of-(\d+)\.parquet"), ""),
    "npy": (re.compile(r"(\d+)\.parquet"), "metadata"),  # the metadata file says the shard is complete
}


def open_shard(fmt: str, output: Path, k: int, num_shards: int, hidden_size: int, save_grids: bool,
               expected: int) -> ShardWriter:  # fmt: skip
    """A writer for shard k of `num_shards` in format `fmt` (a key of WRITERS); `expected`: about how many images it
    will hold (sizes a streamed header's room)."""
    return WRITERS[fmt](output, k, num_shards, hidden_size, save_grids, expected)


def shard_files(output: Path, fmt: str) -> list[tuple[int, Optional[int], Path]]:
    """The finished-looking shard files of format `fmt` in `output`: (k, num_shards from the name or None, path)."""
    pattern, folder = _NAMES[fmt]
    where = output / folder if folder else output
    if not where.is_dir():
        return []
    found = []
    for path in sorted(where.iterdir()):
        match = pattern.fullmatch(path.name)
        if match is not None:
            found.append((int(match[1]), int(match[2]) if match.lastindex == 2 else None, path))
    return found


def shard_path(output: Path, fmt: str, k: int, num_shards: int) -> Path:
    """Where shard k's file (for npy: its metadata file, written last) lives."""
    if fmt == "safetensors":
        return output / shard_name(k, num_shards)
    if fmt == "parquet":
        return output / f"shard-{k:05d}-of-{num_shards:05d}.parquet"
    return output / "metadata" / f"{npy_stem(k, num_shards)}.parquet"


def read_shard(path: Path, fmt: str) -> Optional[dict]:
    """A finished shard's stored metadata (str -> str: format, fingerprint, ids, skipped, plan, ...), or None when
    its files are unreadable or incomplete (a damaged shard is encoded again). Only regular files are opened (a FIFO
    would block the readers)."""
    if not is_regular_file(path):
        return None
    if fmt == "safetensors":
        return _read_safetensors(path)
    metadata = _read_parquet_metadata(path)
    if metadata is None or fmt == "parquet" or "ids" not in metadata:
        return metadata
    embeddings = path.parent.parent / metadata.get("embeddings", f"embeddings/{path.stem}.npy")
    if _npy_rows(embeddings) != len(json.loads(metadata["ids"])):
        return None  # the embeddings file is missing or not this shard's
    return metadata


def shard_entry(path: Path, fmt: str, output: Path) -> dict:
    """How the manifest names a shard's files."""
    if fmt == "npy":
        return {"file": f"embeddings/{path.stem}.npy", "metadata": f"metadata/{path.name}"}
    return {"file": path.relative_to(output).as_posix()}


def temporaries(output: Path) -> list[Path]:
    """Every format's shard temporaries in `output` (`.NAME.tmp-*`, left by killed runs)."""
    mark = atomic.TMP_MARK
    return [
        *output.glob(f".shard-*.safetensors{mark}*"),
        *output.glob(f".shard-*.parquet{mark}*"),
        *output.glob(f"embeddings/.*.npy{mark}*"),
        *output.glob(f"metadata/.*.parquet{mark}*"),
    ]


def finished_files(output: Path) -> list[Path]:
    """Every format's shard files in `output` (what --overwrite removes)."""
    paths = [path for fmt in WRITERS for _, _, path in shard_files(output, fmt)]
    npy = output / "embeddings"
    if npy.is_dir():
        paths += [path for path in npy.iterdir() if re.fullmatch(r"\d+\.npy", path.name)]
    return paths
