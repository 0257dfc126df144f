#!/usr/bin/env python
# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""Encode an image collection with SigLIP-NaViT: token-budget packed forwards, data parallel, resumable shards.

    python extract_features.py --model MODEL_DIR_OR_REPO --input "photos/**/*.jpg" --output feats/
    torchrun --nproc-per-node 8 extract_features.py --model ... --input ... --output ...

Input: a folder (searched recursively for image files), a glob, a text file of paths (one per line), a saved
Hugging Face `datasets` dataset (a `save_to_disk` folder) or a Hub dataset id. Output: `DIR/manifest.json` and
safetensors shards holding, in the manifest's `ids` order, `pooled` (n, C) float32 (the mean over each image's
patches), `grid_hw` (n, 2) int64 and, with `--save-grids`, `features.{j}` (h_j, w_j, C) per image j.

How it works:
- The inputs are cut into shards of `--shard-size` images; rank r of a world of W processes takes the shards
  k with k % W == r (disjoint slices; together every input exactly once).
- Within a shard, each image's patch grid is computed from its header alone, then the images are grouped
  first-fit-decreasing into forwards of at most `--max-patches-per-batch` patches: the NaViT point -- no padding,
  little budget wasted. Images are decoded and preprocessed by DataLoader workers while the model runs.
- Shards are written atomically (temporary file + rename); a rerun skips the shards already on disk.
  Unreadable images are logged with their id and skipped (listed in the manifest), never crashing the run.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
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
# Inputs: ids -> lazily opened PIL images
# --------------------------------------------------------------------------------------------------------------
class FileSource:
    """Image files; an image's id is its path as found."""

    kind = "files"

    def __init__(self, paths: list[str]):
        seen: set = set()
        for path in paths:
            if path in seen:
                raise UsageError(f"--input lists {path!r} twice; every image must appear once")
            seen.add(path)
        self.ids: list[ImageId] = paths

    def open(self, image_id: ImageId) -> PIL.Image.Image:
        return PIL.Image.open(image_id)


class DatasetSource:
    """A `datasets.Dataset`'s image column; an image's id is its row index. Rows are read undecoded (bytes / path)
    so that a corrupt image is one skipped row, not a crashed run."""

    kind = "dataset"

    def __init__(self, dataset: Any, column: str):
        import datasets

        self.dataset = dataset.cast_column(column, datasets.Image(decode=False))
        self.column = column
        self.ids = list(range(len(dataset)))

    def open(self, image_id: ImageId) -> PIL.Image.Image:
        value = self.dataset[int(image_id)][self.column]
        if value is None:
            raise ValueError("the row has no image")
        if value.get("bytes") is not None:
            return PIL.Image.open(io.BytesIO(value["bytes"]))
        if value.get("path"):
            return PIL.Image.open(value["path"])
        raise ValueError("the row's image has neither bytes nor a path")


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json"))


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
        raise UsageError(f"dataset {spec!r} has no image column (columns: {list(features)}); name one with --image-column")
    return image_columns[0]


