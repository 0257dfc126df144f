"""convert_checkpoint.py: BAGEL / stock SigLIP -> this repo (streaming), export back, safety, fsspec, push.

Every checkpoint here is tiny and made in the test (2 layers, hidden 32, 6x6 patch grid); nothing is downloaded.
"""

import contextlib
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from siglip_navit_tools import repo_code
from siglip_navit_tools.convert import cli as convert_cli
from siglip_navit_tools.convert import hub, write
from siglip_navit_tools.io import safetensors as st_io
from siglip_navit_tools.testing import make_model, make_pack, randomize_, tiny_config, unique_dir

ROOT = repo_code.REPO_ROOT

TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])
FP32 = {"dtype" if TRANSFORMERS_MAJOR >= 5 else "torch_dtype": torch.float32}
TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=24, patch_size=4)
# BAGEL's own vit_config.json carries only these keys (hidden_act / eps / channels absent -> defaults)
BAGEL_VIT_CONFIG = {
    "hidden_size": 32,
    "image_size": 24,
    "intermediate_size": 48,
    "model_type": "siglip_vision_model",
    "num_attention_heads": 4,
    "num_hidden_layers": 3,  # BAGEL: the file says one more layer than the checkpoint stores
    "patch_size": 4,
}
BAGEL_OTHER = {  # the other prefixes of BAGEL's ema.safetensors; the language model is the big one
    "connector.fc1.weight": (16, 32),
    "connector.fc1.bias": (16,),
    "connector.fc2.weight": (16, 16),
    "vit_pos_embed.pos_embed": (36, 16),
    "language_model.model.embed_tokens.weight": (512, 256),
    "language_model.model.layers.0.mlp.down_proj.weight": (64, 64),
    "time_embedder.mlp.0.weight": (16, 16),
    "vae2llm.weight": (16, 16),
    "llm2vae.weight": (16, 16),
    "latent_pos_embed.pos_embed": (36, 16),
}
PACK_GRIDS = [(6, 6), (3, 5), (2, 2)]


# ------------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------------
def convert(*args) -> int:
    return convert_cli.main([str(a) for a in args] + ["--no-progress"])


@contextlib.contextmanager
def no_warnings():
    """Fail on any Python warning or transformers log record at WARNING or above inside the block."""
    records = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    tlog = logging.getLogger("transformers")
    tlog.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        tlog.removeHandler(handler)
    messages = [r.getMessage() for r in records] + [f"{w.category.__name__}: {w.message}" for w in caught]
    assert not messages, messages


def load_ours(path: Path):
    """AutoModel + trust_remote_code, fp32, asserting no warnings and no missing / unexpected / mismatched keys."""
    with no_warnings():
        model, info = transformers.AutoModel.from_pretrained(
            str(path), trust_remote_code=True, output_loading_info=True, **FP32
        )
    assert info["missing_keys"] in ([], set()) and info["unexpected_keys"] in ([], set()), info
    assert not info.get("mismatched_keys"), info
    assert type(model).__name__ == "SiglipVisionModel" and type(model).__module__ != "transformers.models.siglip.modeling_siglip"
    return model.eval()


def load_stock(path: Path):
    """Plain transformers SiglipVisionModel, NO trust_remote_code."""
    with no_warnings():
        model, info = transformers.SiglipVisionModel.from_pretrained(str(path), output_loading_info=True, **FP32)
    assert info["missing_keys"] in ([], set()) and info["unexpected_keys"] in ([], set()), info
    assert not info.get("mismatched_keys"), info
    return model.eval()


def packed_out(model, config, grids=PACK_GRIDS):
    with torch.no_grad():
        return model(**make_pack(grids, config)).last_hidden_state


def assert_same_outputs(ref, model, config, grids=PACK_GRIDS):
    a, b = packed_out(ref, config, grids), packed_out(model, config, grids)
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= 1e-5


