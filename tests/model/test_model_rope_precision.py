"""RoPE precision in half precision (issue 12, item 2): q and k are rotated in float32 with float32 tables, then cast
back, as upstream BAGEL and transformers' Qwen2-VL vision tower do; the tables stay float32 in a bf16 model.

The reference here is written independently of the model's rotation: its own float32 angle tables from the spec
(DESIGN.md contract 3), its own pair rotation, and the model's other submodules for everything that is not RoPE.
"""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel

from siglip_navit_tools import repo_code
from siglip_navit_tools.testing import dtype_kwarg, make_model, make_pack, tiny_config, unique_dir

model_mod = repo_code.modeling()
DTYPE_KWARG = dtype_kwarg()

TABLES = ("cos_h", "sin_h", "cos_w", "sin_w")
# a 70 x 70 position grid like BAGEL's (angles up to 69 rad), 4 layers, heads of 16 dims (RoPE halves of 8)
CONFIG = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, image_size=280,
              patch_size=4, rope=True)  # fmt: skip
GRIDS = [(20, 30), (7, 70)]


def spec_angles(pos: torch.Tensor, half: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos/sin of `pos * 10000^(-2i/half)` for the `half / 2` pairs of one RoPE half: (n, half / 2)."""
    inv_freq = torch.tensor([10000.0 ** (-(2 * i) / half) for i in range(half // 2)], dtype=torch.float32)
    angle = pos.to(torch.float32)[:, None] * inv_freq[None, :]
    return angle.cos(), angle.sin()


def rotate_reference(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, table_dtype: torch.dtype) -> torch.Tensor:
    """x `(n, heads, d)`: first half of each head rotated by the row angle, second by the column angle, pairs
    (i, i + m/2) inside a half of width m. Computed in float32 with the angle tables rounded to `table_dtype`
    (float32: upstream's scheme; bfloat16: the old cast-the-tables scheme, rounded again after each product)."""
    m = x.shape[-1] // 2
    work = torch.float32 if table_dtype == torch.float32 else x.dtype
    parts = []
    for half, pos in ((x[..., :m], rows), (x[..., m:], cols)):
        cos, sin = (t.to(table_dtype).to(work)[:, None, :] for t in spec_angles(pos, m))
        a, b = half[..., : m // 2].to(work), half[..., m // 2 :].to(work)
        parts += [a * cos - b * sin, b * cos + a * sin]
    return torch.cat(parts, dim=-1).to(x.dtype)


def reference_forward(model, pack: dict, table_dtype: torch.dtype) -> torch.Tensor:
    """The tower with the model's own linears, norms and SDPA, but the reference rotation; one image at a time."""
    vm = model.vision_model
    dtype = vm.post_layernorm.weight.dtype
    side = model.config.num_patches_per_side
    cu = pack["cu_seqlens"].tolist()
    x = vm.embeddings.patch_embedding(pack["packed_pixel_values"].to(dtype))
    pos = pack["packed_flattened_position_ids"]
    for layer in vm.encoder.layers:
        attn = layer.self_attn
        h = layer.layer_norm1(x)
        shape = (x.shape[0], attn.num_heads, attn.head_dim)
        q, k, v = (proj(h).view(shape) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        q, k = (rotate_reference(t, pos // side, pos % side, table_dtype) for t in (q, k))
        outs = []
        for start, end in zip(cu[:-1], cu[1:]):
            qi, ki, vi = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))
            outs.append(F.scaled_dot_product_attention(qi, ki, vi, scale=attn.scale)[0].transpose(0, 1))
        x = x + attn.out_proj(torch.cat(outs).reshape(x.shape))
        x = x + layer.mlp(layer.layer_norm2(x))
    return vm.post_layernorm(x)


def old_apply_rotary_pos_emb(q, k, cos, sin):
    """What the model did before: tables cast to the activations' dtype, rotation in that dtype."""
    cos, sin = cos.unsqueeze(1).to(q.dtype), sin.unsqueeze(1).to(q.dtype)
    rot = model_mod.rotate_half
    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


@pytest.fixture(scope="module")
def bf16_model():
    return make_model(tiny_config(**CONFIG), attn="sdpa").to(torch.bfloat16)


@pytest.fixture(scope="module")
def pack():
    return make_pack(GRIDS, tiny_config(**CONFIG))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def test_bf16_model_matches_the_float32_rotation_reference(bf16_model, pack, monkeypatch):
    """Measured: max|diff| 0.0 against the fp32-rotation reference; the old cast-the-tables scheme differs by 0.078."""
    with torch.no_grad():
        new = bf16_model(**pack).last_hidden_state
        reference = reference_forward(bf16_model, pack, torch.float32)
        old_reference = reference_forward(bf16_model, pack, torch.bfloat16)
        monkeypatch.setattr(model_mod, "apply_rotary_pos_emb", old_apply_rotary_pos_emb)
        old = bf16_model(**pack).last_hidden_state
    assert new.dtype == torch.bfloat16
    # the reference reproduces the old scheme too (so it is a faithful model of both), and the old scheme differs
    assert max_diff(old, old_reference) <= 1e-2
    assert max_diff(old, reference) >= 3e-2
    # ours is the fp32-rotation scheme: far closer to it than the old scheme ever was
    assert max_diff(new, reference) <= 1e-2
    assert max_diff(new, reference) <= 0.25 * max_diff(old, reference)


def test_float32_results_are_unchanged_by_the_float32_rotation(pack, monkeypatch):
    """In fp32 the new rotation is bit-identical to the old one (no cast is a cast at all)."""
    model = make_model(tiny_config(**CONFIG), attn="eager")
    with torch.no_grad():
        new = model(**pack).last_hidden_state
        monkeypatch.setattr(model_mod, "apply_rotary_pos_emb", old_apply_rotary_pos_emb)
        old = model(**pack).last_hidden_state
    assert torch.equal(new, old)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_apply_rotary_pos_emb_rotates_in_float32_and_casts_back(dtype):
    gen = torch.Generator().manual_seed(0)
    total, heads, m = 300, 3, 8
    q = (torch.randn(total, heads, 2, m, generator=gen) * 3).to(dtype)
    k = (torch.randn(total, heads, 2, m, generator=gen) * 3).to(dtype)
    angle = torch.rand(total, 2, m, generator=gen) * 70  # positions up to 70 cells
    cos, sin = angle.cos(), angle.sin()  # float32 tables, as the model passes them
    q_rot, k_rot = model_mod.apply_rotary_pos_emb(q, k, cos, sin)
    assert q_rot.dtype == dtype and k_rot.dtype == dtype

    wide = torch.promote_types(dtype, torch.float32)  # float32 math, float64 for a float64 model

    def expected(x):
        x = x.to(wide)
        x1, x2 = x[..., : m // 2], x[..., m // 2 :]
        c, s = cos[:, None].to(wide), sin[:, None].to(wide)
        return (x * c + torch.cat((-x2, x1), dim=-1) * s).to(dtype)

    assert torch.equal(q_rot, expected(q)) and torch.equal(k_rot, expected(k))
    if dtype in (torch.bfloat16, torch.float16):
        old_q, _ = old_apply_rotary_pos_emb(q, k, cos, sin)
        assert not torch.equal(old_q, q_rot)  # the old scheme really was different


def test_mixed_q_and_k_dtypes_are_each_cast_back():
    q = torch.randn(5, 2, 2, 4).to(torch.bfloat16)
    k = torch.randn(5, 2, 2, 4).to(torch.float16)
    cos, sin = torch.ones(5, 2, 4), torch.zeros(5, 2, 4)
    q_rot, k_rot = model_mod.apply_rotary_pos_emb(q, k, cos, sin)
    assert q_rot.dtype == torch.bfloat16 and k_rot.dtype == torch.float16
    assert torch.equal(q_rot, q) and torch.equal(k_rot, k)


def assert_fresh_float32_tables(rope, device: str = "cpu") -> None:
    fresh = model_mod.RotaryEmbedding2D(rope.dim, rope.max_h, rope.max_w)
    for name in TABLES:
        table = getattr(rope, name)
        assert table.dtype == torch.float32, name
        assert table.device.type == device, name
        if device != "meta":
            assert torch.equal(table, getattr(fresh, name)), name


CASTS = {
    # name: (cast, the parameters' dtype afterwards)
    "to(bfloat16)": (lambda m: m.to(torch.bfloat16), torch.bfloat16),
    "half()": (lambda m: m.half(), torch.float16),
    "bfloat16()": (lambda m: m.bfloat16(), torch.bfloat16),
    "to(cpu, float16)": (lambda m: m.to("cpu", torch.float16), torch.float16),
    "double()": (lambda m: m.double(), torch.float64),
    "bf16 then float()": (lambda m: m.to(torch.bfloat16).float(), torch.float32),
}


@pytest.mark.parametrize("cast", list(CASTS))
def test_model_dtype_casts_keep_the_tables_float32(cast):
    apply_cast, param_dtype = CASTS[cast]
    model = apply_cast(make_model(tiny_config(**CONFIG)))
    assert all(p.dtype == param_dtype for p in model.parameters())
    assert_fresh_float32_tables(model.vision_model.rope)


def test_meta_model_cast_keeps_float32_meta_tables():
    with torch.device("meta"):
        model = model_mod.SiglipVisionModel(tiny_config(**CONFIG))
    model = model.to(torch.bfloat16)
    assert_fresh_float32_tables(model.vision_model.rope, device="meta")
    assert model.vision_model.post_layernorm.weight.dtype == torch.bfloat16


def test_reset_tables_restores_float32_tables_into_a_downcast_buffer():
    rope = model_mod.RotaryEmbedding2D(8, 7, 5)
    for name in TABLES:
        rope._buffers[name] = torch.zeros(35, 8, dtype=torch.bfloat16)  # what a foreign loader could leave
    rope.reset_tables()
    assert_fresh_float32_tables(rope)


@pytest.mark.parametrize("load_kwargs", [{}, {"device_map": "cpu"}, {"low_cpu_mem_usage": True}])
def test_from_pretrained_in_bfloat16_keeps_float32_tables(tmp_path, load_kwargs):
    config = tiny_config(**CONFIG)
    target = unique_dir(tmp_path, "bf16rope")
    make_model(config).save_pretrained(target)
    loaded = AutoModel.from_pretrained(target, trust_remote_code=True, **{DTYPE_KWARG: torch.bfloat16}, **load_kwargs)
    assert loaded.vision_model.post_layernorm.weight.dtype == torch.bfloat16
    assert_fresh_float32_tables(loaded.vision_model.rope)
    pack = make_pack(GRIDS, config)
    with torch.no_grad():
        out = loaded(**pack).last_hidden_state
        reference = reference_forward(loaded, pack, torch.float32)
    assert max_diff(out, reference) <= 1e-2


def test_tables_are_gathered_once_per_forward_and_passed_as_float32(bf16_model, pack, monkeypatch):
    gathers, rotations = [], []
    real_gather = model_mod.RotaryEmbedding2D.forward
    real_apply = model_mod.apply_rotary_pos_emb

    def gather(self, position_ids):
        gathers.append(position_ids.dtype)
        return real_gather(self, position_ids)

    def apply(q, k, cos, sin):
        rotations.append((q.dtype, cos.dtype, sin.dtype))
        return real_apply(q, k, cos, sin)

    monkeypatch.setattr(model_mod.RotaryEmbedding2D, "forward", gather)
    monkeypatch.setattr(model_mod, "apply_rotary_pos_emb", apply)
    with torch.no_grad():
        bf16_model(**pack)
    assert gathers == [torch.int64]  # once, not per layer
    assert rotations == [(torch.bfloat16, torch.float32, torch.float32)] * CONFIG["num_hidden_layers"]
