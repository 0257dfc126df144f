"""convert_checkpoint.py end to end: a BAGEL checkpoint or a stock SigLIP one (every key style) becomes a complete Hub
repo whose outputs equal the source's; exported back to stock SigLIP bit for bit; --dry-run writes nothing."""

import json

import pytest
import torch
import transformers
from _convert_helpers import (
    assert_same_outputs,
    convert,
    leftovers,
    load_ours,
    load_stock,
    make_bagel,
    ours_on_native_grid,
    stock_on_image,
    stock_state,
    tensors_of,
    write_stock,
)
from safetensors import safe_open
from safetensors.torch import save_file

from siglip_navit_tools import repo_code
from siglip_navit_tools.testing import make_model, tiny_config, unique_dir

ROOT = repo_code.REPO_ROOT


def test_bagel_dir_converts_to_complete_hub_repo(tmp_path):
    src, ref = make_bagel(tmp_path)
    out = unique_dir(tmp_path, "bagel_out")
    assert convert("--src", src, "--out", out) == 0

    names = sorted(p.name for p in out.iterdir())
    expected = {"config.json", "model.safetensors", "preprocessor_config.json", "README.md",
                "configuration_siglip_navit.py", "modeling_siglip_navit.py"}
    assert expected <= set(names)
    if (ROOT / "image_processing_siglip_navit.py").exists():
        assert "image_processing_siglip_navit.py" in names
    for name in ("configuration_siglip_navit.py", "modeling_siglip_navit.py"):
        assert (out / name).read_bytes() == (ROOT / name).read_bytes()
    assert leftovers(tmp_path) == []

    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_siglip_navit.SiglipNaViTConfig",
        "AutoModel": "modeling_siglip_navit.SiglipVisionModel",
    }
    assert config["model_type"] == "siglip_navit" and config["architectures"] == ["SiglipVisionModel"]
    assert config["rope"] is False and config["num_hidden_layers"] == 2  # stored layers, not vit_config's 3
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    assert config["vision_use_head"] is False

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
    assert keys == set(ref.state_dict())  # no connector./language_model./vit_pos_embed. tensors
    tensors = tensors_of(out)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())

    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert pre["auto_map"] == {"AutoImageProcessor": "image_processing_siglip_navit.SiglipNaViTImageProcessor"}
    assert (pre["patch_size"], pre["image_stride"], pre["max_num_patches_per_side"]) == (4, 4, 6)
    assert (pre["max_image_size"], pre["min_image_size"], pre["max_pixels"]) == (24, 24, 576)

    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    for line in ("library_name: transformers", "pipeline_tag: image-feature-extraction", "license: apache-2.0",
                 "- custom_code"):
        assert line in front
    assert "BAGEL checkpoint" in card and "convert_checkpoint.py --src" in card

    model = load_ours(out)
    assert model.config.rope is False and model.config.num_hidden_layers == 2
    assert_same_outputs(ref, model, ref.config)


@pytest.mark.parametrize("style", ["siglip-full", "vision-4x", "vision-5x", "save_pretrained"])
def test_stock_siglip_all_key_styles(tmp_path, style):
    src, stock = write_stock(tmp_path, style)
    out = unique_dir(tmp_path, f"from_{style}")
    assert convert("--src", src, "--out", out) == 0
    tensors = tensors_of(out)
    assert not any(k.startswith(("text_model.", "logit")) or ".head." in k for k in tensors)
    w = tensors["vision_model.embeddings.patch_embedding.weight"]
    assert w.shape == (32, 4 * 4 * 3)
    conv = stock_state(stock if style != "siglip-full" else stock)["vision_model.embeddings.patch_embedding.weight"]
    assert torch.equal(w, conv.permute(0, 2, 3, 1).reshape(32, -1))  # DESIGN numeric contract 4
    model = load_ours(out)
    assert model.config.rope is False
    pixels = torch.randn(3, 24, 24, generator=torch.Generator().manual_seed(5))
    diff = (stock_on_image(stock, pixels) - ours_on_native_grid(model, pixels, 4)).abs().max().item()
    assert diff <= 1e-5


