"""map_key: a foreign tensor name -> ours or a drop reason, for every layout the converter reads, and its inverse."""

import pytest

from siglip_navit_tools.convert.keymap import KeyLayout, map_key, source_key


BAGEL = KeyLayout("bagel", "vit_model.")
STOCK_4X = KeyLayout("siglip")
STOCK_5X = KeyLayout("siglip", unprefixed=True)
OURS = KeyLayout("siglip-navit")
V = "vision_model."
NOT_VIT = "not part of the ViT (other BAGEL modules; never read)"
HEAD = "pooling head (vision_model.head.*; not part of this tower)"
ROPE = "persistent RoPE tables (vision_model.rope.*; recomputed by the model)"

# (layout, source key, our key or None, drop reason or None)
KEYMAP_CASES = [
    (BAGEL, "vit_model.vision_model.encoder.layers.3.mlp.fc1.weight", V + "encoder.layers.3.mlp.fc1.weight", None),
    (BAGEL, "vit_model.vision_model.embeddings.patch_embedding.weight", V + "embeddings.patch_embedding.weight", None),
    (BAGEL, "connector.fc1.weight", None, NOT_VIT),
    (BAGEL, "vit_pos_embed.pos_embed", None, NOT_VIT),
    (BAGEL, "language_model.model.embed_tokens.weight", None, NOT_VIT),
    (BAGEL, "vit_model.vision_model.rope.cos_h", None, ROPE),
    (KeyLayout("bagel", "module.vit."), "module.vit.vision_model.post_layernorm.bias", V + "post_layernorm.bias", None),
    (KeyLayout("bagel", "module.vit."), "vit_model.vision_model.post_layernorm.bias", None, NOT_VIT),
    (STOCK_4X, V + "encoder.layers.0.self_attn.q_proj.weight", V + "encoder.layers.0.self_attn.q_proj.weight", None),
    (STOCK_4X, "text_model.embeddings.token_embedding.weight", None, "text tower (text_model.*)"),
    (STOCK_4X, "logit_scale", None, "logit scale / bias"),
    (STOCK_4X, "logit_bias", None, "logit scale / bias"),
    (STOCK_4X, V + "head.probe", None, HEAD),
    (STOCK_4X, V + "head.attention.in_proj_weight", None, HEAD),
    (STOCK_4X, V + "embeddings.position_ids", None, "position_ids buffer"),
    (STOCK_5X, "embeddings.patch_embedding.weight", V + "embeddings.patch_embedding.weight", None),
    (STOCK_5X, "encoder.layers.1.layer_norm2.bias", V + "encoder.layers.1.layer_norm2.bias", None),
    (STOCK_5X, "head.mlp.fc1.weight", None, HEAD),
    (OURS, V + "post_layernorm.weight", V + "post_layernorm.weight", None),
    (OURS, V + "rope.sin_w", None, ROPE),
    (OURS, V + "rope.inv_freq", V + "rope.inv_freq", None),  # not a known drop: the plan reports it as unexpected
]


@pytest.mark.parametrize("layout, key, ours, reason", KEYMAP_CASES)
def test_key_map_table(layout, key, ours, reason):
    assert tuple(map_key(key, layout)) == (ours, reason)
    if ours is not None:
        assert source_key(ours, layout) == key  # the inverse names missing keys in the source's own terms


def test_key_map_layer_cut():
    key = "vit_model.vision_model.encoder.layers.2.mlp.fc2.bias"
    assert map_key(key, BAGEL, keep_layers=3, layers_stored=4).key == V + "encoder.layers.2.mlp.fc2.bias"
    dropped = map_key(key, BAGEL, keep_layers=2, layers_stored=4)
    assert dropped == (None, "encoder layers 2..3 (--num-hidden-layers 2)")
    assert map_key("vit_model.vision_model.post_layernorm.weight", BAGEL, 1, 4).key == V + "post_layernorm.weight"
