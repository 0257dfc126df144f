#!/usr/bin/env python
# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""Convert a checkpoint users already have into a ready Hub repo of SigLIP-NaViT (and back to stock SigLIP).

    python convert_checkpoint.py --src SOURCE --out DIR [options]

SOURCE is a directory, a file or an fsspec URL (`hf://ByteDance-Seed/BAGEL-7B-MoT`, `file:///...`, `s3://...`):

* a BAGEL model directory (`ema.safetensors` + `vit_config.json`, or sharded `*.safetensors` + index) or a single
  BAGEL `.safetensors` file: the `vit_model.*` tensors are the tower; everything else is never read;
* a stock SigLIP checkpoint: full `SiglipModel` (`vision_model.*` + `text_model.*` + `logit_*`), or
  `SiglipVisionModel` as saved by transformers 4.x (`vision_model.*`) or 5.x (unprefixed); the Conv2d patch weight
  becomes our Linear, the pooling head, text tower and logit tensors are dropped;
* a checkpoint of this repo (re-shard, change dtype, keep fewer layers, or export with `--to stock-siglip`).

The source is streamed: the safetensors header is parsed, the plan (every key, shape and dtype) is validated, and
then ONLY the byte ranges of the kept tensors are read, once, in bounded chunks (remote files too: range requests,
~0.8 GB out of BAGEL's ~29 GB file). Each output tensor is hashed as it is written; after writing, the output is read
back and checked against those hashes, then the temporary directory beside the target is renamed into place.

Exit status 0 on success; non-zero with a one-paragraph reason otherwise. `--help` lists every option.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import importlib.util
import json
import os
import posixpath
import re
import shlex
import shutil
import signal
import struct
import sys
import tempfile
import uuid
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

HERE = Path(__file__).resolve().parent

CONFIG_AUTO_MAP = {
    "AutoConfig": "configuration_siglip_navit.SiglipNaViTConfig",
    "AutoModel": "modeling_siglip_navit.SiglipVisionModel",
}
PROCESSOR_AUTO_MAP = {"AutoImageProcessor": "image_processing_siglip_navit.SiglipNaViTImageProcessor"}
REMOTE_CODE = ("configuration_siglip_navit.py", "modeling_siglip_navit.py", "image_processing_siglip_navit.py")

BAGEL_REPO_ID = "ByteDance-Seed/BAGEL-7B-MoT"
DEFAULT_LICENSE = "apache-2.0"  # BAGEL-7B-MoT and google/siglip-* are both Apache-2.0
DEFAULT_VIT_PREFIX = "vit_model."
DEFAULT_MAX_SHARD_SIZE = "5GB"
DEFAULT_READ_CHUNK = 64 * 2**20
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors reference implementation refuses bigger headers

CONFIG_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_channels",
    "image_size",
    "patch_size",
    "hidden_act",
    "layer_norm_eps",
    "attention_dropout",
)
# Known tower geometries, used only when a source comes without any config file: hidden size -> heads.
KNOWN_HEADS = {768: 12, 1024: 16, 1152: 16}

# safetensors dtype name -> (torch dtype, bytes per element)
ST_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        ST_DTYPES[_name] = (getattr(torch, _attr), 1)
TORCH_TO_ST = {dt: name for name, (dt, _) in ST_DTYPES.items()}
ITEMSIZE = {dt: size for dt, size in ST_DTYPES.values()}
DTYPE_CHOICES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32", torch.float64: "float64"}

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
LAYER_RE = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.")


class ConversionError(Exception):
    """A failure with a message meant for the user (printed as one paragraph, exit status 1)."""


# ----------------------------------------------------------------------------------------------------------------
# Remote-code modules of this repo (relative imports: load them as a package rooted at this script's directory)
# ----------------------------------------------------------------------------------------------------------------
def repo_code_module(module: str):
    """One of this repo's remote-code modules (e.g. "modeling_siglip_navit"), imported the way the Hub's loader sees
    it: as part of a package rooted at this script's directory (the files use relative imports)."""
    name = "siglip_navit"
    pkg = sys.modules.get(name)
    if pkg is not None and [str(Path(p).resolve()) for p in getattr(pkg, "__path__", [])] != [str(HERE)]:
        name = "_siglip_navit_convert_checkpoint"  # an unrelated `siglip_navit` is imported: do not shadow it
        pkg = sys.modules.get(name)
    if pkg is None:
        spec = importlib.util.spec_from_loader(name, loader=None, is_package=True)
        pkg = importlib.util.module_from_spec(spec)
        pkg.__path__ = [str(HERE)]
        sys.modules[name] = pkg
    return importlib.import_module(f"{name}.{module}")


def _remote_code_modules():
    """Return (configuration module, modeling module)."""
    return repo_code_module("configuration_siglip_navit"), repo_code_module("modeling_siglip_navit")


# ----------------------------------------------------------------------------------------------------------------
# Locations: a local path or an fsspec URL, with just what the converter needs
# ----------------------------------------------------------------------------------------------------------------
class Location:
    def __init__(self, display: str, fs=None, path: Optional[str] = None):
        self.display = display
        self.fs = fs  # None: local filesystem, `path` is an OS path
        self.path = path if path is not None else display

    @classmethod
    def parse(cls, spec: str) -> "Location":
        if "://" in spec:
            try:
                import fsspec
            except ImportError as exc:  # pragma: no cover - fsspec ships with huggingface_hub
                raise ConversionError(f"reading {spec!r} needs the `fsspec` package ({exc}).") from exc
            try:
                fs, path = fsspec.core.url_to_fs(spec)
            except (ValueError, ImportError) as exc:
                raise ConversionError(
                    f"cannot open {spec!r}: {exc}. Use a local path or an fsspec URL whose filesystem is installed "
                    "(hf:// needs huggingface_hub)."
                ) from exc
            return cls(spec.rstrip("/"), fs, path.rstrip("/") or path)
        return cls(spec, None, os.path.abspath(os.path.expanduser(spec)))

    @property
    def is_local(self) -> bool:
        return self.fs is None

    @property
    def name(self) -> str:
        return (os.path.basename if self.is_local else posixpath.basename)(self.path.rstrip("/"))

    def join(self, name: str) -> "Location":
        if self.is_local:
            return Location(os.path.join(self.display, name), None, os.path.join(self.path, name))
        return Location(f"{self.display}/{name}", self.fs, posixpath.join(self.path, name))

    def parent(self) -> "Location":
        if self.is_local:
            return Location(os.path.dirname(self.path), None, os.path.dirname(self.path))
        return Location(self.display.rsplit("/", 1)[0], self.fs, posixpath.dirname(self.path))

    def exists(self) -> bool:
        return os.path.exists(self.path) if self.is_local else bool(self.fs.exists(self.path))

    def isdir(self) -> bool:
        return os.path.isdir(self.path) if self.is_local else bool(self.fs.isdir(self.path))

    def isfile(self) -> bool:
        return os.path.isfile(self.path) if self.is_local else bool(self.fs.isfile(self.path))

    def listdir(self) -> list[str]:
        if self.is_local:
            return sorted(os.listdir(self.path))
        return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.path, detail=False))

    def read_text(self) -> str:
        if self.is_local:
            return Path(self.path).read_text(encoding="utf-8")
        with self.fs.open(self.path, "rb") as f:
            return f.read().decode("utf-8")

    def size(self) -> int:
        return os.path.getsize(self.path) if self.is_local else int(self.fs.size(self.path))


class ByteReader:
    """Random-access reads of one file (local or fsspec), exact byte ranges only, counting what it reads."""

    def __init__(self, loc: Location):
        self.loc = loc
        self.bytes_read = 0
        self.requests = 0
        self._f = None
        self.size = loc.size()

    def _file(self):
        if self._f is None:
            if self.loc.is_local:
                self._f = open(self.loc.path, "rb", buffering=0)
            else:
                # "none" cache: every read is exactly the requested range (no read-ahead of unwanted bytes).
                try:
                    self._f = self.loc.fs.open(self.loc.path, "rb", cache_type="none")
                except TypeError:
                    self._f = self.loc.fs.open(self.loc.path, "rb")
        return self._f

    def read(self, start: int, length: int) -> bytearray:
        buf = bytearray(length)
        if length == 0:
            return buf
        f = self._file()
        f.seek(start)
        view = memoryview(buf)
        got = 0
        while got < length:
            if hasattr(f, "readinto"):
                n = f.readinto(view[got:])
            else:  # pragma: no cover - every fsspec file has readinto; kept for exotic file objects
                chunk = f.read(length - got)
                n = len(chunk)
                view[got : got + n] = chunk
            if not n:
                break
            got += n
        self.requests += 1
        self.bytes_read += got
        if got != length:
            raise ConversionError(
                f"{self.loc.display} is truncated: could read only {got} of the {length} bytes at offset {start} "
                f"(file size {self.size} bytes). Re-download the file."
            )
        return buf

    def close(self) -> None:
        if self._f is not None:
            with contextlib.suppress(Exception):
                self._f.close()
            self._f = None


