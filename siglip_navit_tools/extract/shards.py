# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""The output folder: manifest.json, the run's plan and fingerprint, resuming (the lock is in `lock`, the shard
files' formats in `writers`).

Owns the manifest's keys, what makes two runs "the same run" (the fingerprint: ids, input identity, weights
checksum, config, processor settings, resolved dtype, --save-grids, and --format when it is not safetensors), one
format per folder (another --format into it is refused unless --overwrite), and resuming (a shard's files exist only
once complete: `finished_shard`). The shard files are the ground truth: each carries the fingerprint, its ids and the
plan, so a missing, empty or corrupt manifest is rebuilt from them (`make_plan`), and temporaries of killed runs are
removed while the lock is held. Files are replaced with the tools' ONE atomic scheme (`siglip_navit_tools.io.atomic`).
Must not load models, read images or talk to other ranks.
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

import torch

from ..io import atomic
from ..io.files import NotARegularFile, is_regular_file, read_regular_bytes
from . import writers
from .lock import LOCK, OutputLock, lock_output  # noqa: F401 - the lock is part of the folder's format
from .options import DEFAULT_SHARD_SIZE, UsageError
from .writers import FORMAT, output_errors, shard_name, write_shard  # noqa: F401 - the default format's names, used by callers

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SHARD_GLOB = "shard-*-of-*.safetensors"
_VOLATILE_KEYS = ("transformers_version", "torch_dtype", "dtype", "architectures", "auto_map")


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
    output_format: str = "safetensors"  # --format: a key of writers.WRITERS

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


def run_settings(
    input_identity: dict, model: Any, processor: Any, dtype: str, save_grids: bool, output_format: str = "safetensors"
) -> dict:
    """What the saved numbers depend on: a rerun into the same folder must match it (with the ids, the fingerprint).
    The format is added only when it is not safetensors, so runs made before --format existed still resume."""
    return {
        "inputs": input_identity,
        "weights": weights_checksum(model),
        "config": _settings_dict(model.config.to_dict()),
        "processor": _settings_dict(processor.to_dict()),
        "dtype": dtype,
        "save_grids": save_grids,
        **({"format": output_format} if output_format != "safetensors" else {}),
    }


def _fingerprint(ids: list, settings: dict) -> str:
    digest = hashlib.sha256(json.dumps({"ids": ids, "settings": settings}, sort_keys=True).encode())
    return digest.hexdigest()[:32]


class _Manifest:
    """What `output/manifest.json` is: `data` when it is a usable manifest of ours; else `problem` says why not
    (missing, empty, not JSON, incomplete) and `foreign` whether it is another program's file."""

    def __init__(self, output: Path):
        self.data: Optional[dict] = None
        self.problem: Optional[str] = None
        self.foreign = False
        path = output / MANIFEST
        if not path.exists():
            self.problem = "is missing"
            return
        try:
            text = read_regular_bytes(path).decode()
            if not text.strip():
                raise ValueError("the file is empty")
            old = json.loads(text)
        except NotARegularFile as exc:  # never opened: reading a FIFO blocks, a directory is not a manifest
            raise _not_ours(output, MANIFEST, exc.kind) from None
        except ValueError as exc:  # UnicodeDecodeError and json.JSONDecodeError are ValueErrors
            self.problem = f"is corrupt ({exc})"
            return
        if not isinstance(old, dict) or old.get("format") != FORMAT:
            self.foreign = True
            self.problem = f"format {old.get('format') if isinstance(old, dict) else None!r}"
            return
        missing = [key for key in ("fingerprint", "num_inputs", "shard_size", "num_shards") if key not in old]
        if missing:
            self.problem = f"is corrupt (no {', '.join(missing)})"
            return
        self.data = old


def _not_ours(output: Path, name: str, kind: str) -> UsageError:
    return UsageError(
        f"--output {str(output)!r}: its {name} is {kind or 'not a regular file'}, not a file this tool writes (it is "
        f"never opened nor deleted); remove {output / name} yourself, or choose another --output"
    )


def _clear_output(output: Path) -> None:
    """--overwrite: every shard file of every format and the manifest go (whatever run they belong to); a directory
    at such a name is not ours to delete."""
    for path in writers.finished_files(output):
        if path.is_dir() and not path.is_symlink():
            raise _not_ours(output, path.name, "a directory")
        path.unlink(missing_ok=True)
    (output / MANIFEST).unlink(missing_ok=True)


