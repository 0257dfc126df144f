"""Attention backends: one place decides; eager/sdpa on CPU; the flash-attn and torch-varlen call contracts."""

import pytest
import torch
import torch.nn.functional as F

from siglip_navit_tools import repo_code
from siglip_navit_tools.testing import make_model, make_pack, tiny_config

model_mod = repo_code.modeling()

GRIDS = [(6, 6), (2, 5), (1, 1)]


def test_default_backend_is_sdpa_when_built_directly():
    config = tiny_config()
    model = model_mod.SiglipVisionModel(config)
    assert model.config._attn_implementation == "sdpa"
    kernel = model_mod.select_attention_kernel(None, torch.device("cpu"), torch.float32, 0.0)
    assert kernel is model_mod.sdpa_attention_per_image


def test_model_declares_backend_support_flags():
    cls = model_mod.SiglipVisionModel
    assert cls._supports_sdpa is True
    assert cls._supports_flash_attn_2 is True  # transformers 4.x
    assert cls._supports_flash_attn is True  # transformers 5.x
    assert set(cls._no_split_modules) == {"SiglipVisionEmbeddings", "SiglipEncoderLayer"}


@pytest.mark.parametrize("attn, sdpa_calls", [("eager", 0), ("sdpa", 2 * len(GRIDS))])
def test_backend_really_used(monkeypatch, attn, sdpa_calls):
    calls = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    config = tiny_config()
    model = make_model(config, attn=attn)
    with torch.no_grad():
        model(**make_pack(GRIDS, config))
    assert len(calls) == sdpa_calls
    if calls:  # one 4-D (1, heads, n, d) call per image and layer, never a (total x total) problem
        assert all(len(shape) == 4 and shape[0] == 1 for shape in calls)
        assert max(shape[2] for shape in calls) == 36


def test_equal_length_neighbours_share_one_sdpa_call(monkeypatch):
    calls = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(tuple(args[0].shape))
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    config = tiny_config(num_hidden_layers=1)
    model = make_model(config)
    with torch.no_grad():
        model(**make_pack([(2, 5), (5, 2), (1, 1), (3, 3), (1, 1)], config))
    # (2,5)+(5,2) share a call; the two single patches are not neighbours
    assert calls == [(2, 4, 10, 8), (1, 4, 1, 8), (1, 4, 9, 8), (1, 4, 1, 8)]


@pytest.mark.parametrize("name", ["flex_attention", "paged|eager", "kernels-community/flash-attn", "sdpa_paged", "Eager"])
def test_unsupported_backend_names_are_a_value_error(name):
    config = tiny_config()
    model = make_model(config)
    model.config._attn_implementation = name
    with pytest.raises(ValueError, match=r"Unsupported attn_implementation.*'eager', 'sdpa', 'flash_attention_2'"):
        model(**make_pack(GRIDS, config))


def test_flash_attention_without_flash_attn_is_a_clear_error():
    config = tiny_config()
    model = make_model(config)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match=r"flash_attention_2.*flash-attn.*CUDA"):
        model(**make_pack(GRIDS, config))


