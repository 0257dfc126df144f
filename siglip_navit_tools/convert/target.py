# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""What the converter may do at `--out`: the rules, checked at the start AND again right before the final rename.

Owns: `--out` as a path (never empty: that would be the current directory), "never over the source" (by the paths as
given and by what they resolve to, for the source itself and every file it reads: weights, index, config, card),
"never over existing data without --force", and what --force may replace (only a folder that looks like a checkpoint:
config.json or *.safetensors, and nothing a model repo does not hold; anything else is listed and refused), and the
lock that keeps a second converter away from the same --out while one writes (`.OUT.lock` beside it, removed after).
Must not write, rename or delete anything at --out itself (`io.atomic` does, after these checks).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Optional

from ..io import atomic
from ..io.files import NotARegularFile
from ..io.lock import FileLock, LockBusy
from ..repo_code import HUB_CODE_FILES
from .options import ConversionError, nonblank_path
from .sources import Source

# What a model repo holds, and so what --force may delete: our own files (write.py's SIDE_FILES and index, the code
# files), any safetensors weights / index, and the Hub's bookkeeping (`.gitattributes`; `hf download --local-dir`
# keeps a `.cache/huggingface/` folder). Only `config.json` or weights make a folder "a checkpoint".
REPO_FILES = {"config.json", "preprocessor_config.json", "README.md", ".gitattributes", *HUB_CODE_FILES}
REPO_FOLDERS = {".cache"}
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")
LISTED = 10  # foreign entries named in a refusal


def output_path(text: str) -> Path:
    """`--out` as an absolute path (`~` expanded); an empty or blank one is refused (`nonblank_path`)."""
    return Path(os.path.abspath(os.path.expanduser(nonblank_path(text, "--out"))))


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


@contextlib.contextmanager
def locked_target(out: Path) -> Iterator[None]:
    """Hold `.OUT.lock` (beside --out, created with any missing parent folder) while the block runs; another converter
    writing the same --out is one paragraph; parents created here and left empty are removed again at the end."""
    made: list[Path] = []
    try:
        with atomic.target_errors(lock_path(out)):
            made = atomic.make_parents(out)
            lock = FileLock(lock_path(out), remove=True)
    except LockBusy:
        raise ConversionError(
            f"--out {out} is being written by another convert_checkpoint.py run (it holds {lock_path(out)}); nothing "
            "was changed. Wait for that run to finish, or choose another --out."
        ) from None
    except NotARegularFile as exc:
        raise ConversionError(
            f"{lock_path(out)} (the lock beside --out) is {exc.kind or 'not a regular file'}, not a file of this "
            "converter; nothing was changed. Remove it, or choose another --out."
        ) from None
    try:
        yield
    finally:
        lock.release()
        if not (out.exists() or out.is_symlink()):
            atomic.remove_made_parents(made)


# ---- never over the source -----------------------------------------------------------------------------------------
def _source_locations(src: Source) -> list:
    """Every local Location the conversion reads: the source as given, its weight files, the index, config and card."""
    locs = [src.loc, src.config_loc, *src.keys.values(), *(f.loc for f in src.files.values())]
    if src.loc.is_local:
        folder = src.loc if src.loc.isdir() else src.loc.parent()
        locs.append(folder.join("README.md"))
    return [loc for loc in locs if loc is not None and loc.is_local]


def source_paths(src: Source) -> set[str]:
    """The source's local paths as given AND as resolved (symlinks followed): both must stay clear of --out."""
    paths: set[str] = set()
    for path in {loc.path for loc in _source_locations(src)}:
        if os.path.lexists(path):
            paths.update({os.path.abspath(path), os.path.realpath(path)})
    return paths


def _within(path: str, folder: str) -> bool:
    """`path` is `folder` or lies inside it (both absolute)."""
    try:
        return os.path.commonpath([path, folder]) == folder
    except ValueError:  # different drives
        return False


