"""Helpers of tests/convert: tiny checkpoints in BAGEL's and stock SigLIP's layouts (made in the test: 2 layers,
hidden 32, a 6x6 patch grid; nothing is downloaded), the converter run in-process, loading its output, comparing outputs."""

import contextlib
import json
import logging
import warnings
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file

from siglip_navit_tools.convert import cli as convert_cli
from siglip_navit_tools.testing import make_model, make_pack, randomize_, unique_dir

TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])
FP32 = {"dtype" if TRANSFORMERS_MAJOR >= 5 else "torch_dtype": torch.float32}
TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=24, patch_size=4)
# BAGEL's own vit_config.json carries only these keys (hidden_act / eps / channels absent -> defaults)
BAGEL_VIT_CONFIG = {
    "hidden_size": 32,
    "image_size": 24,
    "intermediate_size": 48,
    "model_type": "siglip_vision_model",
    "num_attention_heads": 4,
    "num_hidden_layers": 3,  # BAGEL: the file says one more layer than the checkpoint stores
    "patch_size": 4,
}
BAGEL_OTHER = {  # the other prefixes of BAGEL's ema.safetensors; the language model is the big one
    "connector.fc1.weight": (16, 32),
    "connector.fc1.bias": (16,),
    "connector.fc2.weight": (16, 16),
    "vit_pos_embed.pos_embed": (36, 16),
    "language_model.model.embed_tokens.weight": (512, 256),
    "language_model.model.layers.0.mlp.down_proj.weight": (64, 64),
    "time_embedder.mlp.0.weight": (16, 16),
    "vae2llm.weight": (16, 16),
    "llm2vae.weight": (16, 16),
    "latent_pos_embed.pos_embed": (36, 16),
}
PACK_GRIDS = [(6, 6), (3, 5), (2, 2)]


def convert(*args) -> int:
    return convert_cli.main([str(a) for a in args] + ["--no-progress"])


@contextlib.contextmanager
def no_warnings():
    """Fail on any Python warning or transformers log record at WARNING or above inside the block."""
    records = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    tlog = logging.getLogger("transformers")
    tlog.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        tlog.removeHandler(handler)
    messages = [r.getMessage() for r in records] + [f"{w.category.__name__}: {w.message}" for w in caught]
    assert not messages, messages


def load_ours(path: Path):
    """AutoModel + trust_remote_code, fp32, asserting no warnings and no missing / unexpected / mismatched keys."""
    with no_warnings():
        model, info = transformers.AutoModel.from_pretrained(
            str(path), trust_remote_code=True, output_loading_info=True, **FP32
        )
    assert info["missing_keys"] in ([], set()) and info["unexpected_keys"] in ([], set()), info
    assert not info.get("mismatched_keys"), info
    assert type(model).__name__ == "SiglipVisionModel" and type(model).__module__ != "transformers.models.siglip.modeling_siglip"
    return model.eval()


def load_stock(path: Path):
    """Plain transformers SiglipVisionModel, NO trust_remote_code."""
    with no_warnings():
        model, info = transformers.SiglipVisionModel.from_pretrained(str(path), output_loading_info=True, **FP32)
    assert info["missing_keys"] in ([], set()) and info["unexpected_keys"] in ([], set()), info
    assert not info.get("mismatched_keys"), info
    return model.eval()


def packed_out(model, config, grids=PACK_GRIDS):
    with torch.no_grad():
        return model(**make_pack(grids, config)).last_hidden_state


def assert_same_outputs(ref, model, config, grids=PACK_GRIDS):
    a, b = packed_out(ref, config, grids), packed_out(model, config, grids)
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= 1e-5