def round_params_(model, dtype):
    """Round every parameter through `dtype`, so that a checkpoint stored in `dtype` is exactly this model."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).float())
    return model


def make_bagel(tmp_path, *, layers=2, config_layers=3, dtype=torch.bfloat16, seed=0, extra=None, drop=(),
               vit_config=True, prefix="vit_model.", name="bagel"):
    """A BAGEL model directory: ema.safetensors (real key prefixes) + vit_config.json. Returns (dir, reference)."""
    ref = round_params_(make_model(num_hidden_layers=layers, seed=seed), dtype)
    gen = torch.Generator().manual_seed(seed + 100)
    tensors = {prefix + k: v.to(dtype) for k, v in ref.state_dict().items()}
    for k, shape in BAGEL_OTHER.items():
        tensors[k] = torch.randn(shape, generator=gen)
    tensors.update(extra or {})
    for k in drop:
        tensors.pop(k)
    d = unique_dir(tmp_path, name)
    d.mkdir()
    save_file(tensors, str(d / "ema.safetensors"), metadata={"format": "pt"})
    if vit_config:
        (d / "vit_config.json").write_text(json.dumps({**BAGEL_VIT_CONFIG, "num_hidden_layers": config_layers}))
    return d, ref


def stock_vision_model(seed=0, **overrides):
    cfg = transformers.SiglipVisionConfig(**{**TINY, **overrides}, vision_use_head=True)
    model = transformers.SiglipVisionModel(cfg)
    return randomize_(model, seed).eval()


def stock_state(model) -> dict:
    """A stock vision model's tensors with `vision_model.` prefix, whatever the installed transformers saves."""
    sd = model.state_dict()
    return {(k if k.startswith("vision_model.") else "vision_model." + k): v.clone() for k, v in sd.items()}


def write_stock(tmp_path, style: str, seed=0, **overrides):
    """A stock SigLIP checkpoint dir in one key style. Returns (dir, stock vision model usable with pixel_values)."""
    d = unique_dir(tmp_path, f"stock_{style}")
    if style == "siglip-full":
        text = transformers.SiglipTextConfig(
            hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, vocab_size=50,
            max_position_embeddings=8, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )
        vision = transformers.SiglipVisionConfig(**{**TINY, **overrides}, vision_use_head=True)
        full = transformers.SiglipModel(transformers.SiglipConfig(text_config=text.to_dict(), vision_config=vision.to_dict()))
        randomize_(full, seed).eval()
        full.save_pretrained(str(d))
        return d, full.vision_model
    model = stock_vision_model(seed, **overrides)
    if style == "save_pretrained":  # whatever the installed major writes
        model.save_pretrained(str(d))
        return d, model
    d.mkdir()
    sd = stock_state(model)
    if style == "vision-5x":  # transformers 5.x SiglipVisionModel: unprefixed
        sd = {k[len("vision_model.") :]: v for k, v in sd.items()}
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(model.config.to_dict()))
    return d, model


