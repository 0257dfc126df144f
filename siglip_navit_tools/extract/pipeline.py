# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""From image ids to features: model + processor loading, the DataLoader of packs, and the encode loop.

Owns how a shard's images become forwards (sizes from headers -> `plan_windows`, one look-ahead window at a time ->
packs built by DataLoader workers with `processor.concatenate_packs`, the budget checked again after decoding) and
how a forward's output becomes per-image results (`processor.unpack` and `processor.mean_pool`) handed to the
shard's writer as each forward finishes. Every image <-> pack fact comes from the image processor: this module must
not compute grids, patch counts or boundaries itself, nor write files (the writers do).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch

from .. import cpu, repo_code
from ..compat import dtype_kwarg
from .inputs import ImageId, Source, error_text, is_bad_image_error
from .model_folder import check_model
from .options import DTYPES, UsageError
from .packing import plan_batches, plan_windows

logger = logging.getLogger(__name__)

# What the extractor asks of an image processor (a --trust-remote-code repo may ship an older one).
PROCESSOR_METHODS = ("patch_grid", "max_patches_per_image", "concatenate_packs", "unpack", "mean_pool")


# --------------------------------------------------------------------------------------------------------------
# Model and processor
# --------------------------------------------------------------------------------------------------------------
def _repo_classes() -> tuple[Any, Any]:
    """This repo's model and processor classes (no code is fetched or run from --model)."""
    missing = [name for name in repo_code.REMOTE_CODE_FILES if not (repo_code.REPO_ROOT / name).is_file()]
    if missing:
        raise UsageError(
            f"the model code ({', '.join(repo_code.REMOTE_CODE_FILES)}) is not next to the siglip_navit_tools package "
            f"({repo_code.REPO_ROOT}); run from the repo, or pass --trust-remote-code to run the code of --model's repo"
        )
    return repo_code.modeling().SiglipVisionModel, repo_code.image_processing().SiglipNaViTImageProcessor


def resolve_dtype(requested: str, device: torch.device) -> tuple[str, str]:
    """`--dtype` -> (a key of DTYPES, one line saying why). "auto": bfloat16 on CUDA devices that support it and on
    CPUs with native bf16 (AMX, AVX512_BF16), float32 elsewhere (bf16 is emulated, 4-6x slower, on AVX2-only CPUs)."""
    if requested != "auto":
        return requested, f"--dtype {requested}"
    chosen = cpu.auto_dtype(device)
    name = next(key for key, value in DTYPES.items() if value == chosen)
    if device.type == "cuda":
        why = "the CUDA device supports bf16" if chosen == torch.bfloat16 else "the CUDA device lacks bf16"
    elif device.type == "cpu":
        why = f"CPU: {cpu.bf16_support()}"
    else:
        why = f"{device.type} device"
    return name, f"--dtype auto chose {name} on {device} ({why})"


def load_model_and_processor(
    model_id: str,
    device: torch.device,
    *,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    revision: Optional[str] = None,
    trust_remote_code: bool = False,
) -> tuple[torch.nn.Module, Any]:
    """The model (in eval mode, on `device`) and its image processor. Default: this repo's code with `model_id`'s
    config and weights; `trust_remote_code`: the code in `model_id`'s own repo, through the Auto classes."""
    check_model(model_id, revision, trust_remote_code)  # a stock SigLIP / BAGEL folder: say how to convert it
    hub = {"revision": revision} if revision else {}
    model_kwargs = {"attn_implementation": attn_implementation, dtype_kwarg(): DTYPES[dtype], **hub}
    try:
        if trust_remote_code:
            from transformers import AutoImageProcessor, AutoModel

            model = AutoModel.from_pretrained(model_id, trust_remote_code=True, **model_kwargs)
            processor = AutoImageProcessor.from_pretrained(model_id, trust_remote_code=True, **hub)
        else:
            model_class, processor_class = _repo_classes()
            model = model_class.from_pretrained(model_id, **model_kwargs)
            processor = processor_class.from_pretrained(model_id, **hub)
    except (OSError, ValueError, RuntimeError) as exc:  # RuntimeError: a checkpoint missing tensors (strict load)
        raise UsageError(f"--model {model_id!r} could not be loaded: {exc}") from exc
    missing = [name for name in PROCESSOR_METHODS if not hasattr(processor, name)]
    if missing:
        raise UsageError(
            f"--model {model_id!r}: its image processor ({type(processor).__name__}) lacks {missing}; with "
            "--trust-remote-code the repo's code must be this version's (or run without --trust-remote-code)"
        )
    return model.to(device).eval(), processor