def resolve_input(spec: str, split: Optional[str] = None, image_column: Optional[str] = None):
    """`--input` -> a FileSource or DatasetSource (see the module docstring for what is accepted)."""
    path = Path(spec)
    if _is_saved_dataset(path):
        import datasets

        dataset = _pick_split(datasets.load_from_disk(str(path)), split, spec)
        return DatasetSource(dataset, _image_column(dataset, image_column, spec))
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise UsageError(f"--input folder {spec!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
        return FileSource(files)
    if glob.has_magic(spec):
        files = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        if not files:
            raise UsageError(f"--input glob {spec!r} matches no files")
        return FileSource(files)
    if path.is_file():
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            return FileSource([spec])
        lines = [line.strip() for line in path.read_text().splitlines()]
        files = [line for line in lines if line and not line.startswith("#")]
        if not files:
            raise UsageError(f"--input list {spec!r} names no files")
        return FileSource(files)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:  # a path, not an "owner/name" Hub id
        raise UsageError(f"--input {spec!r}: no such file, folder or glob")
    try:  # a Hub dataset id (or any name `datasets.load_dataset` accepts)
        import datasets

        dataset = datasets.load_dataset(spec, split=split)
    except Exception as exc:
        raise UsageError(f"--input {spec!r} is no file, folder or glob, and no loadable dataset: {exc}") from exc
    dataset = _pick_split(dataset, split, spec)
    return DatasetSource(dataset, _image_column(dataset, image_column, spec))


# --------------------------------------------------------------------------------------------------------------
# Decoding + preprocessing (runs in DataLoader workers)
# --------------------------------------------------------------------------------------------------------------
# Errors that are bugs, not bad images: never swallowed as "skip this image".
_BUG_ERRORS = (NameError, AttributeError, ImportError, TypeError, AssertionError, NotImplementedError)


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()


class BatchLoader(torch.utils.data.Dataset):
    """Item b = forward b of a shard: its images decoded and packed by the image processor. Images that fail to
    decode or preprocess are reported back (id, error) and left out of the pack."""

    def __init__(self, source: Any, processor: Any, batches: list[list[ImageId]]):
        self.source, self.processor, self.batches = source, processor, batches

    def __len__(self) -> int:
        return len(self.batches)

    def _decode(self, image_id: ImageId) -> PIL.Image.Image:
        with self.source.open(image_id) as image:
            image.load()
            return image.copy()

    def __getitem__(self, b: int) -> dict:
        images, ids, errors = [], [], []
        for image_id in self.batches[b]:
            try:
                images.append(self._decode(image_id))
                ids.append(image_id)
            except Exception as exc:
                if isinstance(exc, _BUG_ERRORS):
                    raise
                errors.append((image_id, _error_text(exc)))
        try:
            pack = dict(self.processor(images=images, return_tensors="pt")) if images else None
        except Exception:  # rare (e.g. an image mode the processor rejects): find the culprits one by one
            keep = []
            for image_id, image in zip(ids, images):
                try:
                    self.processor(images=image)
                    keep.append((image_id, image))
                except Exception as exc:
                    if isinstance(exc, _BUG_ERRORS):
                        raise
                    errors.append((image_id, _error_text(exc)))
            ids, images = [k[0] for k in keep], [k[1] for k in keep]
            pack = dict(self.processor(images=images, return_tensors="pt")) if images else None
        return {"pack": pack, "ids": ids, "errors": errors}


def _identity(item):
    return item


# --------------------------------------------------------------------------------------------------------------
# Output: shards and the manifest
# --------------------------------------------------------------------------------------------------------------
def shard_name(k: int, num_shards: int) -> str:
    return f"shard-{k:05d}-of-{num_shards:05d}.safetensors"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_shard_metadata(path: Path) -> Optional[dict]:
    """The metadata of a finished shard, or None if the file is missing or unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return {
            "fingerprint": metadata.get("fingerprint"),
            "ids": json.loads(metadata["ids"]),
            "skipped": json.loads(metadata["skipped"]),
        }
    except Exception:
        return None


_UMASK = os.umask(0o022)
os.umask(_UMASK)


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a shard atomically: a temporary file in the same folder, renamed over the final name once complete.
    An interrupted write (Ctrl-C, a crash) leaves no file under the final name and removes its temporary."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o666 & ~_UMASK)  # safetensors creates files 0600; give them the usual permissions
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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


def build_manifest(output: Path, plan: Plan, header: dict, complete: bool, summary: Optional[dict] = None) -> dict:
    """The manifest from the shard files on disk (the ground truth: a shard file exists only once complete)."""
    shards, skipped = [], []
    for k in range(plan.num_shards):
        meta = _read_shard_metadata(output / shard_name(k, plan.num_shards))
        if meta is None or meta["fingerprint"] != plan.fingerprint:
            continue
        shards.append({"file": shard_name(k, plan.num_shards), "ids": meta["ids"], "skipped": meta["skipped"]})
        skipped.extend(meta["skipped"])
    manifest = {
        "format": FORMAT,
        "complete": complete and len(shards) == plan.num_shards,
        **header,
        "fingerprint": plan.fingerprint,
        "num_inputs": plan.num_inputs,
        "shard_size": plan.shard_size,
        "num_shards": plan.num_shards,
        "num_encoded": sum(len(s["ids"]) for s in shards),
        "num_skipped": len(skipped),
        "shards": shards,
        "skipped": skipped,
    }
    if summary is not None:
        manifest["last_run"] = summary
    return manifest


def write_manifest(output: Path, plan: Plan, header: dict, complete: bool = False, summary: Optional[dict] = None):
    manifest = build_manifest(output, plan, header, complete, summary)
    _atomic_write_text(output / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


def make_plan(output: Path, ids: list, settings: dict, shard_size: Optional[int], world_size: int, overwrite: bool) -> Plan:
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
            raise UsageError(f"--output {str(output)!r} holds a manifest.json this script did not write ({exc})") from exc
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
def init_distributed(device_arg: Optional[str]) -> tuple[int, int, torch.device]:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg is not None:
        device = torch.device(device_arg)
    elif torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
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


def load_model_and_processor(model_name: str, dtype: torch.dtype, device: torch.device, attn: str):
    import transformers
    from transformers import AutoImageProcessor, AutoModel

    dtype_kwarg = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    try:
        model = AutoModel.from_pretrained(
            model_name, trust_remote_code=True, attn_implementation=attn, **{dtype_kwarg: dtype}
        )
        processor = AutoImageProcessor.from_pretrained(model_name, trust_remote_code=True)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--model {model_name!r} could not be loaded: {exc}") from exc
    if not hasattr(processor, "patch_grid"):
        raise UsageError(f"--model {model_name!r}: its image processor is not SiglipNaViTImageProcessor ({type(processor).__name__})")
    return model.to(device).eval(), processor


def max_patches_per_image(processor: Any) -> Optional[int]:
    """The most patches the processor can give one image (None when it does not resize)."""
    if not processor.do_resize:
        return None
    side = max(processor.patch_grid(processor.max_image_size, processor.max_image_size))
    return side * side


def encode_shard(
    model: Any,
    processor: Any,
    source: Any,
    shard_ids: list,
    budget: int,
    save_grids: bool,
    device: torch.device,
    num_workers: int,
    stats: RankStats,
    progress: Any,
) -> tuple[dict[str, torch.Tensor], list, list]:
    """Encode one shard's images in token-budget packed forwards. Returns (tensors, ids, skipped) in input order."""
    skipped: list[dict] = []

    def skip(image_id: ImageId, error: str) -> None:
        logger.warning("skipping image %r: %s", image_id, error)
        skipped.append({"id": image_id, "error": error})

    # 1. Each image's patch count from its header (no decoding), then first-fit-decreasing batches.
    sized_ids, lengths = [], []
    for image_id in shard_ids:
        try:
            with source.open(image_id) as image:
                grid_h, grid_w = processor.patch_grid(*image.size)
        except Exception as exc:
            if isinstance(exc, _BUG_ERRORS):
                raise
            skip(image_id, _error_text(exc))
            progress.update(1)
            continue
        if grid_h * grid_w > budget:
            skip(image_id, f"{grid_h}x{grid_w} = {grid_h * grid_w} patches, more than --max-patches-per-batch {budget}")
            progress.update(1)
            continue
        sized_ids.append(image_id)
        lengths.append(grid_h * grid_w)
    batches = [[sized_ids[i] for i in batch] for batch in plan_batches(lengths, budget)]

    # 2. Decode + preprocess in workers, forward packed, pool in float32.
    loader = torch.utils.data.DataLoader(
        BatchLoader(source, processor, batches),
        batch_size=None,
        num_workers=num_workers,
        collate_fn=_identity,
        pin_memory=device.type == "cuda",
    )
    results: dict[ImageId, tuple[torch.Tensor, tuple[int, int], Optional[torch.Tensor]]] = {}
    with torch.inference_mode():
        for item in loader:
            for image_id, error in item["errors"]:
                skip(image_id, error)
            progress.update(len(item["errors"]))
            if item["pack"] is None:
                continue
            pack = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in item["pack"].items()}
            grids = pack["image_grid_hw"].tolist()
            hidden = model(**pack).last_hidden_state
            lengths_b = [h * w for h, w in grids]
            segment = torch.repeat_interleave(torch.arange(len(grids), device=device), torch.tensor(lengths_b, device=device))
            sums = torch.zeros(len(grids), hidden.shape[-1], device=device, dtype=torch.float32)
            pooled = sums.index_add_(0, segment, hidden.float()) / torch.tensor(lengths_b, device=device)[:, None]
            pooled = pooled.cpu()
            maps = hidden.split(lengths_b) if save_grids else [None] * len(grids)
            for j, image_id in enumerate(item["ids"]):
                h, w = grids[j]
                fmap = maps[j].reshape(h, w, -1).cpu() if save_grids else None
                results[image_id] = (pooled[j], (h, w), fmap)
            n_patches = sum(lengths_b)
            stats.forwards += 1
            stats.patches += n_patches
            stats.largest_forward = max(stats.largest_forward, n_patches)
            progress.update(len(item["ids"]))

    # 3. Back to input order.
    ids = [image_id for image_id in shard_ids if image_id in results]
    hidden_size = model.config.hidden_size
    tensors = {
        "pooled": torch.stack([results[i][0] for i in ids]) if ids else torch.zeros(0, hidden_size),
        "grid_hw": torch.tensor([results[i][1] for i in ids], dtype=torch.int64).reshape(-1, 2),
    }
    if save_grids:
        for j, image_id in enumerate(ids):
            tensors[f"features.{j}"] = results[image_id][2].contiguous()
    stats.images += len(ids)
    stats.skipped += len(skipped)
    order = {image_id: n for n, image_id in enumerate(shard_ids)}
    skipped.sort(key=lambda s: order[s["id"]])
    return tensors, ids, skipped