def test_reverse_export_round_trip(tmp_path):
    src, stock = write_stock(tmp_path, "vision-4x")
    ours = unique_dir(tmp_path, "ours")
    assert convert("--src", src, "--out", ours) == 0
    exported = unique_dir(tmp_path, "exported")
    assert convert("--src", ours, "--out", exported, "--to", "stock-siglip") == 0
    assert not list(exported.glob("*.py"))
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "siglip_vision_model" and config["vision_use_head"] is False
    assert "auto_map" not in config

    plain = load_stock(exported)  # no trust_remote_code, both majors
    assert type(plain).__module__.startswith("transformers.models.siglip")
    pixels = torch.randn(3, 24, 24, generator=torch.Generator().manual_seed(7))
    ref = stock_on_image(stock, pixels)
    assert (stock_on_image(plain, pixels) - ref).abs().max().item() <= 1e-5
    assert (ours_on_native_grid(load_ours(ours), pixels, 4) - ref).abs().max().item() <= 1e-5

    # exact inverse: the Conv2d weight comes back bit for bit, and converting the export again is bit-exact
    exported_t = tensors_of(exported)
    original = stock_state(stock)
    for key, value in exported_t.items():
        assert torch.equal(value, original[key]), key
    again = unique_dir(tmp_path, "again")
    assert convert("--src", exported, "--out", again) == 0
    first, second = tensors_of(ours), tensors_of(again)
    assert first.keys() == second.keys()
    for key in first:
        assert first[key].dtype == second[key].dtype and torch.equal(first[key], second[key]), key

    processor = transformers.SiglipImageProcessor.from_pretrained(str(exported))
    assert processor.size == {"height": 24, "width": 24}


def test_bagel_export_to_stock_directly(tmp_path):
    src, ref = make_bagel(tmp_path, dtype=torch.float32)
    exported = unique_dir(tmp_path, "bagel_stock")
    assert convert("--src", src, "--out", exported, "--to", "stock-siglip") == 0
    plain = load_stock(exported)
    pixels = torch.randn(3, 24, 24, generator=torch.Generator().manual_seed(8))
    diff = (stock_on_image(plain, pixels) - ours_on_native_grid(ref, pixels, 4)).abs().max().item()
    assert diff <= 1e-5


def test_rope_true_repo_round_trips_but_refuses_stock_export(tmp_path, capsys):
    ref = make_model(rope=True)
    src = unique_dir(tmp_path, "rope_src")
    src.mkdir()
    sd = {k: v for k, v in ref.state_dict().items()}
    for n in ("cos_h", "sin_h", "cos_w", "sin_w"):  # upstream stored these persistently: dropped on conversion
        sd[f"vision_model.rope.{n}"] = getattr(ref.vision_model.rope, n).clone()
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps({**tiny_config(rope=True).to_dict(), "model_type": "siglip_navit"}))
    out = unique_dir(tmp_path, "rope_out")
    assert convert("--src", src, "--out", out) == 0
    assert not any("rope" in k for k in tensors_of(out))
    model = load_ours(out)
    assert model.config.rope is True
    assert_same_outputs(ref, model, ref.config)

    stock = unique_dir(tmp_path, "rope_stock")
    assert convert("--src", out, "--out", stock, "--to", "stock-siglip") == 1
    assert "rope" in capsys.readouterr().err and not stock.exists()


def test_dry_run_writes_nothing(tmp_path, capsys):
    src, _ = make_bagel(tmp_path)
    out = unique_dir(tmp_path, "dry")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert convert("--src", src, "--out", out, "--dry-run", "--max-shard-size", "10KB") == 0
    stdout = capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    for text in ("model-00001-of-", "model.safetensors.index.json", "config.json", "preprocessor_config.json",
                 "README.md", "modeling_siglip_navit.py", "vision_model.encoder.layers.1.mlp.fc2.weight",
                 "<- vit_model.vision_model.encoder.layers.1.mlp.fc2.weight", "not part of the ViT",
                 "nothing was written"):
        assert text in stdout, text