def test_kernel_selection_on_cuda(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(model_mod, "varlen_attn", lambda *a, **k: None)
    select = model_mod.select_attention_kernel
    varlen, per_image = model_mod.torch_varlen_attention, model_mod.sdpa_attention_per_image
    assert select("sdpa", cuda, torch.bfloat16, 0.0) is varlen
    assert select("sdpa", cuda, torch.float16, 0.0) is varlen
    assert select("sdpa", cuda, torch.float32, 0.0) is per_image  # varlen is half-only
    assert select("sdpa", cuda, torch.bfloat16, 0.1) is per_image  # varlen has no dropout
    assert select("sdpa", torch.device("cpu"), torch.bfloat16, 0.0) is per_image
    assert select("eager", cuda, torch.bfloat16, 0.0) is model_mod.eager_attention_per_image
    monkeypatch.setattr(model_mod, "varlen_attn", None)  # an older torch
    assert select("sdpa", cuda, torch.bfloat16, 0.0) is per_image


def segment_reference(q, k, v, cu, scale):
    """fp32 per-segment attention for (total, heads, d) inputs."""
    out = torch.empty_like(q, dtype=torch.float32)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = (t[s:e].float().transpose(0, 1) for t in (q, k, v))
        out[s:e] = (torch.softmax(qs @ ks.transpose(-1, -2) * scale, -1) @ vs).transpose(0, 1)
    return out


def test_flash_attention_2_call_contract(monkeypatch):
    """flash-attn cannot be installed here: check the exact call the model makes, with a stand-in kernel."""
    config = tiny_config(rope=True)
    model = make_model(config, attn="eager")
    pack = make_pack(GRIDS, config)
    with torch.no_grad():
        reference = model(**pack).last_hidden_state

    calls = []

    def fake_flash_attn_varlen_func(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                    softmax_scale, causal):  # fmt: skip
        calls.append(dict(q=q, k=k, v=v, cu_q=cu_seqlens_q, cu_k=cu_seqlens_k, max_q=max_seqlen_q,
                          max_k=max_seqlen_k, dropout_p=dropout_p, scale=softmax_scale, causal=causal))  # fmt: skip
        return segment_reference(q, k, v, cu_seqlens_q, softmax_scale).to(q.dtype)

    monkeypatch.setattr(model_mod, "flash_attn_varlen_func", fake_flash_attn_varlen_func)
    monkeypatch.setattr(model_mod, "_flash_attn_available", lambda device: True)
    model.config._attn_implementation = "flash_attention_2"
    with torch.no_grad():
        got = model(**pack).last_hidden_state

    total = pack["packed_pixel_values"].shape[0]
    head_dim = config.hidden_size // config.num_attention_heads
    assert len(calls) == config.num_hidden_layers
    for call in calls:
        for t in ("q", "k", "v"):
            assert call[t].dtype == torch.bfloat16  # fp32 model -> bf16 kernel, as upstream
            assert call[t].shape == (total, config.num_attention_heads, head_dim)
        for cu in (call["cu_q"], call["cu_k"]):
            assert cu.dtype == torch.int32 and cu.device == call["q"].device
            assert cu.tolist() == pack["cu_seqlens"].tolist()
        assert call["max_q"] == call["max_k"] == 36 and isinstance(call["max_q"], int)
        assert call["causal"] is False
        assert call["dropout_p"] == 0.0
        assert call["scale"] == pytest.approx(head_dim**-0.5)
    assert got.dtype == torch.float32  # result cast back
    cos = F.cosine_similarity(got.flatten(), reference.flatten(), dim=0).item()
    assert cos >= 0.9999
    assert (got - reference).abs().max().item() <= 5e-2


def test_torch_varlen_call_contract(monkeypatch):
    """The CUDA varlen path: (total, heads, d) q/k/v, int32 cu_seqlens, host-int max_seqlen, default scale."""
    calls = []

    def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs):  # torch's defaults: non-causal, 1/sqrt(d)
        calls.append((cu_q, cu_k, max_q, max_k, kwargs))
        return segment_reference(q, k, v, cu_q, q.shape[-1] ** -0.5).to(q.dtype)

    monkeypatch.setattr(model_mod, "varlen_attn", fake_varlen)
    q, k, v = (torch.randn(47, 4, 8) for _ in range(3))
    cu = torch.tensor([0, 36, 46, 47], dtype=torch.int32)
    packed = model_mod.PackedSequences(cu_seqlens=cu, max_seqlen=36, runs=None,
                                       attention=model_mod.torch_varlen_attention)  # fmt: skip
    out = packed.attention(q, k, v, packed, 8**-0.5)
    loop = model_mod.PackedSequences(cu, 36, [(0, 36, 1), (36, 10, 1), (46, 1, 1)], model_mod.sdpa_attention_per_image)
    torch.testing.assert_close(out, loop.attention(q, k, v, loop, 8**-0.5))
    assert calls == [(cu, cu, 36, 36, {})]


@pytest.mark.parametrize("validate_inputs", [True, False])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int64], ids=str)
def test_flash_path_takes_any_integer_index_dtype(monkeypatch, dtype, validate_inputs):
    """The kernels that skip the host bounds still get int32 cu_seqlens and int64 (gatherable) position ids."""
    config = tiny_config(rope=True)
    model = make_model(config, attn="eager")
    pack = make_pack(GRIDS, config)
    seen = []

    def fake_flash_attn_varlen_func(q, k, v, *, cu_seqlens_q, max_seqlen_q, softmax_scale, **kwargs):
        seen.append((cu_seqlens_q.dtype, max_seqlen_q))
        return segment_reference(q, k, v, cu_seqlens_q, softmax_scale).to(q.dtype)

    monkeypatch.setattr(model_mod, "flash_attn_varlen_func", fake_flash_attn_varlen_func)
    monkeypatch.setattr(model_mod, "_flash_attn_available", lambda device: True)
    model.config._attn_implementation = "flash_attention_2"
    narrow = dict(pack, cu_seqlens=pack["cu_seqlens"].to(dtype), image_grid_hw=pack["image_grid_hw"].to(dtype),
                  packed_flattened_position_ids=pack["packed_flattened_position_ids"].to(dtype),
                  max_seqlen=torch.tensor(36, dtype=dtype))  # fmt: skip
    with torch.no_grad():
        base = model(**pack).last_hidden_state
        got = model(**narrow, validate_inputs=validate_inputs).last_hidden_state
    assert torch.equal(got, base)
    assert seen[-1] == (torch.int32, 36)
