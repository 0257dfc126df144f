"""`output_attentions=True`: per-layer, per-image eager attention maps, checked against an independent softmax; and
the clear error for the sdpa / flash kernels, which never form the probabilities."""

import pytest
import torch
from transformers import AutoModel

from siglip_navit_tools import repo_code
from siglip_navit_tools.testing import build_hub_dir, make_model, make_pack, tiny_config

model_mod = repo_code.modeling()

GRIDS = [(6, 6), (2, 5), (2, 5), (1, 1)]  # two equal-length neighbours share one kernel call


def independent_rope(x: torch.Tensor, position_ids: torch.Tensor, side: int) -> torch.Tensor:
    """DESIGN's RoPE contract written out: `(total, heads, d)`; first half of a head gets the row angle, second half
    the column angle, each half rotated with rotate-half and inv_freq = 1/10000^(arange(0, d/2, 2)/(d/2))."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / 10000 ** (torch.arange(0, half, 2, dtype=torch.float64) / half)
    out = []
    for part, coord in ((x[..., :half], position_ids // side), (x[..., half:], position_ids % side)):
        angles = coord.to(torch.float64)[:, None] * inv_freq
        angles = torch.cat([angles, angles], dim=-1)[:, None, :]  # broadcast over heads
        p = part.to(torch.float64)
        rotated = torch.cat([-p[..., half // 2 :], p[..., : half // 2]], dim=-1)
        out.append(p * angles.cos() + rotated * angles.sin())
    return torch.cat(out, dim=-1)


def reference_maps(model, pack) -> list[list[torch.Tensor]]:
    """softmax(QK^T / sqrt(d)) per layer and image, from the q/k projections captured with forward hooks."""
    config = model.config
    heads, d = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    captured = []
    hooks = []
    for layer in model.vision_model.encoder.layers:
        attn = layer.self_attn
        record = {}
        hooks.append(attn.q_proj.register_forward_hook(lambda m, i, o, r=record: r.__setitem__("q", o.detach())))
        hooks.append(attn.k_proj.register_forward_hook(lambda m, i, o, r=record: r.__setitem__("k", o.detach())))
        captured.append(record)
    with torch.no_grad():
        model(**pack)
    for hook in hooks:
        hook.remove()
    cu = pack["cu_seqlens"].tolist()
    side = config.image_size // config.patch_size
    result = []
    for record in captured:
        q = record["q"].view(-1, heads, d).to(torch.float64)
        k = record["k"].view(-1, heads, d).to(torch.float64)
        if config.rope:
            q = independent_rope(q, pack["packed_flattened_position_ids"], side)
            k = independent_rope(k, pack["packed_flattened_position_ids"], side)
        per_image = []
        for start, end in zip(cu[:-1], cu[1:]):
            qi, ki = q[start:end].transpose(0, 1), k[start:end].transpose(0, 1)  # (heads, n, d)
            per_image.append(torch.softmax(qi @ ki.transpose(-1, -2) / d**0.5, dim=-1))
        result.append(per_image)
    return result


def single_image_pack(pack, index: int, grids) -> dict:
    cu = pack["cu_seqlens"].tolist()
    start, end = cu[index], cu[index + 1]
    return dict(
        packed_pixel_values=pack["packed_pixel_values"][start:end],
        packed_flattened_position_ids=pack["packed_flattened_position_ids"][start:end],
        cu_seqlens=torch.tensor([0, end - start], dtype=torch.int32),
        max_seqlen=end - start,
        image_grid_hw=torch.tensor([grids[index]]),
    )


@pytest.mark.parametrize("rope", [False, True])
def test_eager_maps_equal_an_independent_softmax(rope):
    config = tiny_config(rope=rope)
    model = make_model(config, attn="eager")
    pack = make_pack(GRIDS, config)
    with torch.no_grad():
        out = model(**pack, output_attentions=True)
    assert isinstance(out.attentions, tuple) and len(out.attentions) == config.num_hidden_layers
    reference = reference_maps(model, pack)
    for layer, (maps, expected) in enumerate(zip(out.attentions, reference)):
        assert isinstance(maps, list) and len(maps) == len(GRIDS)
        for i, ((h, w), got, want) in enumerate(zip(GRIDS, maps, expected)):
            assert got.shape == (config.num_attention_heads, h * w, h * w), (layer, i)
            assert got.dtype == torch.float32
            torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6, msg=f"layer {layer} image {i}")
            torch.testing.assert_close(got.sum(-1), torch.ones(got.shape[:2]), rtol=0, atol=1e-5)
            assert (got >= 0).all()


@pytest.mark.parametrize("rope", [False, True])
def test_no_cross_image_leakage(rope):
    config = tiny_config(rope=rope)
    model = make_model(config, attn="eager")
    pack = make_pack(GRIDS, config)
    with torch.no_grad():
        packed = model(**pack, output_attentions=True).attentions
        for i in range(len(GRIDS)):
            alone = model(**single_image_pack(pack, i, GRIDS), output_attentions=True).attentions
            for layer in range(config.num_hidden_layers):
                assert len(alone[layer]) == 1
                torch.testing.assert_close(packed[layer][i], alone[layer][0], rtol=0, atol=1e-6)


def test_attentions_do_not_change_the_features():
    config = tiny_config(rope=True)
    model = make_model(config, attn="eager")
    pack = make_pack(GRIDS, config)
    with torch.no_grad():
        plain = model(**pack)
        with_maps = model(**pack, output_attentions=True, output_hidden_states=True)
    assert plain.attentions is None
    assert torch.equal(plain.last_hidden_state, with_maps.last_hidden_state)
    assert len(with_maps.hidden_states) == config.num_hidden_layers + 1


def test_off_by_default_and_config_default_respected():
    config = tiny_config()
    model = make_model(config, attn="eager")
    pack = make_pack(GRIDS, config)
    with torch.no_grad():
        assert model(**pack).attentions is None
        assert model(**pack, output_attentions=False).attentions is None
        model.config.output_attentions = True
        assert len(model(**pack).attentions) == config.num_hidden_layers
        assert model(**pack, output_attentions=False).attentions is None  # the argument wins


def test_tuple_output_ends_with_the_attentions():
    config = tiny_config()
    model = make_model(config, attn="eager")
    pack = make_pack(GRIDS, config)
    with torch.no_grad():
        out = model(**pack, output_attentions=True)
        as_tuple = model(**pack, output_attentions=True, return_dict=False)
    assert len(as_tuple) == 2 and torch.equal(as_tuple[0], out.last_hidden_state)
    assert all(torch.equal(a, b) for la, lb in zip(as_tuple[1], out.attentions) for a, b in zip(la, lb))


def test_sdpa_with_output_attentions_is_a_clear_error():
    config = tiny_config()
    model = make_model(config, attn="sdpa")
    pack = make_pack(GRIDS, config)
    with pytest.raises(ValueError, match=r"output_attentions=True needs attn_implementation='eager'.*'sdpa'"):
        model(**pack, output_attentions=True)
    # asking through the config: transformers 5.x's config setter refuses non-eager itself, 4.49 reaches our check
    with pytest.raises(ValueError, match="eager"):
        model.config.output_attentions = True
        model(**pack)


def test_default_backend_with_output_attentions_is_a_clear_error(tmp_path):
    config = tiny_config()
    target = build_hub_dir(tmp_path, config, make_model(config))
    model = AutoModel.from_pretrained(target, trust_remote_code=True)  # sdpa, the default
    with pytest.raises(ValueError, match=r'attn_implementation="eager"'):
        model(**make_pack(GRIDS, config), output_attentions=True)


def test_flash_with_output_attentions_is_a_clear_error(monkeypatch):
    config = tiny_config()
    model = make_model(config, attn="eager")
    monkeypatch.setattr(model_mod, "flash_attn_varlen_func", lambda *a, **k: pytest.fail("kernel must not run"))
    monkeypatch.setattr(model_mod, "_flash_attn_available", lambda device: True)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match=r"needs attn_implementation='eager'.*'flash_attention_2'"):
        model(**make_pack(GRIDS, config), output_attentions=True)


def test_loaded_with_eager_gives_maps(tmp_path):
    config = tiny_config(rope=True)
    model = make_model(config)
    target = build_hub_dir(tmp_path, config, model)
    loaded = AutoModel.from_pretrained(target, trust_remote_code=True, attn_implementation="eager").eval()
    pack = make_pack(GRIDS, config)
    with torch.no_grad():
        maps = loaded(**pack, output_attentions=True).attentions
    assert [tuple(m.shape) for m in maps[-1]] == [(config.num_attention_heads, h * w, h * w) for h, w in GRIDS]
    for got, want in zip(maps[-1], reference_maps(loaded, pack)[-1]):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)


def test_training_maps_are_the_dropped_out_probabilities():
    """As transformers' eager attention: the returned weights are the ones multiplied with V (after dropout)."""
    config = tiny_config(attention_dropout=0.5)
    model = make_model(config, attn="eager").train()
    pack = make_pack([(6, 6)], config)
    torch.manual_seed(0)
    maps = model(**pack, output_attentions=True).attentions
    first = maps[0][0]
    assert (first == 0).any()  # dropped entries
    kept = first[first != 0]
    assert kept.max() > 1.0 / 36  # survivors are scaled by 1 / (1 - p)
    assert not torch.allclose(first.sum(-1), torch.ones(first.shape[:2]))
    loss = model(**pack, output_attentions=True).last_hidden_state.sum()
    loss.backward()  # the graph is intact with the maps collected


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
def test_gradient_checkpointing_with_attentions():
    config = tiny_config()
    model = make_model(config, attn="eager").train()
    model.gradient_checkpointing_enable()
    pack = make_pack(GRIDS, config)
    out = model(**pack, output_attentions=True)
    assert len(out.attentions) == config.num_hidden_layers and len(out.attentions[0]) == len(GRIDS)
    out.last_hidden_state.sum().backward()


def test_layers_return_plain_tensors_as_upstream():
    """Forward hooks and direct callers see what BAGEL's layers return: a tensor, maps or not."""
    config = tiny_config()
    model = make_model(config, attn="eager")
    seen = []
    model.vision_model.encoder.layers[0].register_forward_hook(lambda mod, args, out: seen.append(out))
    model.vision_model.encoder.layers[0].self_attn.register_forward_hook(lambda mod, args, out: seen.append(out))
    with torch.no_grad():
        out = model(**make_pack([(3, 5), (2, 2)], config), output_attentions=True)
        model(**make_pack([(3, 5), (2, 2)], config))
    assert len(seen) == 4 and all(isinstance(o, torch.Tensor) and o.shape == (19, config.hidden_size) for o in seen)
    assert len(out.attentions) == config.num_hidden_layers and all(len(layer) == 2 for layer in out.attentions)