def run(args: argparse.Namespace) -> dict:
    """Run the extraction in this process (one rank of a torchrun world, or alone). Returns the summary."""
    rank, world_size, device = init_distributed(args.device)
    output = Path(args.output)
    if args.max_patches_per_batch <= 0:
        raise UsageError(f"--max-patches-per-batch must be a positive number of patches, got {args.max_patches_per_batch}")
    if args.shard_size is not None and args.shard_size <= 0:
        raise UsageError(f"--shard-size must be a positive number of images, got {args.shard_size}")
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {args.output!r} exists and is not a folder")
    source = resolve_input(args.input, args.split, args.image_column)
    dtype = DTYPES[args.dtype]

    # rank 0 first: transformers writes the remote code into its module cache on first load
    model, processor = _rank0_first(
        lambda: load_model_and_processor(args.model, dtype, device, args.attn_implementation), rank, world_size
    )
    largest = max_patches_per_image(processor)
    if largest is not None and args.max_patches_per_batch < largest:
        raise UsageError(
            f"--max-patches-per-batch {args.max_patches_per_batch} is smaller than the largest image this processor "
            f"makes ({largest} patches, max_image_size {processor.max_image_size}); use at least {largest}"
        )

    # what the saved numbers depend on: a rerun into the same folder must match it (the run's fingerprint)
    settings = {
        "model": args.model,
        "config": _settings_dict(model.config.to_dict()),
        "processor": _settings_dict(processor.to_dict()),
        "dtype": args.dtype,
        "save_grids": args.save_grids,
        "input_kind": source.kind,
        "image_column": getattr(source, "column", None),
    }
    header = {
        "model": args.model,
        "input": args.input,
        "input_kind": source.kind,
        "dtype": args.dtype,
        "save_grids": args.save_grids,
        "hidden_size": model.config.hidden_size,
        "tensors": {"pooled": "(n, C) float32 mean over patches", "grid_hw": "(n, 2) int64 (h, w) patch grid",
                    **({"features.{j}": f"(h_j, w_j, C) {args.dtype}"} if args.save_grids else {})},  # fmt: skip
    }

    def first_manifest() -> Plan:
        output.mkdir(parents=True, exist_ok=True)
        plan = make_plan(output, source.ids, settings, args.shard_size, world_size, args.overwrite)
        write_manifest(output, plan, header)
        return plan

    plan: Plan = _broadcast(_rank0_first(lambda: first_manifest() if rank == 0 else None, rank, world_size), world_size)

    from tqdm.auto import tqdm

    my_shards = list(range(rank, plan.num_shards, world_size))
    stats = RankStats()
    todo = []
    for k in my_shards:
        meta = _read_shard_metadata(output / shard_name(k, plan.num_shards))
        if meta is not None and meta["fingerprint"] == plan.fingerprint:
            stats.shards_resumed += 1
        else:
            todo.append(k)
    total = sum(len(source.ids[k * plan.shard_size : (k + 1) * plan.shard_size]) for k in todo)
    progress = tqdm(total=total, desc=f"rank {rank}", unit="img", position=rank, disable=args.no_progress or None, dynamic_ncols=True)
    start = time.perf_counter()
    try:
        for k in todo:
            shard_ids = source.ids[k * plan.shard_size : (k + 1) * plan.shard_size]
            tensors, ids, skipped = encode_shard(
                model, processor, source, shard_ids, args.max_patches_per_batch, args.save_grids, device,
                args.num_workers, stats, progress,
            )  # fmt: skip
            metadata = {"format": FORMAT, "fingerprint": plan.fingerprint, "ids": json.dumps(ids), "skipped": json.dumps(skipped)}
            write_shard(output / shard_name(k, plan.num_shards), tensors, metadata)
            stats.shards_written += 1
            stats.skipped_ids.extend(s["id"] for s in skipped)
            if rank == 0:  # keep the manifest current (it lists every shard on disk, other ranks' too)
                write_manifest(output, plan, header)
    except KeyboardInterrupt:
        progress.close()
        if rank == 0:
            write_manifest(output, plan, header)
        raise
    stats.seconds = time.perf_counter() - start
    progress.close()

    all_stats = _gather(asdict(stats), world_size)
    _barrier(world_size)
    summary = summarize(all_stats, args.max_patches_per_batch, world_size)
    if rank == 0:
        manifest = write_manifest(output, plan, header, complete=True, summary=summary)
        summary["complete"] = manifest["complete"]
        summary["num_encoded_total"] = manifest["num_encoded"]
        print(format_summary(summary, output), flush=True)
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
    parser.add_argument("--model", required=True, help="model folder or Hub repo (SiglipVisionModel + its image processor)")
    parser.add_argument("--input", required=True,
                        help="image folder, glob (quote it), text file of paths, saved `datasets` folder or Hub dataset id")  # fmt: skip
    parser.add_argument("--output", required=True, help="output folder (manifest.json + shards)")
    parser.add_argument("--max-patches-per-batch", type=int, default=16384, help="token budget of one forward")
    parser.add_argument("--save-grids", action="store_true", help="also save each image's (h, w, C) feature map")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="model dtype")
    parser.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when CUDA is available, else cpu")
    parser.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "flash_attention_2", "eager"])
    parser.add_argument("--shard-size", type=int, default=None,
                        help=f"images per shard (default: inputs / processes, at most {DEFAULT_SHARD_SIZE})")  # fmt: skip
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader workers decoding images, per process")
    parser.add_argument("--split", default=None, help="dataset split (datasets input)")
    parser.add_argument("--image-column", default=None, help="dataset image column (default: the first image column)")
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
