# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""`extract(options) -> summary`: one rank's run, as a sequence of small steps.

Check the options -> join the torchrun world -> list the inputs (rank 0 first; every rank must see the same list)
-> resolve --dtype (auto) -> load the model -> take the output folder (rank 0: lock, stale temporaries removed,
plan, the list of unfinished shards and a run id, shared with every rank) -> encode shards as this rank claims them
(dynamic: an atomic counter in torch.distributed's store hands each unfinished shard to exactly one rank; the next
one is claimed and started during the current one's last forward) -> gather the stats, write the final manifest,
print the summary. Owns the order of the steps and the summary; must not hold the steps' own logic (inputs,
pipeline, shards, distributed do) nor parse command lines, nor any hook for tests (they wrap `encode_shard` from
outside).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import torch

from . import distributed, writers
from .inputs import Source, resolve_input
from .options import ExtractOptions, UsageError
from .pipeline import RankStats, ShardJob, encode_shard, load_model_and_processor, resolve_dtype
from .shards import (
    MANIFEST,
    ManifestWriter,
    Plan,
    finished_shard,
    lock_output,
    make_plan,
    remove_stale_temporaries,
    run_settings,
    shard_metadata,
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
    options, dtype_choice = _resolve_dtype(options, world)
    model, processor = distributed.rank0_first(lambda: _load(options, world.device), rank, size)
    settings = run_settings(source.identity, model, processor, options.dtype, options.save_grids, options.format)

    taken = distributed.rank0_first(
        lambda: _take_output(output, source, settings, options, size) if rank == 0 else None, rank, size
    )
    plan, todo, run_id = distributed.broadcast(taken[:3] if taken else None, size)
    lock = taken[3] if taken else None
    try:
        header = _header(options, source, model, dtype_choice)
        manifest = ManifestWriter(output, plan, header) if rank == 0 else None
        if manifest is not None:
            manifest.write()
        claims = distributed.Claims(len(todo), run_id, size, options.dist_timeout_minutes)
        stats = _encode_shards(options, world, source, model, processor, plan, todo, claims, manifest)
        if rank == 0:
            stats.shards_resumed = plan.num_shards - len(todo)
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
    source = resolve_input(options.input, options.split, options.image_column, options.dataset_config,
                           options.image_key, exclude=options.output)  # fmt: skip
    if source.streaming and options.shard_size is not None:
        raise UsageError(f"--shard-size does not apply to --input {options.input!r}: each {source.kind} file is one "
                         "shard (one input file -> one output shard)")  # fmt: skip
    return source


def _check_same_inputs(source: Source, spec: str, world_size: int) -> None:
    """Shard k must mean the same images on every rank."""
    digest = hashlib.sha256(json.dumps({"ids": source.ids, "identity": source.identity}, sort_keys=True).encode())
    if len(set(distributed.gather(digest.hexdigest(), world_size))) > 1:
        raise UsageError(
            f"the ranks see different inputs for --input {spec!r} (files changing while listed, or different "
            "mounts on different nodes?); every rank must see the same list"
        )


def _resolve_dtype(options: ExtractOptions, world: distributed.World) -> tuple[ExtractOptions, str]:
    """`--dtype auto` -> the dtype every rank uses (ranks that would choose differently all use float32), logged; the
    options from here on carry the resolved name (the fingerprint and the manifest record it, never "auto")."""
    name, why = resolve_dtype(options.dtype, world.device)
    choices = distributed.gather(name, world.size)
    if len(set(choices)) > 1:
        name, why = "float32", f"--dtype auto: the ranks' devices differ ({sorted(set(choices))}), all use float32"
    if options.dtype == "auto":
        logger.info("%s", why)
    return dataclasses.replace(options, dtype=name), why


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


def _header(options: ExtractOptions, source: Source, model: Any, dtype_choice: str) -> dict:
    """The manifest's description of the run (beside the plan and the shards)."""
    return {
        "model": options.model,
        "input": options.input,
        "input_kind": source.kind,
        "dtype": options.dtype,
        "dtype_choice": dtype_choice,
        "duplicates": source.duplicates,
        "save_grids": options.save_grids,
        "hidden_size": model.config.hidden_size,
        **_layout(options),
    }


def _layout(options: ExtractOptions) -> dict:
    """The manifest's one-line description of what each shard file holds, per --format."""
    if options.format == "parquet":
        return {"columns": {
            "id": "string", "pooled": "fixed-size list<float32>[C], mean over patches", "grid_h": "int32",
            "grid_w": "int32",
            **({"features": f"binary: the (grid_h, grid_w, C) map, row-major, {options.dtype} little-endian"}
               if options.save_grids else {}),
        }}  # fmt: skip
    if options.format == "npy":
        return {"files": {"embeddings/XXXXX.npy": "(n, C) float32 mean over patches",
                          "metadata/XXXXX.parquet": "id (string), grid_h, grid_w (int32), same row order"}}  # fmt: skip
    return {
        "tensors": {
            "pooled": "(n, C) float32 mean over patches",
            "grid_hw": "(n, 2) int64 (h, w) patch grid",
            **({"features.{j}": f"(h_j, w_j, C) {options.dtype}"} if options.save_grids else {}),
        },
    }


def _take_output(output: Path, source: Source, settings: dict, options: ExtractOptions, world_size: int) -> tuple:
    """Rank 0: create and lock the output folder, remove killed runs' temporaries, read (resume) or make the plan
    (a streamed source: one file per shard), list the unfinished shards (the order every rank claims them in) and
    name the run (its claim counter's namespace). Returns (plan, unfinished shards, run id, lock)."""
    lock = lock_output(output)  # creates the folder; a read-only or busy --output is one line (UsageError)
    try:
        remove_stale_temporaries(output)
        shard_size = 1 if source.streaming else options.shard_size
        plan = make_plan(output, source.ids, settings, shard_size, world_size, options.overwrite, options.format)
        todo = [k for k in range(plan.num_shards) if finished_shard(output, plan, k) is None]
        return plan, todo, uuid.uuid4().hex, lock
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
    todo: list[int],
    claims: distributed.Claims,
    manifest: Optional[ManifestWriter],
) -> RankStats:
    """Encode and write the unfinished shards this rank claims (`todo[claims.claim()]`, until none is left); keeps
    rank 0's manifest current."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    stats = RankStats()
    progress = _progress_bar(0, world.rank, options.progress)  # its total grows as shards are claimed
    pending: list[ShardJob] = []  # at most one: the next shard, claimed and started during the current one

    def claim_and_start() -> None:
        position = claims.claim()
        if position is not None:
            k = todo[position]
            pending.append(ShardJob(
                k, plan.shard_ids(source.ids, k), source, processor, options.max_patches_per_batch,
                options.num_workers, world.device, progress, options.lookahead if source.streaming else None,
            ))  # fmt: skip

    start = time.perf_counter()
    try:
        with logging_redirect_tqdm():
            claim_and_start()
            while pending:
                job = pending.pop()
                skipped = _encode_one_shard(options, world, source, model, processor, plan, job, stats, claim_and_start)
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


def _encode_one_shard(
    options: ExtractOptions,
    world: distributed.World,
    source: Source,
    model: Any,
    processor: Any,
    plan: Plan,
    job: ShardJob,
    stats: RankStats,
    on_last_forward: Any,
) -> list:
    """Encode `job` into its shard's files (--format's writer: written as the forwards finish, committed atomically
    at the end, its temporaries removed on any failure). Returns the shard's skipped images."""
    expected = writers.STREAMED_EXPECTED_IMAGES if source.streaming else len(job.shard_ids)
    with writers.open_shard(options.format, Path(options.output), job.k, plan.num_shards, model.config.hidden_size,
                            options.save_grids, expected) as writer:  # fmt: skip
        skipped = encode_shard(
            job, model, processor, world.device, stats, writer, budget=options.max_patches_per_batch,
            save_grids=options.save_grids, on_last_forward=on_last_forward,
        )  # fmt: skip
        units = job.shard_ids if source.streaming else None
        writer.commit(shard_metadata(plan, skipped, units), job.order)
    return skipped


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
        "packing_efficiency": patches / (forwards * budget) if forwards else None,  # <= 1: no forward exceeds it
        "shards_written": sum(s["shards_written"] for s in all_stats),
        "shards_resumed": sum(s["shards_resumed"] for s in all_stats),
        "shards_per_rank": [s["shards_written"] for s in all_stats],
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
