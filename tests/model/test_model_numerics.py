"""DESIGN.md numeric contract: 1. stock SigLIP parity, 2. packing is invisible, 3. 2D RoPE math,
4. Conv2d <-> Linear patch embedding; plus the full-size checkpoint layout on the meta device."""

import math

import pytest
import torch
import torch.nn.functional as F
import transformers

from siglip_navit_tools import repo_code
from siglip_navit_tools.testing import bagel_config, make_model, make_pack, randomize_, tiny_config

model_mod = repo_code.modeling()

BACKENDS = ["eager", "sdpa"]
TOL = 1e-5


def patchify(image: torch.Tensor, patch: int) -> torch.Tensor:
    """(C, H, W) -> (n, P*P*C): patches row-major over the grid, (row, col, channel) inside, channel fastest."""
    c, height, width = image.shape
    h, w = height // patch, width // patch
    return image.reshape(c, h, patch, w, patch).permute(1, 3, 2, 4, 0).reshape(h * w, patch * patch * c)


def rotate_2d_reference(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """2D RoPE written from the spec, independently of the model: x is (heads, n, d).

    First half of each head rotated by the row angle, second half by the column angle; inside a half of
    width m, dims i and i + m/2 form a pair rotated by angle pos * 10000^(-2i/m).
    """
    d = x.shape[-1]
    m = d // 2
    inv_freq = torch.tensor([10000.0 ** (-(2 * i) / m) for i in range(m // 2)], dtype=x.dtype)
    out = []
    for half, pos in ((x[..., :m], rows), (x[..., m:], cols)):
        angle = pos.to(x.dtype)[:, None] * inv_freq[None, :]  # (n, m/2)
        cos, sin = angle.cos(), angle.sin()
        a, b = half[..., : m // 2], half[..., m // 2 :]
        out += [a * cos - b * sin, b * cos + a * sin]
    first = torch.cat(out[:2], dim=-1)
    second = torch.cat(out[2:], dim=-1)
    return torch.cat([first, second], dim=-1)


def reference_forward(model, pixels: torch.Tensor, grids, rope_fn=rotate_2d_reference) -> torch.Tensor:
    """The whole tower, one image at a time, in float64, from the state dict alone."""
    cfg = model.config
    sd = {k: v.detach().double() for k, v in model.state_dict().items()}
    side = cfg.image_size // cfg.patch_size
    heads = cfg.num_attention_heads
    dim = cfg.hidden_size
    head_dim = dim // heads
    eps = cfg.layer_norm_eps

    def lin(x, name):
        return x @ sd[name + ".weight"].T + sd[name + ".bias"]

    def ln(x, name):
        return F.layer_norm(x, (dim,), sd[name + ".weight"], sd[name + ".bias"], eps)

    outs, start = [], 0
    for h, w in grids:
        n = h * w
        x = pixels[start : start + n].double()
        start += n
        rows = torch.arange(h).repeat_interleave(w)
        cols = torch.arange(w).repeat(h)
        hs = lin(x, "vision_model.embeddings.patch_embedding")
        if not cfg.rope:
            hs = hs + sd["vision_model.embeddings.position_embedding.weight"][rows * side + cols]
        for layer in range(cfg.num_hidden_layers):
            p = f"vision_model.encoder.layers.{layer}."
            y = ln(hs, p + "layer_norm1")
            q, k, v = (lin(y, p + f"self_attn.{t}_proj").view(n, heads, head_dim).transpose(0, 1) for t in "qkv")
            if cfg.rope:
                q, k = rope_fn(q, rows, cols), rope_fn(k, rows, cols)
            attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1) @ v
            hs = hs + lin(attn.transpose(0, 1).reshape(n, dim), p + "self_attn.out_proj")
            y = ln(hs, p + "layer_norm2")
            y = lin(F.gelu(lin(y, p + "mlp.fc1"), approximate="tanh"), p + "mlp.fc2")
            hs = hs + y
        outs.append(ln(hs, "vision_model.post_layernorm"))
    return torch.cat(outs)


# ---- contract 1: stock transformers SigLIP at the native grid -------------------------------------------------


def stock_siglip(config, attn: str, seed: int = 3):
    stock_cfg = transformers.SiglipVisionConfig(
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_channels=config.num_channels,
        image_size=config.image_size,
        patch_size=config.patch_size,
        vision_use_head=False,
    )
    stock_cfg._attn_implementation = attn
    stock = transformers.SiglipVisionModel(stock_cfg)
    return randomize_(stock, seed).eval()


def load_stock_weights_into_ours(stock, ours) -> None:
    """Stock keys (4.x: `vision_model.*`, 5.x: unprefixed) -> ours; the Conv2d weight goes through the Linear layout."""
    state = {}
    for key, value in stock.state_dict().items():
        key = key.removeprefix("vision_model.")
        if key.endswith("position_ids"):
            continue
        if key == "embeddings.patch_embedding.weight":
            value = value.permute(0, 2, 3, 1).reshape(value.shape[0], -1)  # DESIGN.md contract 4
        state["vision_model." + key] = value
    missing, unexpected = ours.load_state_dict(state, strict=True)
    assert not missing and not unexpected


@pytest.mark.parametrize("attn", BACKENDS)
def test_contract1_matches_stock_siglip_on_native_grid(attn):
    config = tiny_config(rope=False)
    stock = stock_siglip(config, "eager")
    ours = make_model(config, attn=attn)
    load_stock_weights_into_ours(stock, ours)

    image = torch.randn(1, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(5))
    side = config.image_size // config.patch_size
    n = side * side
    with torch.no_grad():
        expected = stock(pixel_values=image).last_hidden_state[0]
        got = ours(
            packed_pixel_values=patchify(image[0], config.patch_size),
            packed_flattened_position_ids=torch.arange(n),
            cu_seqlens=torch.tensor([0, n], dtype=torch.int32),
            max_seqlen=n,
        ).last_hidden_state
    assert got.shape == expected.shape == (n, config.hidden_size)
    assert (got - expected).abs().max().item() <= TOL


# ---- contract 2: packing is invisible --------------------------------------------------------------------------

# full native grid, non-square, its transpose (same length: batched into one kernel call), single patches
# (again equal neighbours), a tall strip
GRIDS = [(6, 6), (2, 5), (5, 2), (1, 1), (1, 1), (5, 1)]


def run_single_images(model, pack, grids):
    outs, start = [], 0
    for h, w in grids:
        n = h * w
        outs.append(
            model(
                packed_pixel_values=pack["packed_pixel_values"][start : start + n],
                packed_flattened_position_ids=pack["packed_flattened_position_ids"][start : start + n],
                cu_seqlens=torch.tensor([0, n], dtype=torch.int32),
                max_seqlen=n,
            ).last_hidden_state
        )
        start += n
    return torch.cat(outs)


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("attn", BACKENDS)
def test_contract2_pack_equals_single_image_runs(attn, rope):
    config = tiny_config(rope=rope)
    model = make_model(config, attn=attn)
    pack = make_pack(GRIDS, config)
    with torch.no_grad():
        packed = model(**pack).last_hidden_state
        singles = run_single_images(model, pack, GRIDS)
    assert packed.shape == (sum(h * w for h, w in GRIDS), config.hidden_size)
    assert (packed - singles).abs().max().item() <= TOL


@pytest.mark.parametrize("attn", BACKENDS)
def test_contract2_no_image_influences_another(attn):
    config = tiny_config(rope=True)
    model = make_model(config, attn=attn)
    pack = make_pack(GRIDS, config)
    altered = dict(pack)
    pixels = pack["packed_pixel_values"].clone()
    start, end = 36, 46  # the (2, 5) image
    pixels[start:end] += 3.0 * torch.randn(end - start, pixels.shape[1])
    altered["packed_pixel_values"] = pixels
    with torch.no_grad():
        base = model(**pack).last_hidden_state
        changed = model(**altered).last_hidden_state
    others = torch.cat([torch.arange(0, start), torch.arange(end, base.shape[0])])
    assert (changed[start:end] - base[start:end]).abs().max().item() > 1e-2  # the altered image did change
    assert (changed[others] - base[others]).abs().max().item() <= 1e-6


@pytest.mark.parametrize("rope", [False, True])
def test_eager_and_sdpa_agree_on_cpu(rope):
    config = tiny_config(rope=rope)
    model = make_model(config, attn="eager")
    pack = make_pack(GRIDS, config)
    with torch.no_grad():
        eager = model(**pack).last_hidden_state
        model.config._attn_implementation = "sdpa"
        sdpa = model(**pack).last_hidden_state
    assert (eager - sdpa).abs().max().item() <= TOL


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("attn", BACKENDS)
def test_whole_tower_matches_independent_float64_reference(attn, rope):
    config = tiny_config(rope=rope)
    model = make_model(config, attn=attn)
    pack = make_pack(GRIDS, config)
    with torch.no_grad():
        got = model(**pack).last_hidden_state
    expected = reference_forward(model, pack["packed_pixel_values"], GRIDS)
    assert (got.double() - expected).abs().max().item() <= TOL


# ---- contract 3: 2D RoPE ---------------------------------------------------------------------------------------


def test_contract3_rope_tables_follow_the_formula():
    rope = model_mod.RotaryEmbedding2D(dim=8, max_h=5, max_w=7)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8)
    for p in [0, 1, 6, 7, 20, 34]:
        row, col = divmod(p, 7)  # row-major flattening over the (max_h x max_w) grid
        ang_h = torch.cat([row * inv_freq, row * inv_freq])
        ang_w = torch.cat([col * inv_freq, col * inv_freq])
        torch.testing.assert_close(rope.cos_h[p], ang_h.cos())
        torch.testing.assert_close(rope.sin_h[p], ang_h.sin())
        torch.testing.assert_close(rope.cos_w[p], ang_w.cos())
        torch.testing.assert_close(rope.sin_w[p], ang_w.sin())
    assert rope.cos_h.shape == (35, 8)
    # non-persistent: never part of a checkpoint
    assert rope.state_dict() == {}


def test_contract3_rope_orientation_rows_first_half_columns_second():
    """The reference with the halves swapped (columns first) must NOT match: the test can tell them apart."""
    config = tiny_config(rope=True)
    model = make_model(config, attn="eager")
    grids = [(2, 5), (4, 3)]
    pack = make_pack(grids, config)
    with torch.no_grad():
        got = model(**pack).last_hidden_state.double()

    def swapped(x, rows, cols):
        return rotate_2d_reference(x, cols, rows)

    def q_and_k_unrotated(x, rows, cols):
        return x

    assert (got - reference_forward(model, pack["packed_pixel_values"], grids)).abs().max() <= TOL
    assert (got - reference_forward(model, pack["packed_pixel_values"], grids, swapped)).abs().max() > 1e-3
    assert (got - reference_forward(model, pack["packed_pixel_values"], grids, q_and_k_unrotated)).abs().max() > 1e-3


def test_contract3_rope_rotates_q_and_k_only():
    q = torch.randn(5, 2, 8)
    k = torch.randn(5, 2, 8)
    cos = torch.randn(5, 8)
    sin = torch.randn(5, 8)
    q2, k2 = model_mod.apply_rotary_pos_emb(q, k, cos, sin)
    half = torch.cat([-q[..., 4:], q[..., :4]], dim=-1)
    torch.testing.assert_close(model_mod.rotate_half(q), half)
    torch.testing.assert_close(q2, q * cos[:, None] + half * sin[:, None])
    torch.testing.assert_close(k2, k * cos[:, None] + model_mod.rotate_half(k) * sin[:, None])


def test_rope_model_has_no_position_table_and_absolute_model_has_no_rope():
    rope_model = make_model(tiny_config(rope=True))
    abs_model = make_model(tiny_config(rope=False))
    assert not hasattr(rope_model.vision_model.embeddings, "position_embedding")
    assert hasattr(rope_model.vision_model, "rope")
    assert not any("rope" in k for k in rope_model.state_dict())
    assert hasattr(abs_model.vision_model.embeddings, "position_embedding")
    assert not hasattr(abs_model.vision_model, "rope")


# ---- contract 4: Conv2d <-> Linear -----------------------------------------------------------------------------


def test_contract4_conv_weight_to_linear_matches_conv_on_patches():
    gen = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(3, 16, kernel_size=4, stride=4)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
        conv.bias.copy_(torch.randn(16, generator=gen))
    image = torch.randn(3, 8, 12, generator=gen)
    expected = conv(image[None])[0].flatten(1).T  # (n, hidden), patches row-major
    w_lin = model_mod.conv2d_weight_to_linear(conv.weight)
    torch.testing.assert_close(w_lin, conv.weight.permute(0, 2, 3, 1).reshape(16, 48), rtol=0, atol=0)
    got = patchify(image, 4) @ w_lin.T + conv.bias
    assert (got - expected).abs().max().item() <= TOL
    # a peer's mistake (channel-first flattening) is far off: the test can fail
    wrong = conv.weight.reshape(16, 48)
    assert (patchify(image, 4) @ wrong.T + conv.bias - expected).abs().max().item() > 0.5
    # and the inverse is exact
    back = model_mod.linear_weight_to_conv2d(w_lin, num_channels=3, patch_size=4)
    assert torch.equal(back, conv.weight)
    assert torch.equal(back, w_lin.view(16, 4, 4, 3).permute(0, 3, 1, 2))


@pytest.mark.parametrize("rope", [False, True])
def test_contract4_converted_embeddings_equal_the_conv_source(rope):
    config = tiny_config(rope=rope)
    embeddings = model_mod.SiglipVisionEmbeddings(config)
    randomize_(embeddings, seed=4)
    conv = embeddings.patch_embedding
    assert isinstance(conv, torch.nn.Conv2d)
    image = torch.randn(1, 3, 16, 20)
    with torch.no_grad():
        conv_out = conv(image)[0].flatten(1).T
        embeddings.convert_conv2d_to_linear(config)
        assert isinstance(embeddings.patch_embedding, torch.nn.Linear)
        lin_out = embeddings.patch_embedding(patchify(image[0], config.patch_size))
    assert (lin_out - conv_out).abs().max().item() <= TOL

    # Linear -> Conv2d -> Linear round trip is bit-exact
    linear_weight = embeddings.patch_embedding.weight.detach().clone()
    embeddings.convert_linear_to_conv2d(config)
    assert isinstance(embeddings.patch_embedding, torch.nn.Conv2d)
    assert torch.equal(embeddings.patch_embedding.weight, conv.weight)
    embeddings.convert_conv2d_to_linear(config)
    assert torch.equal(embeddings.patch_embedding.weight, linear_weight)


def test_contract4_whole_model_conv_source_to_converted_model():
    """A model built with the upstream Conv2d layout, converted, equals the stock conv computation."""
    config = tiny_config(rope=False)
    stock = stock_siglip(config, "eager", seed=9)
    ours = make_model(config, attn="eager")
    load_stock_weights_into_ours(stock, ours)
    # export back to the conv layout and compare with the stock weights bit for bit
    model_mod.convert_linear_to_conv2d(ours, config)
    stock_conv = dict(stock.named_parameters())
    key = "vision_model.embeddings.patch_embedding.weight"
    stock_key = key if key in stock_conv else key.removeprefix("vision_model.")
    assert torch.equal(ours.vision_model.embeddings.patch_embedding.weight, stock_conv[stock_key])
    model_mod.convert_conv2d_to_linear(ours, config)
    pack = make_pack([(6, 6)], config)
    image = pack["packed_pixel_values"].reshape(6, 6, 4, 4, 3).permute(4, 0, 2, 1, 3).reshape(1, 3, 24, 24)
    with torch.no_grad():
        expected = stock(pixel_values=image).last_hidden_state[0]
        got = ours(**pack).last_hidden_state
    assert (got - expected).abs().max().item() <= TOL


def test_conversion_is_a_noop_when_already_linear():
    config = tiny_config()
    model = make_model(config)
    layer = model.vision_model.embeddings.patch_embedding
    before = layer.weight.detach().clone()
    model_mod.convert_conv2d_to_linear(model, config, meta=True)  # what BAGEL's scripts do after building
    model.vision_model.embeddings.convert_conv2d_to_linear(config)
    assert model.vision_model.embeddings.patch_embedding is layer
    assert torch.equal(layer.weight, before)


def test_conversion_on_meta_device():
    config = tiny_config()
    embeddings = model_mod.SiglipVisionEmbeddings(config)
    embeddings.convert_conv2d_to_linear(config, meta=True)
    assert embeddings.patch_embedding.weight.device.type == "meta"
    assert embeddings.patch_embedding.weight.shape == (32, 48)
    with torch.device("meta"):
        meta_embeddings = model_mod.SiglipVisionEmbeddings(config)
    meta_embeddings.convert_conv2d_to_linear(config)
    assert meta_embeddings.patch_embedding.weight.is_meta


# ---- the full-size BAGEL tower on the meta device ----------------------------------------------------------------


def test_full_size_bagel_layout_on_meta_device():
    config = bagel_config()
    with torch.device("meta"):
        model = model_mod.SiglipVisionModel(config)
    state = model.state_dict()
    assert len(state) == 421
    n_params = sum(p.numel() for p in model.parameters())
    assert round(n_params / 1e6, 2) == 402.55
    assert state["vision_model.embeddings.patch_embedding.weight"].shape == (1152, 588)
    assert state["vision_model.embeddings.patch_embedding.bias"].shape == (1152,)
    assert state["vision_model.embeddings.position_embedding.weight"].shape == (4900, 1152)
    assert state["vision_model.post_layernorm.weight"].shape == (1152,)
    expected_layer = {
        "layer_norm1.weight": (1152,), "layer_norm1.bias": (1152,),
        "layer_norm2.weight": (1152,), "layer_norm2.bias": (1152,),
        "self_attn.q_proj.weight": (1152, 1152), "self_attn.q_proj.bias": (1152,),
        "self_attn.k_proj.weight": (1152, 1152), "self_attn.k_proj.bias": (1152,),
        "self_attn.v_proj.weight": (1152, 1152), "self_attn.v_proj.bias": (1152,),
        "self_attn.out_proj.weight": (1152, 1152), "self_attn.out_proj.bias": (1152,),
        "mlp.fc1.weight": (4304, 1152), "mlp.fc1.bias": (4304,),
        "mlp.fc2.weight": (1152, 4304), "mlp.fc2.bias": (1152,),
    }  # fmt: skip
    for layer in range(26):
        for name, shape in expected_layer.items():
            assert state[f"vision_model.encoder.layers.{layer}.{name}"].shape == shape
    assert "vision_model.encoder.layers.26.mlp.fc1.weight" not in state


def test_full_size_rope_variant_on_meta_device():
    config = bagel_config(rope=True)
    with torch.device("meta"):
        model = model_mod.SiglipVisionModel(config)
    state = model.state_dict()
    assert len(state) == 420  # no position table, and the RoPE tables are not persistent
    assert model.vision_model.rope.cos_h.shape == (4900, 36)  # head_dim 72 -> 36 per half
