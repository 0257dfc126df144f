# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""SigLIP-NaViT vision configuration: the SigLIP vision config plus BAGEL's `rope` flag."""

from transformers import SiglipVisionConfig as _HFSiglipVisionConfig


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
        super().__init__(
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            num_channels=num_channels,
            image_size=image_size,
            patch_size=patch_size,
            hidden_act=hidden_act,
            layer_norm_eps=layer_norm_eps,
            attention_dropout=attention_dropout,
            **kwargs,
        )
        self.rope = rope
        self._check_geometry()

    def _check_geometry(self) -> None:
        for name in ("hidden_size", "num_attention_heads", "image_size", "patch_size", "num_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"SiglipNaViTConfig: `{name}` must be a positive int, got {value!r}.")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"SiglipNaViTConfig: `hidden_size` ({self.hidden_size}) must be divisible by "
                f"`num_attention_heads` ({self.num_attention_heads})."
            )
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"SiglipNaViTConfig: `image_size` ({self.image_size}) must be a multiple of `patch_size` "
                f"({self.patch_size}): the position grid has image_size // patch_size cells per side."
            )
        head_dim = self.hidden_size // self.num_attention_heads
        if self.rope and head_dim % 4 != 0:
            raise ValueError(
                f"SiglipNaViTConfig: rope=True needs head_dim (hidden_size / num_attention_heads = {head_dim}) "
                "divisible by 4: each head is split into a row half and a column half, and each half is "
                "rotated in pairs."
            )

    @property
    def num_patches_per_side(self) -> int:
        """Cells per side of the position grid (70 for BAGEL's 980 px / 14 px)."""
        return self.image_size // self.patch_size


# The upstream name (BAGEL's modeling/bagel/siglip_navit.py); an alias, so the class name stays unique.
SiglipVisionConfig = SiglipNaViTConfig

SiglipNaViTConfig.register_for_auto_class()

__all__ = ["SiglipNaViTConfig", "SiglipVisionConfig"]
