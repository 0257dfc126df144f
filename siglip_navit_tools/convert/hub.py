# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""The Hub files of a converted repo: config.json, preprocessor_config.json, the model card, and the upload.

Owns what those files say: the config (trimmed to what both transformers majors read silently), the processor
settings (asked of `SiglipNaViTImageProcessor.settings_for_model`, plus the auto_map), the model card (front matter
through huggingface_hub's `ModelCardData`, which also reads a source's card), and `push_to_hub`. Must not read or
write weights, nor write files itself (the writer does), nor state a fact the code or README owns: the auto_map and
architectures come from the registered classes (`repo_code`), the measured CPU figures from README's marked section.
"""

from __future__ import annotations

import json
import os
import re
from typing import TYPE_CHECKING, Optional, Union

from huggingface_hub import ModelCard, ModelCardData

from ..io.files import read_regular_text
from ..repo_code import (
    REPO_ROOT, architectures, config_auto_map, custom_pipelines, image_processing, pipeline, processor_auto_map,
    template_config,
)  # fmt: skip
from .options import DEFAULT_LICENSE, ConversionError, ConvertOptions

if TYPE_CHECKING:  # the plan imports the sources, which read cards through this module
    from .plan import Plan

BAGEL_REPO_ID = "ByteDance-Seed/BAGEL-7B-MoT"
BaseModel = Union[str, list[str]]


# ---- config.json / preprocessor_config.json -------------------------------------------------------------------
def _config_dict(plan: "Plan", head: dict, tail: dict) -> dict:
    """`head` + the tower's fields + `tail` + dtype (4.49 reads `torch_dtype`, 5.x `dtype`: both are written)."""
    import transformers

    from .config import CONFIG_FIELDS

    d = {**head, **{k: getattr(plan.config, k) for k in CONFIG_FIELDS}, **tail}
    d.update(vision_use_head=False, torch_dtype=plan.dtype_name, dtype=plan.dtype_name)
    d["transformers_version"] = transformers.__version__
    return d


def navit_config_dict(plan: "Plan") -> dict:
    """config.json of this repo's layout, trimmed to what every transformers major reads silently."""
    head = {"architectures": architectures(), "auto_map": config_auto_map(), "model_type": plan.config.model_type}
    return _config_dict(plan, head, {"rope": bool(plan.config.rope), "custom_pipelines": custom_pipelines()})


def stock_config_dict(plan: "Plan") -> dict:
    return _config_dict(plan, {"architectures": ["SiglipVisionModel"], "model_type": "siglip_vision_model"}, {})


def navit_preprocessor_dict(config) -> dict:
    """preprocessor_config.json: the repo's template (else BAGEL's settings) with the model's geometry filled in."""
    path = REPO_ROOT / "preprocessor_config.json"
    template = json.loads(read_regular_text(path)) if path.is_file() else None
    settings = image_processing().SiglipNaViTImageProcessor.settings_for_model(config, template)
    return {"auto_map": processor_auto_map(), **settings}


def stock_preprocessor_dict(config) -> dict:
    return {
        "image_processor_type": "SiglipImageProcessor",
        "do_resize": True,
        "size": {"height": config.image_size, "width": config.image_size},
        "resample": 3,  # bicubic
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }


# ---- model card -------------------------------------------------------------------------------------------------
def card_metadata(text: str) -> dict:
    """`license` and `base_model` (a string or a list of repo ids, as the card says) of a model card's front matter;
    {} without front matter."""
    if not text.lstrip().startswith("---"):
        return {}
    data = ModelCard(text).data
    meta: dict = {}
    if isinstance(data.license, str):
        meta["license"] = data.license
    base = data.base_model
    if isinstance(base, list):
        base = [b for b in base if isinstance(b, str)]
    if base and isinstance(base, (str, list)):
        meta["base_model"] = base
    return meta


