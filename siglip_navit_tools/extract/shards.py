# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""The output folder: shard files, manifest.json, the run's plan and fingerprint, and the lock.

Owns the on-disk format (`FORMAT`; shard names, their metadata, the manifest's keys), what makes two runs "the same
run" (the fingerprint: ids, input identity, weights checksum, config, processor settings, dtype, --save-grids),
and resuming (a shard file exists only once complete: `finished_shard`). Files are replaced with the tools' ONE
atomic scheme (`siglip_navit_tools.io.atomic`). Must not load models, read images or talk to other ranks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import filelock
import torch

from ..io import atomic
from .options import DEFAULT_SHARD_SIZE, UsageError

logger = logging.getLogger(__name__)

FORMAT = "siglip-navit-features/1"
MANIFEST = "manifest.json"
LOCK = ".lock"
_VOLATILE_KEYS = ("transformers_version", "torch_dtype", "dtype", "architectures", "auto_map")


def shard_name(k: int, num_shards: int) -> str:
    return f"shard-{k:05d}-of-{num_shards:05d}.safetensors"


# --------------------------------------------------------------------------------------------------------------
# What a run is: its plan and fingerprint
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """What a run (and every rerun into the same folder) encodes: fixed by the first run, kept in the manifest."""

    fingerprint: str
    num_inputs: int
    shard_size: int
    num_shards: int

    def shard_ids(self, ids: list, k: int) -> list:
        """The inputs of shard k."""
        return ids[k * self.shard_size : (k + 1) * self.shard_size]


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


def run_settings(input_identity: dict, model: Any, processor: Any, dtype: str, save_grids: bool) -> dict:
    """What the saved numbers depend on: a rerun into the same folder must match it (with the ids, the fingerprint)."""
    return {
        "inputs": input_identity,
        "weights": weights_checksum(model),
        "config": _settings_dict(model.config.to_dict()),
        "processor": _settings_dict(processor.to_dict()),
        "dtype": dtype,
        "save_grids": save_grids,
    }


def _fingerprint(ids: list, settings: dict) -> str:
    digest = hashlib.sha256(json.dumps({"ids": ids, "settings": settings}, sort_keys=True).encode())
    return digest.hexdigest()[:32]


def _resumable_plan(output: Path, fingerprint: str, shard_size: Optional[int], overwrite: bool) -> Optional[Plan]:
    """The plan of the run whose manifest is in `output` if it is this run (resume); else clear its shards (with
    `overwrite`) or refuse."""
    manifest_path = output / MANIFEST
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
    return None


def _clear_orphan_shards(output: Path, overwrite: bool) -> None:
    """Shard files without a manifest: removed with `overwrite`, else the run is refused."""
    leftovers = sorted(p.name for p in output.glob("shard-*-of-*.safetensors"))
    if leftovers and not overwrite:
        raise UsageError(
            f"--output {str(output)!r} holds shard files but no manifest.json ({leftovers[0]}, ...); "
            "use a new --output folder, or --overwrite to replace them"
        )
    for name in leftovers:
        (output / name).unlink()


def make_plan(
    output: Path, ids: list, settings: dict, shard_size: Optional[int], world_size: int, overwrite: bool
) -> Plan:
    """Rank 0: the run's plan -- read from an existing manifest (resume) or made new. Raises UsageError when the
    folder holds a different run's results."""
    fingerprint = _fingerprint(ids, settings)
    if (output / MANIFEST).exists():
        plan = _resumable_plan(output, fingerprint, shard_size, overwrite)
        if plan is not None:
            return plan
    else:
        _clear_orphan_shards(output, overwrite)
    for stale in output.glob(f".shard-*.safetensors{atomic.TMP_MARK}*"):  # left by a process killed with SIGKILL
        stale.unlink(missing_ok=True)
    if shard_size is None:  # balanced over the ranks, at most DEFAULT_SHARD_SIZE images per shard
        shard_size = max(1, min(DEFAULT_SHARD_SIZE, math.ceil(len(ids) / world_size)))
    return Plan(fingerprint, len(ids), shard_size, math.ceil(len(ids) / shard_size))


# --------------------------------------------------------------------------------------------------------------
# Shard files
# --------------------------------------------------------------------------------------------------------------
def finished_shard(output: Path, plan: Plan, k: int) -> Optional[dict]:
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


def shard_metadata(plan: Plan, ids: list, skipped: list) -> dict[str, str]:
    """A shard file's safetensors metadata (what `finished_shard` reads back)."""
    return {"format": FORMAT, "fingerprint": plan.fingerprint, "ids": json.dumps(ids), "skipped": json.dumps(skipped)}


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a shard atomically: a temporary file in the same folder, synced, renamed over the final name once
    complete. An interrupted write (Ctrl-C, a crash) leaves no file under the final name and removes its temporary."""
    from safetensors.torch import save_file

    tmp = atomic.temporary_sibling(path)
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        atomic.replace_file(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def lock_output(output: Path) -> filelock.BaseFileLock:
    """Rank 0 holds an exclusive lock on `output` for the whole run: a second run into the same folder is refused
    instead of deleting the first one's temporary files. `filelock` takes a non-blocking flock on `output/.lock` (the
    file stays); the kernel releases it when the process exits, however it exits."""
    lock = filelock.FileLock(str(output / LOCK), thread_local=False)
    try:
        lock.acquire(blocking=False)
    except filelock.Timeout as exc:
        raise UsageError(f"--output {str(output)!r} is in use by another extract_features.py run") from exc
    return lock


# --------------------------------------------------------------------------------------------------------------
# The manifest
# --------------------------------------------------------------------------------------------------------------
class ManifestWriter:
    """Rank 0's manifest.json, rebuilt from the shard files on disk (the ground truth: a shard file exists only once
    complete), so it lists other ranks' shards too. A finished shard's metadata is read once and cached; during a
    run the file is rewritten at most every `interval` seconds (and always at the end and on Ctrl-C)."""

    def __init__(self, output: Path, plan: Plan, header: dict, interval: float = 30.0):
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
        atomic.write_text(self.output / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        self.last_write = time.monotonic()
        return manifest

    def maybe_write(self) -> None:
        if time.monotonic() - self.last_write >= self.interval:
            self.write()