def check_not_source(out: Path, src: Source) -> None:
    """--out must not be, contain or lie inside anything the source reads, by the paths as given or resolved: a
    --force over it would delete the source (or, through a symlink, the files it points to)."""
    outs = {os.path.abspath(out), os.path.realpath(out)}
    for path in sorted(source_paths(src)):
        for o in sorted(outs):
            if _within(path, o) or _within(o, path):
                relation = "is" if path == o else ("contains" if _within(path, o) else "lies inside")
                shown = "" if o == str(out) else f" (resolved: {o})"
                raise ConversionError(
                    f"refusing to write to {out}{shown}: it {relation} {path}, which the source {src.loc.display} "
                    "reads. Choose an --out outside the source and outside every folder its files resolve to."
                )


# ---- what is at --out ----------------------------------------------------------------------------------------------
def _is_repo_entry(entry: os.DirEntry) -> bool:
    if entry.is_dir(follow_symlinks=False):
        return entry.name in REPO_FOLDERS
    return entry.name in REPO_FILES or entry.name.endswith(WEIGHT_SUFFIXES)


def _shown(entry: os.DirEntry) -> str:
    if entry.is_symlink():
        return f"{entry.name} (a symlink)"
    return entry.name + ("/" if entry.is_dir() else "")


def force_refusal(out: Path) -> Optional[str]:
    """Why --force must not replace the existing directory `out` (None: it looks like a checkpoint folder): it must
    hold config.json or weights, and only what a model repo holds; otherwise the reason names every foreign entry
    (up to LISTED) and how many entries in all would have been deleted."""
    with os.scandir(out) as it:
        entries = sorted(it, key=lambda e: e.name)
    foreign = [e for e in entries if not _is_repo_entry(e)]
    looks = any(e.name == "config.json" or e.name.endswith(WEIGHT_SUFFIXES) for e in entries)
    if looks and not foreign:
        return None
    more = f", ... ({len(foreign) - LISTED} more)" if len(foreign) > LISTED else ""
    names = ", ".join(_shown(e) for e in foreign[:LISTED]) + more
    why = f"it holds {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} no model repo has ({names})" if foreign \
        else "it holds no config.json and no *.safetensors"
    return (
        f"--out {out} does not look like a checkpoint folder: {why}; --force would have deleted all {len(entries)} "
        "of its entries. --force replaces only a folder holding config.json or *.safetensors and nothing but "
        "model-repo files; nothing was changed. Move those files away, or choose another --out."
    )


def check_target(out: Path, src: Source, force: bool) -> None:
    """The rules for --out, in the state it is in NOW (called at the start and again right before the rename): never
    the source; missing or an empty folder; or, with `force`, a checkpoint folder or a symlink (only the link is
    replaced, never what it points to)."""
    check_not_source(out, src)
    if out.is_symlink():
        target = os.readlink(out)
        empty = out.is_dir() and not any(out.iterdir())
        if force:
            return
        what = "an empty folder" if empty else ("a folder" if out.is_dir() else "something that is not a folder")
        raise ConversionError(
            f"--out {out} is a symlink to {what} ({target}), not a folder: the converter puts its output in place with "
            "a rename, which would replace the link, not fill what it points to. Pass the real folder as --out "
            f"({os.path.realpath(out)}), or --force to replace the link itself (what it points to is never touched)."
        )
    if not out.exists():
        return
    if not out.is_dir():
        raise ConversionError(
            f"--out {out} exists and is not a folder; nothing was changed (--force replaces only a checkpoint "
            "folder). Remove it yourself, or choose another --out."
        )
    if not any(out.iterdir()):
        return
    if not force:
        raise ConversionError(
            f"target {out} already exists and is not empty; pass --force to replace it (only a checkpoint folder is "
            "replaced, and only after the new checkpoint has been written and verified)."
        )
    refusal = force_refusal(out)
    if refusal is not None:
        raise ConversionError(refusal)
