# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""Checkpoint sources: which files hold the weights, what layout they are in, and the pickle policy.

Owns `open_source` (a directory, file, index or URL -> `Source`: every key and the file it lives in, the config,
the card's metadata), format detection from tensor names, and `PickleFile`, the only place a pickle is ever loaded
(`torch.load(weights_only=True)`, local files only, and only with `allow_pickle`). Reads headers, never tensor
data (that is `write.iter_source_tensors`), and must not decide what is kept (that is the key map and the plan).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from ..io.locations import Location, LocationError
from ..io.safetensors import SafetensorsFile, TensorInfo
from .hub import card_metadata
from .options import ConversionError, ConvertOptions

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
STYLES = {  # what the model card and the log call a forced --source-format
    "bagel": "BAGEL checkpoint ({prefix}* tensors)",
    "siglip": "stock SigLIP",
    "siglip-navit": "SigLIP-NaViT (this repo, vision_model.*)",
}


class PickleFile:
    """A pickle checkpoint, loaded only with torch.load(weights_only=True) (tensors and plain containers only)."""

    def __init__(self, loc: Location):
        self.loc = loc
        self.bytes_read = 0  # loaded whole, not read by range: nothing to count
        if not loc.is_local:
            raise ConversionError(
                f"{loc.display} is a pickle checkpoint on a remote filesystem; pickle sources must be local files "
                "(download it first, or use a safetensors source)."
            )
        obj = _load_weights_only(loc)
        for wrapper in ("state_dict", "model"):
            if isinstance(obj, dict) and set(obj) == {wrapper} and isinstance(obj[wrapper], dict):
                obj = obj[wrapper]
        if not isinstance(obj, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
            raise ConversionError(f"{loc.display} does not hold a flat {{name: tensor}} state dict.")
        self.state_dict: dict[str, torch.Tensor] = obj
        # offsets mean nothing in a pickle: each tensor spans 0..nbytes of its own storage
        self.tensors = {
            k: TensorInfo(k, v.dtype, tuple(v.shape), 0, v.numel() * v.element_size()) for k, v in obj.items()
        }

    def close(self) -> None:
        self.state_dict = {}


def _load_weights_only(loc: Location) -> object:
    loc.check_regular()  # torch.load opens the path itself (mmap needs it): a FIFO would block it
    try:
        try:
            return torch.load(loc.path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc) and "zip" not in str(exc):
                raise
            return torch.load(loc.path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as exc:  # noqa: BLE001 - turned into one clear message
        raise ConversionError(
            f"refusing to load {loc.display}: torch.load(weights_only=True) rejected it ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Only plain tensor state dicts are accepted; "
            "a pickle that needs arbitrary objects could run code and is never unpickled by this tool."
        ) from exc


WeightFile = Union[SafetensorsFile, PickleFile]


@dataclass(frozen=True)
class TensorEntry:
    """One source tensor and the opened file it lives in."""

    info: TensorInfo
    file: WeightFile


@dataclass
class Source:
    loc: Location
    format: str  # "bagel" | "siglip" | "siglip-navit"
    key_style: str  # the layout in words, for the log and the model card
    weight_files: list[str]  # display names
    keys: dict[str, Location]  # every key in the checkpoint -> the file it lives in
    files: dict[str, WeightFile] = field(default_factory=dict)  # file display -> opened file (header only)
    entries: dict[str, TensorEntry] = field(default_factory=dict)  # the opened keys
    config_dict: Optional[dict] = None
    config_loc: Optional[Location] = None
    card: dict = field(default_factory=dict)  # `license` / `base_model` of the source's model card
    total_bytes: int = 0  # size of the weight files
    pickle: bool = False

    @property
    def bytes_read(self) -> int:
        return sum(f.bytes_read for f in self.files.values())

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def is_pickle_name(name: str) -> bool:
    return name.endswith(PICKLE_SUFFIXES) or name.endswith(".bin.index.json")


def _only(loc: Location, names: list[str], what: str, pick: str = "file") -> Optional[Location]:
    """The one file among `names`, None for none; several is an error asking for the one to convert."""
    if len(names) > 1:
        listed = ", ".join(names)
        raise ConversionError(f"{loc.display} holds several {what} ({listed}); pass the {pick} to convert as --src.")
    return loc.join(names[0]) if names else None


def pick_weight_files(loc: Location) -> tuple[list[Location], Optional[Location]]:
    """Weights of a directory: (files, index). Prefers ema.safetensors, then a safetensors index, then one file."""
    names = loc.listdir()
    if "ema.safetensors" in names:
        return [loc.join("ema.safetensors")], None
    index = _only(loc, [n for n in names if n.endswith(".safetensors.index.json")], "safetensors indexes", "one")
    if index is not None:
        return [], index
    st = [n for n in names if n.endswith(".safetensors")]
    if "model.safetensors" in st:
        return [loc.join("model.safetensors")], None
    single = _only(loc, st, ".safetensors files and no index")
    if single is not None:
        return [single], None
    pickles = [n for n in names if is_pickle_name(n)]
    bin_indexes = [n for n in pickles if n.endswith(".index.json")]
    if bin_indexes:
        return [], loc.join(bin_indexes[0])
    single = _only(loc, pickles, "pickle checkpoints")
    if single is not None:
        return [single], None
    raise ConversionError(
        f"{loc.display} contains no checkpoint: no ema.safetensors, *.safetensors, safetensors index or pickle file."
    )


def read_json(loc: Location, what: str) -> dict:
    try:
        data = json.loads(loc.read_text())
    except RecursionError:
        raise ConversionError(f"cannot read {what} {loc.display}: its JSON is nested too deeply.") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # ValueError: JSONDecodeError, an int too long
        raise ConversionError(f"cannot read {what} {loc.display}: {str(exc)[:300]}") from exc
    if not isinstance(data, dict):
        raise ConversionError(f"{what} {loc.display} is not a JSON object.")
    return data


def _card_of(folder: Location) -> dict:
    """`license` / `base_model` of the model card beside the source, if there is one (the card is optional)."""
    readme = folder.join("README.md")
    try:
        return card_metadata(readme.read_text()) if readme.isfile() else {}
    except Exception:  # noqa: BLE001 - an unreadable card is no card
        return {}


def detect_format(keys: list[str], vit_prefix: str, config_dict: Optional[dict]) -> tuple[str, str]:
    """(format, key style) of a checkpoint from its tensor names (and model_type when a config is at hand)."""
    keyset = set(keys)
    if any(k.startswith(vit_prefix) for k in keys):
        return "bagel", STYLES["bagel"].format(prefix=vit_prefix)
    has_vision = any(k.startswith("vision_model.") for k in keys)
    if has_vision and (any(k.startswith("text_model.") for k in keys) or "logit_scale" in keyset):
        return "siglip", "SiglipModel (vision_model.* + text_model.* + logit_*)"
    model_type = (config_dict or {}).get("model_type")
    if has_vision:
        if model_type == "siglip_navit":
            return "siglip-navit", STYLES["siglip-navit"]
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


def _forced_format(fmt: str, keys: list[str], vit_prefix: str, where: str) -> tuple[str, str]:
    """--source-format given: check the tensor names agree, and name the style."""
    if fmt == "bagel" and not any(k.startswith(vit_prefix) for k in keys):
        raise ConversionError(
            f"--source-format bagel, but {where} has no {vit_prefix}* tensors (pass --vit-prefix if this BAGEL "
            "variant stores its ViT under another name)."
        )
    if fmt == "siglip" and not any(k.startswith(("vision_model.", "embeddings.")) for k in keys):
        raise ConversionError(f"--source-format siglip, but {where} has no vision_model.* / embeddings.* tensors.")
    return fmt, STYLES[fmt].format(prefix=vit_prefix)


def _locate(options: ConvertOptions) -> tuple[Location, Location, list[Location], Optional[Location]]:
    """(source, its folder, weight files, index) of `options.src`, without reading any weights."""
    loc = Location.parse(options.src)
    try:
        exists = loc.exists()
    except Exception as exc:  # noqa: BLE001 - network / permission errors of remote filesystems
        raise ConversionError(f"cannot access source {options.src!r}: {type(exc).__name__}: {exc}") from exc
    if not exists:
        hint = "" if loc.is_local else " (or cannot be reached: check the URL, your network and, for hf://, your token)"
        raise ConversionError(f"source {options.src!r} does not exist{hint}.")
    if loc.isdir():
        return (loc, loc, *pick_weight_files(loc))
    if loc.name.endswith(".index.json"):
        return loc, loc.parent(), [], loc
    if loc.name.endswith(".safetensors") or is_pickle_name(loc.name):
        return loc, loc.parent(), [loc], None
    raise ConversionError(
        f"{loc.display} is neither a .safetensors file, a safetensors index nor a directory "
        f"(pickle files {', '.join(PICKLE_SUFFIXES)} need --allow-pickle)."
    )


def _index_keys(index: Location, allow_pickle: bool) -> tuple[dict[str, Location], list[Location]]:
    """Every key of a sharded checkpoint -> its file, and the files (sorted by name), from the index alone. Every
    file it names must be a weight file inside the index's folder (`Location.child_within`): never an absolute path,
    `..` or a symlink out of it, and a .safetensors file (or, with allow_pickle, a pickle checkpoint)."""
    weight_map = read_json(index, "index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConversionError(f"index {index.display} has no weight_map.")
    base = index.parent()
    suffixes = (".safetensors", *PICKLE_SUFFIXES) if allow_pickle else (".safetensors",)
    files: dict[str, Location] = {}
    for value in {v if isinstance(v, str) else repr(v): v for v in weight_map.values()}.values():
        name = value if isinstance(value, str) else ""
        if not name.endswith(suffixes):
            raise ConversionError(
                f"index {index.display}: its weight_map names {str(value)[:200]!r}, which is not a "
                f"{' / '.join(suffixes)} file" + ("" if allow_pickle else " (pickle shards need --allow-pickle)")
                + "; nothing was opened."
            )
        try:
            files[name] = base.child_within(name, f"index {index.display}: its weight_map")
        except LocationError as exc:
            raise ConversionError(f"{exc} Nothing was opened.") from None
    keys = {key: files[name] for key, name in weight_map.items()}
    return keys, [files[name] for name in sorted(files)]


def _refuse_pickle(first: Location) -> None:
    raise ConversionError(
        f"{first.display} is a pickle checkpoint. Unpickling can run arbitrary code, so it is refused unless you "
        "pass --allow-pickle; even then it is loaded only with torch.load(weights_only=True), which accepts tensors "
        "and plain containers only. Prefer a .safetensors source."
    )


def _config_beside(folder: Location, fmt: str) -> tuple[Optional[dict], Optional[Location]]:
    """The config beside the weights: vit_config.json for BAGEL, config.json otherwise."""
    candidate = folder.join("vit_config.json" if fmt == "bagel" else "config.json")
    return (read_json(candidate, "config"), candidate) if candidate.exists() else (None, None)


def _probe_config(folder: Location) -> Optional[dict]:
    """config.json beside the weights, only to tell the formats apart (a broken one is ignored here)."""
    with contextlib.suppress(ConversionError):
        return _config_beside(folder, "auto")[0]
    return None


def _open_files(files: list[Location], is_pickle: bool) -> tuple[dict[str, Location], dict[str, WeightFile]]:
    """Open every file of an unindexed checkpoint (headers only): key -> file, and the opened files."""
    keys: dict[str, Location] = {}
    opened: dict[str, WeightFile] = {}
    for f in files:
        opened[f.display] = handle = PickleFile(f) if is_pickle else SafetensorsFile(f)
        keys.update((key, f) for key in handle.tensors)
    return keys, opened


def open_source(options: ConvertOptions) -> Source:
    """Find the weights of `options.src`, map every key to its file (headers only) and detect the format."""
    loc, folder, files, index = _locate(options)
    keys: dict[str, Location] = {}
    opened: dict[str, WeightFile] = {}
    if index is not None:
        keys, files = _index_keys(index, options.allow_pickle or is_pickle_name(index.name))
    is_pickle = any(is_pickle_name(f.name) for f in files) or (index is not None and is_pickle_name(index.name))
    if is_pickle and not options.allow_pickle:
        _refuse_pickle(index or files[0])
    if index is None:
        keys, opened = _open_files(files, is_pickle)
    total_bytes = 0
    for f in files:
        with contextlib.suppress(Exception):
            total_bytes += f.size()
    config_dict = config_loc = None
    if options.config:
        config_loc = Location.parse(options.config)
        config_dict = read_json(config_loc, "config")
    if options.source_format == "auto":
        probe = config_dict if config_dict is not None else _probe_config(folder)
        fmt, style = detect_format(list(keys), options.vit_prefix, probe)
    else:
        fmt, style = _forced_format(options.source_format, list(keys), options.vit_prefix, loc.display)
    if config_dict is None:
        config_dict, config_loc = _config_beside(folder, fmt)
    return Source(
        loc=loc, format=fmt, key_style=style, weight_files=[f.display for f in files], keys=keys, files=opened,
        config_dict=config_dict, config_loc=config_loc, card=_card_of(folder), total_bytes=total_bytes,
        pickle=is_pickle,
    )  # fmt: skip


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
        if key not in handle.tensors:
            raise ConversionError(f"the index says {key!r} is in {floc.display}, but that file has no such tensor.")
        src.entries[key] = TensorEntry(handle.tensors[key], handle)
