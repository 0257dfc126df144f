# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""The safetensors format, streamed: the ONE header parser (with its integrity checks), the hashed writer, verify.

Owns the byte layout: an 8-byte little-endian header length, a JSON header, then the tensors' bytes back to back.
`parse_header` takes its bytes from any transport (a `read(start, length)` callable: local file, fsspec, hf://), so
local and remote sources are checked by the same code. `SafetensorsWriter` writes one file tensor by tensor and
hashes each as it goes; `verify_file` reads a written file back (our parser and the reference one) against those
hashes. Must not know about models, key layouts or where a file comes from.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Optional, Sequence

import torch

from ..errors import ToolError
from . import atomic
from .locations import ByteReader, Location

# What safetensors itself accepts (its reference implementation refuses a longer header).
MAX_HEADER_BYTES = 100_000_000
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# dtypes safetensors knows that this reader does not (packed sub-byte floats, scale exponents, complex, unsigned):
# refused as "unsupported", not as a corrupt header.
KNOWN_UNREAD = ("F4", "F6_E2M3", "F6_E3M2", "F8_E8M0", "C64", "U16", "U32", "U64")

ReadFn = Callable[[int, int], bytes | bytearray]


class SafetensorsError(ToolError):
    """A file that is not the safetensors file it claims to be (damaged, truncated or not safetensors)."""


class VerificationError(ToolError):
    """A written file that does not read back as what was written."""


def nbytes_of(shape: Sequence[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a parsed header; `start` / `end` are absolute byte offsets in the file."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    nbytes: int  # the 8-byte length plus the JSON header: where the tensor data starts


MAX_NUMEL = 2**62  # more elements than any file could hold: a shape above it is refused before any arithmetic


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _numel(shape: list) -> Optional[int]:
    """The element count of a shape of non-negative ints, or None when it is malformed or absurdly large. Computed
    with an early exit, so that a crafted shape of a million huge dimensions costs nothing."""
    if not all(_is_int(s) and s >= 0 for s in shape):
        return None
    if 0 in shape:
        return 0
    total = 1
    for s in shape:
        total *= s
        if total > MAX_NUMEL:
            return None
    return total


def _entry_problem(info: Any) -> Optional[str]:
    """Why one header entry is malformed, or None."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        return "entry lacks dtype/shape/data_offsets"
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        return f"unknown dtype {_short(dtype)}"
    numel = _numel(shape) if isinstance(shape, list) else None
    if numel is None:
        return f"bad shape {_short(shape)}"
    if not (
        isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):  # fmt: skip
        return f"bad data_offsets {_short(offsets)}"
    need = numel * DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != need:
        return (
            f"data_offsets {_short(offsets)} span {offsets[1] - offsets[0]} bytes but shape {_short(shape)} "
            f"{dtype} needs {need}"
        )
    return None


def _short(value: Any, limit: int = 80) -> str:
    """repr() for messages, cut to `limit` characters (a crafted header can hold megabytes in one field)."""
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # deeply nested / an int too long to print
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_json_header(read: ReadFn, size: int, where: str) -> tuple[dict, int]:
    """The header object and the offset where the data starts, after checking the length prefix."""
    if size < 8:
        raise SafetensorsError(
            f"{where} is not a safetensors file: {size} bytes, shorter than the 8-byte header length."
        )
    prefix = bytes(read(0, 8))
    if len(prefix) != 8:
        raise SafetensorsError(f"{where} is truncated: could read only {len(prefix)} of its 8 header-length bytes.")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len == 0 or header_len > MAX_HEADER_BYTES:
        raise SafetensorsError(
            f"{where} has a corrupt safetensors header: its first 8 bytes give a header length of {header_len} "
            f"bytes (expected 1..{MAX_HEADER_BYTES}). The file is damaged or not a safetensors file."
        )
    if 8 + header_len > size:
        raise SafetensorsError(
            f"{where} is truncated: the header alone needs {8 + header_len} bytes but the file has {size}. "
            "Re-download the file."
        )
    raw = bytes(read(8, header_len))
    if len(raw) != header_len:
        raise SafetensorsError(f"{where} is truncated: could read only {len(raw)} of its {header_len} header bytes.")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: JSONDecodeError, huge ints
        reason = "nested too deeply" if isinstance(exc, RecursionError) else _short(str(exc), 200)
        raise SafetensorsError(
            f"{where} has a corrupt safetensors header (not valid UTF-8 JSON: {reason}). The file is damaged or "
            "not a safetensors file."
        ) from None
    if not isinstance(header, dict):
        kind = type(header).__name__
        raise SafetensorsError(f"{where} has a corrupt safetensors header: a JSON {kind}, not an object.")
    return header, 8 + header_len


def _check_layout(tensors: dict[str, TensorInfo], data_start: int, size: int, where: str) -> None:
    """The tensors must tile the data section exactly: no overlap, no gap, nothing missing or left over."""
    cursor = data_start
    for info in sorted(tensors.values(), key=lambda t: (t.start, t.end, t.key)):
        if info.start != cursor:
            raise SafetensorsError(
                f"{where} has a corrupt safetensors header: tensor {_short(info.key)} starts at data byte "
                f"{info.start - data_start}, expected {cursor - data_start} "
                f"({'overlapping' if info.start < cursor else 'a gap between'} tensors)."
            )
        cursor = info.end
    if cursor > size:
        raise SafetensorsError(
            f"{where} is truncated: its header describes {cursor} bytes but the file has only {size} "
            f"({cursor - size} bytes missing). Re-download the file."
        )
    if cursor < size:
        raise SafetensorsError(
            f"{where} is corrupt: {size - cursor} unexpected bytes after the last tensor (the header describes "
            f"{cursor} bytes, the file has {size})."
        )


def parse_header(read: ReadFn, size: int, where: str) -> Header:
    """Parse and check the header of a safetensors file of `size` bytes whose bytes `read(start, length)` returns;
    `where` names the file in messages. Reads only the header."""
    header, data_start = _read_json_header(read, size, where)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError(
            f"{where} has a corrupt safetensors header: __metadata__ must map strings to strings, got "
            f"{_short(metadata)}."
        )
    tensors: dict[str, TensorInfo] = {}
    for key, info in header.items():
        if isinstance(info, dict) and isinstance(info.get("dtype"), str) and info["dtype"] in KNOWN_UNREAD:
            raise SafetensorsError(
                f"{where}: tensor {_short(key)} is stored as {info['dtype']}, a safetensors dtype this tool does not "
                f"read (it reads {', '.join(DTYPES)}). Save the checkpoint in bfloat16, float16 or float32 first."
            )
        problem = _entry_problem(info)
        if problem is not None:
            raise SafetensorsError(f"{where} has a corrupt safetensors header: tensor {_short(key)}: {problem}.")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        tensors[key] = TensorInfo(key, DTYPES[info["dtype"]], shape, data_start + begin, data_start + end)
    _check_layout(tensors, data_start, size, where)
    return Header(tensors, metadata, data_start)


class SafetensorsFile:
    """One safetensors file on any Location: the header parsed and checked; tensor bytes read on demand."""

    def __init__(self, loc: Location):
        self.loc = loc
        self.reader = ByteReader(loc)
        header = parse_header(self.reader.read, self.reader.size, loc.display)
        self.tensors = header.tensors
        self.metadata = header.metadata

    @property
    def bytes_read(self) -> int:
        return self.reader.bytes_read

    def sha256(self, key: str, chunk_bytes: int) -> str:
        """sha256 of one tensor's bytes, read in chunks of at most `chunk_bytes`."""
        info = self.tensors[key]
        digest = hashlib.sha256()
        for pos in range(info.start, info.end, chunk_bytes):
            digest.update(self.reader.read(pos, min(chunk_bytes, info.end - pos)))
        return digest.hexdigest()

    def close(self) -> None:
        self.reader.close()


# ---- writing ----------------------------------------------------------------------------------------------------
class TensorSpec(NamedTuple):
    """A tensor as it will be written: name, dtype, shape."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.shape, self.dtype)


def header_bytes(specs: Sequence[TensorSpec], metadata: Optional[dict[str, str]] = None) -> bytes:
    """The length prefix + JSON header of a file holding `specs` in this order (data 8-byte aligned, as the
    reference writer does)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for spec in specs:
        header[spec.key] = {"dtype": DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                            "data_offsets": [offset, offset + spec.nbytes]}  # fmt: skip
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous tensor (no copy)."""
    flat = tensor.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


def _write_tensor_data(f: Any, data: memoryview) -> None:
    """Write one tensor's bytes (a separate function so tests can simulate write failures and corruption)."""
    f.write(data)


class SafetensorsWriter:
    """Write one safetensors file tensor by tensor, in header order, hashing each tensor as it is written.

    safetensors' own `save_file` needs the whole state dict in memory at once and hashes nothing; streaming keeps
    memory bounded: `write_pieces` takes a tensor as consecutive pieces (each hashed and written as it comes), so
    a tensor larger than the read chunk is never held whole. A failing write on the target (disk full, read-only
    file system, no permission) raises `atomic.TargetWriteError` naming the file."""

    def __init__(self, path: Path, specs: Sequence[TensorSpec]):
        self.path = Path(path)
        self.specs = list(specs)
        self.sha256: dict[str, str] = {}
        self._f: Any = None

    def __enter__(self) -> "SafetensorsWriter":
        with atomic.target_errors(self.path):
            self._f = open(self.path, "wb")
            self._f.write(header_bytes(self.specs))
        return self

    def _next_spec(self, key: str) -> TensorSpec:
        spec = self.specs[len(self.sha256)] if len(self.sha256) < len(self.specs) else None
        if spec is None or spec.key != key:
            raise ValueError(f"{self.path.name}: got {key}, expected {spec}")
        return spec

    def write(self, key: str, tensor: torch.Tensor) -> str:
        """Append the next tensor (it must be the next spec's key, dtype and shape); returns its sha256."""
        spec = self._next_spec(key)
        if (tensor.dtype, tuple(tensor.shape)) != (spec.dtype, tuple(spec.shape)):
            raise ValueError(f"{self.path.name}: got {key} {tensor.dtype} {tuple(tensor.shape)}, expected {spec}")
        return self.write_pieces(key, [tensor])

    def write_pieces(self, key: str, pieces: Iterable[torch.Tensor]) -> str:
        """Append the next tensor given as consecutive pieces of its row-major bytes (any shapes, the spec's dtype,
        spec.nbytes in all); each piece is hashed and written before the next is asked for. Returns the sha256."""
        spec = self._next_spec(key)
        digest, written = hashlib.sha256(), 0
        for piece in pieces:
            if piece.dtype != spec.dtype:
                raise ValueError(f"{self.path.name}: {key}: a piece of dtype {piece.dtype}, expected {spec.dtype}")
            data = tensor_bytes(piece.contiguous())
            digest.update(data)
            written += len(data)
            with atomic.target_errors(self.path):
                _write_tensor_data(self._f, data)
        if written != spec.nbytes:
            raise ValueError(f"{self.path.name}: {key}: {written} bytes written, expected {spec.nbytes}")
        self.sha256[key] = hexdigest = digest.hexdigest()
        return hexdigest

    def __exit__(self, *exc: Any) -> None:
        with atomic.target_errors(self.path):
            self._f.close()
        if exc[0] is None and len(self.sha256) != len(self.specs):
            raise ValueError(f"{self.path.name}: {len(self.sha256)} of {len(self.specs)} tensors were written")


def verify_file(path: Path, expected: dict[str, tuple[TensorSpec, str]], chunk_bytes: int) -> None:
    """Read a written file back: the reference parser and ours must see exactly `expected` ({key: (spec, sha256)}),
    metadata {"format": "pt"}, and every tensor's bytes must hash to its sha256."""
    from safetensors import safe_open

    name = Path(path).name
    try:
        with safe_open(str(path), framework="pt") as ref:
            ref_keys, ref_meta = set(ref.keys()), ref.metadata()
    except Exception as exc:  # noqa: BLE001 - any failure of the reference reader is the same verdict
        raise VerificationError(f"verification failed: {name} is not a valid safetensors file ({exc}).") from exc
    if ref_keys != set(expected) or ref_meta != {"format": "pt"}:
        raise VerificationError(f"verification failed: {name} has the wrong tensors or metadata.")
    st = SafetensorsFile(Location.parse(str(path)))
    try:
        for key, (spec, digest) in expected.items():
            info = st.tensors[key]
            if info.dtype != spec.dtype or info.shape != tuple(spec.shape):
                raise VerificationError(f"verification failed: {key} in {name} has the wrong dtype or shape.")
            if st.sha256(key, chunk_bytes) != digest:
                raise VerificationError(
                    f"verification failed: tensor {key} in {name} does not match what was written (sha256 mismatch "
                    "after writing: disk or filesystem error?)."
                )
    finally:
        st.close()
