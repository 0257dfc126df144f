# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""`extract(options) -> summary`: one rank's run, as a sequence of small steps.

Check the options -> join the torchrun world -> list the inputs (rank 0 first; every rank must see the same list)
-> load the model -> take the output folder (rank 0: lock + plan, shared with every rank) -> encode this rank's
shards (k % world_size == rank), the next shard started during the current one's last forward -> gather the stats,
write the final manifest, print the summary. Owns the order of the steps and the summary; must not hold the
steps' own logic (inputs, pipeline, shards, distributed do) nor parse command lines.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import torch

from . import distributed
from .inputs import Source, resolve_input
from .options import ExtractOptions, UsageError
from .pipeline import RankStats, ShardJob, encode_shard, load_model_and_processor
from .shards import (
    MANIFEST,
    ManifestWriter,
    Plan,
    finished_shard,
    lock_output,
    make_plan,
    run_settings,
    shard_metadata,
    shard_name,
    write_shard,
)

logger = logging.getLogger(__name__)


def extract(options: ExtractOptions) -> dict:
    """Run the extraction in this process (one rank of a torchrun world, or alone). Returns the run's summary (every
    rank's numbers together); rank 0 also writes the final manifest and prints the summary."""
    options.validate()
    world = distributed.init_distributed(options.device, options.dist_timeout_minutes)
    rank, size = world.rank, world.size
    output = Path(options.output)
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {options.output!r} exists and is not a folder")
    # rank 0 first: listing / downloading a dataset and loading the model (transformers caches remote code on first
    # load) happen once; the other ranks then read the caches
    source = distributed.rank0_first(lambda: _list_inputs(options), rank, size)
    _check_same_inputs(source, options.input, size)
    model, processor = distributed.rank0_first(lambda: _load(options, world.device), rank, size)
    settings = run_settings(source.identity, model, processor, options.dtype, options.save_grids)

    taken = distributed.rank0_first(
        lambda: _take_output(output, source.ids, settings, options, size) if rank == 0 else None, rank, size
    )
    plan: Plan = distributed.broadcast(taken[0] if taken else None, size)
    lock = taken[1] if taken else None
    try:
        manifest = ManifestWriter(output, plan, _header(options, source, model)) if rank == 0 else None
        if manifest is not None:
            manifest.write()
        stats = _encode_shards(options, world, source, model, processor, plan, manifest)
        summary = summarize(distributed.gather(asdict(stats), size), options.max_patches_per_batch, size)
        if manifest is not None:
            final = manifest.write(complete=True, summary=summary)
            summary["complete"] = final["complete"]
            summary["num_encoded_total"] = final["num_encoded"]
            print(format_summary(summary, output), flush=True)
        # No rank leaves before rank 0 has written the final manifest, and none tears the process group down while a
        # peer still has a collective in flight (gloo can abort the process when a peer disappears mid-operation).
        distributed.barrier(size)
    finally:
        if lock is not None:
            lock.release()
    return summary


# --------------------------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------------------------
def _list_inputs(options: ExtractOptions) -> Source:
    return resolve_input(options.input, options.split, options.image_column, options.dataset_config)


def _check_same_inputs(source: Source, spec: str, world_size: int) -> None:
    """Shard k must mean the same images on every rank."""
    digest = hashlib.sha256(json.dumps({"ids": source.ids, "identity": source.identity}, sort_keys=True).encode())
    if len(set(distributed.gather(digest.hexdigest(), world_size))) > 1:
        raise UsageError(
            f"the ranks see different inputs for --input {spec!r} (files changing while listed, or different "
            "mounts on different nodes?); every rank must see the same list"
        )


def _load(options: ExtractOptions, device: torch.device) -> tuple[Any, Any]:
    """The model and processor, checked against the token budget."""
    model, processor = load_model_and_processor(
        options.model,
        device,
        dtype=options.dtype,
        attn_implementation=options.attn_implementation,
        revision=options.revision,
        trust_remote_code=options.trust_remote_code,
    )
    largest = processor.max_patches_per_image()
    if largest is not None and options.max_patches_per_batch < largest:
        raise UsageError(
            f"--max-patches-per-batch {options.max_patches_per_batch} is smaller than the largest image this processor "
            f"makes ({largest} patches, max_image_size {processor.max_image_size}); use at least {largest}"
        )
    return model, processor


def _header(options: ExtractOptions, source: Source, model: Any) -> dict:
    """The manifest's description of the run (beside the plan and the shards)."""
    return {
        "model": options.model,
        "input": options.input,
        "input_kind": source.kind,
        "dtype": options.dtype,
        "save_grids": options.save_grids,
        "hidden_size": model.config.hidden_size,
        "tensors": {
            "pooled": "(n, C) float32 mean over patches",
            "grid_hw": "(n, 2) int64 (h, w) patch grid",
            **({"features.{j}": f"(h_j, w_j, C) {options.dtype}"} if options.save_grids else {}),
        },
    }


def _take_output(output: Path, ids: list, settings: dict, options: ExtractOptions, world_size: int) -> tuple:
    """Rank 0: create and lock the output folder, then read (resume) or make the plan. Returns (plan, lock)."""
    output.mkdir(parents=True, exist_ok=True)
    lock = lock_output(output)
    try:
        return make_plan(output, ids, settings, options.shard_size, world_size, options.overwrite), lock
    except BaseException:
        lock.release()
        raise


def _progress_bar(total: int, rank: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=f"rank {rank}", unit="img", position=distributed.local_rank(),
        disable=None if enabled else True, dynamic_ncols=True,
    )  # fmt: skip


def _encode_shards(
    options: ExtractOptions,
    world: distributed.World,
    source: Source,
    model: Any,
    processor: Any,
    plan: Plan,
    manifest: Optional[ManifestWriter],
) -> RankStats:
    """Encode and write this rank's unfinished shards (k % world_size == rank); keeps rank 0's manifest current."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    stats = RankStats()
    mine = range(world.rank, plan.num_shards, world.size)
    todo = [k for k in mine if finished_shard(Path(options.output), plan, k) is None]
    stats.shards_resumed = len(mine) - len(todo)
    progress = _progress_bar(sum(len(plan.shard_ids(source.ids, k)) for k in todo), world.rank, options.progress)
    jobs: dict[int, ShardJob] = {}  # at most two: the shard being encoded, the next one (started early)

    def start_job(position: int) -> None:
        if position < len(todo) and position not in jobs:
            k = todo[position]
            jobs[position] = ShardJob(
                k, plan.shard_ids(source.ids, k), source, processor, options.max_patches_per_batch,
                options.num_workers, world.device, progress,
            )  # fmt: skip

    start = time.perf_counter()
    try:
        with logging_redirect_tqdm():
            for position in range(len(todo)):
                start_job(position)
                job = jobs.pop(position)
                tensors, ids, skipped = encode_shard(
                    job, model, processor, world.device, stats, save_grids=options.save_grids,
                    on_last_forward=lambda: start_job(position + 1),
                )  # fmt: skip
                write_shard(Path(options.output) / shard_name(job.k, plan.num_shards), tensors,
                            shard_metadata(plan, ids, skipped))  # fmt: skip
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
    return stats


# --------------------------------------------------------------------------------------------------------------
# The summary
# --------------------------------------------------------------------------------------------------------------
def summarize(all_stats: list[dict], budget: int, world_size: int) -> dict:
    """Every rank's RankStats (as dicts) -> the run's summary (also stored as the manifest's `last_run`)."""
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
    """The lines rank 0 prints at the end of a run."""
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
