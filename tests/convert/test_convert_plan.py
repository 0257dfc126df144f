"""The conversion plan, checked from the headers before anything is read or built: missing, unexpected and
mis-shaped tensors, absurd or gapped layer indices, the cost of the expected shapes, sharding by --max-shard-size."""

import json
import time

import pytest
import torch
from _convert_helpers import assert_same_outputs, convert, load_ours, make_bagel, one_paragraph
from safetensors import safe_open
from safetensors.torch import save_file

from siglip_navit_tools.convert import plan as plan_mod
from siglip_navit_tools.convert import write
from siglip_navit_tools.testing import make_model, tiny_config, unique_dir


def test_sharding_above_max_shard_size(tmp_path):
    src, ref = make_bagel(tmp_path, dtype=torch.float32)
    out = unique_dir(tmp_path, "sharded")
    limit = 8000
    assert convert("--src", src, "--out", out, "--max-shard-size", "8KB") == 0
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    total = 0
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            sizes = [f.get_slice(k).get_shape() for k in f.keys()]
            nbytes = sum(4 * torch.Size(s).numel() for s in sizes)
        assert nbytes <= limit or len(sizes) == 1
        total += nbytes
    assert index["metadata"]["total_size"] == total
    assert_same_outputs(ref, load_ours(out), ref.config)
    # one file without the limit
    single = unique_dir(tmp_path, "single_shard")
    assert convert("--src", src, "--out", single) == 0
    assert (single / "model.safetensors").exists() and not (single / "model.safetensors.index.json").exists()


def test_missing_unexpected_misshaped_reported_before_writing(tmp_path, capsys, monkeypatch):
    bad_q = torch.zeros(32, 16, dtype=torch.bfloat16)
    src, _ = make_bagel(
        tmp_path,
        drop=["vit_model.vision_model.encoder.layers.1.mlp.fc2.bias"],
        extra={
            "vit_model.vision_model.encoder.layers.0.mlp.fc3.weight": torch.zeros(4, 4, dtype=torch.bfloat16),
            "vit_model.vision_model.encoder.layers.0.self_attn.q_proj.weight": bad_q,
        },
    )
    read = []
    monkeypatch.setattr(write, "iter_source_tensors", lambda *a, **k: read.append(1) or iter(()))
    out = unique_dir(tmp_path, "invalid")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert convert("--src", src, "--out", out) == 1
    err = capsys.readouterr().err
    assert "nothing was written" in err
    assert "missing (1)" in err and "vit_model.vision_model.encoder.layers.1.mlp.fc2.bias" in err
    assert "unexpected (1)" in err and "vit_model.vision_model.encoder.layers.0.mlp.fc3.weight" in err
    assert "mis-shaped (1)" in err and "layers.0.self_attn.q_proj.weight: [32, 16], expected [32, 32]" in err
    assert not read  # validated from the header alone: no tensor data was read
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# ---- layer indices checked from the keys, before anything is built -----------------------------------------------
LAYER = "vit_model.vision_model.encoder.layers."


def _forbid_building(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the model was built")

    monkeypatch.setattr(plan_mod, "expected_shapes", boom)


@pytest.mark.parametrize(
    "key_index, config_layers, words",
    [
        ("99999999999", 100_001, ["layers.99999999999.mlp.fc1.weight", "not a plain layer index"]),
        ("9" * 5000, 3, ["not a plain layer index"]),
        ("100000", 100_001, ["layers.100000.mlp.fc1.weight", "names encoder layer 100000", "missing: 2, 3, 4"]),
        ("5", 3, ["names encoder layer 5", "not 0..2"]),
        ("01", 3, ["'01'", "not a plain layer index"]),
    ],
)
def test_absurd_or_gapped_layer_indices_refused_cheaply(tmp_path, capsys, monkeypatch, key_index, config_layers, words):
    w = torch.zeros(48, 32, dtype=torch.bfloat16)
    src, _ = make_bagel(tmp_path, config_layers=config_layers, extra={f"{LAYER}{key_index}.mlp.fc1.weight": w})
    _forbid_building(monkeypatch)
    out = unique_dir(tmp_path, "layers")
    t0 = time.perf_counter()
    assert convert("--src", src, "--out", out) == 1
    assert time.perf_counter() - t0 < 5
    err = one_paragraph(capsys.readouterr().err)
    for word in words:
        assert word in err, (word, err[:500])
    assert not out.exists()


def test_layer_gap_refused(tmp_path, capsys, monkeypatch):
    ref = make_model(num_hidden_layers=3)
    tensors = {"vit_model." + k: v for k, v in ref.state_dict().items() if ".layers.1." not in k}
    d = unique_dir(tmp_path, "gap")
    d.mkdir()
    save_file(tensors, str(d / "ema.safetensors"), metadata={"format": "pt"})
    _forbid_building(monkeypatch)
    assert convert("--src", d, "--out", unique_dir(tmp_path, "o")) == 1
    err = one_paragraph(capsys.readouterr().err)
    assert "layers.2." in err and "missing: 1" in err


def test_non_ascii_digit_layer_is_an_unexpected_key(tmp_path, capsys):
    src, _ = make_bagel(tmp_path, extra={LAYER + "\u0663.mlp.fc1.weight": torch.zeros(48, 32, dtype=torch.bfloat16)})
    assert convert("--src", src, "--out", unique_dir(tmp_path, "o")) == 1
    err = capsys.readouterr().err
    assert "unexpected (1)" in err and "\u0663" in err


def test_expected_shapes_cost_does_not_grow_with_layers():
    small = tiny_config(num_hidden_layers=3)
    with torch.device("meta"):
        full = plan_mod.modeling().SiglipVisionModel(small)
    assert plan_mod.expected_shapes(small) == {k: tuple(v.shape) for k, v in full.state_dict().items()}
    t0 = time.perf_counter()
    shapes = plan_mod.expected_shapes(tiny_config(num_hidden_layers=1024))
    assert time.perf_counter() - t0 < 2 and len(shapes) == 5 + 1024 * 16
