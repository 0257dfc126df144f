# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""SigLIP-NaViT vision configuration: the SigLIP vision config plus BAGEL's `rope` flag."""

from typing import Any, Mapping, Optional

from transformers import SiglipVisionConfig as _HFSiglipVisionConfig


# Every integer size field and its inclusive bounds: the ONE table `check_size_fields` enforces. The upper bounds
# are far above any published ViT (ViT-22B: hidden 6144, MLP 24576, 48 layers, 48 heads) and only refuse absurd
# values (a crafted config with 100,001 layers) before anything is built.
SIZE_FIELD_BOUNDS: dict[str, tuple[int, int]] = {
    "hidden_size": (1, 65_536),
    "intermediate_size": (1, 262_144),
    "num_hidden_layers": (1, 1_024),
    "num_attention_heads": (1, 4_096),
    "num_channels": (1, 1_024),
    "image_size": (1, 65_536),
    "patch_size": (1, 1_024),
}
# Cells per side of the position grid (image_size // patch_size; BAGEL: 70). The table has side**2 rows. The ONE owner
# of this limit: the image processor bounds `max_num_patches_per_side` and every image's patch grid by it too.
MAX_PATCHES_PER_SIDE = 1_024


def check_size_fields(sizes: Mapping[str, Any]) -> None:
    """Raise a ValueError naming the field if a size in `sizes` (field -> value) is not an int within its bounds.

    bool is not an int here (`True` is no layer count); neither is a float such as 768.0, nor a list or tuple
    (transformers' stock config allows `(h, w)` image and patch sizes; this tower is square).
    """
    for name, (low, high) in SIZE_FIELD_BOUNDS.items():
        value = sizes[name]
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"SiglipNaViTConfig: `{name}` must be an int, got {value!r} ({type(value).__name__}).")
        if not low <= value <= high:
            raise ValueError(f"SiglipNaViTConfig: `{name}` must be in [{low}, {high}], got {value}.")


def check_config(config) -> None:
    """Raise a ValueError naming the field if `config` (ours, or any object with the same fields) cannot be built.

    Every size within its bounds (`SIZE_FIELD_BOUNDS`), then the relations between them: heads divide the width,
    the patch divides the image, the position grid is not absurd, and with RoPE each head splits into two
    rotatable halves. `SiglipNaViTConfig.__init__` and the model's constructor both call it (the second catches a
    field changed after construction, e.g. `config.num_hidden_layers -= 1` taken one step too far).
    """
    check_size_fields({name: getattr(config, name, None) for name in SIZE_FIELD_BOUNDS})
    hidden_size, heads = config.hidden_size, config.num_attention_heads
    image_size, patch_size = config.image_size, config.patch_size
    if hidden_size % heads != 0:
        raise ValueError(
            f"SiglipNaViTConfig: `hidden_size` ({hidden_size}) must be divisible by `num_attention_heads` ({heads})."
        )
    if image_size % patch_size != 0:
        raise ValueError(
            f"SiglipNaViTConfig: `image_size` ({image_size}) must be a multiple of `patch_size` ({patch_size}): "
            "the position grid has image_size // patch_size cells per side."
        )
    side = image_size // patch_size
    if side > MAX_PATCHES_PER_SIDE:
        raise ValueError(
            f"SiglipNaViTConfig: `image_size // patch_size` ({image_size} // {patch_size} = {side}) must be at most "
            f"{MAX_PATCHES_PER_SIDE}: the position grid has that many cells per side, squared."
        )
    head_dim = hidden_size // heads
    if getattr(config, "rope", False) and head_dim % 4 != 0:
        raise ValueError(
            f"SiglipNaViTConfig: rope=True needs head_dim (hidden_size / num_attention_heads = {head_dim}) "
            "divisible by 4: each head is split into a row half and a column half, and each half is "
            "rotated in pairs."
        )


# The `attn_implementation` values the model runs (transformers sets `config._attn_implementation`).
SUPPORTED_ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")