def hf_repo_id(spec: str) -> Optional[str]:
    """`org/name` of an `hf://org/name[@rev][/path]` model URL, else None."""
    if not spec.startswith("hf://"):
        return None
    parts = spec[len("hf://") :].split("/")
    if len(parts) < 2 or parts[0] in ("datasets", "spaces"):
        return None
    return f"{parts[0]}/{parts[1].split('@')[0]}"


def base_model(plan: "Plan", options: ConvertOptions) -> Optional[BaseModel]:
    """--base-model, else the hf:// repo converted, else what the source says it derives from."""
    if options.base_model:
        return options.base_model
    repo = hf_repo_id(options.src)
    if repo:
        return repo
    src, c = plan.source, plan.config
    if src.format == "siglip-navit" and src.card.get("base_model"):
        return src.card["base_model"]
    if src.format == "bagel":
        geometry = (c.hidden_size, c.patch_size, c.image_size, plan.layers_stored)
        return BAGEL_REPO_ID if geometry == bagel_geometry() else None
    name = (src.config_dict or {}).get("_name_or_path")
    return name if isinstance(name, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", name) else None


def bagel_geometry() -> tuple[int, int, int, int]:
    """(hidden, patch, image, stored layers) of BAGEL-7B-MoT's tower: the repo root's config.json (its template)."""
    t = template_config()
    return t["hidden_size"], t["patch_size"], t["image_size"], t["num_hidden_layers"]


def human(n: float) -> str:
    """Bytes in decimal units: `812 B`, `0.81 GB`."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


CARD_BODY = """# {title}

{summary}

## Converted from

| | |
|---|---|
| source | `{source}` |
| source format | {source_format} |
| weight file(s) | {weight_files} |
| tensors read | {tensors_read} of {tensors_total} ({bytes_read} of {bytes_total}) |
| dropped | {dropped} |
| layers | {layers} |
| geometry | hidden {hidden}, {heads} heads, MLP {intermediate}, patch {patch}, image {image} px ({side}x{side} patch grid), rope={rope} |
| dtype | {dtype} |
| license | {license} (the source weights' license{license_note}) |
{notes}
## How it was converted

```bash
{command}
```

with `convert_checkpoint.py` from the SigLIP-NaViT repo, which:

{steps}

## Usage

{usage}
"""

NAVIT_USAGE = """```python
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel

repo = "{repo}"
processor = AutoImageProcessor.from_pretrained(repo, trust_remote_code=True)
# on transformers 4.x write torch_dtype= instead of dtype= (CPU dtype: see below)
model = AutoModel.from_pretrained(repo, trust_remote_code=True, dtype=torch.float32).eval()

images = [Image.open("a.jpg"), Image.open("b.png")]        # any sizes: one packed batch, no padding
inputs = processor(images, return_tensors="pt")
with torch.no_grad():
    features = model(**inputs).last_hidden_state             # (total_patches, {hidden})
maps = processor.unpack(features, inputs)                    # one (h, w, {hidden}) map per image
```

Or the repo's own pipeline (packs a batch into ONE forward, never pads; `pool=True` is the mean over an image's
patches, as BAGEL's tower has no pooling head):

```python
from transformers import pipeline

extractor = pipeline("image-feature-extraction", model=repo, trust_remote_code=True)
vectors = extractor(["a.jpg", "b.png"], pool=True, batch_size=2)   # [[1][{hidden}], [1][{hidden}]]
```

`handler.py` serves the same on Inference Endpoints: `{{"inputs": <base64 image | list>, "parameters": {{"pool": true}}}}`.

**CPU dtype.** {cpu_dtype}
`torch.cpu._is_avx512_bf16_supported()` and `torch.cpu._is_amx_tile_supported()` tell which case you are in.

Export back to a plain transformers checkpoint (no remote code): `python convert_checkpoint.py --src {repo_path}
--out siglip-stock --to stock-siglip`."""

STOCK_USAGE = """```python
import torch
from transformers import SiglipImageProcessor, SiglipVisionModel

model = SiglipVisionModel.from_pretrained("{repo}", dtype=torch.float32)  # transformers 4.x: torch_dtype=
processor = SiglipImageProcessor.from_pretrained("{repo}")
```

A plain transformers `SiglipVisionModel` (no pooling head: `vision_use_head: false`); its `last_hidden_state` on a
{image}x{image} image equals the packed SigLIP-NaViT tower's output for that image."""


# README's section with the measured CPU dtype figures: the ONE place they are written; every card quotes it.
CPU_DTYPE_SECTION = ("<!-- cpu-dtype: the converter copies this into every model card -->", "<!-- /cpu-dtype -->")


def cpu_dtype_note(readme: Optional[os.PathLike] = None) -> str:
    """The measured CPU dtype figures for the card: README's marked section (`CPU_DTYPE_SECTION`)."""
    path = readme if readme is not None else REPO_ROOT / "README.md"
    start, end = CPU_DTYPE_SECTION
    try:
        text = read_regular_text(path)
    except (OSError, ValueError):  # missing, not a regular file, not UTF-8
        text = ""
    first = text.find(start)
    last = text.find(end, first + 1) if first >= 0 else -1
    if last < 0:
        raise ConversionError(
            f"{path} lacks the section between {start!r} and {end!r} (the measured CPU dtype figures every model card "
            "quotes): run the converter from a complete checkout of the SigLIP-NaViT repo."
        )
    return text[first + len(start) : last].strip()


def _steps(plan: "Plan", options: ConvertOptions) -> list[str]:
    """The card's "How it was converted" list: what this run did, step by step."""
    src, c = plan.source, plan.config
    if src.pickle:
        steps = [
            "loaded the pickle checkpoint with `torch.load(weights_only=True)` (tensors only) and validated every "
            "kept key, shape and dtype against the model before writing anything;"
        ]
    else:
        steps = [
            "read the source's safetensors header and validated every kept key, shape and dtype against the model "
            "before writing anything;",
            f"read only the {len(plan.items)} kept tensors, once ({human(plan.total_read_bytes)}); nothing else of "
            "the source was read;",
        ]
    if src.format == "bagel":
        steps.append(f"renamed `{options.vit_prefix}vision_model.*` to `vision_model.*`;")
    elif src.key_style.endswith("(unprefixed)"):
        steps.append("renamed the unprefixed `embeddings.*` / `encoder.*` / `post_layernorm.*` to `vision_model.*`;")
    transforms = {it.transform for it in plan.items}
    if "conv2d_to_linear" in transforms:
        steps.append(
            "re-laid-out the Conv2d patch embedding `(hidden, C, P, P)` as the packed model's Linear "
            "`(hidden, P*P*C)`: `w.permute(0, 2, 3, 1).reshape(hidden, -1)` (exact; bias unchanged);"
        )
    if "linear_to_conv2d" in transforms:
        steps.append(
            "re-laid-out the Linear patch embedding `(hidden, P*P*C)` as stock SigLIP's Conv2d `(hidden, C, P, P)`: "
            "`w.view(hidden, P, P, C).permute(0, 3, 1, 2)` (the exact inverse; bias unchanged);"
        )
    if c.num_hidden_layers < plan.layers_stored:
        steps.append(f"kept the first {c.num_hidden_layers} of {plan.layers_stored} encoder layers;")
    if options.dtype != "keep":
        steps.append(f"cast the weights to {options.dtype};")
    steps.append("hashed (sha256) every tensor as it was written and verified the written files against those hashes.")
    return steps


def _title_summary_usage(plan: "Plan", options: ConvertOptions, origin: str) -> tuple[str, str, str]:
    c = plan.config
    repo = options.push_to_hub or os.path.basename(os.path.abspath(options.out))
    if plan.to == "stock-siglip":
        summary = (
            f"The vision tower of `{origin}` as a plain transformers `SiglipVisionModel` checkpoint: loads without "
            "`trust_remote_code`."
        )
        usage = STOCK_USAGE.format(repo=repo, image=c.image_size)
        return "SigLIP vision tower (stock transformers layout)", summary, usage
    whose = "BAGEL's" if plan.source.format == "bagel" else "a"
    summary = (
        f"{whose} SigLIP vision tower (from `{origin}`) in the packed, variable-resolution SigLIP-NaViT layout: many "
        "images of different sizes go through one forward call without padding. Load it with `trust_remote_code=True`."
    )
    repo_path = f"hf://{repo}" if options.push_to_hub else repo
    usage = NAVIT_USAGE.format(repo=repo, hidden=c.hidden_size, repo_path=repo_path, cpu_dtype=cpu_dtype_note())
    return "SigLIP-NaViT vision tower", summary, usage


def card_body(plan: "Plan", options: ConvertOptions, license_: str, base: Optional[BaseModel]) -> str:
    """The card below its front matter."""
    src, c = plan.source, plan.config
    origin = (base if isinstance(base, str) else ", ".join(base)) if base else src.loc.display
    title, summary, usage = _title_summary_usage(plan, options, origin)
    layers = f"{c.num_hidden_layers} (the source stores {plan.layers_stored}"
    if plan.layers_config is not None and plan.layers_config != plan.layers_stored:
        layers += f"; its config says {plan.layers_config}"
    return CARD_BODY.format(
        title=title, summary=summary, source=src.loc.display, source_format=src.key_style,
        weight_files=", ".join(f"`{os.path.basename(w)}`" for w in src.weight_files),
        tensors_read=len(plan.items), tensors_total=len(src.keys), bytes_read=human(plan.total_read_bytes),
        bytes_total=human(src.total_bytes) if src.total_bytes else "?",
        dropped="; ".join(f"{reason}: {len(keys)}" for reason, keys in plan.dropped.items()) or "nothing",
        layers=layers + ")", hidden=c.hidden_size, heads=c.num_attention_heads, intermediate=c.intermediate_size,
        patch=c.patch_size, image=c.image_size, side=c.image_size // c.patch_size, rope=c.rope,
        dtype=plan.dtype_name, license=license_, license_note="" if options.license else "; override with --license",
        notes="".join(f"\n> {n}\n" for n in plan.notes), command=options.command_line(),
        steps="\n".join(f"- {x}" for x in _steps(plan, options)), usage=usage,
    )  # fmt: skip


def model_card(plan: "Plan", options: ConvertOptions) -> str:
    """README.md of the converted repo: front matter (ModelCardData) + what was converted, how, and usage."""
    src = plan.source
    stock = plan.to == "stock-siglip"
    tags = ["siglip", "vision", "image-feature-extraction"] if stock else ["custom_code", "siglip", "navit", "vision"]
    if src.format == "bagel":
        tags.append("bagel")
    license_ = options.license or src.card.get("license") or DEFAULT_LICENSE
    base = base_model(plan, options)
    data = ModelCardData(
        library_name="transformers", pipeline_tag=pipeline().TASK, license=license_, base_model=base,
        tags=tags,
    )  # fmt: skip
    body = card_body(plan, options, license_, base)
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


# ---- upload -----------------------------------------------------------------------------------------------------
def push_to_hub(out: os.PathLike, options: ConvertOptions, plan: "Plan") -> str:
    """Upload the finished folder `out` to `options.push_to_hub` (created if missing); returns the repo URL."""
    import huggingface_hub

    repo_id, revision = options.push_to_hub, options.revision
    api = huggingface_hub.HfApi()
    try:
        url = api.create_repo(repo_id, private=True if options.private else None, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        api.upload_folder(
            repo_id=repo_id, folder_path=str(out), repo_type="model", revision=revision,
            commit_message=f"SigLIP-NaViT vision tower converted from {plan.source.loc.display}",
        )  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - network / auth errors become one clear message
        raise ConversionError(
            f"the checkpoint was written to {out}, but uploading it to {repo_id} failed ({type(exc).__name__}: "
            f"{exc}). Log in with `hf auth login` (or set HF_TOKEN) and retry with `hf upload {repo_id} {out}`."
        ) from exc
    return str(url)
