#!/usr/bin/env python
# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""Encode an image collection with SigLIP-NaViT: token-budget packed forwards, data parallel, resumable shards.

    python extract_features.py --model MODEL_DIR_OR_REPO --input "photos/**/*.jpg" --output feats/
    torchrun --nproc-per-node 8 extract_features.py --model ... --input ... --output ...

Input: a folder (searched recursively for image files), a glob, a .txt / .lst file of paths (one per line), one
image file, a saved Hugging Face `datasets` dataset (a `save_to_disk` folder) or a Hub dataset id.
Output: `DIR/manifest.json` and safetensors shards holding, in the manifest's `ids` order, `pooled` (n, C) float32
(the mean over each image's patches), `grid_hw` (n, 2) int64 and, with `--save-grids`, `features.{j}` (h_j, w_j, C)
per image j.

How it works:
- The inputs are cut into shards of `--shard-size` images; rank r of a world of W processes takes the shards
  k with k % W == r (disjoint slices; together every input exactly once).
- Within a shard, each image's patch grid is computed from its header alone, then the images are grouped
  first-fit-decreasing into forwards of at most `--max-patches-per-batch` patches: the NaViT point -- no padding,
  little budget wasted. Images are decoded and preprocessed by DataLoader workers while the model runs.
- Shards are written atomically (temporary file + fsync + rename); a rerun skips the shards already on disk. A run
  is fingerprinted (inputs, weights, settings): a different run into the same folder is refused.
- Unreadable images are logged with their id and skipped (listed in the manifest), never crashing the run; file
  system failures (I/O errors, too many open files, ...) stop it instead, so a rerun retries those images.
- The model code is the one next to this script (--model gives config + weights); --trust-remote-code runs the
  code of --model's own repo instead.
"""

from __future__ import annotations

import argparse
import errno
import glob
import hashlib
import io
import json
import logging
import math
import os
import signal
import struct
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import PIL.Image
import torch
import torch.distributed as dist

logger = logging.getLogger("extract_features")

FORMAT = "siglip-navit-features/1"
MANIFEST = "manifest.json"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_SHARD_SIZE = 256
REMOTE_CODE_FILES = ("configuration_siglip_navit.py", "modeling_siglip_navit.py", "image_processing_siglip_navit.py")

ImageId = Union[str, int]


class UsageError(Exception):
    """Bad arguments or a bad output folder: reported in one line, exit code 2."""


# --------------------------------------------------------------------------------------------------------------
# Token-budget packing
# --------------------------------------------------------------------------------------------------------------
def plan_batches(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Group items of the given patch counts into forwards of at most `budget` patches, first-fit decreasing.

    Returns lists of indices into `lengths`; each list is ordered largest first (equal sizes end up next to each
    other, which the model batches into one attention call). Every index appears exactly once.
    """
    if budget <= 0:
        raise ValueError(f"budget must be a positive number of patches, got {budget}")
    too_big = [n for n in lengths if n > budget]
    if too_big:
        raise ValueError(f"an item of {max(too_big)} patches does not fit a budget of {budget} patches")
    batches: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                batches[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            batches.append([i])
            room.append(budget - lengths[i])
    return batches


# --------------------------------------------------------------------------------------------------------------
# Inputs: ids -> image sizes (headers only) and decoded images
# --------------------------------------------------------------------------------------------------------------
LIST_EXTENSIONS = (".txt", ".lst")


class FileSource:
    """Image files; an image's id is its path as found. Images are read as stored (EXIF orientation is not applied),
    exactly as `processor(Image.open(path))` and BAGEL read them."""

    kind = "files"

    def __init__(self, paths: list[str]):
        seen: set = set()
        for path in paths:
            if path in seen:
                raise UsageError(f"--input lists {path!r} twice; every image must appear once")
            seen.add(path)
        self.ids: list[ImageId] = paths
        self.identity: dict = {"kind": "files"}  # the ids (paths) themselves are fingerprinted

    def size(self, image_id: ImageId) -> tuple[int, int]:
        with PIL.Image.open(image_id) as image:
            return image.size

    def load(self, image_id: ImageId) -> PIL.Image.Image:
        with PIL.Image.open(image_id) as image:
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
        self.ids = list(range(len(dataset)))
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


def _dataset_source(dataset: Any, spec: str, split: Optional[str], image_column: Optional[str], identity: dict):
    dataset = _pick_split(dataset, split, spec)
    return DatasetSource(
        dataset, _image_column(dataset, image_column, spec), {"input": spec, "split": split, **identity}
    )


def _unique_files(paths: list[str]) -> list[str]:
    """Sorted, one path per real file (a glob through a symlinked folder, or a link loop, finds files twice)."""
    seen, out = set(), []
    for path in sorted(paths):
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            out.append(path)
    return out


def resolve_input(
    spec: str, split: Optional[str] = None, image_column: Optional[str] = None, dataset_config: Optional[str] = None
):
    """`--input` -> a FileSource or DatasetSource. Tried in order: a saved `datasets` folder, a folder of images, a
    file (a .txt / .lst list of paths, one per line, relative to the working directory; anything else is one
    image), a glob, and last a Hub dataset id."""
    path = Path(spec)
    is_files = not _is_saved_dataset(path) and (path.exists() or glob.has_magic(spec))
    if split is not None and is_files:
        raise UsageError(f"--split {split!r} applies to datasets input only; --input {spec!r} is files")
    if _is_saved_dataset(path):
        import datasets

        return _dataset_source(datasets.load_from_disk(str(path)), spec, split, image_column, {})
    if path.is_dir():
        found = [p for p in path.rglob("*") if p.is_file()]
        files = sorted(str(p) for p in found if p.suffix.lower() in IMAGE_EXTENSIONS)
        if len(files) < len(found):
            logger.info("--input folder: %d files without an image extension ignored", len(found) - len(files))
        if not files:
            raise UsageError(f"--input folder {spec!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
        return FileSource(files)
    if path.is_file():
        if path.suffix.lower() not in LIST_EXTENSIONS:
            return FileSource([spec])
        try:
            lines = [line.strip() for line in path.read_text().splitlines()]
        except UnicodeDecodeError as exc:
            raise UsageError(
                f"--input {spec!r}: a {path.suffix} file is read as a list of paths, and is not text"
            ) from exc
        files = [line for line in lines if line and not line.startswith("#")]
        if not files:
            raise UsageError(f"--input list {spec!r} names no files")
        return FileSource(files)
    if glob.has_magic(spec):
        files = _unique_files([p for p in glob.glob(spec, recursive=True) if os.path.isfile(p)])
        if not files:
            raise UsageError(f"--input glob {spec!r} matches no files")
        return FileSource(files)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:  # a path, not an "owner/name" Hub id
        raise UsageError(f"--input {spec!r}: no such file, folder or glob")
    try:  # a Hub dataset id (or any name `datasets.load_dataset` accepts)
        import datasets

        dataset = datasets.load_dataset(spec, name=dataset_config, split=split)
    except Exception as exc:
        raise UsageError(f"--input {spec!r} is no file, folder or glob, and no loadable dataset: {exc}") from exc
    return _dataset_source(dataset, spec, split, image_column, {"config": dataset_config})


# --------------------------------------------------------------------------------------------------------------
# Decoding + preprocessing (runs in DataLoader workers)
# --------------------------------------------------------------------------------------------------------------
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


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()


class BatchLoader(torch.utils.data.Dataset):
    """Item b = forward b of a shard: its images decoded and preprocessed one at a time (only the small patch
    tensors are kept, never all full-size decodes at once), then joined into one pack. Images that cannot be used
    are reported back as (id, error) and left out of the pack."""

    def __init__(self, source: Any, processor: Any, batches: list[list[ImageId]]):
        self.source, self.processor, self.batches = source, processor, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, b: int) -> dict:
        packs, ids, errors = [], [], []
        for image_id in self.batches[b]:
            try:
                packs.append(self.processor(images=self.source.load(image_id)))
                ids.append(image_id)
            except Exception as exc:
                if not is_bad_image_error(exc):
                    raise
                errors.append((image_id, _error_text(exc)))
        pack = dict(self.processor.concatenate_packs(packs)) if packs else None
        return {"pack": pack, "ids": ids, "errors": errors}


def _identity(item):
    return item


# --------------------------------------------------------------------------------------------------------------
# Output: shards and the manifest
# --------------------------------------------------------------------------------------------------------------
def shard_name(k: int, num_shards: int) -> str:
    return f"shard-{k:05d}-of-{num_shards:05d}.safetensors"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _atomic_replace(tmp: Path, path: Path) -> None:
    """Make `tmp` durable, then rename it over `path` (atomic on POSIX), then make the rename durable."""
    os.chmod(tmp, 0o666 & ~_UMASK)  # safetensors creates files 0600; give them the usual permissions
    _fsync(tmp)
    os.replace(tmp, path)
    if os.name == "posix":
        _fsync(path.parent)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        _atomic_replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def finished_shard(output: Path, plan: "Plan", k: int) -> Optional[dict]:
    """Shard k's manifest entry if its file is on disk, readable and of this run (fingerprint); else None."""
    from safetensors import safe_open

    path = output / shard_name(k, plan.num_shards)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        if metadata.get("fingerprint") != plan.fingerprint:
            return None
        return {"file": path.name, "ids": json.loads(metadata["ids"]), "skipped": json.loads(metadata["skipped"])}
    except Exception:  # a damaged file (e.g. after a power loss) is not finished: the shard is encoded again
        return None


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a shard atomically: a temporary file in the same folder, synced, renamed over the final name once
    complete. An interrupted write (Ctrl-C, a crash) leaves no file under the final name and removes its temporary."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        _atomic_replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def lock_output(output: Path):
    """Rank 0 holds an exclusive lock on `--output` for the whole run: a second run into the same folder is refused
    instead of deleting the first one's temporary files. Released when the process exits."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock
        return None
    handle = open(output / ".lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        handle.close()
        raise UsageError(f"--output {str(output)!r} is in use by another extract_features.py run") from exc
    return handle


@dataclass
class Plan:
    """What a run (and every rerun into the same folder) encodes: fixed by the first run, kept in the manifest."""

    fingerprint: str
    num_inputs: int
    shard_size: int
    num_shards: int


def _fingerprint(ids: list, settings: dict) -> str:
    digest = hashlib.sha256(json.dumps({"ids": ids, "settings": settings}, sort_keys=True).encode())
    return digest.hexdigest()[:32]


class ManifestWriter:
    """Rank 0's manifest.json, rebuilt from the shard files on disk (the ground truth: a shard file exists only once
    complete), so it lists other ranks' shards too. A finished shard's metadata is read once and cached; during a
    run the file is rewritten at most every `interval` seconds (and always at the end and on Ctrl-C)."""

    def __init__(self, output: Path, plan: "Plan", header: dict, interval: float = 30.0):
        self.output, self.plan, self.header, self.interval = output, plan, header, interval
        self.finished: dict[int, dict] = {}
        self.last_write = -math.inf

    def _shard(self, k: int) -> Optional[dict]:
        if k not in self.finished:
            entry = finished_shard(self.output, self.plan, k)
            if entry is None:
                return None
            self.finished[k] = entry  # finished shards never change
        return self.finished[k]

    def build(self, complete: bool = False, summary: Optional[dict] = None) -> dict:
        shards = [shard for k in range(self.plan.num_shards) if (shard := self._shard(k)) is not None]
        skipped = [entry for shard in shards for entry in shard["skipped"]]
        manifest = {
            "format": FORMAT,
            "complete": complete and len(shards) == self.plan.num_shards,
            **self.header,
            "fingerprint": self.plan.fingerprint,
            "num_inputs": self.plan.num_inputs,
            "shard_size": self.plan.shard_size,
            "num_shards": self.plan.num_shards,
            "num_encoded": sum(len(shard["ids"]) for shard in shards),
            "num_skipped": len(skipped),
            "shards": shards,
            "skipped": skipped,
        }
        if summary is not None:
            manifest["last_run"] = summary
        return manifest

    def write(self, complete: bool = False, summary: Optional[dict] = None) -> dict:
        manifest = self.build(complete, summary)
        _atomic_write_text(self.output / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        self.last_write = time.monotonic()
        return manifest

    def maybe_write(self) -> None:
        if time.monotonic() - self.last_write >= self.interval:
            self.write()


def make_plan(
    output: Path, ids: list, settings: dict, shard_size: Optional[int], world_size: int, overwrite: bool
) -> Plan:
    """Rank 0: the run's plan -- read from an existing manifest (resume) or made new. Raises UsageError when the
    folder holds a different run's results."""
    fingerprint = _fingerprint(ids, settings)
    manifest_path = output / MANIFEST
    if manifest_path.exists():
        try:
            old = json.loads(manifest_path.read_text())
            if old.get("format") != FORMAT:
                raise ValueError(f"format {old.get('format')!r}")
        except Exception as exc:
            raise UsageError(
                f"--output {str(output)!r} holds a manifest.json this script did not write ({exc})"
            ) from exc
        if old["fingerprint"] == fingerprint and not overwrite:
            if shard_size is not None and shard_size != old["shard_size"]:
                logger.warning("resuming with the first run's --shard-size %d (not %d)", old["shard_size"], shard_size)
            return Plan(fingerprint, old["num_inputs"], old["shard_size"], old["num_shards"])
        if not overwrite:
            raise UsageError(
                f"--output {str(output)!r} holds features of a different run (other inputs, model or settings); "
                "use a new --output folder, or --overwrite to replace them"
            )
        for k in range(old.get("num_shards", 0)):
            (output / shard_name(k, old["num_shards"])).unlink(missing_ok=True)
        manifest_path.unlink()
    else:
        leftovers = sorted(p.name for p in output.glob("shard-*-of-*.safetensors"))
        if leftovers and not overwrite:
            raise UsageError(
                f"--output {str(output)!r} holds shard files but no manifest.json ({leftovers[0]}, ...); "
                "use a new --output folder, or --overwrite to replace them"
            )
        for name in leftovers:
            (output / name).unlink()
    for stale in output.glob(".shard-*.safetensors.tmp-*"):  # left by a process killed with SIGKILL
        stale.unlink(missing_ok=True)
    if shard_size is None:  # balanced over the ranks, at most DEFAULT_SHARD_SIZE images per shard
        shard_size = max(1, min(DEFAULT_SHARD_SIZE, math.ceil(len(ids) / world_size)))
    return Plan(fingerprint, len(ids), shard_size, math.ceil(len(ids) / shard_size))


# --------------------------------------------------------------------------------------------------------------
# Distributed helpers (torchrun / accelerate launch set RANK, WORLD_SIZE, LOCAL_RANK)
# --------------------------------------------------------------------------------------------------------------
def init_distributed(device_arg: Optional[str], timeout_minutes: float) -> tuple[int, int, torch.device]:
    """(rank, world_size, device) from torchrun's environment; joins the process group when world_size > 1.

    Ranks wait for each other at the start (the model is loaded and the inputs are listed on rank 0 first) and at
    the end (ranks finish their shards at different times): the collectives' timeout is `--dist-timeout-minutes`,
    not torch's default (10 minutes for nccl), so waiting is not mistaken for a hang."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg is not None:
        device = torch.device(device_arg)
        if device.type == "cuda" and device.index is None:  # "--device cuda": one GPU per process
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    elif torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=timeout_minutes)
        )
    return rank, world_size, device


def _broadcast(obj: Any, world_size: int) -> Any:
    if world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(obj: Any, world_size: int) -> list:
    if world_size == 1:
        return [obj]
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def _barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


def _rank0_first(fn: Callable[[], Any], rank: int, world_size: int) -> Any:
    """Run `fn` on rank 0, then on the other ranks; a UsageError on rank 0 is raised on every rank."""
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except UsageError as exc:
            error = str(exc)
    error = _broadcast(error, world_size)
    if error is not None:
        raise UsageError(error)
    return fn() if rank != 0 else result


# --------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------
@dataclass
class RankStats:
    """What one rank did in this run."""

    images: int = 0
    skipped: int = 0
    patches: int = 0
    forwards: int = 0
    largest_forward: int = 0
    shards_written: int = 0
    shards_resumed: int = 0
    seconds: float = 0.0
    skipped_ids: list = field(default_factory=list)


_VOLATILE_KEYS = ("transformers_version", "torch_dtype", "dtype", "architectures", "auto_map")


def _settings_dict(d: dict) -> dict:
    """A config / processor dict without bookkeeping keys that do not change the features."""
    return {k: v for k, v in d.items() if not k.startswith("_") and k not in _VOLATILE_KEYS}


def weights_checksum(model: torch.nn.Module) -> str:
    """A checksum of the weights: per tensor, the float64 sums of |w| and w^2 to 10 significant digits (no sign
    cancellation, so reduction order on any device cannot move them). Same checkpoint -> same value; retrained
    or other weights -> another value."""
    parts = []
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            if torch.is_floating_point(tensor):
                x = tensor.detach().double()
                parts.append(f"{name}:{x.abs().sum().item():.9e}:{x.square().sum().item():.9e}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def _local_classes():
    """The model and processor classes of the files next to this script (no code is fetched or run from --model),
    or None when the script was copied away from them."""
    here = Path(__file__).resolve().parent
    if not all((here / name).is_file() for name in (*REMOTE_CODE_FILES, "convert_checkpoint.py")):
        return None
    if str(here) not in sys.path:
        sys.path.insert(0, str(here))
    from convert_checkpoint import repo_code_module  # the one loader of the repo's code as a package

    modeling = repo_code_module("modeling_siglip_navit")
    processing = repo_code_module("image_processing_siglip_navit")
    return modeling.SiglipVisionModel, processing.SiglipNaViTImageProcessor


def load_model_and_processor(args: argparse.Namespace, device: torch.device):
    """The model and its image processor. Default: this repo's code (next to the script) with --model's config and
    weights; --trust-remote-code: the code in --model's own repo, through the Auto classes."""
    import transformers

    dtype_kwarg = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    hub = {"revision": args.revision} if args.revision else {}
    try:
        if args.trust_remote_code:
            from transformers import AutoImageProcessor, AutoModel

            model = AutoModel.from_pretrained(
                args.model, trust_remote_code=True, attn_implementation=args.attn_implementation,
                **{dtype_kwarg: DTYPES[args.dtype]}, **hub,
            )  # fmt: skip
            processor = AutoImageProcessor.from_pretrained(args.model, trust_remote_code=True, **hub)
        else:
            classes = _local_classes()
            if classes is None:
                raise UsageError(
                    f"the model code ({', '.join(REMOTE_CODE_FILES)}) is not next to extract_features.py; run it from "
                    "the repo, or pass --trust-remote-code to run the code of --model's repo"
                )
            model = classes[0].from_pretrained(
                args.model, attn_implementation=args.attn_implementation, **{dtype_kwarg: DTYPES[args.dtype]}, **hub
            )
            processor = classes[1].from_pretrained(args.model, **hub)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--model {args.model!r} could not be loaded: {exc}") from exc
    missing = [
        name for name in ("patch_grid", "max_patches_per_image", "concatenate_packs") if not hasattr(processor, name)
    ]
    if missing:
        raise UsageError(
            f"--model {args.model!r}: its image processor ({type(processor).__name__}) lacks {missing}; with "
            "--trust-remote-code the repo's code must be this version's (or run without --trust-remote-code)"
        )
    return model.to(device).eval(), processor


class ShardJob:
    """One shard, planned and started: each image's patch count read from its header (no decoding), the images
    grouped first-fit-decreasing into forwards, and a DataLoader iterator whose workers already decode them.

    Creating the next shard's job while the current shard's last forward runs (asynchronously, on a GPU) keeps
    the model fed across shard boundaries."""

    def __init__(
        self, k: int, shard_ids: list, source: Any, processor: Any, args: argparse.Namespace, device, progress
    ):
        self.k, self.shard_ids, self.progress = k, shard_ids, progress
        self.skipped: list[dict] = []
        budget = args.max_patches_per_batch
        sized_ids, lengths = [], []
        for image_id in shard_ids:
            try:
                grid_h, grid_w = processor.patch_grid(*source.size(image_id))
            except Exception as exc:
                if not is_bad_image_error(exc):
                    raise
                self.skip(image_id, _error_text(exc))
                continue
            if grid_h * grid_w > budget:  # only possible with do_resize=False (run() checks the budget otherwise)
                self.skip(image_id, f"{grid_h}x{grid_w} = {grid_h * grid_w} patches, more than --max-patches-per-batch")
                continue
            sized_ids.append(image_id)
            lengths.append(grid_h * grid_w)
        self.batches = [[sized_ids[i] for i in batch] for batch in plan_batches(lengths, budget)]
        loader = torch.utils.data.DataLoader(
            BatchLoader(source, processor, self.batches),
            batch_size=None,
            num_workers=args.num_workers,
            collate_fn=_identity,
            pin_memory=device.type == "cuda",
        )
        self.items = iter(loader)  # with workers: they start decoding now

    def skip(self, image_id: ImageId, error: str) -> None:
        logger.warning("skipping image %r: %s", image_id, error)
        self.skipped.append({"id": image_id, "error": error})
        self.progress.update(1)


def encode_shard(
    job: ShardJob,
    model: Any,
    args: argparse.Namespace,
    device: torch.device,
    stats: RankStats,
    on_last_forward: Callable[[], None] = lambda: None,
) -> tuple[dict[str, torch.Tensor], list, list]:
    """Encode one shard's forwards; call `on_last_forward` once the last forward is queued (before waiting for
    it). Returns (tensors, ids, skipped), in the shard's input order."""
    results: dict[ImageId, tuple[torch.Tensor, tuple[int, int], Optional[torch.Tensor]]] = {}
    if not job.batches:
        on_last_forward()
    with torch.inference_mode():
        for index, item in enumerate(job.items):
            for image_id, error in item["errors"]:
                job.skip(image_id, error)
            if item["pack"] is None:
                if index == len(job.batches) - 1:
                    on_last_forward()
                continue
            pack = {
                k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                for k, v in item["pack"].items()
            }
            grids = item["pack"]["image_grid_hw"].tolist()
            sizes = [h * w for h, w in grids]
            hidden = model(**pack).last_hidden_state
            per_image = hidden.split(sizes)
            pooled = torch.stack([features.float().mean(0) for features in per_image])  # deterministic, unlike atomics
            if index == len(job.batches) - 1:
                on_last_forward()  # on a GPU the forward is still running: plan and start the next shard meanwhile
            pooled = pooled.cpu()
            for j, image_id in enumerate(item["ids"]):
                h, w = grids[j]
                fmap = per_image[j].reshape(h, w, -1).cpu() if args.save_grids else None
                results[image_id] = (pooled[j], (h, w), fmap)
            stats.forwards += 1
            stats.patches += sum(sizes)
            stats.largest_forward = max(stats.largest_forward, sum(sizes))
            job.progress.update(len(item["ids"]))

    # Back to input order.
    ids = [image_id for image_id in job.shard_ids if image_id in results]
    tensors = {
        "pooled": torch.stack([results[i][0] for i in ids]) if ids else torch.zeros(0, model.config.hidden_size),
        "grid_hw": torch.tensor([results[i][1] for i in ids], dtype=torch.int64).reshape(-1, 2),
    }
    if args.save_grids:
        for j, image_id in enumerate(ids):
            tensors[f"features.{j}"] = results[image_id][2].contiguous()
    stats.images += len(ids)
    stats.skipped += len(job.skipped)
    order = {image_id: n for n, image_id in enumerate(job.shard_ids)}
    return tensors, ids, sorted(job.skipped, key=lambda entry: order[entry["id"]])


def _ids_digest(source: Any) -> str:
    return hashlib.sha256(
        json.dumps({"ids": source.ids, "identity": source.identity}, sort_keys=True).encode()
    ).hexdigest()


def run(args: argparse.Namespace) -> dict:
    """Run the extraction in this process (one rank of a torchrun world, or alone). Returns the summary."""
    rank, world_size, device = init_distributed(args.device, args.dist_timeout_minutes)
    output = Path(args.output)
    if args.max_patches_per_batch <= 0:
        raise UsageError(
            f"--max-patches-per-batch must be a positive number of patches, got {args.max_patches_per_batch}"
        )
    if args.shard_size is not None and args.shard_size <= 0:
        raise UsageError(f"--shard-size must be a positive number of images, got {args.shard_size}")
    if args.num_workers < 0:
        raise UsageError(f"--num-workers must be 0 or more, got {args.num_workers}")
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {args.output!r} exists and is not a folder")

    # rank 0 first: listing / downloading a dataset and loading the model (transformers caches remote code on first
    # load) happen once; the other ranks then read the caches
    source = _rank0_first(
        lambda: resolve_input(args.input, args.split, args.image_column, args.dataset_config), rank, world_size
    )
    digests = _gather(_ids_digest(source), world_size)
    if len(set(digests)) > 1:  # shard k must mean the same images on every rank
        raise UsageError(
            f"the ranks see different inputs for --input {args.input!r} (files changing while listed, or different "
            "mounts on different nodes?); every rank must see the same list"
        )
    model, processor = _rank0_first(lambda: load_model_and_processor(args, device), rank, world_size)
    largest = processor.max_patches_per_image()
    if largest is not None and args.max_patches_per_batch < largest:
        raise UsageError(
            f"--max-patches-per-batch {args.max_patches_per_batch} is smaller than the largest image this processor "
            f"makes ({largest} patches, max_image_size {processor.max_image_size}); use at least {largest}"
        )

    # what the saved numbers depend on: a rerun into the same folder must match it (the run's fingerprint)
    settings = {
        "inputs": source.identity,
        "weights": weights_checksum(model),
        "config": _settings_dict(model.config.to_dict()),
        "processor": _settings_dict(processor.to_dict()),
        "dtype": args.dtype,
        "save_grids": args.save_grids,
    }
    header = {
        "model": args.model,
        "input": args.input,
        "input_kind": source.kind,
        "dtype": args.dtype,
        "save_grids": args.save_grids,
        "hidden_size": model.config.hidden_size,
        "tensors": {
            "pooled": "(n, C) float32 mean over patches",
            "grid_hw": "(n, 2) int64 (h, w) patch grid",
            **({"features.{j}": f"(h_j, w_j, C) {args.dtype}"} if args.save_grids else {}),
        },  # fmt: skip
    }

    lock = None

    def first_manifest() -> Plan:
        nonlocal lock
        output.mkdir(parents=True, exist_ok=True)
        lock = lock_output(output)
        return make_plan(output, source.ids, settings, args.shard_size, world_size, args.overwrite)

    plan: Plan = _broadcast(_rank0_first(lambda: first_manifest() if rank == 0 else None, rank, world_size), world_size)
    manifest = ManifestWriter(output, plan, header) if rank == 0 else None
    if manifest is not None:
        manifest.write()

    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    stats = RankStats()
    todo = []
    for k in range(rank, plan.num_shards, world_size):  # this rank's slice: shards k with k % world_size == rank
        if finished_shard(output, plan, k) is not None:
            stats.shards_resumed += 1
        else:
            todo.append(k)
    total = sum(len(source.ids[k * plan.shard_size : (k + 1) * plan.shard_size]) for k in todo)
    progress = tqdm(
        total=total, desc=f"rank {rank}", unit="img", position=int(os.environ.get("LOCAL_RANK", "0")),
        disable=args.no_progress or None, dynamic_ncols=True,
    )  # fmt: skip
    start = time.perf_counter()
    try:
        with logging_redirect_tqdm(loggers=[logger]):
            jobs: dict[int, ShardJob] = {}  # at most two: the shard being encoded, the next one (started early)

            def start_job(position: int) -> None:
                if position < len(todo) and position not in jobs:
                    k = todo[position]
                    shard_ids = source.ids[k * plan.shard_size : (k + 1) * plan.shard_size]
                    jobs[position] = ShardJob(k, shard_ids, source, processor, args, device, progress)

            for position, k in enumerate(todo):
                start_job(position)
                job = jobs.pop(position)
                tensors, ids, skipped = encode_shard(
                    job, model, args, device, stats, on_last_forward=lambda: start_job(position + 1)
                )
                metadata = {
                    "format": FORMAT,
                    "fingerprint": plan.fingerprint,
                    "ids": json.dumps(ids),
                    "skipped": json.dumps(skipped),
                }
                write_shard(output / shard_name(k, plan.num_shards), tensors, metadata)
                stats.shards_written += 1
                stats.skipped_ids.extend(entry["id"] for entry in skipped)
                if manifest is not None:  # keep the manifest current (it lists every shard on disk, other ranks' too)
                    manifest.maybe_write()
    except KeyboardInterrupt:
        progress.close()
        if manifest is not None:
            manifest.write()
        raise
    stats.seconds = time.perf_counter() - start
    progress.close()

    all_stats = _gather(asdict(stats), world_size)  # also waits for every rank to finish its shards
    summary = summarize(all_stats, args.max_patches_per_batch, world_size)
    if manifest is not None:
        final = manifest.write(complete=True, summary=summary)
        summary["complete"] = final["complete"]
        summary["num_encoded_total"] = final["num_encoded"]
        print(format_summary(summary, output), flush=True)
    if lock is not None:
        lock.close()
    # No rank leaves before rank 0 has written the final manifest, and none tears the process group down while a
    # peer still has a collective in flight (gloo can abort the process when a peer disappears mid-operation).
    _barrier(world_size)
    return summary


def summarize(all_stats: list[dict], budget: int, world_size: int) -> dict:
    images = sum(s["images"] for s in all_stats)
    forwards = sum(s["forwards"] for s in all_stats)
    patches = sum(s["patches"] for s in all_stats)
    seconds = max(s["seconds"] for s in all_stats)
    return {
        "world_size": world_size,
        "images": images,
        "skipped": sum(s["skipped"] for s in all_stats),
        "skipped_ids": [i for s in all_stats for i in s["skipped_ids"]],
        "forwards": forwards,
        "patches": patches,
        "max_patches_per_batch": budget,
        "largest_forward": max(s["largest_forward"] for s in all_stats),
        "packing_efficiency": patches / (forwards * budget) if forwards else None,
        "shards_written": sum(s["shards_written"] for s in all_stats),
        "shards_resumed": sum(s["shards_resumed"] for s in all_stats),
        "seconds": seconds,
        "images_per_second": images / seconds if seconds > 0 and images else None,
    }


def format_summary(s: dict, output: Path) -> str:
    lines = [
        f"encoded {s['images']} images, skipped {s['skipped']} unreadable, on {s['world_size']} process(es): "
        f"{s['shards_written']} shard(s) written, {s['shards_resumed']} already done",
    ]
    if s["forwards"]:
        lines.append(
            f"packing efficiency {100 * s['packing_efficiency']:.1f}% ({s['patches']} patches in {s['forwards']} "
            f"forwards of <= {s['max_patches_per_batch']}); {s['images_per_second']:.2f} images/s, "
            f"{s['patches'] / s['seconds']:.0f} patches/s"
        )
    lines.append(f"manifest: {output / MANIFEST}" + ("" if s.get("complete") else " (INCOMPLETE: rerun to finish)"))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Encode images with SigLIP-NaViT into safetensors shards (token-budget packing, data parallel).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model", required=True, help="model folder or Hub repo (SiglipVisionModel + its image processor)"
    )
    parser.add_argument(
        "--input", required=True, help="image folder, glob (quote it), .txt list of paths, `datasets` folder or Hub id"
    )
    parser.add_argument("--output", required=True, help="output folder (manifest.json + shards)")
    parser.add_argument("--max-patches-per-batch", type=int, default=16384, help="token budget of one forward")
    parser.add_argument("--save-grids", action="store_true", help="also save each image's (h, w, C) feature map")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="model dtype")
    parser.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when CUDA is available, else cpu")
    parser.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "flash_attention_2", "eager"])
    parser.add_argument(
        "--shard-size",
        type=int,
        default=None,
        help=f"images per shard (default: inputs/ranks, max {DEFAULT_SHARD_SIZE})",
    )
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader workers decoding images, per process")
    parser.add_argument("--split", default=None, help="dataset split (datasets input)")
    parser.add_argument("--dataset-config", default=None, help="dataset configuration name (Hub dataset input)")
    parser.add_argument("--image-column", default=None, help="dataset image column (default: the first image column)")
    parser.add_argument("--revision", default=None, help="model revision (branch, tag or commit) on the Hub")
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="run the code of --model's repo (default: ours)"
    )
    parser.add_argument("--dist-timeout-minutes", type=float, default=360.0,
                        help="how long ranks wait for each other (start, end) under torchrun")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace a different run's results in --output")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _terminate(signum, frame):
    """SIGTERM (what torchrun sends its workers on Ctrl-C) unwinds like Ctrl-C, so no temporary file is left."""
    raise KeyboardInterrupt


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if __name__ == "__main__":
        signal.signal(signal.SIGTERM, _terminate)
    logging.basicConfig(level=logging.INFO, format=f"[rank {os.environ.get('RANK', '0')}] %(levelname)s %(message)s")
    try:
        run(args)
    except UsageError as exc:
        print(f"extract_features.py: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("extract_features.py: interrupted; finished shards are kept, rerun to resume", file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