# --------------------------------------------------------------------------------------------------------------
# Decoding + preprocessing (runs in DataLoader workers)
# --------------------------------------------------------------------------------------------------------------
class BatchLoader(torch.utils.data.Dataset):
    """`loader[batch]` for one planned forward (a list of (id, payload)): its images decoded and preprocessed one at
    a time (only the small patch tensors are kept, never all full-size decodes at once), then joined into one pack.
    Images that cannot be used are reported back as (id, error) and left out. The budget is checked again on what
    the processor made: an image whose file changed after its header was read and no longer fits is handed back
    alone (`overflow`) to be planned again, never forced into the forward."""

    def __init__(self, source: Source, processor: Any, budget: int):
        self.source, self.processor, self.budget = source, processor, budget

    def __getitem__(self, batch: list) -> dict:
        packs, ids, errors, overflow = [], [], [], []
        total = 0
        for image_id, payload in batch:
            try:
                pack = self.processor(images=self.source.load(payload))
            except Exception as exc:
                if not is_bad_image_error(exc):
                    raise
                errors.append((image_id, error_text(exc)))
                continue
            patches = int(pack["packed_pixel_values"].shape[0])
            if total + patches <= self.budget:
                packs.append(pack)
                ids.append(image_id)
                total += patches
            elif patches <= self.budget:
                overflow.append((image_id, dict(pack)))
            else:
                errors.append((image_id, _too_big(pack["image_grid_hw"][0].tolist(), patches, "after decoding")))
        pack = dict(self.processor.concatenate_packs(packs)) if packs else None
        return {"pack": pack, "ids": ids, "errors": errors, "overflow": overflow}


def _too_big(grid: Any, patches: int, when: str) -> str:
    return f"{grid[0]}x{grid[1]} = {patches} patches {when}, more than --max-patches-per-batch"


def _identity(item: Any) -> Any:
    return item


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


class ShardJob:
    """Shard `k`, started: its images are read from the source in input order (a streamed source's file is read as
    it goes), each one's patch count taken from its header (no decoding), and each look-ahead window of `window`
    images grouped first-fit decreasing into forwards; DataLoader workers decode and preprocess those forwards as
    they are planned. `order` maps each id to its input position.

    Creating the next shard's job while the current shard's last forward runs (asynchronously, on a GPU) keeps
    the model fed across shard boundaries."""

    def __init__(
        self,
        k: int,
        shard_ids: list[ImageId],
        source: Source,
        processor: Any,
        budget: int,
        num_workers: int,
        device: torch.device,
        progress: Any,
        window: Optional[int] = None,
    ):
        self.k, self.shard_ids, self.progress = k, shard_ids, progress
        self.skipped: list[dict] = []
        self.order: dict[ImageId, int] = {}
        window = window if window is not None else max(1, len(shard_ids))  # None: the whole shard at once
        loader = torch.utils.data.DataLoader(
            BatchLoader(source, processor, budget),
            batch_size=None,
            sampler=plan_windows(self._sized(source, processor, budget), budget, window),  # yields each batch itself
            num_workers=num_workers,
            collate_fn=_identity,
            pin_memory=device.type == "cuda",
        )
        self.items = iter(loader)  # with workers: they start decoding now

    def _sized(self, source: Source, processor: Any, budget: int) -> Iterator[tuple[tuple[ImageId, Any], int]]:
        """((id, payload), patch count) of the shard's usable images, in input order; the others are skipped here."""
        for item in source.items(self.shard_ids):
            self.order.setdefault(item.id, len(self.order))
            self.progress.total += 1
            if item.error is not None:
                self.skip(item.id, item.error)
                continue
            try:
                grid = processor.patch_grid(*source.size(item.payload))
            except Exception as exc:
                if not is_bad_image_error(exc):
                    raise
                self.skip(item.id, error_text(exc))
                continue
            patches = math.prod(grid)
            if patches > budget:  # only possible with do_resize=False (the run checks the budget otherwise)
                self.skip(item.id, _too_big(grid, patches, "from its header"))
                continue
            yield (item.id, item.payload), patches

    def skip(self, image_id: ImageId, error: str) -> None:
        logger.warning("skipping image %r: %s", image_id, error)
        self.skipped.append({"id": image_id, "error": error})
        self.progress.update(1)


