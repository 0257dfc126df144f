# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""`convert(options) -> ConvertResult`: the converter's steps, in order.

Take the target's lock (unless a dry run) and repair leftovers of killed runs, open the source (headers only), check
the target (`target`), build and validate the plan, then (unless a dry run) write the weights and side files into a
temporary directory beside the target, verify them, make them durable, check the target again and rename the
directory into place (`io.atomic`), and optionally upload. Owns the progress messages on stderr and the dry-run
listing on stdout. Must not parse command lines nor map errors to exit codes (that is `cli`).
"""

from __future__ import annotations

import errno
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..io import atomic
from .hub import human, push_to_hub
from .options import READ_CHUNK_BOUNDS, ConversionError, ConvertOptions, nonblank_path, parse_size
from .plan import DTYPE_NAMES, Plan, build_plan
from .sources import Source, open_source
from .target import check_target, locked_target, output_path
from .write import output_file_list, verify_output, write_side_files, write_weights


@dataclass
class ConvertResult:
    out: Path  # the output directory (not written on a dry run)
    plan: Plan
    bytes_read: int  # tensor bytes read from the source
    url: Optional[str] = None  # the Hub repo, with push_to_hub
    written: bool = True  # False on a dry run


def _natural(key: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def describe_plan(plan: Plan, out: Path) -> str:
    """The dry-run listing: source, output, files, every tensor and what is not written."""
    src, c = plan.source, plan.config
    layers = f"  layers stored: {plan.layers_stored}"
    layout = "stock transformers SiglipVisionModel" if plan.to == "stock-siglip" else "SigLIP-NaViT (remote code)"
    lines = [
        f"source: {src.loc.display} [{src.key_style}]",
        f"  weight files: {', '.join(src.weight_files)}",
        layers + (f", config says {plan.layers_config}" if plan.layers_config is not None else ""),
        f"output: {out} [{layout}]",
        f"  layers {c.num_hidden_layers}, hidden {c.hidden_size}, patch {c.patch_size}, image {c.image_size}, "
        f"rope={c.rope}, dtype {plan.dtype_name}",
        f"  would read {len(plan.items)} tensors, {plan.total_read_bytes} bytes"
        + (f" of {src.total_bytes} bytes of source weights" if src.total_bytes else ""),
        "files:",
    ]
    for i, name in enumerate(plan.shard_files):
        items = plan.shard_items(i)
        lines.append(f"  {name}  ({len(items)} tensors, {sum(it.nbytes for it in items)} bytes)")
    lines += [f"  {n}" for n in output_file_list(plan)[len(plan.shard_files) :]]
    lines.append("tensors:")
    for it in sorted(plan.items, key=lambda i: _natural(i.out_key)):
        extra = f"  [{it.transform}]" if it.transform else ""
        dtype = DTYPE_NAMES.get(it.out_dtype, it.out_dtype)
        lines.append(f"  {it.out_key}  {list(it.out_shape)} {dtype}  <- {it.entry.info.key}{extra}")
    if plan.dropped:
        lines.append("not written:")
        lines += [f"  {reason}: {len(keys)} tensors" for reason, keys in plan.dropped.items()]
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def _write(plan: Plan, out: Path, options: ConvertOptions, chunk: int) -> None:
    """Everything into a temporary directory beside `out`; verified and durable before it replaces `out`, and only if
    `out` still passes the target rules at that moment (something may have appeared there meanwhile). An
    operating-system failure of the target (disk full, read-only, no permission) is one paragraph saying what it
    means for `out`."""
    existed = out.exists() or out.is_symlink()
    try:
        with atomic.temporary_directory(out) as tmp:
            write_weights(plan, tmp, chunk, progress=options.progress and not options.quiet)
            with atomic.target_errors(tmp):
                write_side_files(plan, tmp, options)
            verify_output(plan, tmp, chunk)
            with atomic.target_errors(tmp):
                atomic.fsync_tree(tmp)
            _check_again(out, plan.source, options.force)
            with atomic.target_errors(out):
                atomic.replace_directory(tmp, out, replace=options.force)
    except atomic.TargetWriteError as exc:
        raise _target_error(exc, out, existed, plan) from None
    except atomic.TargetAppeared:
        raise _appeared(out, "during the final rename") from None


def _check_again(out: Path, src: Source, force: bool) -> None:
    """The target rules once more, right before the rename: a folder created at --out during the run (by a user, or
    a program) is not replaced without --force, nor with it unless it looks like a checkpoint."""
    try:
        check_target(out, src, force)
    except ConversionError as exc:
        raise ConversionError(f"{out} changed during the run: {exc} The converted checkpoint was discarded.") from None


def _appeared(out: Path, when: str) -> ConversionError:
    return ConversionError(
        f"{out} changed during the run: something non-empty appeared there {when}, so it was left as it is and the "
        "converted checkpoint was discarded. Pass --force to replace a checkpoint folder, or choose another --out."
    )


def _target_error(exc: atomic.TargetWriteError, out: Path, existed: bool, plan: Optional[Plan]) -> ConversionError:
    if existed and not (out.exists() or out.is_symlink()):  # both renames failed: say where the old output is
        state = f"the previous --out could not be put back; it is parked beside it as .{out.name}{atomic.OLD_MARK}*"
    else:
        state = "nothing was changed at --out" + (" (its previous contents are intact)" if existed else "")
    free = f"free at least {human(plan.total_out_bytes)}" if plan is not None else "free some space"
    writable = "choose an --out you may write to (or fix its permissions)"
    hints = {errno.ENOSPC: f"{free} there and run again", errno.EDQUOT: f"{free} of your quota and run again",
             errno.EROFS: "choose an --out on a writable file system", errno.EACCES: writable, errno.EPERM: writable}
    hint = hints.get(exc.errno, "fix that and run again")
    removed = " and the temporary directory was removed" if plan is not None else ""
    return ConversionError(f"{exc}; {state} ({out}){removed}. To fix: {hint}.")


def _recover(out: Path, options: ConvertOptions, log) -> None:
    """Before anything else: repair what an interrupted earlier run left beside `out`, and say so."""
    try:
        lines = atomic.recover_leftovers(out, dry_run=options.dry_run)
    except OSError as exc:
        raise ConversionError(f"cannot repair the leftovers of an earlier run beside {out}: {exc}") from None
    for line in lines:
        log(f"note: {line}")


def convert(options: ConvertOptions) -> ConvertResult:
    """Convert `options.src` into a ready Hub repo at `options.out` (see ConvertOptions); raises ConversionError
    (or another ToolError) with a one-paragraph message when it cannot. Nothing is left behind on failure."""

    def log(msg: str) -> None:
        if not options.quiet:
            print(msg, file=sys.stderr)

    chunk = parse_size(options.read_chunk_size, "--read-chunk-size", READ_CHUNK_BOUNDS)
    parse_size(options.max_shard_size)  # both size options are checked before any file is opened
    nonblank_path(options.src, "--src")
    if options.config is not None:
        nonblank_path(options.config, "--config")
    out = output_path(options.out)
    if options.dry_run:  # writes nothing, so it takes no lock (and creates no lock file)
        return _convert(options, out, chunk, log)
    try:
        with locked_target(out):
            return _convert(options, out, chunk, log)
    except atomic.TargetWriteError as exc:  # the lock (or a parent folder) could not be created
        raise _target_error(exc, out, out.exists() or out.is_symlink(), None) from None


def _convert(options: ConvertOptions, out: Path, chunk: int, log) -> ConvertResult:
    """`convert` once the target is ours (locked, or a dry run)."""
    _recover(out, options, log)
    src = open_source(options)
    try:
        check_target(out, src, options.force)
        plan = build_plan(src, options)
        if options.dry_run:
            print(describe_plan(plan, out))
            print("dry run: nothing was written.")
            return ConvertResult(out, plan, src.bytes_read, written=False)
        for note in plan.notes:
            log(f"note: {note}")
        total = f" of {human(src.total_bytes)}" if src.total_bytes else ""
        log(f"converting {src.loc.display} [{src.key_style}] -> {out}: {len(plan.items)} tensors, "
            f"{human(plan.total_read_bytes)} to read{total}")  # fmt: skip
        _write(plan, out, options, chunk)
        log(f"wrote {out} ({', '.join(output_file_list(plan))}); read {human(src.bytes_read)} from the source "
            f"({src.bytes_read} bytes); every tensor verified against its sha256.")  # fmt: skip
        result = ConvertResult(out, plan, src.bytes_read)
        if options.push_to_hub:
            result.url = push_to_hub(out, options, plan)
            log(f"uploaded to {result.url}" + (f" (revision {options.revision})" if options.revision else ""))
        return result
    finally:
        src.close()