def _check_one_format(output: Path, manifest: "_Manifest", output_format: str) -> None:
    """Refuse another format's results in `output` (one folder, one format): from the manifest, or when it is lost,
    from the shard files on disk."""
    held = manifest.data.get("output_format", "safetensors") if manifest.data is not None else None
    if held is None:
        held = next((fmt for fmt in writers.WRITERS if fmt != output_format and writers.shard_files(output, fmt)), None)
    if held is not None and held != output_format:
        raise UsageError(
            f"--output {str(output)!r} holds {held} features; this run writes --format {output_format}, and one folder "
            "holds one format: use a new --output folder, or --overwrite to replace them"
        )


def _held_inputs(meta: dict) -> list:
    """The plan's inputs a shard file covers: its `units` (the tar / parquet file of a streamed source), else its
    encoded and skipped images."""
    if "units" in meta:
        return json.loads(meta["units"])
    return json.loads(meta["ids"]) + [entry["id"] for entry in json.loads(meta["skipped"])]


def _plan_of_shards(
    found: dict[int, dict], num_shards: int, ids: list, fingerprint: str, output_format: str
) -> Optional[Plan]:
    """The plan that the shard files `found` ({k: metadata}, all of this run) were written under, or None when they
    fit no plan. Shards written since the `plan` metadata key exist say it; older ones are measured: a shard other
    than the last holds exactly `shard_size` inputs (encoded + skipped)."""
    n = len(ids)
    sizes = set()
    for k, meta in found.items():
        count = len(_held_inputs(meta))
        if "plan" in meta:
            sizes.add(json.loads(meta["plan"])["shard_size"])
        elif k < num_shards - 1:
            sizes.add(count)
        elif num_shards > 1:
            sizes.add((n - count) // (num_shards - 1))
        else:
            sizes.add(max(count, 1))
    if len(sizes) != 1:
        return None
    size = sizes.pop()
    if size <= 0:
        return None
    plan = Plan(fingerprint, n, size, math.ceil(n / size) if n else 0, output_format)
    for k, meta in found.items():
        held = _held_inputs(meta)
        if plan.num_shards != num_shards or sorted(map(str, held)) != sorted(map(str, plan.shard_ids(ids, k))):
            return None
    return plan


def _recover_plan(output: Path, ids: list, fingerprint: str, problem: str, output_format: str) -> Optional[Plan]:
    """No usable manifest: the shard files are the ground truth. Their plan when they are this run's (resume);
    None when there are none (a fresh start); UsageError when they are another run's (or fit no plan)."""
    found: dict[int, dict] = {}
    names: dict[int, set] = {}
    others = []
    for k, num_shards, path in writers.shard_files(output, output_format):
        meta = writers.read_shard(path, output_format)
        if meta is None:
            logger.warning("%s is unreadable (damaged?): it is not a finished shard", path)
            continue
        if meta.get("fingerprint") != fingerprint or "ids" not in meta or "skipped" not in meta:
            others.append(path.name)
            continue
        if num_shards is None:  # npy names say only k: the plan stored in the file says how many
            num_shards = json.loads(meta.get("plan", "{}")).get("num_shards", -1)
        found[k] = meta
        names.setdefault(num_shards, set()).add(k)
    where = f"--output {str(output)!r}"
    if others:
        what = "no manifest.json" if problem == "is missing" else f"a manifest.json that {problem}"
        raise UsageError(
            f"{where} holds shard files but {what}, and the shard files are of a different run ({others[0]}, ...); "
            "use a new --output folder, or --overwrite to replace them"
        )
    if not found:
        if problem != "is missing":
            logger.warning("%s: manifest.json %s and no shard file of this run is there: starting afresh", where,
                           problem)  # fmt: skip
        return None
    plan = _plan_of_shards(found, next(iter(names)), ids, fingerprint, output_format) if len(names) == 1 else None
    if plan is None:
        raise UsageError(
            f"{where}: manifest.json {problem} and the shard files fit no plan of this run; use --overwrite"
        )
    logger.warning(
        "%s: manifest.json %s; rebuilt from the %d shard file(s) of this run on disk (the shard files are the ground "
        "truth)", where, problem, len(found),
    )  # fmt: skip
    return plan


def make_plan(
    output: Path,
    ids: list,
    settings: dict,
    shard_size: Optional[int],
    world_size: int,
    overwrite: bool,
    output_format: str = "safetensors",
) -> Plan:
    """Rank 0 (holding the lock): the run's plan -- read from the manifest or, when that is missing or corrupt, from
    the shard files (resume), or made new. Raises UsageError when the folder holds a different run's results or
    another format's (unless `overwrite`, which clears them)."""
    fingerprint = _fingerprint(ids, settings)
    manifest = _Manifest(output)
    where = f"--output {str(output)!r}"
    plan = None
    if not overwrite:
        _check_one_format(output, manifest, output_format)
    if overwrite:
        _clear_output(output)
    elif manifest.data is not None:
        old = manifest.data
        if old["fingerprint"] != fingerprint:
            raise UsageError(
                f"{where} holds features of a different run (other inputs, model or settings); "
                "use a new --output folder, or --overwrite to replace them"
            )
        plan = Plan(fingerprint, old["num_inputs"], old["shard_size"], old["num_shards"], output_format)
    elif manifest.foreign:
        raise UsageError(f"{where} holds a manifest.json this script did not write ({manifest.problem}); use a new "
                         "--output folder, or --overwrite to replace it")  # fmt: skip
    else:
        plan = _recover_plan(output, ids, fingerprint, manifest.problem, output_format)
    if plan is not None:
        if shard_size is not None and shard_size != plan.shard_size:
            logger.warning("resuming with the first run's --shard-size %d (not %d)", plan.shard_size, shard_size)
        return plan
    if shard_size is None:  # balanced over the ranks, at most DEFAULT_SHARD_SIZE images per shard
        shard_size = max(1, min(DEFAULT_SHARD_SIZE, math.ceil(len(ids) / world_size)))
    return Plan(fingerprint, len(ids), shard_size, math.ceil(len(ids) / shard_size), output_format)


def remove_stale_temporaries(output: Path) -> list[str]:
    """Remove the temporaries (`.shard-*.tmp-*`, `.manifest.json.tmp-*`) that killed runs (SIGKILL, power loss) left
    in `output`. Only while holding the output's lock: then no live run is writing them. Returns their names."""
    stale = [*writers.temporaries(output), *output.glob(f".{MANIFEST}{atomic.TMP_MARK}*")]
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        logger.info("--output: removed %d temporary file(s) left by an interrupted run", len(stale))
    return sorted(path.name for path in stale)


# --------------------------------------------------------------------------------------------------------------
# Shard files
# --------------------------------------------------------------------------------------------------------------
def finished_shard(output: Path, plan: Plan, k: int) -> Optional[dict]:
    """Shard k's manifest entry if its files are on disk, readable and of this run (fingerprint); else None."""
    path = writers.shard_path(output, plan.output_format, k, plan.num_shards)
    if not is_regular_file(path):
        if path.is_dir() and not path.is_symlink():  # the shard could never be written over it
            raise _not_ours(output, path.name, "a directory")
        return None
    metadata = writers.read_shard(path, plan.output_format)
    try:
        if metadata is None or metadata.get("fingerprint") != plan.fingerprint:
            return None
        entry = writers.shard_entry(path, plan.output_format, output)
        if "units" in metadata:
            entry["input"] = ", ".join(json.loads(metadata["units"]))
        return {**entry, "ids": json.loads(metadata["ids"]), "skipped": json.loads(metadata["skipped"])}
    except Exception:  # a damaged file (e.g. after a power loss) is not finished: the shard is encoded again
        return None


def shard_metadata(plan: Plan, skipped: list, units: Optional[list] = None) -> dict[str, str]:
    """A shard's stored metadata, but its ids (the writer adds them in its row order): with the plan, a shard file
    alone says which run and which slice of the inputs it holds (`units`: the tar / parquet file of a streamed
    source), so a lost manifest is rebuilt from the shards."""
    layout = {"num_inputs": plan.num_inputs, "shard_size": plan.shard_size, "num_shards": plan.num_shards}
    metadata = {"format": FORMAT, "fingerprint": plan.fingerprint, "skipped": json.dumps(skipped),
                "plan": json.dumps(layout)}  # fmt: skip
    if units is not None:
        metadata["units"] = json.dumps(units)
    return metadata


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
            "output_format": self.plan.output_format,
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
        with output_errors(self.output / MANIFEST):
            atomic.write_text(self.output / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        self.last_write = time.monotonic()
        return manifest

    def maybe_write(self) -> None:
        if time.monotonic() - self.last_write >= self.interval:
            self.write()