def round_params_(model, dtype):
    """Round every parameter through `dtype`, so that a checkpoint stored in `dtype` is exactly this model."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).float())
    return model


def make_bagel(tmp_path, *, layers=2, config_layers=3, dtype=torch.bfloat16, seed=0, extra=None, drop=(),
               vit_config=True, prefix="vit_model.", name="bagel"):
    """A BAGEL model directory: ema.safetensors (real key prefixes) + vit_config.json. Returns (dir, reference)."""
    ref = round_params_(make_model(num_hidden_layers=layers, seed=seed), dtype)
    gen = torch.Generator().manual_seed(seed + 100)
    tensors = {prefix + k: v.to(dtype) for k, v in ref.state_dict().items()}
    for k, shape in BAGEL_OTHER.items():
        tensors[k] = torch.randn(shape, generator=gen)
    tensors.update(extra or {})
    for k in drop:
        tensors.pop(k)
    d = unique_dir(tmp_path, name)
    d.mkdir()
    save_file(tensors, str(d / "ema.safetensors"), metadata={"format": "pt"})
    if vit_config:
        (d / "vit_config.json").write_text(json.dumps({**BAGEL_VIT_CONFIG, "num_hidden_layers": config_layers}))
    return d, ref


def stock_vision_model(seed=0, **overrides):
    cfg = transformers.SiglipVisionConfig(**{**TINY, **overrides}, vision_use_head=True)
    model = transformers.SiglipVisionModel(cfg)
    return randomize_(model, seed).eval()


def stock_state(model) -> dict:
    """A stock vision model's tensors with `vision_model.` prefix, whatever the installed transformers saves."""
    sd = model.state_dict()
    return {(k if k.startswith("vision_model.") else "vision_model." + k): v.clone() for k, v in sd.items()}


def write_stock(tmp_path, style: str, seed=0, **overrides):
    """A stock SigLIP checkpoint dir in one key style. Returns (dir, stock vision model usable with pixel_values)."""
    d = unique_dir(tmp_path, f"stock_{style}")
    if style == "siglip-full":
        text = transformers.SiglipTextConfig(
            hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, vocab_size=50,
            max_position_embeddings=8, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )
        vision = transformers.SiglipVisionConfig(**{**TINY, **overrides}, vision_use_head=True)
        full = transformers.SiglipModel(transformers.SiglipConfig(text_config=text.to_dict(), vision_config=vision.to_dict()))
        randomize_(full, seed).eval()
        full.save_pretrained(str(d))
        return d, full.vision_model
    model = stock_vision_model(seed, **overrides)
    if style == "save_pretrained":  # whatever the installed major writes
        model.save_pretrained(str(d))
        return d, model
    d.mkdir()
    sd = stock_state(model)
    if style == "vision-5x":  # transformers 5.x SiglipVisionModel: unprefixed
        sd = {k[len("vision_model.") :]: v for k, v in sd.items()}
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(model.config.to_dict()))
    return d, model


def patchify(pixels: torch.Tensor, patch: int) -> torch.Tensor:
    """(C, H, W) -> (n, P*P*C): patches row-major, (row, col, channel) inside a patch (DESIGN's rule)."""
    c, h, w = pixels.shape
    x = pixels.reshape(c, h // patch, patch, w // patch, patch).permute(1, 3, 2, 4, 0)
    return x.reshape((h // patch) * (w // patch), patch * patch * c)


def ours_on_native_grid(model, pixels, patch):
    grid = pixels.shape[-1] // patch
    n = grid * grid
    with torch.no_grad():
        return model(
            packed_pixel_values=patchify(pixels, patch),
            packed_flattened_position_ids=torch.arange(n),
            cu_seqlens=torch.tensor([0, n], dtype=torch.int32),
            max_seqlen=n,
        ).last_hidden_state


def stock_on_image(stock, pixels):
    with torch.no_grad():
        return stock(pixel_values=pixels[None]).last_hidden_state[0]


def tensors_of(path: Path) -> dict:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def one_paragraph(err: str) -> str:
    """The error line, which must be the last one and a single paragraph (notes logged before it are fine)."""
    lines = err.strip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert starts and starts[0] == len(lines) - 1, err
    text = lines[-1]
    assert "unexpected" not in text, text
    return text