# --------------------------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------------------------
def _forward(model: Any, processor: Any, pack: dict, device: torch.device) -> tuple[torch.Tensor, list]:
    """One packed forward -> (pooled (k, C) float32, the k (h, w, C) maps), both still on `device` (on a GPU the
    work is only queued: nothing here waits for it)."""
    inputs = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in pack.items()}
    hidden = model(**inputs).last_hidden_state
    # the grid from the host copy of the pack: reading the device copy would wait for the forward
    maps = processor.unpack(hidden, pack["image_grid_hw"])
    return processor.mean_pool(hidden, pack["image_grid_hw"]), maps


def _write_results(
    writer: Any, pack: dict, ids: list, result: tuple[torch.Tensor, list], stats: RankStats, save_grids: bool
) -> None:
    """A finished forward's images to the shard's writer (a grid goes to disk now, not at the end of the shard)."""
    pooled, maps = result
    pooled = pooled.cpu()
    for j, image_id in enumerate(ids):
        writer.add(image_id, pooled[j], tuple(maps[j].shape[:2]), maps[j].cpu() if save_grids else None)
    patches = int(pack["packed_pixel_values"].shape[0])
    stats.forwards += 1
    stats.patches += patches
    stats.largest_forward = max(stats.largest_forward, patches)
    stats.images += len(ids)


def _replanned(overflow: list[tuple[ImageId, dict]], processor: Any, budget: int) -> Iterator[tuple[dict, list]]:
    """The images handed back by the workers (grown since their header was read), packed again under the budget."""
    lengths = [int(pack["packed_pixel_values"].shape[0]) for _, pack in overflow]
    for batch in plan_batches(lengths, budget):
        yield dict(processor.concatenate_packs([overflow[i][1] for i in batch])), [overflow[i][0] for i in batch]


def encode_shard(
    job: ShardJob,
    model: Any,
    processor: Any,
    device: torch.device,
    stats: RankStats,
    writer: Any,
    *,
    budget: int,
    save_grids: bool = False,
    on_last_forward: Callable[[], None] = lambda: None,
) -> list:
    """Encode one shard's forwards into `writer` (each image added as its forward finishes); call `on_last_forward`
    once the last planned forward is queued (before waiting for it). Returns the skipped images, in input order."""
    overflow: list[tuple[ImageId, dict]] = []
    with torch.inference_mode():
        item = next(job.items, None)
        if item is None:
            on_last_forward()
        while item is not None:
            for image_id, error in item["errors"]:
                job.skip(image_id, error)
            overflow.extend(item["overflow"])
            pack, ids = item["pack"], item["ids"]
            result = _forward(model, processor, pack, device) if pack is not None else None
            item = next(job.items, None)  # the next forward's images (decoded by workers) while this one runs
            if item is None:
                on_last_forward()  # on a GPU the forward is still running: plan and start the next shard meanwhile
            if result is not None:
                _write_results(writer, pack, ids, result, stats, save_grids)
                job.progress.update(len(ids))
        for pack, ids in _replanned(overflow, processor, budget):
            _write_results(writer, pack, ids, _forward(model, processor, pack, device), stats, save_grids)
            job.progress.update(len(ids))
    stats.skipped += len(job.skipped)
    return sorted(job.skipped, key=lambda entry: job.order[entry["id"]])
