"""Shared test helpers: import the repo-root remote-code files as a package, tiny configs, packs."""

import importlib.util
import json
import shutil
import sys
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
REMOTE_CODE_FILES = ["configuration_siglip_navit.py", "modeling_siglip_navit.py", "image_processing_siglip_navit.py"]

# The remote-code files use relative imports (as the Hub's loader expects): expose the repo root as a
# package named `siglip_navit` so tests can import them directly too.
if "siglip_navit" not in sys.modules:
    _spec = importlib.util.spec_from_loader("siglip_navit", loader=None, is_package=True)
    _pkg = importlib.util.module_from_spec(_spec)
    _pkg.__path__ = [str(ROOT)]
    sys.modules["siglip_navit"] = _pkg

from siglip_navit import configuration_siglip_navit as cfg_mod  # noqa: E402
from siglip_navit import modeling_siglip_navit as model_mod  # noqa: E402


def tiny_config(**overrides) -> "cfg_mod.SiglipNaViTConfig":
    """A 2-layer model on a 6x6 patch grid (patch 4, 24 px): heads of 8 dims so RoPE halves are 4-wide."""
    kwargs = dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_channels=3,
        image_size=24,
        patch_size=4,
        rope=False,
    )
    kwargs.update(overrides)
    return cfg_mod.SiglipNaViTConfig(**kwargs)


def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Give EVERY parameter (biases and LayerNorms too) random values, so no term can silently drop out."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * scale
            if name.endswith("layer_norm1.weight") or name.endswith("layer_norm2.weight") or "post_layernorm.weight" in name:
                noise = noise + 1.0
            p.copy_(noise.to(p.dtype))
    return model


def make_model(config=None, attn="sdpa", seed: int = 0, **overrides):
    config = config if config is not None else tiny_config(**overrides)
    config._attn_implementation = attn
    model = model_mod.SiglipVisionModel(config)
    randomize_(model, seed)
    return model.eval()


def positions_for(h: int, w: int, side: int) -> torch.Tensor:
    """Extrapolate-mode position ids (row * side + col), written independently of the model code."""
    return torch.tensor([i * side + j for i in range(h) for j in range(w)], dtype=torch.long)


def make_pack(grids, config, seed: int = 1):
    """Random pixels for images with the given (h, w) patch grids, packed with their index tensors."""
    gen = torch.Generator().manual_seed(seed)
    side = config.image_size // config.patch_size
    dim = config.num_channels * config.patch_size**2
    pixels = [torch.randn(h * w, dim, generator=gen) for h, w in grids]
    lengths = [h * w for h, w in grids]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)
    return dict(
        packed_pixel_values=torch.cat(pixels),
        packed_flattened_position_ids=torch.cat([positions_for(h, w, side) for h, w in grids]),
        cu_seqlens=cu,
        max_seqlen=max(lengths),
        image_grid_hw=torch.tensor(grids, dtype=torch.long),
    )


def unique_dir(tmp_path: Path, stem: str) -> Path:
    """transformers 4.x caches remote code by folder name: give every saved model its own name."""
    return tmp_path / f"{stem}_{uuid.uuid4().hex[:10]}"


def copy_remote_code(target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for name in REMOTE_CODE_FILES:
        shutil.copy(ROOT / name, target / name)
    return target


def build_hub_dir(tmp_path: Path, config, model, extra_tensors=None) -> Path:
    """What a user downloads: remote-code files + config.json + model.safetensors (format=pt metadata)."""
    target = copy_remote_code(unique_dir(tmp_path, "hubdir"))
    data = config.to_dict()
    data["auto_map"] = {
        "AutoConfig": "configuration_siglip_navit.SiglipNaViTConfig",
        "AutoModel": "modeling_siglip_navit.SiglipVisionModel",
    }
    data.pop("_attn_implementation_autoset", None)
    (target / "config.json").write_text(json.dumps(data, indent=2))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    state.update(extra_tensors or {})
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


@pytest.fixture
def tiny():
    return tiny_config


TRANSFORMERS_MAJOR = int(__import__("transformers").__version__.split(".")[0])
# transformers 5.x renamed from_pretrained's `torch_dtype=` to `dtype=` (the old name warns there).
DTYPE_KWARG = "dtype" if TRANSFORMERS_MAJOR >= 5 else "torch_dtype"