# ----------------------------------------------------------------------------------------------------------------
# Source files: safetensors (header parsed, data read lazily) and pickle (only with --allow-pickle)
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class TensorEntry:
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    file: Any  # SafetensorsFile | PickleFile
    start: int = 0  # absolute byte offsets in the file (safetensors only)
    end: int = 0

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


class SafetensorsFile:
    """One safetensors file: header parsed and checked against the file size; tensor bytes read on demand."""

    def __init__(self, loc: Location):
        self.loc = loc
        self.reader = ByteReader(loc)
        size = self.reader.size
        where = loc.display
        if size < 8:
            raise ConversionError(f"{where} is not a safetensors file: {size} bytes, shorter than the 8-byte header length.")
        (header_len,) = struct.unpack("<Q", bytes(self.reader.read(0, 8)))
        if header_len == 0 or header_len > MAX_HEADER_BYTES:
            raise ConversionError(
                f"{where} has a corrupt safetensors header: its first 8 bytes give a header length of {header_len} "
                f"bytes (expected 1..{MAX_HEADER_BYTES}). The file is damaged or not a safetensors file."
            )
        if 8 + header_len > size:
            raise ConversionError(
                f"{where} is truncated: the header alone needs {8 + header_len} bytes but the file has {size}. "
                "Re-download the file."
            )
        raw = self.reader.read(8, header_len)
        try:
            header = json.loads(bytes(raw).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConversionError(
                f"{where} has a corrupt safetensors header (not valid UTF-8 JSON: {exc}). The file is damaged or "
                "not a safetensors file."
            ) from exc
        if not isinstance(header, dict):
            raise ConversionError(f"{where} has a corrupt safetensors header: a JSON {type(header).__name__}, not an object.")
        self.header_bytes = 8 + header_len
        self.metadata = header.pop("__metadata__", None) or {}
        data_start = 8 + header_len
        self.entries: dict[str, TensorEntry] = {}
        spans = []
        for key, info in header.items():
            problem = None
            if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
                problem = "entry lacks dtype/shape/data_offsets"
            elif info["dtype"] not in ST_DTYPES:
                problem = f"unknown dtype {info['dtype']!r}"
            elif not (isinstance(info["shape"], list) and all(isinstance(s, int) and s >= 0 for s in info["shape"])):
                problem = f"bad shape {info['shape']!r}"
            elif not (
                isinstance(info["data_offsets"], list)
                and len(info["data_offsets"]) == 2
                and all(isinstance(o, int) for o in info["data_offsets"])
                and 0 <= info["data_offsets"][0] <= info["data_offsets"][1]
            ):
                problem = f"bad data_offsets {info['data_offsets']!r}"
            if problem is None:
                dtype, itemsize = ST_DTYPES[info["dtype"]]
                numel = 1
                for s in info["shape"]:
                    numel *= s
                b, e = info["data_offsets"]
                if e - b != numel * itemsize:
                    problem = (
                        f"data_offsets {info['data_offsets']} span {e - b} bytes but shape {info['shape']} "
                        f"{info['dtype']} needs {numel * itemsize}"
                    )
            if problem is not None:
                raise ConversionError(f"{where} has a corrupt safetensors header: tensor {key!r}: {problem}.")
            self.entries[key] = TensorEntry(
                key, dtype, tuple(info["shape"]), e - b, self, data_start + b, data_start + e
            )
            spans.append((b, e, key))
        spans.sort()
        cursor = 0
        for b, e, key in spans:
            if b != cursor:
                raise ConversionError(
                    f"{where} has a corrupt safetensors header: tensor {key!r} starts at data byte {b}, expected "
                    f"{cursor} ({'overlapping' if b < cursor else 'a gap between'} tensors)."
                )
            cursor = e
        expected = data_start + cursor
        if expected > size:
            raise ConversionError(
                f"{where} is truncated: its header describes {expected} bytes but the file has only {size} "
                f"({expected - size} bytes missing). Re-download the file."
            )
        if expected < size:
            raise ConversionError(
                f"{where} is corrupt: {size - expected} unexpected bytes after the last tensor (the header describes "
                f"{expected} bytes, the file has {size})."
            )

    @property
    def bytes_read(self) -> int:
        return self.reader.bytes_read

    def close(self) -> None:
        self.reader.close()


class PickleFile:
    """A pickle checkpoint, loaded only with torch.load(weights_only=True) (tensors and plain containers only)."""

    def __init__(self, loc: Location):
        self.loc = loc
        self.bytes_read = 0
        self.header_bytes = 0
        if not loc.is_local:
            raise ConversionError(
                f"{loc.display} is a pickle checkpoint on a remote filesystem; pickle sources must be local files "
                "(download it first, or use a safetensors source)."
            )
        try:
            try:
                obj = torch.load(loc.path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc) and "zip" not in str(exc):
                    raise
                obj = torch.load(loc.path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
        except Exception as exc:  # noqa: BLE001 - turned into one clear message
            raise ConversionError(
                f"refusing to load {loc.display}: torch.load(weights_only=True) rejected it ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}). Only plain tensor state dicts are accepted; "
                "a pickle that needs arbitrary objects could run code and is never unpickled by this tool."
            ) from exc
        for wrapper in ("state_dict", "model"):
            if isinstance(obj, dict) and set(obj) == {wrapper} and isinstance(obj[wrapper], dict):
                obj = obj[wrapper]
        if not isinstance(obj, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
            raise ConversionError(f"{loc.display} does not hold a flat {{name: tensor}} state dict.")
        self.tensors = obj
        self.entries = {
            k: TensorEntry(k, v.dtype, tuple(v.shape), v.numel() * v.element_size(), self) for k, v in obj.items()
        }
        self.bytes_total = sum(e.nbytes for e in self.entries.values())

    def close(self) -> None:
        self.tensors = {}


# ----------------------------------------------------------------------------------------------------------------
# Source discovery and format detection
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Source:
    loc: Location
    format: str  # "bagel" | "siglip" | "siglip-navit"
    key_style: str
    weight_files: list[str]  # display names
    keys: dict[str, Location]  # every key in the checkpoint -> file it lives in
    files: dict[str, Any] = field(default_factory=dict)  # file display -> SafetensorsFile/PickleFile (opened ones)
    entries: dict[str, TensorEntry] = field(default_factory=dict)  # opened keys
    config_dict: Optional[dict] = None
    config_loc: Optional[Location] = None
    readme_meta: dict = field(default_factory=dict)
    total_bytes: int = 0  # size of the weight files
    pickle: bool = False

    @property
    def bytes_read(self) -> int:
        return sum(f.bytes_read for f in self.files.values())

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def _is_pickle_name(name: str) -> bool:
    return name.endswith(PICKLE_SUFFIXES) or name.endswith(".bin.index.json")


def _pick_weight_files(loc: Location) -> tuple[list[Location], Optional[Location]]:
    """Weights of a directory: (files, index). Prefers ema.safetensors, then a safetensors index, then one file."""
    names = loc.listdir()
    if "ema.safetensors" in names:
        return [loc.join("ema.safetensors")], None
    indexes = [n for n in names if n.endswith(".safetensors.index.json")]
    if len(indexes) == 1:
        return [], loc.join(indexes[0])
    if len(indexes) > 1:
        raise ConversionError(
            f"{loc.display} holds several safetensors indexes ({', '.join(indexes)}); pass the one to convert as --src."
        )
    st = [n for n in names if n.endswith(".safetensors")]
    if "model.safetensors" in st:
        return [loc.join("model.safetensors")], None
    if len(st) == 1:
        return [loc.join(st[0])], None
    if len(st) > 1:
        raise ConversionError(
            f"{loc.display} holds several .safetensors files and no index ({', '.join(st)}); pass the file to convert "
            "as --src."
        )
    pickles = [n for n in names if _is_pickle_name(n)]
    bin_indexes = [n for n in pickles if n.endswith(".index.json")]
    if bin_indexes:
        return [], loc.join(bin_indexes[0])
    if len(pickles) == 1:
        return [loc.join(pickles[0])], None
    if pickles:
        raise ConversionError(
            f"{loc.display} holds several pickle checkpoints ({', '.join(pickles)}); pass the file to convert as --src."
        )
    raise ConversionError(
        f"{loc.display} contains no checkpoint: no ema.safetensors, *.safetensors, safetensors index or pickle file."
    )


def _read_json(loc: Location, what: str) -> dict:
    try:
        data = json.loads(loc.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"cannot read {what} {loc.display}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConversionError(f"{what} {loc.display} is not a JSON object.")
    return data


def _readme_front_matter(loc: Location) -> dict:
    """`license` / `base_model` of a source's model card (single-line YAML values), if there is one."""
    readme = loc.join("README.md")
    try:
        if not readme.isfile():
            return {}
        text = readme.read_text()
    except Exception:  # noqa: BLE001 - the card is optional
        return {}
    m = re.match(r"^---\s*\n(.*?)\n---\s*\n", text, re.S)
    if not m:
        return {}
    meta = {}
    for key in ("license", "base_model"):
        km = re.search(rf"^{key}:\s*(\S[^\n#]*)$", m.group(1), re.M)
        if km:
            meta[key] = km.group(1).strip().strip("'\"")
    return meta


def detect_format(keys: list[str], vit_prefix: str, config_dict: Optional[dict]) -> tuple[str, str]:
    """(format, key style) of a checkpoint from its tensor names (and model_type when a config is at hand)."""
    keyset = set(keys)
    if any(k.startswith(vit_prefix) for k in keys):
        return "bagel", f"BAGEL checkpoint ({vit_prefix}* tensors)"
    has_vision = any(k.startswith("vision_model.") for k in keys)
    if has_vision and (any(k.startswith("text_model.") for k in keys) or "logit_scale" in keyset):
        return "siglip", "SiglipModel (vision_model.* + text_model.* + logit_*)"
    model_type = (config_dict or {}).get("model_type")
    if has_vision:
        if model_type == "siglip_navit":
            return "siglip-navit", "SigLIP-NaViT (this repo, vision_model.*)"
        if model_type in ("siglip_vision_model", "siglip"):
            return "siglip", "SiglipVisionModel, transformers 4.x (vision_model.*)"
        return "siglip", "SiglipVisionModel (vision_model.*)"  # no config: either patch-weight layout is accepted
    if "embeddings.patch_embedding.weight" in keyset:
        return "siglip", "SiglipVisionModel, transformers 5.x (unprefixed)"
    sample = ", ".join(sorted(keys)[:5])
    raise ConversionError(
        f"cannot tell what kind of checkpoint this is: no {vit_prefix}* (BAGEL), vision_model.* (SigLIP / this repo) "
        f"or embeddings.* (SigLIP, transformers 5.x) tensors; first keys: {sample or '(none)'}. Pass --source-format "
        "(and --vit-prefix for a BAGEL variant)."
    )


def open_source(args) -> Source:
    loc = Location.parse(args.src)
    try:
        exists = loc.exists()
    except Exception as exc:  # noqa: BLE001 - network / permission errors of remote filesystems
        raise ConversionError(f"cannot access source {args.src!r}: {type(exc).__name__}: {exc}") from exc
    if not exists:
        hint = "" if loc.is_local else " (or cannot be reached: check the URL, your network and, for hf://, your token)"
        raise ConversionError(f"source {args.src!r} does not exist{hint}.")
    if loc.isdir():
        folder = loc
        files, index = _pick_weight_files(loc)
    else:
        folder = loc.parent()
        name = loc.name
        if name.endswith(".index.json"):
            files, index = [], loc
        elif name.endswith(".safetensors") or _is_pickle_name(name):
            files, index = [loc], None
        else:
            raise ConversionError(
                f"{loc.display} is neither a .safetensors file, a safetensors index nor a directory "
                f"(pickle files {', '.join(PICKLE_SUFFIXES)} need --allow-pickle)."
            )

    # key -> file, without touching any tensor data
    keys: dict[str, Location] = {}
    opened: dict[str, Any] = {}
    if index is not None:
        data = _read_json(index, "index")
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConversionError(f"index {index.display} has no weight_map.")
        base = index.parent()
        for key, fname in weight_map.items():
            keys[key] = base.join(fname)
        files = [base.join(f) for f in sorted(set(weight_map.values()))]
    is_pickle = any(_is_pickle_name(f.name) for f in files) or (index is not None and _is_pickle_name(index.name))
    if is_pickle and not args.allow_pickle:
        raise ConversionError(
            f"{(index or files[0]).display} is a pickle checkpoint. Unpickling can run arbitrary code, so it is refused "
            "unless you pass --allow-pickle; even then it is loaded only with torch.load(weights_only=True), which "
            "accepts tensors and plain containers only. Prefer a .safetensors source."
        )
    total_bytes = 0
    if index is None:
        for f in files:
            handle = PickleFile(f) if is_pickle else SafetensorsFile(f)
            opened[f.display] = handle
            for key in handle.entries:
                keys[key] = f
    for f in files:
        with contextlib.suppress(Exception):
            total_bytes += f.size()

    config_dict = config_loc = None
    if args.config:
        config_loc = Location.parse(args.config)
        config_dict = _read_json(config_loc, "config")

    key_list = list(keys)
    if args.source_format == "auto":
        probe_cfg = config_dict
        if probe_cfg is None and folder.join("config.json").exists():
            with contextlib.suppress(ConversionError):
                probe_cfg = _read_json(folder.join("config.json"), "config")
        fmt, style = detect_format(key_list, args.vit_prefix, probe_cfg)
    else:
        fmt = args.source_format
        style = {
            "bagel": f"BAGEL checkpoint ({args.vit_prefix}* tensors)",
            "siglip": "stock SigLIP",
            "siglip-navit": "SigLIP-NaViT (this repo, vision_model.*)",
        }[fmt]
        if fmt == "bagel" and not any(k.startswith(args.vit_prefix) for k in key_list):
            raise ConversionError(
                f"--source-format bagel, but {loc.display} has no {args.vit_prefix}* tensors (pass --vit-prefix if "
                "this BAGEL variant stores its ViT under another name)."
            )
        if fmt == "siglip" and not any(
            k.startswith("vision_model.") or k.startswith("embeddings.") for k in key_list
        ):
            raise ConversionError(f"--source-format siglip, but {loc.display} has no vision_model.* / embeddings.* tensors.")

    if config_dict is None:
        config_name = "vit_config.json" if fmt == "bagel" else "config.json"
        candidate = folder.join(config_name)
        if candidate.exists():
            config_loc = candidate
            config_dict = _read_json(candidate, "config")

    src = Source(
        loc=loc,
        format=fmt,
        key_style=style,
        weight_files=[f.display for f in files],
        keys=keys,
        files=opened,
        config_dict=config_dict,
        config_loc=config_loc,
        readme_meta=_readme_front_matter(folder),
        total_bytes=total_bytes,
        pickle=is_pickle,
    )
    return src


def open_entries(src: Source, wanted: list[str]) -> None:
    """Make sure the files holding `wanted` keys are opened (header only) and their entries known."""
    for key in wanted:
        if key in src.entries:
            continue
        floc = src.keys[key]
        handle = src.files.get(floc.display)
        if handle is None:
            handle = PickleFile(floc) if src.pickle else SafetensorsFile(floc)
            src.files[floc.display] = handle
        if key not in handle.entries:
            raise ConversionError(f"the index says {key!r} is in {floc.display}, but that file has no such tensor.")
        src.entries[key] = handle.entries[key]


# ----------------------------------------------------------------------------------------------------------------
# Plan: which tensors are kept, how they are renamed / re-laid-out / cast; validated before anything is written
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Item:
    out_key: str
    canon_key: str
    entry: TensorEntry
    transform: Optional[str]  # "conv2d_to_linear" | "linear_to_conv2d" | None
    out_shape: tuple[int, ...]
    out_dtype: torch.dtype
    shard: int = 0
    sha256: Optional[str] = None

    @property
    def nbytes(self) -> int:
        n = ITEMSIZE[self.out_dtype]
        for s in self.out_shape:
            n *= s
        return n


@dataclass
class Plan:
    source: Source
    to: str  # "siglip-navit" | "stock-siglip"
    config: Any  # SiglipNaViTConfig of the (our-layout) model
    items: list[Item]
    dropped: "OrderedDict[str, list[str]]"
    notes: list[str]
    layers_stored: int
    layers_config: Optional[int]
    dtype_name: str
    shard_files: list[str] = field(default_factory=list)

    @property
    def total_out_bytes(self) -> int:
        return sum(i.nbytes for i in self.items)

    @property
    def total_read_bytes(self) -> int:
        return sum(i.entry.nbytes for i in self.items)


def _canonical(src: Source, key: str, vit_prefix: str, unprefixed: bool) -> tuple[Optional[str], Optional[str]]:
    """Source key -> (key in this repo's layout, or None plus why it is not ours)."""
    if src.format == "bagel":
        if not key.startswith(vit_prefix):
            return None, "not part of the ViT (other BAGEL modules; never read)"
        return key[len(vit_prefix) :], None
    if src.format == "siglip":
        if key.startswith("text_model."):
            return None, "text tower (text_model.*)"
        if key in ("logit_scale", "logit_bias"):
            return None, "logit scale / bias"
        if unprefixed:
            return "vision_model." + key, None
        return key, None
    return key, None


def _drop_reason(canon: str, keep_layers: int, layers_stored: int) -> Optional[str]:
    if canon.startswith("vision_model.head."):
        return "pooling head (vision_model.head.*; not part of this tower)"
    if re.fullmatch(r"vision_model\.rope\.(cos|sin)_[hw]", canon):
        return "persistent RoPE tables (vision_model.rope.*; recomputed by the model)"
    if canon == "vision_model.embeddings.position_ids":
        return "position_ids buffer"
    m = LAYER_RE.match(canon)
    if m and keep_layers <= int(m.group(1)) < layers_stored:
        return f"encoder layers {keep_layers}..{layers_stored - 1} (--num-hidden-layers {keep_layers})"
    return None


def _config_fields_from(src: Source) -> tuple[dict, Optional[int], Optional[bool], str]:
    """Tower fields of the source's config: (fields, layers in the config, rope flag, where they came from)."""
    d = src.config_dict
    if d is None:
        return {}, None, None, ""
    where = src.config_loc.display if src.config_loc else "config"
    if src.format == "bagel" or src.format == "siglip-navit":
        # BAGEL's vit_config.json is read as BAGEL reads it (from_json_file; from_pretrained would look for a
        # config.json). It says rope=True (the default); BAGEL then runs rope=False, set by build_plan.
        cfg_mod, _ = _remote_code_modules()
        try:
            try:
                if src.config_loc is not None and src.config_loc.is_local:
                    cfg = cfg_mod.SiglipNaViTConfig.from_json_file(src.config_loc.path)
                else:
                    cfg = cfg_mod.SiglipNaViTConfig(**d)
            except ValueError:
                if src.format != "bagel":
                    raise
                cfg = cfg_mod.SiglipNaViTConfig(**{**d, "rope": False})  # e.g. head_dim not divisible by 4
        except (TypeError, ValueError) as exc:
            raise ConversionError(f"{where} is not a valid SigLIP vision config: {exc}") from exc
        fields = {k: getattr(cfg, k) for k in CONFIG_FIELDS}
        return fields, fields["num_hidden_layers"], bool(cfg.rope), where
    vision = d.get("vision_config") if isinstance(d.get("vision_config"), dict) else d
    if d.get("model_type") == "siglip" and "vision_config" not in d:
        vision = {}  # a full SiglipModel config with every vision field at its default
    fields = {k: vision[k] for k in CONFIG_FIELDS if k in vision}
    return fields, fields.get("num_hidden_layers"), None, where


def _infer_fields(shapes: dict[str, tuple], layers: int) -> dict:
    """Tower geometry from tensor shapes alone (for a source without any config file)."""
    pw = shapes.get("vision_model.embeddings.patch_embedding.weight")
    pos = shapes.get("vision_model.embeddings.position_embedding.weight")
    fc1 = shapes.get("vision_model.encoder.layers.0.mlp.fc1.weight")
    if pw is None or pos is None or fc1 is None:
        raise ConversionError(
            "no config file was found beside the source and the geometry cannot be inferred from its tensors; pass "
            "--config (BAGEL: vit_config.json, SigLIP: config.json)."
        )
    hidden = pw[0]
    if len(pw) == 4:
        channels, patch = pw[1], pw[2]
    else:
        channels = 3
        patch = int(round((pw[1] / channels) ** 0.5))
    side = int(round(pos[0] ** 0.5))
    heads = KNOWN_HEADS.get(hidden)
    if heads is None or side * side != pos[0] or patch * patch * channels != (pw[1] if len(pw) == 2 else pw[1] * pw[2] * pw[3]):
        raise ConversionError(
            f"no config file was found beside the source and hidden size {hidden} is not a known SigLIP geometry "
            "(the number of attention heads cannot be read from the tensors); pass --config."
        )
    return dict(
        hidden_size=hidden,
        intermediate_size=fc1[0],
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_channels=channels,
        image_size=side * patch,
        patch_size=patch,
    )


def build_plan(src: Source, args) -> Plan:
    cfg_mod, modeling = _remote_code_modules()
    notes: list[str] = []
    dropped: "OrderedDict[str, list[str]]" = OrderedDict()
    unprefixed = src.format == "siglip" and not any(k.startswith("vision_model.") for k in src.keys)

    # 1. map every key; count stored layers
    canon_of: dict[str, str] = {}
    seen: set[str] = set()
    for key in src.keys:
        canon, reason = _canonical(src, key, args.vit_prefix, unprefixed)
        if canon is None:
            dropped.setdefault(reason, []).append(key)
        else:
            if canon in seen:
                raise ConversionError(f"two source tensors map to {canon!r} (one of them is {key!r}).")
            seen.add(canon)
            canon_of[key] = canon
    layer_ids = sorted({int(m.group(1)) for c in canon_of.values() if (m := LAYER_RE.match(c))})
    layers_stored = layer_ids[-1] + 1 if layer_ids else 0
    if layers_stored == 0:
        raise ConversionError(f"{src.loc.display} has no encoder layers (no ...encoder.layers.N.* tensors).")

    # 2. config of the tower
    fields, layers_config, src_rope, cfg_where = _config_fields_from(src)
    if layers_config is not None and src.format == "bagel":
        if layers_stored == layers_config - 1:
            notes.append(
                f"{cfg_where} says {layers_config} layers and the checkpoint stores {layers_stored}: BAGEL runs the "
                "tower with num_hidden_layers - 1 and never stored the last layer."
            )
        elif layers_stored != layers_config:
            raise ConversionError(
                f"layer count mismatch: {cfg_where} says num_hidden_layers = {layers_config}, so a BAGEL checkpoint "
                f"should store {layers_config - 1} layers (BAGEL drops the last one) or {layers_config}, but "
                f"{src.loc.display} stores {layers_stored} (layers {layer_ids[0]}..{layer_ids[-1]}). The config and "
                "the weights do not belong together; pass the matching --config."
            )
    elif layers_config is not None and layers_stored != layers_config:
        raise ConversionError(
            f"layer count mismatch: {cfg_where} says num_hidden_layers = {layers_config} but {src.loc.display} stores "
            f"{layers_stored} layers. The config and the weights do not belong together; pass the matching --config."
        )
    keep = args.num_hidden_layers if args.num_hidden_layers is not None else layers_stored
    if not 1 <= keep <= layers_stored:
        raise ConversionError(
            f"--num-hidden-layers {keep} is out of range: the source stores {layers_stored} layers (choose 1.."
            f"{layers_stored})."
        )
    if src.config_dict is None:
        needed = [k for k, c in canon_of.items() if c in (
            "vision_model.embeddings.patch_embedding.weight",
            "vision_model.embeddings.position_embedding.weight",
            "vision_model.encoder.layers.0.mlp.fc1.weight",
        )]
        open_entries(src, needed)  # headers only
        shapes = {canon_of[k]: src.entries[k].shape for k in needed}
        fields = _infer_fields(shapes, layers_stored)
        notes.append(
            "no config file was found beside the source: geometry inferred from the tensor shapes "
            f"({fields['num_attention_heads']} heads assumed for hidden size {fields['hidden_size']})."
        )
        cfg_where = "tensor shapes"
    if src.format == "bagel":
        rope = False  # BAGEL runs its ViT with rope=False (vit_config.json's rope=True is overridden)
    elif src.format == "siglip":
        rope = False
    else:
        rope = bool(src_rope) if src_rope is not None else False
    fields = dict(fields)
    fields["num_hidden_layers"] = keep
    patch = fields.get("patch_size", 16)
    image = fields.get("image_size", 224)
    if isinstance(image, int) and isinstance(patch, int) and patch > 0 and image % patch:
        fixed = (image // patch) * patch
        notes.append(
            f"image_size {image} is not a multiple of patch_size {patch}: the tower sees a {image // patch}x"
            f"{image // patch} patch grid, i.e. {fixed} px (stock SigLIP drops the remaining pixels); config.json says "
            f"image_size {fixed}."
        )
        fields["image_size"] = fixed
    try:
        config = cfg_mod.SiglipNaViTConfig(**fields, rope=rope)
    except (TypeError, ValueError) as exc:
        raise ConversionError(f"the tower's config ({cfg_where}) is invalid: {exc}") from exc
    if args.to == "stock-siglip" and config.rope:
        raise ConversionError(
            "--to stock-siglip needs a rope=False model: stock SigLIP has a learned position table and no rotary "
            "embeddings, so a rope=True tower has no stock equivalent. Export a rope=False checkpoint instead."
        )

    # 3. expected keys and shapes: the model itself, built on the meta device (no memory)
    with torch.device("meta"):
        model = modeling.SiglipVisionModel(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    del model

    # 4. classify every source key of the tower: kept / dropped / unexpected; then missing and mis-shaped
    kept_src: dict[str, str] = {}
    unexpected: list[str] = []
    for key, canon in canon_of.items():
        reason = _drop_reason(canon, keep, layers_stored)
        if reason is not None:
            dropped.setdefault(reason, []).append(key)
        elif canon in expected:
            kept_src[canon] = key
        else:
            unexpected.append(key)
    open_entries(src, list(kept_src.values()))
    missing = [k for k in expected if k not in kept_src]
    misshaped: list[str] = []
    items: list[Item] = []
    out_dtype_arg = DTYPE_CHOICES.get(args.dtype)
    patch_key = "vision_model.embeddings.patch_embedding.weight"
    for canon, shape in expected.items():
        key = kept_src.get(canon)
        if key is None:
            continue
        entry = src.entries[key]
        transform = None
        if canon == patch_key:
            conv_shape = (config.hidden_size, config.num_channels, config.patch_size, config.patch_size)
            if entry.shape == conv_shape:
                transform = None if args.to == "stock-siglip" else "conv2d_to_linear"
            elif entry.shape == shape:
                transform = "linear_to_conv2d" if args.to == "stock-siglip" else None
            else:
                misshaped.append(
                    f"{key}: {list(entry.shape)}, expected {list(shape)} (Linear) or {list(conv_shape)} (Conv2d)"
                )
                continue
            out_shape = conv_shape if args.to == "stock-siglip" else shape
        else:
            if entry.shape != shape:
                misshaped.append(f"{key}: {list(entry.shape)}, expected {list(shape)}")
                continue
            out_shape = shape
        if not entry.dtype.is_floating_point:
            misshaped.append(f"{key}: dtype {entry.dtype} is not floating point")
            continue
        items.append(Item(canon, canon, entry, transform, out_shape, out_dtype_arg or entry.dtype))
    if missing or unexpected or misshaped:
        lines = [
            f"{src.loc.display} does not match the {keep}-layer tower described by {cfg_where} "
            f"(hidden {config.hidden_size}, patch {config.patch_size}, image {config.image_size}, rope={config.rope}); "
            "nothing was written."
        ]

        def block(title, keys):
            if keys:
                lines.append(f"  {title} ({len(keys)}):")
                lines.extend(f"    - {k}" for k in keys[:25])
                if len(keys) > 25:
                    lines.append(f"    ... and {len(keys) - 25} more")

        if src.format == "bagel":
            to_src = lambda c: args.vit_prefix + c  # noqa: E731
        elif unprefixed:
            to_src = lambda c: c[len("vision_model.") :]  # noqa: E731
        else:
            to_src = lambda c: c  # noqa: E731
        block("missing", [to_src(k) for k in missing])
        block("unexpected", unexpected)
        block("mis-shaped", misshaped)
        raise ConversionError("\n".join(lines))

    # 5. dtype of the output, and order: the order the source is read in (file, then offset)
    if out_dtype_arg is not None:
        dtype_name = args.dtype
    else:
        dtype_name = DTYPE_NAMES.get(src.entries[kept_src[patch_key]].dtype, "float32")
        kinds = Counter(DTYPE_NAMES.get(i.out_dtype, str(i.out_dtype)) for i in items)
        if len(kinds) > 1:
            notes.append(f"source tensors have mixed dtypes {dict(kinds)}; kept as they are (--dtype keep).")
    file_order = {name: i for i, name in enumerate(src.files)}
    items.sort(key=lambda it: (file_order.get(it.entry.file.loc.display, 0), it.entry.start, it.out_key))

    plan = Plan(src, args.to, config, items, dropped, notes, layers_stored, layers_config, dtype_name)
    _assign_shards(plan, parse_size(args.max_shard_size))
    return plan


def parse_size(text) -> int:
    """'5GB' (10**9), '500MiB' (2**20), '10KB', or a plain number of bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", str(text), re.I)
    if not m:
        raise ConversionError(f"--max-shard-size {text!r}: use e.g. 5GB, 500MB, 2GiB or a number of bytes.")
    number = float(m.group(1))
    unit = (m.group(2) or "").upper()
    scale = {"": 1, "B": 1}
    for i, p in enumerate("KMGT", start=1):
        scale[p] = scale[p + "B"] = 1000**i
        scale[p + "I"] = scale[p + "IB"] = 1024**i
    if unit not in scale:
        raise ConversionError(f"--max-shard-size {text!r}: unknown unit {m.group(2)!r}.")
    size = int(number * scale[unit])
    if size <= 0:
        raise ConversionError(f"--max-shard-size {text!r} must be positive.")
    return size


def _assign_shards(plan: Plan, max_shard: int) -> None:
    shard, used = 0, 0
    for item in plan.items:
        if used and used + item.nbytes > max_shard:
            shard, used = shard + 1, 0
        item.shard = shard
        used += item.nbytes
    count = shard + 1
    if count == 1:
        plan.shard_files = ["model.safetensors"]
    else:
        plan.shard_files = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


# ----------------------------------------------------------------------------------------------------------------
# Reading (bounded chunks of contiguous ranges), converting and writing
# ----------------------------------------------------------------------------------------------------------------
def _tensor_from_buffer(buf: bytearray, offset: int, entry: TensorEntry) -> torch.Tensor:
    if entry.numel == 0:
        return torch.empty(entry.shape, dtype=entry.dtype)
    itemsize = entry.nbytes // entry.numel
    if offset % itemsize:  # keep the storage aligned for the element type
        buf, offset = bytearray(memoryview(buf)[offset : offset + entry.nbytes]), 0
    return torch.frombuffer(buf, dtype=entry.dtype, count=entry.numel, offset=offset).reshape(entry.shape)


def iter_source_tensors(plan: Plan, chunk_bytes: int) -> Iterator[tuple[Item, torch.Tensor]]:
    """Yield (item, source tensor) in plan order, reading each run of contiguous tensors in chunks <= chunk_bytes."""
    group: list[Item] = []

    def flush(group):
        first = group[0].entry
        if isinstance(first.file, PickleFile):
            for it in group:
                yield it, first.file.tensors[it.entry.key]
            return
        buf = first.file.reader.read(first.start, group[-1].entry.end - first.start)
        for it in group:
            yield it, _tensor_from_buffer(buf, it.entry.start - first.start, it.entry)

    for item in plan.items:
        e = item.entry
        if (
            group
            and not isinstance(e.file, PickleFile)
            and e.file is group[-1].entry.file
            and e.start == group[-1].entry.end
            and e.end - group[0].entry.start <= chunk_bytes
        ):
            group.append(item)
            continue
        if group:
            yield from flush(group)
        group = [item]
    if group:
        yield from flush(group)


def _all_finite(tensor: torch.Tensor) -> bool:
    """NaN / inf anywhere makes the sum non-finite (a 5x cheaper test than isfinite().all() on bf16); a sum that
    overflows from finite values alone is settled by the exact test."""
    if tensor.numel() == 0:
        return True
    total = tensor.sum(dtype=torch.float32) if tensor.dtype in (torch.float16,) else tensor.sum()
    return bool(torch.isfinite(total)) or bool(torch.isfinite(tensor).all())


def convert_tensor(item: Item, tensor: torch.Tensor, config) -> torch.Tensor:
    _, modeling = _remote_code_modules()
    if tensor.is_floating_point() and not _all_finite(tensor):
        raise ConversionError(
            f"source tensor {item.entry.key!r} contains NaN or infinite values: the source file is corrupt "
            "(or not a trained checkpoint). Nothing was written to the target."
        )
    if item.transform == "conv2d_to_linear":
        tensor = modeling.conv2d_weight_to_linear(tensor)
    elif item.transform == "linear_to_conv2d":
        tensor = modeling.linear_weight_to_conv2d(tensor, config.num_channels, config.patch_size)
    if tensor.dtype != item.out_dtype:
        tensor = tensor.to(item.out_dtype)
        if not _all_finite(tensor):
            raise ConversionError(
                f"casting {item.entry.key!r} to {DTYPE_NAMES.get(item.out_dtype, item.out_dtype)} overflows (values "
                "out of range become inf); choose another --dtype."
            )
    if tuple(tensor.shape) != tuple(item.out_shape):  # pragma: no cover - guarded by the plan
        raise ConversionError(f"internal error: {item.out_key} has shape {tuple(tensor.shape)}, planned {item.out_shape}")
    return tensor.contiguous()


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


def _write_tensor_data(f, data: memoryview) -> None:
    """Write one tensor's bytes (a separate function so tests can simulate write failures and corruption)."""
    f.write(data)


def _safetensors_header(items: list[Item]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for it in items:
        header[it.out_key] = {
            "dtype": TORCH_TO_ST[it.out_dtype],
            "shape": list(it.out_shape),
            "data_offsets": [offset, offset + it.nbytes],
        }
        offset += it.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the reference writer does
    return struct.pack("<Q", len(raw)) + raw


def write_weights(plan: Plan, outdir: Path, chunk_bytes: int, progress: bool) -> None:
    from tqdm.auto import tqdm

    stream = iter_source_tensors(plan, chunk_bytes)
    bar = tqdm(
        total=plan.total_out_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="converting",
        disable=None if progress else True, file=sys.stderr,
    )
    try:
        for shard, fname in enumerate(plan.shard_files):
            shard_items = [it for it in plan.items if it.shard == shard]
            with open(outdir / fname, "wb") as f:
                f.write(_safetensors_header(shard_items))
                for it in shard_items:
                    got, tensor = next(stream)
                    assert got is it, "read order and write order diverged"
                    data = _tensor_bytes(convert_tensor(it, tensor, plan.config))
                    it.sha256 = hashlib.sha256(data).hexdigest()
                    _write_tensor_data(f, data)
                    bar.update(it.nbytes)
                f.flush()
                os.fsync(f.fileno())
    finally:
        bar.close()
    if len(plan.shard_files) > 1:
        index = {
            "metadata": {"total_size": plan.total_out_bytes},
            "weight_map": {it.out_key: plan.shard_files[it.shard] for it in sorted(plan.items, key=lambda i: i.out_key)},
        }
        (outdir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def verify_output(plan: Plan, outdir: Path, chunk_bytes: int) -> None:
    """Re-read what was written: safetensors headers (our parser and the reference one) and every tensor's hash."""
    from safetensors import safe_open

    for shard, fname in enumerate(plan.shard_files):
        path = outdir / fname
        shard_items = {it.out_key: it for it in plan.items if it.shard == shard}
        try:
            with safe_open(str(path), framework="pt") as ref:
                ref_keys = set(ref.keys())
                ref_meta = ref.metadata()
        except Exception as exc:  # noqa: BLE001
            raise ConversionError(f"verification failed: {fname} is not a valid safetensors file ({exc}).") from exc
        if ref_keys != set(shard_items) or ref_meta != {"format": "pt"}:
            raise ConversionError(f"verification failed: {fname} has the wrong tensors or metadata.")
        st = SafetensorsFile(Location(str(path)))
        try:
            for key, it in shard_items.items():
                e = st.entries[key]
                if e.dtype != it.out_dtype or e.shape != tuple(it.out_shape):
                    raise ConversionError(f"verification failed: {key} in {fname} has the wrong dtype or shape.")
                h = hashlib.sha256()
                pos = e.start
                while pos < e.end:
                    n = min(chunk_bytes, e.end - pos)
                    h.update(st.reader.read(pos, n))
                    pos += n
                if h.hexdigest() != it.sha256:
                    raise ConversionError(
                        f"verification failed: tensor {key} in {fname} does not match what was converted from the "
                        "source (sha256 mismatch after writing: disk or filesystem error?). Nothing was written to the "
                        "target."
                    )
        finally:
            st.close()
    if len(plan.shard_files) > 1:
        index = json.loads((outdir / "model.safetensors.index.json").read_text())
        if index["weight_map"] != {it.out_key: plan.shard_files[it.shard] for it in plan.items}:
            raise ConversionError("verification failed: model.safetensors.index.json does not match the shards.")


# ----------------------------------------------------------------------------------------------------------------
# Side files: config.json, preprocessor_config.json, remote code, model card
# ----------------------------------------------------------------------------------------------------------------
def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def navit_config_dict(plan: Plan) -> dict:
    """config.json of this repo's layout: built by the config class, trimmed to what every transformers major reads
    silently (4.49 reads `torch_dtype`, 5.x `dtype`: both are written)."""
    cfg = plan.config
    full = cfg.to_dict()
    d = {"architectures": ["SiglipVisionModel"], "auto_map": dict(CONFIG_AUTO_MAP), "model_type": cfg.model_type}
    for k in CONFIG_FIELDS:
        d[k] = full[k]
    d["rope"] = bool(full["rope"])
    d["vision_use_head"] = False
    d["torch_dtype"] = plan.dtype_name
    d["dtype"] = plan.dtype_name
    d["transformers_version"] = _transformers_version()
    return d


def stock_config_dict(plan: Plan) -> dict:
    cfg = plan.config
    d = {"architectures": ["SiglipVisionModel"], "model_type": "siglip_vision_model"}
    for k in CONFIG_FIELDS:
        d[k] = getattr(cfg, k)
    d["vision_use_head"] = False
    d["torch_dtype"] = plan.dtype_name
    d["dtype"] = plan.dtype_name
    d["transformers_version"] = _transformers_version()
    return d


# BAGEL's ViT transform settings (the processor's constructor arguments), used when the repo has no template.
DEFAULT_PREPROCESSOR = {
    "auto_map": dict(PROCESSOR_AUTO_MAP),
    "bagel_interleaved_resize": False,
    "do_resize": True,
    "image_stride": 14,
    "img_num": 1,
    "max_image_size": 980,
    "max_num_patches_per_side": 70,
    "max_pixels": 1_806_336,
    "min_image_size": 224,
    "patch_size": 14,
    "position_id_mode": "extrapolate",
}


def navit_preprocessor_dict(config) -> dict:
    """preprocessor_config.json: the repo's template (else BAGEL's settings) with the model's geometry filled in.

    patch_size / image_stride / max_num_patches_per_side / max_image_size always follow the model. The size budget
    (min_image_size = min(224, image_size), max_pixels = min(1_806_336, image_size**2)) is recomputed only when the
    template was written for another geometry: for BAGEL's own 980 px / 14 px tower the template's BAGEL values stay
    (BAGEL divides max_pixels = 1_806_336 by img_num, so lowering it would change results for img_num > 1).
    """
    path = HERE / "preprocessor_config.json"
    d = json.loads(path.read_text()) if path.is_file() else json.loads(json.dumps(DEFAULT_PREPROCESSOR))
    # no "image_processor_type": auto_map alone selects the class, and with that key transformers 4.49 warns
    # about a "slow" image processor on every load
    d.pop("image_processor_type", None)
    d["auto_map"] = dict(PROCESSOR_AUTO_MAP)
    same_geometry = (d.get("max_image_size"), d.get("patch_size")) == (config.image_size, config.patch_size)
    if not same_geometry or "min_image_size" not in d or "max_pixels" not in d:
        d["min_image_size"] = min(224, config.image_size)
        d["max_pixels"] = min(1_806_336, config.image_size**2)
    d["patch_size"] = config.patch_size
    d["image_stride"] = config.patch_size
    d["max_num_patches_per_side"] = config.image_size // config.patch_size
    d["max_image_size"] = config.image_size
    return d


def stock_preprocessor_dict(config) -> dict:
    return {
        "image_processor_type": "SiglipImageProcessor",
        "do_resize": True,
        "size": {"height": config.image_size, "width": config.image_size},
        "resample": 3,  # bicubic
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }


MODEL_CARD_TEMPLATE = """---
library_name: transformers
pipeline_tag: image-feature-extraction
license: {license}
{base_model_line}tags:
{tags}
---

# {title}

{summary}

## Converted from

| | |
|---|---|
| source | `{source}` |
| source format | {source_format} |
| weight file(s) | {weight_files} |
| tensors read | {tensors_read} of {tensors_total} ({bytes_read} of {bytes_total}) |
| dropped | {dropped} |
| layers | {layers} |
| geometry | hidden {hidden}, {heads} heads, MLP {intermediate}, patch {patch}, image {image} px ({side}x{side} patch grid), rope={rope} |
| dtype | {dtype} |
| license | {license} (the source weights' license{license_note}) |
{notes}
## How it was converted

```bash
{command}
```

with `convert_checkpoint.py` from the SigLIP-NaViT repo, which:

{steps}

## Usage

{usage}
"""

NAVIT_USAGE = """```python
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel

repo = "{repo}"
processor = AutoImageProcessor.from_pretrained(repo, trust_remote_code=True)
# fp32 on CPU (bf16 matmuls are much slower there); on transformers 4.x write torch_dtype= instead of dtype=
model = AutoModel.from_pretrained(repo, trust_remote_code=True, dtype=torch.float32).eval()

images = [Image.open("a.jpg"), Image.open("b.png")]        # any sizes: one packed batch, no padding
inputs = processor(images, return_tensors="pt")
with torch.no_grad():
    features = model(**inputs).last_hidden_state             # (total_patches, {hidden})
maps = processor.unpack(features, inputs)                    # one (h, w, {hidden}) map per image
```

Export back to a plain transformers checkpoint (no remote code): `python convert_checkpoint.py --src {repo_path}
--out siglip-stock --to stock-siglip`."""

STOCK_USAGE = """```python
import torch
from transformers import SiglipImageProcessor, SiglipVisionModel

model = SiglipVisionModel.from_pretrained("{repo}", dtype=torch.float32)  # transformers 4.x: torch_dtype=
processor = SiglipImageProcessor.from_pretrained("{repo}")
```

A plain transformers `SiglipVisionModel` (no pooling head: `vision_use_head: false`); its `last_hidden_state` on a
{image}x{image} image equals the packed SigLIP-NaViT tower's output for that image."""


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"  # pragma: no cover


def _hf_repo_id(spec: str) -> Optional[str]:
    if not spec.startswith("hf://"):
        return None
    parts = spec[len("hf://") :].split("/")
    if parts and parts[0] in ("datasets", "spaces"):
        return None
    if len(parts) < 2:
        return None
    return f"{parts[0]}/{parts[1].split('@')[0]}"


def _base_model(plan: Plan, args) -> Optional[str]:
    if args.base_model:
        return args.base_model
    repo = _hf_repo_id(args.src)
    if repo:
        return repo
    src = plan.source
    if src.format == "siglip-navit" and src.readme_meta.get("base_model"):
        return src.readme_meta["base_model"]
    if src.format == "bagel":
        c = plan.config
        if (c.hidden_size, c.patch_size, c.image_size, plan.layers_stored) == (1152, 14, 980, 26):
            return BAGEL_REPO_ID
        return None
    name = (src.config_dict or {}).get("_name_or_path")
    if isinstance(name, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        return name
    return None


def model_card(plan: Plan, args, command: str) -> str:
    src = plan.source
    c = plan.config
    license_ = args.license or src.readme_meta.get("license") or DEFAULT_LICENSE
    license_note = "" if args.license else "; override with --license"
    base = _base_model(plan, args)
    side = c.image_size // c.patch_size
    dropped = "; ".join(f"{reason}: {len(keys)}" for reason, keys in plan.dropped.items()) or "nothing"
    if plan.layers_config is not None and plan.layers_config != plan.layers_stored:
        layers = f"{c.num_hidden_layers} (the source stores {plan.layers_stored}; its config says {plan.layers_config})"
    else:
        layers = f"{c.num_hidden_layers} (the source stores {plan.layers_stored})"
    stock = plan.to == "stock-siglip"
    repo = args.push_to_hub or os.path.basename(os.path.abspath(args.out))
    tags = ["siglip", "vision", "image-feature-extraction"] if stock else ["custom_code", "siglip", "navit", "vision"]
    if src.format == "bagel":
        tags.append("bagel")
    if src.pickle:
        steps = [
            "loaded the pickle checkpoint with `torch.load(weights_only=True)` (tensors only) and validated every "
            "kept key, shape and dtype against the model before writing anything;"
        ]
    else:
        steps = [
            "read the source's safetensors header and validated every kept key, shape and dtype against the model "
            "before writing anything;",
            f"read only the {len(plan.items)} kept tensors, once ({_human(plan.total_read_bytes)}); nothing else of "
            "the source was read;",
        ]
    if src.format == "bagel":
        steps.append(f"renamed `{args.vit_prefix}vision_model.*` to `vision_model.*`;")
    elif src.key_style.endswith("(unprefixed)"):
        steps.append("renamed the unprefixed `embeddings.*` / `encoder.*` / `post_layernorm.*` to `vision_model.*`;")
    transforms = {it.transform for it in plan.items}
    if "conv2d_to_linear" in transforms:
        steps.append(
            "re-laid-out the Conv2d patch embedding `(hidden, C, P, P)` as the packed model's Linear "
            "`(hidden, P*P*C)`: `w.permute(0, 2, 3, 1).reshape(hidden, -1)` (exact; bias unchanged);"
        )
    if "linear_to_conv2d" in transforms:
        steps.append(
            "re-laid-out the Linear patch embedding `(hidden, P*P*C)` as stock SigLIP's Conv2d `(hidden, C, P, P)`: "
            "`w.view(hidden, P, P, C).permute(0, 3, 1, 2)` (the exact inverse; bias unchanged);"
        )
    if c.num_hidden_layers < plan.layers_stored:
        steps.append(f"kept the first {c.num_hidden_layers} of {plan.layers_stored} encoder layers;")
    if args.dtype != "keep":
        steps.append(f"cast the weights to {args.dtype};")
    steps.append("hashed (sha256) every tensor as it was written and verified the written files against those hashes.")
    if stock:
        title = "SigLIP vision tower (stock transformers layout)"
        summary = (
            f"The vision tower of `{base or src.loc.display}` as a plain transformers `SiglipVisionModel` checkpoint: "
            "loads without `trust_remote_code`."
        )
        usage = STOCK_USAGE.format(repo=repo, image=c.image_size)
    else:
        title = "SigLIP-NaViT vision tower"
        origin = "BAGEL's" if src.format == "bagel" else "a"
        summary = (
            f"{origin} SigLIP vision tower (from `{base or src.loc.display}`) in the packed, variable-resolution "
            "SigLIP-NaViT layout: many images of different sizes go through one forward call without padding. Load "
            "it with `trust_remote_code=True`."
        )
        usage = NAVIT_USAGE.format(
            repo=repo, hidden=c.hidden_size, repo_path=f"hf://{repo}" if args.push_to_hub else repo
        )
    notes = "".join(f"\n> {n}\n" for n in plan.notes)
    return MODEL_CARD_TEMPLATE.format(
        license=license_,
        base_model_line=f"base_model: {base}\n" if base else "",
        tags="\n".join(f"- {t}" for t in tags),
        title=title,
        summary=summary,
        source=src.loc.display,
        source_format=src.key_style,
        weight_files=", ".join(f"`{os.path.basename(w)}`" for w in src.weight_files),
        tensors_read=len(plan.items),
        tensors_total=len(src.keys),
        bytes_read=_human(plan.total_read_bytes),
        bytes_total=_human(src.total_bytes) if src.total_bytes else "?",
        dropped=dropped,
        layers=layers,
        hidden=c.hidden_size,
        heads=c.num_attention_heads,
        intermediate=c.intermediate_size,
        patch=c.patch_size,
        image=c.image_size,
        side=side,
        rope=c.rope,
        dtype=plan.dtype_name,
        license_note=license_note,
        notes=notes,
        command=command,
        steps="\n".join(f"- {x}" for x in steps),
        usage=usage,
    )


def write_side_files(plan: Plan, outdir: Path, args, command: str) -> list[str]:
    written = []
    if plan.to == "stock-siglip":
        config = stock_config_dict(plan)
        processor = stock_preprocessor_dict(plan.config)
    else:
        config = navit_config_dict(plan)
        processor = navit_preprocessor_dict(plan.config)
        for name in REMOTE_CODE:
            if not (HERE / name).is_file():
                raise ConversionError(f"{HERE / name} is missing: run the converter from a complete checkout.")
            shutil.copyfile(HERE / name, outdir / name)
            written.append(name)
    (outdir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")
    (outdir / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    (outdir / "README.md").write_text(model_card(plan, args, command))
    return written + ["config.json", "preprocessor_config.json", "README.md"]


def output_file_list(plan: Plan) -> list[str]:
    files = list(plan.shard_files)
    if len(files) > 1:
        files.append("model.safetensors.index.json")
    files += ["config.json", "preprocessor_config.json", "README.md"]
    if plan.to != "stock-siglip":
        files += list(REMOTE_CODE)
    return files


# ----------------------------------------------------------------------------------------------------------------
# Target handling, push, CLI
# ----------------------------------------------------------------------------------------------------------------
def check_target(out: Path, src: Source, force: bool) -> None:
    if src.loc.is_local:
        src_path = Path(src.loc.path).resolve()
        out_res = out.resolve()
        if out_res == src_path or out_res in src_path.parents:
            raise ConversionError(
                f"refusing to write to {out}: it is (or contains) the source {src.loc.display}. Choose another --out."
            )
    if out.is_symlink() or out.exists():
        if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
            return
        if not force:
            raise ConversionError(
                f"target {out} already exists and is not empty; pass --force to replace it (the old contents are "
                "replaced only after the new checkpoint has been written and verified)."
            )


def _move_into_place(tmp: Path, out: Path) -> None:
    if out.is_symlink() or out.exists():
        backup = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, backup)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(backup, out)
            raise
        if backup.is_dir() and not backup.is_symlink():
            shutil.rmtree(backup, ignore_errors=True)
        else:
            backup.unlink()
    else:
        os.rename(tmp, out)


def push_to_hub(out: Path, args, plan: Plan) -> str:
    import huggingface_hub

    api = huggingface_hub.HfApi()
    try:
        url = api.create_repo(args.push_to_hub, private=True if args.private else None, exist_ok=True, repo_type="model")
        if args.revision and args.revision != "main":
            api.create_branch(args.push_to_hub, branch=args.revision, exist_ok=True, repo_type="model")
        api.upload_folder(
            repo_id=args.push_to_hub,
            folder_path=str(out),
            repo_type="model",
            revision=args.revision,
            commit_message=f"SigLIP-NaViT vision tower converted from {plan.source.loc.display}",
        )
    except Exception as exc:  # noqa: BLE001 - network / auth errors become one clear message
        raise ConversionError(
            f"the checkpoint was written to {out}, but uploading it to {args.push_to_hub} failed ({type(exc).__name__}: "
            f"{exc}). Log in with `hf auth login` (or set HF_TOKEN) and retry with `hf upload {args.push_to_hub} "
            f"{out}`."
        ) from exc
    return str(url)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convert_checkpoint.py",
        description="Convert a BAGEL or stock SigLIP checkpoint into a ready SigLIP-NaViT Hub repo (streaming), or "
        "export one back to a stock transformers SiglipVisionModel.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  python convert_checkpoint.py --src /path/to/BAGEL-7B-MoT --out siglip-navit-bagel\n"
        "  python convert_checkpoint.py --src hf://ByteDance-Seed/BAGEL-7B-MoT --out siglip-navit-bagel\n"
        "  python convert_checkpoint.py --src /path/to/siglip-so400m-patch14-384 --out siglip-navit-so400m\n"
        "  python convert_checkpoint.py --src siglip-navit-bagel --out siglip-stock --to stock-siglip\n"
        "  python convert_checkpoint.py --src ... --out DIR --push-to-hub you/siglip-navit-bagel --private",
    )
    p.add_argument("--src", required=True, help="source directory, file, or fsspec URL (e.g. hf://ByteDance-Seed/BAGEL-7B-MoT)")
    p.add_argument("--out", required=True, help="output directory (written via a temporary directory beside it)")
    p.add_argument("--to", choices=["siglip-navit", "stock-siglip"], default="siglip-navit",
                   help="output layout: this repo's (remote code; default) or a plain transformers SiglipVisionModel")
    p.add_argument("--source-format", choices=["auto", "bagel", "siglip", "siglip-navit"], default="auto",
                   help="override the detected source format (default: auto)")
    p.add_argument("--config", help="the source's config (BAGEL: vit_config.json, SigLIP: config.json) when it is "
                   "not beside the weights")
    p.add_argument("--vit-prefix", default=DEFAULT_VIT_PREFIX, help=f"key prefix of the ViT in a BAGEL checkpoint (default: {DEFAULT_VIT_PREFIX})")
    p.add_argument("--num-hidden-layers", type=int, help="keep only the first N encoder layers")
    p.add_argument("--dtype", choices=["keep", "bfloat16", "float16", "float32"], default="keep",
                   help="dtype of the written weights (default: keep the source's)")
    p.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                   help=f"shard model.safetensors above this size, e.g. 5GB, 500MB, 2GiB (default: {DEFAULT_MAX_SHARD_SIZE})")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept .bin/.pt pickle sources (loaded only with torch.load(weights_only=True))")
    p.add_argument("--force", action="store_true", help="replace an existing non-empty --out")
    p.add_argument("--dry-run", action="store_true", help="validate and list what would be written; write nothing")
    p.add_argument("--license", help=f"license of the source weights for the model card (default: the source's, else {DEFAULT_LICENSE})")
    p.add_argument("--base-model", help="base_model for the model card (default: derived from the source)")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the output to this Hub model repo")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private (with --push-to-hub)")
    p.add_argument("--revision", help="branch to upload to (with --push-to-hub; created if missing)")
    p.add_argument("--read-chunk-size", default="64MiB", help="largest single read from the source (default: 64MiB)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--quiet", action="store_true", help="only errors")
    p.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    return p


def describe_plan(plan: Plan, out: Path) -> str:
    src = plan.source
    lines = [
        f"source: {src.loc.display} [{src.key_style}]",
        f"  weight files: {', '.join(src.weight_files)}",
        f"  layers stored: {plan.layers_stored}" + (f", config says {plan.layers_config}" if plan.layers_config is not None else ""),
        f"output: {out} [{'stock transformers SiglipVisionModel' if plan.to == 'stock-siglip' else 'SigLIP-NaViT (remote code)'}]",
        f"  layers {plan.config.num_hidden_layers}, hidden {plan.config.hidden_size}, patch {plan.config.patch_size}, "
        f"image {plan.config.image_size}, rope={plan.config.rope}, dtype {plan.dtype_name}",
        f"  would read {len(plan.items)} tensors, {plan.total_read_bytes} bytes"
        + (f" of {src.total_bytes} bytes of source weights" if src.total_bytes else ""),
        "files:",
    ]
    for i, name in enumerate(plan.shard_files):
        n = sum(it.nbytes for it in plan.items if it.shard == i)
        lines.append(f"  {name}  ({sum(1 for it in plan.items if it.shard == i)} tensors, {n} bytes)")
    lines += [f"  {n}" for n in output_file_list(plan)[len(plan.shard_files):]]
    lines.append("tensors:")
    natural = lambda key: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]  # noqa: E731
    for it in sorted(plan.items, key=lambda i: natural(i.out_key)):
        extra = f"  [{it.transform}]" if it.transform else ""
        lines.append(
            f"  {it.out_key}  {list(it.out_shape)} {DTYPE_NAMES.get(it.out_dtype, it.out_dtype)}  <- {it.entry.key}{extra}"
        )
    if plan.dropped:
        lines.append("not written:")
        for reason, keys in plan.dropped.items():
            lines.append(f"  {reason}: {len(keys)} tensors")
    for n in plan.notes:
        lines.append(f"note: {n}")
    return "\n".join(lines)


def run(args, argv: list[str]) -> int:
    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr)

    chunk = parse_size(args.read_chunk_size)
    out = Path(os.path.abspath(os.path.expanduser(args.out)))
    src = open_source(args)
    try:
        check_target(out, src, args.force)
        plan = build_plan(src, args)
        if args.dry_run:
            print(describe_plan(plan, out))
            print("dry run: nothing was written.")
            return 0
        for n in plan.notes:
            log(f"note: {n}")
        log(
            f"converting {src.loc.display} [{src.key_style}] -> {out}: {len(plan.items)} tensors, "
            f"{_human(plan.total_read_bytes)} to read"
            + (f" of {_human(src.total_bytes)}" if src.total_bytes else "")
        )
        command = "python convert_checkpoint.py " + shlex.join(argv)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            write_weights(plan, tmp, chunk, progress=not (args.no_progress or args.quiet))
            write_side_files(plan, tmp, args, command)
            verify_output(plan, tmp, chunk)
            _move_into_place(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        log(
            f"wrote {out} ({', '.join(output_file_list(plan))}); read {_human(src.bytes_read)} from the source "
            f"({src.bytes_read} bytes); every tensor verified against its sha256."
        )
        if args.push_to_hub:
            url = push_to_hub(out, args, plan)
            log(f"uploaded to {url}" + (f" (revision {args.revision})" if args.revision else ""))
        return 0
    finally:
        src.close()


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.private or args.revision) and not args.push_to_hub:
        parser.error("--private and --revision only apply with --push-to-hub")
    if args.vit_prefix and not args.vit_prefix.endswith("."):
        args.vit_prefix += "."
    try:
        return run(args, argv)
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written to the target (the temporary directory was removed).", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - unexpected: one paragraph, traceback with --debug
        if args.debug:
            raise
        print(
            f"error: unexpected {type(exc).__name__}: {exc}. Nothing was written to the target. Re-run with --debug "
            "for the traceback.",
            file=sys.stderr,
        )
        return 1


def _sigterm(signum, frame):  # pragma: no cover - exercised by users, not tests
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _sigterm)
    sys.exit(main())
