"""The converted tower's config: BAGEL's layer-count rule and --num-hidden-layers, a stock image size that is not a
multiple of the patch, RoPE from the keys and --rope (contradictions are errors), absurd or malformed config values."""

import json

import pytest
import torch
from _convert_helpers import (
    BAGEL_OTHER,
    BAGEL_VIT_CONFIG,
    assert_same_outputs,
    convert,
    leftovers,
    load_ours,
    make_bagel,
    one_paragraph,
    ours_on_native_grid,
    stock_on_image,
    tensors_of,
    write_stock,
)
from safetensors.torch import save_file

from siglip_navit_tools.testing import make_model, tiny_config, unique_dir


@pytest.mark.parametrize("config_layers, ok", [(3, True), (2, True), (5, False), (1, False)])
def test_bagel_layer_count_rules(tmp_path, capsys, config_layers, ok):
    src, _ = make_bagel(tmp_path, config_layers=config_layers)
    out = unique_dir(tmp_path, "layers")
    rc = convert("--src", src, "--out", out)
    if ok:
        assert rc == 0 and json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    else:
        assert rc == 1 and not out.exists() and leftovers(tmp_path) == []
        err = capsys.readouterr().err
        assert "layer count mismatch" in err and f"num_hidden_layers = {config_layers}" in err and "stores 2" in err


def test_num_hidden_layers_keeps_first_n(tmp_path, capsys):
    src, ref = make_bagel(tmp_path, layers=3, config_layers=4)
    out = unique_dir(tmp_path, "first2")
    assert convert("--src", src, "--out", out, "--num-hidden-layers", 2) == 0
    model = load_ours(out)
    assert model.config.num_hidden_layers == 2
    assert not any(".layers.2." in k for k in tensors_of(out))
    ref2 = make_model(num_hidden_layers=2)
    ref2.load_state_dict({k: v for k, v in ref.state_dict().items() if ".layers.2." not in k})
    assert_same_outputs(ref2, model, ref2.config)

    for bad in (4, 0):
        out_bad = unique_dir(tmp_path, "bad_n")
        assert convert("--src", src, "--out", out_bad, "--num-hidden-layers", bad) == 1
        assert not out_bad.exists()
        assert "--num-hidden-layers" in capsys.readouterr().err


def test_stock_image_size_not_multiple_of_patch(tmp_path, capsys):
    src, stock = write_stock(tmp_path, "vision-4x", image_size=26)  # 6x6 grid like so400m-patch14-384 (27x27)
    out = unique_dir(tmp_path, "img26")
    assert convert("--src", src, "--out", out) == 0
    assert "not a multiple of patch_size" in capsys.readouterr().err
    model = load_ours(out)
    assert model.config.image_size == 24
    pixels = torch.randn(3, 26, 26, generator=torch.Generator().manual_seed(6))
    diff = (stock_on_image(stock, pixels) - ours_on_native_grid(model, pixels[:, :24, :24], 4)).abs().max().item()
    assert diff <= 1e-5

# ---- rope from the keys, --rope ----------------------------------------------------------------------------------
ROPE_NAMES = ("cos_h", "sin_h", "cos_w", "sin_w")


def make_bagel_rope(tmp_path, *, tables=True, name="bagel_rope"):
    """A BAGEL checkpoint trained with --vit_rope True: no position table, upstream's persistent RoPE tables."""
    ref = make_model(rope=True, num_hidden_layers=2, seed=3)
    tensors = {"vit_model." + k: v.clone() for k, v in ref.state_dict().items()}
    assert not any("position_embedding" in k for k in tensors)
    if tables:
        for n in ROPE_NAMES:
            tensors[f"vit_model.vision_model.rope.{n}"] = getattr(ref.vision_model.rope, n).clone()
    gen = torch.Generator().manual_seed(1)
    tensors.update({k: torch.randn(s, generator=gen) for k, s in BAGEL_OTHER.items()})
    d = unique_dir(tmp_path, name)
    d.mkdir()
    save_file(tensors, str(d / "ema.safetensors"), metadata={"format": "pt"})
    (d / "vit_config.json").write_text(json.dumps(BAGEL_VIT_CONFIG))  # says 3 layers, no rope key (default True)
    return d, ref


@pytest.mark.parametrize("tables", [True, False])
def test_bagel_vit_rope_true_converts_and_matches_a_rope_model(tmp_path, capsys, tables):
    src, ref = make_bagel_rope(tmp_path, tables=tables)
    out = unique_dir(tmp_path, "rope_out")
    assert convert("--src", src, "--out", out) == 0
    assert "--vit_rope True" in capsys.readouterr().err
    written = tensors_of(out)
    assert not any("rope" in k or "position_embedding" in k for k in written)
    assert json.loads((out / "config.json").read_text())["rope"] is True
    model = load_ours(out)  # AutoModel + trust_remote_code, fp32
    assert model.config.rope is True
    assert_same_outputs(ref, model, ref.config)  # fp32 max|diff| <= 1e-5
    out2 = unique_dir(tmp_path, "rope_forced")
    assert convert("--src", src, "--out", out2, "--rope", "true") == 0  # agreeing with the keys is fine