def patchify(pixels: torch.Tensor, patch: int) -> torch.Tensor:
    """(C, H, W) -> (n, P*P*C): patches row-major, (row, col, channel) inside a patch (DESIGN's rule)."""
    c, h, w = pixels.shape
    x = pixels.reshape(c, h // patch, patch, w // patch, patch).permute(1, 3, 2, 4, 0)
    return x.reshape((h // patch) * (w // patch), patch * patch * c)


def ours_on_native_grid(model, pixels, patch):
    grid = pixels.shape[-1] // patch
    n = grid * grid
    with torch.no_grad():
        return model(
            packed_pixel_values=patchify(pixels, patch),
            packed_flattened_position_ids=torch.arange(n),
            cu_seqlens=torch.tensor([0, n], dtype=torch.int32),
            max_seqlen=n,
        ).last_hidden_state


def stock_on_image(stock, pixels):
    with torch.no_grad():
        return stock(pixel_values=pixels[None]).last_hidden_state[0]


def tensors_of(path: Path) -> dict:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# ------------------------------------------------------------------------------------------------------------------
# BAGEL -> this repo
# ------------------------------------------------------------------------------------------------------------------
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


def test_bagel_single_file_and_config_rules(tmp_path):
    src, ref = make_bagel(tmp_path)
    out = unique_dir(tmp_path, "single")
    assert convert("--src", src / "ema.safetensors", "--out", out) == 0  # vit_config.json found beside the file
    assert_same_outputs(ref, load_ours(out), ref.config)

    # the same file alone: a tiny geometry cannot be inferred (heads) -> clear error, then --config works
    alone = unique_dir(tmp_path, "alone")
    alone.mkdir()
    shutil.copy(src / "ema.safetensors", alone / "ema.safetensors")
    out2 = unique_dir(tmp_path, "alone_out")
    assert convert("--src", alone / "ema.safetensors", "--out", out2) == 1
    assert not out2.exists()
    assert convert("--src", alone / "ema.safetensors", "--out", out2, "--config", src / "vit_config.json") == 0
    assert tensors_of(out2).keys() == tensors_of(out).keys()


def test_bagel_sharded_dir_opens_only_vit_shards(tmp_path):
    src, ref = make_bagel(tmp_path)
    tensors = load_file(str(src / "ema.safetensors"))
    (src / "ema.safetensors").unlink()
    vit = sorted(k for k in tensors if k.startswith("vit_model."))
    shards = {
        "model-00001-of-00003.safetensors": vit[: len(vit) // 2] + ["connector.fc1.weight"],
        "model-00002-of-00003.safetensors": vit[len(vit) // 2 :] + ["vit_pos_embed.pos_embed"],
        "model-00003-of-00003.safetensors": [k for k in tensors if k.startswith("language_model.")],
    }
    weight_map = {}
    for name, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(src / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
    # the language-model shard is never opened: make it garbage to prove it
    (src / "model-00003-of-00003.safetensors").write_bytes(b"\xff" * 4096)
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    out = unique_dir(tmp_path, "from_shards")
    assert convert("--src", src, "--out", out) == 0
    assert_same_outputs(ref, load_ours(out), ref.config)


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


def test_persistent_rope_buffers_dropped_and_custom_prefix(tmp_path):
    side = 6
    extra = {f"module.vit.vision_model.rope.{n}": torch.randn(side * side, 4) for n in ("cos_h", "sin_h", "cos_w", "sin_w")}
    src, ref = make_bagel(tmp_path, extra=extra, prefix="module.vit.")
    out = unique_dir(tmp_path, "prefix")
    assert convert("--src", src, "--out", out) == 1  # no vit_model.* tensors: not detected as BAGEL
    assert convert("--src", src, "--out", out, "--vit-prefix", "module.vit") == 0
    assert not any("rope" in k for k in tensors_of(out))
    assert_same_outputs(ref, load_ours(out), ref.config)


# ------------------------------------------------------------------------------------------------------------------
# stock SigLIP <-> this repo
# ------------------------------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------------------------
# --dtype, sharding, processor
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["keep", "float32", "float16", "bfloat16"])
def test_dtype(tmp_path, dtype):
    src, ref = make_bagel(tmp_path, dtype=torch.float32)
    out = unique_dir(tmp_path, f"dtype_{dtype}")
    assert convert("--src", src, "--out", out, "--dtype", dtype) == 0
    want = {"keep": torch.float32, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == str(want).split(".")[1]
    source = load_file(str(src / "ema.safetensors"))
    for key, value in tensors_of(out).items():
        assert value.dtype == want
        assert torch.equal(value, source["vit_model." + key].to(want)), key
    load_ours(out)


def test_fp16_overflow_is_an_error(tmp_path, capsys):
    big = make_model().state_dict()["vision_model.encoder.layers.0.mlp.fc1.weight"].clone()
    big[0, 0] = 1e6
    src, _ = make_bagel(tmp_path, dtype=torch.float32, extra={"vit_model.vision_model.encoder.layers.0.mlp.fc1.weight": big})
    out = unique_dir(tmp_path, "overflow")
    assert convert("--src", src, "--out", out, "--dtype", "float16") == 1
    assert "overflow" in capsys.readouterr().err and not out.exists() and leftovers(tmp_path) == []


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


def test_output_processor_matches_model(tmp_path):
    from PIL import Image

    src, ref = make_bagel(tmp_path)
    out = unique_dir(tmp_path, "proc")
    assert convert("--src", src, "--out", out) == 0
    with no_warnings():  # loads silently on both majors
        processor = transformers.AutoImageProcessor.from_pretrained(str(out), trust_remote_code=True)
    assert (processor.patch_size, processor.max_num_patches_per_side, processor.max_image_size) == (4, 6, 24)
    image = Image.fromarray((torch.rand(24, 24, 3, generator=torch.Generator().manual_seed(3)) * 255).byte().numpy())
    inputs = processor([image], return_tensors="pt")
    model = load_ours(out)
    with torch.no_grad():
        features = model(**inputs).last_hidden_state
    assert features.shape == (36, 32)


# ------------------------------------------------------------------------------------------------------------------
# safety (issue item 6): every failure mode
# ------------------------------------------------------------------------------------------------------------------
def _pickle_source(tmp_path, payload=None):
    src, stock = write_stock(tmp_path, "vision-4x")
    (src / "model.safetensors").unlink()
    torch.save(payload if payload is not None else stock_state(stock), str(src / "pytorch_model.bin"))
    return src, stock


def test_pickle_refused_without_allow_pickle(tmp_path, capsys):
    src, _ = _pickle_source(tmp_path)
    out = unique_dir(tmp_path, "pickle_refused")
    assert convert("--src", src, "--out", out) == 1
    err = capsys.readouterr().err
    assert "--allow-pickle" in err and "weights_only" in err and not out.exists()


def test_pickle_allowed_only_through_weights_only(tmp_path, monkeypatch):
    src, stock = _pickle_source(tmp_path)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    out = unique_dir(tmp_path, "pickle_ok")
    assert convert("--src", src, "--out", out, "--allow-pickle") == 0
    assert calls and all(c is True for c in calls)
    pixels = torch.randn(3, 24, 24, generator=torch.Generator().manual_seed(9))
    diff = (stock_on_image(stock, pixels) - ours_on_native_grid(load_ours(out), pixels, 4)).abs().max().item()
    assert diff <= 1e-5


class _Payload:
    """Unpickling this would create a file (stands in for arbitrary code)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_never_executed(tmp_path, capsys):
    marker = tmp_path / "pwned"
    src, _ = _pickle_source(tmp_path, payload={"vision_model.x": _Payload(str(marker))})
    out = unique_dir(tmp_path, "evil")
    assert convert("--src", src, "--out", out, "--allow-pickle") == 1
    assert not marker.exists() and not out.exists()
    assert "weights_only" in capsys.readouterr().err


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


def test_existing_target_needs_force(tmp_path, capsys):
    src, ref = make_bagel(tmp_path)
    out = unique_dir(tmp_path, "existing")
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert convert("--src", src, "--out", out) == 1
    assert "--force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "user data"
    assert convert("--src", src, "--out", out, "--force") == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert leftovers(tmp_path) == []
    empty = unique_dir(tmp_path, "empty")
    empty.mkdir()
    assert convert("--src", src, "--out", empty) == 0  # an empty directory is not "existing data"
    # never over the source itself
    assert convert("--src", src, "--out", src, "--force") == 1
    assert (src / "ema.safetensors").exists()


@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch, capsys, existing):
    src, _ = make_bagel(tmp_path)
    out = unique_dir(tmp_path, "interrupted")
    if existing:
        out.mkdir()
        (out / "old.txt").write_text("old")
    calls = []
    real = st_io._write_tensor_data

    def interrupt(f, data):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        real(f, data)

    monkeypatch.setattr(st_io, "_write_tensor_data", interrupt)
    args = ["--src", src, "--out", out] + (["--force"] if existing else [])
    assert convert(*args) == 130
    assert "interrupted" in capsys.readouterr().err
    assert leftovers(tmp_path) == []
    if existing:
        assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    else:
        assert not out.exists()


def test_truncated_source(tmp_path, capsys):
    src, _ = make_bagel(tmp_path)
    f = src / "ema.safetensors"
    data = f.read_bytes()
    out = unique_dir(tmp_path, "trunc")
    f.write_bytes(data[:-10])  # tensor data cut short
    assert convert("--src", src, "--out", out) == 1
    assert "truncated" in capsys.readouterr().err and not out.exists()
    f.write_bytes(data[:100])  # cut inside the header
    assert convert("--src", src, "--out", out) == 1
    assert "truncated" in capsys.readouterr().err and not out.exists()
    f.write_bytes(data + b"\0" * 16)  # trailing garbage
    assert convert("--src", src, "--out", out) == 1
    assert "unexpected bytes" in capsys.readouterr().err and not out.exists()
    assert leftovers(tmp_path) == []


def test_corrupt_header(tmp_path, capsys):
    src, _ = make_bagel(tmp_path)
    f = src / "ema.safetensors"
    data = bytearray(f.read_bytes())
    out = unique_dir(tmp_path, "corrupt")
    garbled = bytearray(data)
    garbled[8:16] = b"#garbage"
    f.write_bytes(bytes(garbled))
    assert convert("--src", src, "--out", out) == 1
    assert "corrupt safetensors header" in capsys.readouterr().err
    f.write_bytes(struct.pack("<Q", 2**62) + bytes(data[8:]))  # absurd header length
    assert convert("--src", src, "--out", out) == 1
    assert "corrupt safetensors header" in capsys.readouterr().err
    header_len = struct.unpack("<Q", bytes(data[:8]))[0]
    header = json.loads(bytes(data[8 : 8 + header_len]))
    key = next(k for k in header if k.startswith("vit_model."))
    header[key]["data_offsets"][1] += 2  # offsets that disagree with the shape
    raw = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(data[8 + header_len :]))
    assert convert("--src", src, "--out", out) == 1
    assert "corrupt safetensors header" in capsys.readouterr().err
    assert not out.exists() and leftovers(tmp_path) == []


def test_nan_in_source_is_corruption(tmp_path, capsys):
    w = make_model().state_dict()["vision_model.post_layernorm.weight"].clone()
    w[3] = float("nan")
    src, _ = make_bagel(tmp_path, extra={"vit_model.vision_model.post_layernorm.weight": w.to(torch.bfloat16)})
    out = unique_dir(tmp_path, "nan")
    assert convert("--src", src, "--out", out) == 1
    assert "NaN" in capsys.readouterr().err and not out.exists() and leftovers(tmp_path) == []


def test_hash_verification_catches_corrupted_output(tmp_path, monkeypatch, capsys):
    src, _ = make_bagel(tmp_path)
    calls = []

    def corrupting_write(f, data):
        calls.append(1)
        if len(calls) == 7:  # a disk / filesystem error on one tensor
            data = bytearray(data)
            data[0] ^= 0xFF
        f.write(data)

    monkeypatch.setattr(st_io, "_write_tensor_data", corrupting_write)
    out = unique_dir(tmp_path, "corrupted_out")
    assert convert("--src", src, "--out", out) == 1
    err = capsys.readouterr().err
    assert "verification failed" in err and "sha256" in err
    assert not out.exists() and leftovers(tmp_path) == []


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


# ------------------------------------------------------------------------------------------------------------------
# remote sources through fsspec: header + the ViT's byte ranges, nothing else
# ------------------------------------------------------------------------------------------------------------------
from fsspec.implementations.local import LocalFileSystem  # noqa: E402
from fsspec.spec import AbstractBufferedFile  # noqa: E402


class CountingFile(AbstractBufferedFile):
    """A remote-style file (like HfFileSystem's): every read is a ranged fetch, and is counted."""

    def _fetch_range(self, start, end):
        with open(self.path, "rb") as f:
            f.seek(start)
            data = f.read(end - start)
        type(self.fs).ranges.append((os.path.basename(self.path), start, start + len(data)))
        return data


class CountingFileSystem(LocalFileSystem):
    protocol = "countingfs"
    root_marker = "/"
    ranges: list = []

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        if path.startswith("countingfs://"):
            path = path[len("countingfs://") :]
        return LocalFileSystem._strip_protocol(path)

    def _open(self, path, mode="rb", block_size=None, autocommit=True, cache_options=None, **kwargs):
        assert mode == "rb"
        return CountingFile(self, path, mode, block_size=block_size or 2**20, cache_options=cache_options, **kwargs)

    def cat_file(self, path, start=None, end=None, **kwargs):  # route every read through the counted file
        with self.open(path, "rb", cache_type="none") as f:
            f.seek(start or 0)
            return f.read(None if end is None else end - (start or 0))


def test_fsspec_source_reads_only_header_and_vit_ranges(tmp_path):
    import fsspec

    fsspec.register_implementation("countingfs", CountingFileSystem, clobber=True)
    src, ref = make_bagel(tmp_path)
    f = src / "ema.safetensors"
    header_len = struct.unpack("<Q", f.read_bytes()[:8])[0]
    header = json.loads(f.read_bytes()[8 : 8 + header_len])
    header.pop("__metadata__", None)
    base = 8 + header_len
    vit = {k: (base + v["data_offsets"][0], base + v["data_offsets"][1]) for k, v in header.items() if k.startswith("vit_model.")}
    other = {k: (base + v["data_offsets"][0], base + v["data_offsets"][1]) for k, v in header.items() if k not in vit}
    vit_bytes = sum(e - b for b, e in vit.values())
    assert sum(e - b for b, e in other.values()) > 5 * vit_bytes  # the language model dominates the file

    CountingFileSystem.ranges = []
    out = unique_dir(tmp_path, "remote")
    assert convert("--src", f"countingfs://{src}", "--out", out) == 0
    ranges = [(b, e) for name, b, e in CountingFileSystem.ranges if name == "ema.safetensors"]
    assert {name for name, _, _ in CountingFileSystem.ranges} <= {"ema.safetensors", "vit_config.json", "config.json"}
    read = sum(e - b for b, e in ranges)
    assert read == 8 + header_len + vit_bytes, (read, 8 + header_len + vit_bytes)  # exactly: header + ViT slice
    for b, e in ranges:
        assert not any(b < oe and ob < e for ob, oe in other.values())  # never a byte of another module
    assert_same_outputs(ref, load_ours(out), ref.config)
    assert "countingfs://" in (out / "README.md").read_text()

    local = unique_dir(tmp_path, "file_url")  # plain file:// URL of the single file (vit_config.json beside it)
    assert convert("--src", f"file://{f}", "--out", local) == 0
    first, second = tensors_of(out), tensors_of(local)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_hf_url_base_model_and_card(tmp_path):
    assert hub.hf_repo_id("hf://ByteDance-Seed/BAGEL-7B-MoT") == "ByteDance-Seed/BAGEL-7B-MoT"
    assert hub.hf_repo_id("hf://ByteDance-Seed/BAGEL-7B-MoT@main/ema.safetensors") == "ByteDance-Seed/BAGEL-7B-MoT"
    assert hub.hf_repo_id("hf://datasets/x/y") is None and hub.hf_repo_id("/local/path") is None
    src, _ = make_bagel(tmp_path)
    out = unique_dir(tmp_path, "card")
    assert convert("--src", src, "--out", out, "--license", "other", "--base-model", "me/base") == 0
    front = (out / "README.md").read_text().split("---")[1]
    assert "license: other" in front and "base_model: me/base" in front


# ------------------------------------------------------------------------------------------------------------------
# --push-to-hub (nothing is sent)
# ------------------------------------------------------------------------------------------------------------------
def test_push_to_hub_calls(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = []

    class FakeApi:
        def __init__(self, *a, **k):
            pass

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))
            return f"https://huggingface.co/{repo_id}"

        def create_branch(self, repo_id, **kwargs):
            calls.append(("create_branch", repo_id, kwargs))

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs["repo_id"], kwargs))
            assert sorted(os.listdir(kwargs["folder_path"])) == sorted(os.listdir(out))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    src, _ = make_bagel(tmp_path)
    out = unique_dir(tmp_path, "push")
    rc = convert("--src", src, "--out", out, "--push-to-hub", "me/tower", "--private", "--revision", "dev")
    assert rc == 0
    assert [c[0] for c in calls] == ["create_repo", "create_branch", "upload_folder"]
    assert calls[0][1] == "me/tower" and calls[0][2]["private"] is True and calls[0][2]["exist_ok"] is True
    assert calls[1][2]["branch"] == "dev"
    upload = calls[2][2]
    assert upload["folder_path"] == str(out) and upload["revision"] == "dev" and upload["repo_type"] == "model"
    assert 'repo = "me/tower"' in (out / "README.md").read_text()

    # a failing upload: non-zero, the output stays
    class FailingApi(FakeApi):
        def upload_folder(self, **kwargs):
            raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "HfApi", FailingApi)
    out2 = unique_dir(tmp_path, "push_fail")
    assert convert("--src", src, "--out", out2, "--push-to-hub", "me/tower") == 1
    assert (out2 / "model.safetensors").exists()


# ------------------------------------------------------------------------------------------------------------------
# the real command line (one subprocess test)
# ------------------------------------------------------------------------------------------------------------------
def test_command_line_exit_codes(tmp_path):
    src, _ = make_bagel(tmp_path)
    out = unique_dir(tmp_path, "cli")
    cmd = [sys.executable, str(ROOT / "convert_checkpoint.py"), "--src", str(src), "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ok = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert (out / "model.safetensors").exists()
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 1
    assert again.stderr.startswith("error: ") and "--force" in again.stderr
    assert "Traceback" not in again.stderr and again.stderr.strip().count("\n") == 0  # one paragraph


def test_preprocessor_settings_follow_the_model():
    bagel = hub.navit_preprocessor_dict(tiny_config(hidden_size=1152, num_attention_heads=16, image_size=980, patch_size=14))
    assert (bagel["patch_size"], bagel["image_stride"], bagel["max_num_patches_per_side"]) == (14, 14, 70)
    assert (bagel["max_image_size"], bagel["min_image_size"]) == (980, 224)
    assert bagel["max_pixels"] == 1_806_336  # BAGEL's own budget is kept for BAGEL's geometry (img_num divides it)
    stock = hub.navit_preprocessor_dict(tiny_config(image_size=378, patch_size=14, hidden_size=32))
    assert (stock["max_num_patches_per_side"], stock["max_image_size"], stock["min_image_size"]) == (27, 378, 224)
    assert stock["max_pixels"] == 378 * 378
    assert stock["auto_map"] == {"AutoImageProcessor": "image_processing_siglip_navit.SiglipNaViTImageProcessor"}