def check_attn_implementation(
    name: Optional[str], requested: Optional[str] = None, flash_attn_importable: Optional[bool] = None
) -> None:
    """ValueError unless `name` is a backend we run (None: the default, sdpa). `requested`: what the user asked
    for, when transformers turned it into `name`. `flash_attn_importable` (given at load time): flash_attention_2 also
    needs flash-attn (its CUDA device is checked at the forward: the model may be moved there after loading)."""
    if not (name is None or (isinstance(name, str) and name in SUPPORTED_ATTN_IMPLEMENTATIONS)):
        via = f" (transformers chose it for {requested!r})" if requested not in (None, name) else ""
        raise ValueError(
            f"Unsupported attn_implementation {name!r}{via} for SigLIP-NaViT; supported: "
            f"{', '.join(repr(n) for n in SUPPORTED_ATTN_IMPLEMENTATIONS)}."
        )
    if name == "flash_attention_2" and flash_attn_importable is False:
        raise ValueError(
            "attn_implementation='flash_attention_2' needs the `flash-attn` package (not importable here) and a "
            "CUDA device. Install flash-attn on a CUDA machine, or use attn_implementation='sdpa' (default) or 'eager'."
        )


def check_output_attentions(attn_implementation: Optional[str]) -> None:
    """`output_attentions=True` needs the eager kernel: sdpa and flash never materialise the probabilities."""
    if attn_implementation != "eager":
        raise ValueError(
            f"output_attentions=True needs attn_implementation='eager', but this model runs "
            f"{attn_implementation or 'sdpa'!r}, whose kernels never form the attention probabilities. Load it with "
            "`from_pretrained(..., attn_implementation=\"eager\")` (or from_config) to get the attention maps."
        )


class SiglipNaViTConfig(_HFSiglipVisionConfig):
    r"""
    Configuration of BAGEL's packed (NaViT-style) SigLIP vision tower.

    Same fields and defaults as upstream BAGEL's `SiglipVisionConfig`, plus:

    rope (`bool`, *optional*, defaults to `True`):
        `True`: 2D rotary position embeddings on q/k (row angle on the first half of each head, column
        angle on the second half), no learned position table. `False`: a learned absolute table of
        `(image_size // patch_size) ** 2` rows indexed by `row * (image_size // patch_size) + col` (what
        the released BAGEL-7B-MoT uses).

    The class name and `model_type` are deliberately NOT transformers' own (`SiglipVisionConfig`,
    `siglip_vision_model`): transformers resolves built-in classes by those names, and would otherwise
    silently build its stock (un-packed) SigLIP when `trust_remote_code` is not set.

    To read BAGEL's own `vit_config.json` use `SiglipNaViTConfig.from_json_file(path)`; BAGEL then runs
    the tower with `rope=False` and `num_hidden_layers - 1` layers.
    """

    model_type = "siglip_navit"

    def __init__(
        self,
        hidden_size: int = 768,
        intermediate_size: int = 3072,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        num_channels: int = 3,
        image_size: int = 224,
        patch_size: int = 16,
        hidden_act: str = "gelu_pytorch_tanh",
        layer_norm_eps: float = 1e-6,
        attention_dropout: float = 0.0,
        rope: bool = True,
        **kwargs,
    ):
        # A file written for the stock model (e.g. BAGEL's vit_config.json) carries the stock model_type;
        # this class is what the caller chose, so the key is informational only.
        kwargs.pop("model_type", None)
        # No pooling head in this tower (transformers 5.x's stock config defaults it to True).
        kwargs.setdefault("vision_use_head", False)
        # Checked before the base class sees them, so that both majors raise the same ValueError (5.x's strict
        # dataclass would raise its own type error first).
        sizes = dict(
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            num_channels=num_channels,
            image_size=image_size,
            patch_size=patch_size,
        )
        check_size_fields(sizes)
        super().__init__(
            **sizes,
            hidden_act=hidden_act,
            layer_norm_eps=layer_norm_eps,
            attention_dropout=attention_dropout,
            **kwargs,
        )
        self.rope = rope
        check_config(self)

    @property
    def num_patches_per_side(self) -> int:
        """Cells per side of the position grid (70 for BAGEL's 980 px / 14 px)."""
        return self.image_size // self.patch_size


# The upstream name (BAGEL's modeling/bagel/siglip_navit.py); an alias, so the class name stays unique.
SiglipVisionConfig = SiglipNaViTConfig

SiglipNaViTConfig.register_for_auto_class()

__all__ = [
    "MAX_PATCHES_PER_SIDE",
    "SIZE_FIELD_BOUNDS",
    "SUPPORTED_ATTN_IMPLEMENTATIONS",
    "SiglipNaViTConfig",
    "SiglipVisionConfig",
    "check_attn_implementation",
    "check_config",
    "check_output_attentions",
    "check_size_fields",
]