def _own_repo(tmp_path, rope: bool, config_rope: bool):
    ref = make_model(rope=rope)
    d = unique_dir(tmp_path, "own")
    d.mkdir()
    save_file(dict(ref.state_dict()), str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = tiny_config(rope=True).to_dict()
    (d / "config.json").write_text(json.dumps({**cfg, "rope": config_rope, "model_type": "siglip_navit"}))
    return d


@pytest.mark.parametrize(
    "case, args, words",
    [
        ("bagel", ["--rope", "true"], ["--rope true", "position table", "--rope auto"]),
        ("bagel_rope", ["--rope", "false"], ["--rope false", "no position table", "--vit_rope True"]),
        ("stock", ["--rope", "true"], ["--rope true", "stock SigLIP"]),
        ("own_config_says_false", [], ["rope=False", "do not belong together"]),
        ("own_config_says_true", [], ["rope=True", "do not belong together"]),
    ],
)
def test_rope_contradictions_are_clear_errors(tmp_path, capsys, case, args, words):
    if case == "bagel":
        src, _ = make_bagel(tmp_path)
    elif case == "bagel_rope":
        src, _ = make_bagel_rope(tmp_path)
    elif case == "stock":
        src, _ = write_stock(tmp_path, "vision-4x")
    else:
        rope = case == "own_config_says_false"  # keys of a rope model, config says False (and the reverse)
        src = _own_repo(tmp_path, rope=rope, config_rope=not rope)
    out = unique_dir(tmp_path, "contradiction")
    assert convert("--src", src, "--out", out, *args) == 1
    err = one_paragraph(capsys.readouterr().err)
    for w in words:
        assert w in err, (w, err)
    assert not out.exists() and leftovers(tmp_path) == []


def test_rope_false_agreeing_and_own_rope_repo(tmp_path):
    src, ref = make_bagel(tmp_path, dtype=torch.float32)
    out = unique_dir(tmp_path, "rope_false")
    assert convert("--src", src, "--out", out, "--rope", "false") == 0
    assert_same_outputs(ref, load_ours(out), ref.config)
    own = _own_repo(tmp_path, rope=True, config_rope=True)
    out2 = unique_dir(tmp_path, "own_rope")
    assert convert("--src", own, "--out", out2) == 0 and load_ours(out2).config.rope is True


# ---- absurd or malformed config values ---------------------------------------------------------------------------
SIZE_CASES = [("hidden_size", -32), ("hidden_size", 10**12), ("hidden_size", "32"), ("intermediate_size", 0),
              ("intermediate_size", -1), ("num_attention_heads", 0), ("patch_size", 0), ("patch_size", -4),
              ("image_size", -24), ("image_size", 10**30), ("num_channels", 0), ("num_attention_heads", 7),
              ("hidden_size", 32.0), ("patch_size", True)]  # fmt: skip


@pytest.mark.parametrize("field, value", SIZE_CASES)
@pytest.mark.parametrize("kind", ["bagel", "stock"])
def test_absurd_config_sizes_are_one_paragraph_naming_field_and_file(tmp_path, capsys, field, value, kind):
    if kind == "bagel":
        src, _ = make_bagel(tmp_path)
        cfg_file = src / "vit_config.json"
    else:
        src, _ = write_stock(tmp_path, "vision-4x")
        cfg_file = src / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg[field] = value
    cfg_file.write_text(json.dumps(cfg))
    assert convert("--src", src, "--out", unique_dir(tmp_path, "o")) == 1
    err = one_paragraph(capsys.readouterr().err)
    assert f"`{field}`" in err and cfg_file.name in err, err


@pytest.mark.parametrize("field, value", [("num_hidden_layers", -3), ("num_hidden_layers", 10**40),
                                          ("num_hidden_layers", "3"), ("hidden_act", "no_such_act"),
                                          ("num_hidden_layers", None)])  # fmt: skip
def test_other_bad_config_values_are_clear(tmp_path, capsys, field, value):
    src, _ = make_bagel(tmp_path)
    cfg = json.loads((src / "vit_config.json").read_text())
    cfg[field] = value
    (src / "vit_config.json").write_text(json.dumps(cfg))
    assert convert("--src", src, "--out", unique_dir(tmp_path, "o")) == 1
    err = one_paragraph(capsys.readouterr().err)
    assert "vit_config.json" in err
