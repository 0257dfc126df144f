"""Hugging Face integration as users meet it: remote code from a directory, save/load in fresh processes,
dtype / device_map, gradient checkpointing, hidden states, and no silent stock model without trust_remote_code."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel

from siglip_navit_tools import repo_code
from siglip_navit_tools.testing import (
    build_hub_dir,
    copy_remote_code,
    dtype_kwarg,
    make_model,
    make_pack,
    tiny_config,
    unique_dir,
)

ROOT = repo_code.REPO_ROOT
cfg_mod = repo_code.configuration()
model_mod = repo_code.modeling()
DTYPE_KWARG = dtype_kwarg()

GRIDS = [(6, 6), (2, 5), (1, 1)]


def save_pack(pack, path):
    tensors = {k: (v if isinstance(v, torch.Tensor) else torch.tensor(v)) for k, v in pack.items()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def run_fresh_python(code: str) -> subprocess.CompletedProcess:
    """Run code in a new interpreter (no class registered, no module cached), stdin closed."""
    env = dict(os.environ, PYTHONPATH="", TRANSFORMERS_VERBOSITY="warning")
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env=env,
        timeout=300,
    )


def forward(model, pack):
    with torch.no_grad():
        return model(**pack).last_hidden_state


# ---- loading from a directory, the Hub way --------------------------------------------------------------------


@pytest.mark.parametrize("rope", [False, True])
def test_directory_loads_with_auto_classes_and_trust_remote_code(tmp_path, rope):
    config = tiny_config(rope=rope)
    model = make_model(config, attn="sdpa")
    target = build_hub_dir(tmp_path, config, model)

    loaded_config = AutoConfig.from_pretrained(target, trust_remote_code=True)
    assert type(loaded_config).__name__ == "SiglipNaViTConfig"
    assert loaded_config.rope is rope
    loaded, info = AutoModel.from_pretrained(target, trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(loaded).__module__.startswith("transformers_modules")  # the remote code, not a stock class
    assert loaded.config._attn_implementation == "sdpa"  # the default, without any argument
    pack = make_pack(GRIDS, config)
    assert torch.equal(forward(loaded, pack), forward(model, pack))


def test_upstream_persistent_rope_buffers_in_a_checkpoint_are_ignored(tmp_path):
    config = tiny_config(rope=True)
    model = make_model(config)
    garbage = {f"vision_model.rope.{n}": torch.full((36, 4), 7.0) for n in ("cos_h", "sin_h", "cos_w", "sin_w")}
    target = build_hub_dir(tmp_path, config, model, extra_tensors=garbage)
    loaded, info = AutoModel.from_pretrained(target, trust_remote_code=True, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"]
    fresh = model_mod.RotaryEmbedding2D(4, 6, 6)
    for name in ("cos_h", "sin_h", "cos_w", "sin_w"):
        assert torch.equal(getattr(loaded.vision_model.rope, name), getattr(fresh, name))


@pytest.mark.parametrize("load_kwargs", [{}, {"device_map": "cpu"}, {"device_map": "auto"}, {"low_cpu_mem_usage": True}])
def test_rope_tables_are_correct_after_from_pretrained(tmp_path, load_kwargs):
    """transformers 5.x leaves non-persistent buffers uninitialised after a meta-device load: we recompute them."""
    config = tiny_config(rope=True)
    model = make_model(config)
    target = unique_dir(tmp_path, "ropeload")
    model.save_pretrained(target)
    loaded = AutoModel.from_pretrained(target, trust_remote_code=True, **load_kwargs)
    fresh = model_mod.RotaryEmbedding2D(4, 6, 6)
    for name in ("cos_h", "sin_h", "cos_w", "sin_w"):
        assert torch.equal(getattr(loaded.vision_model.rope, name), getattr(fresh, name)), name
    pack = make_pack(GRIDS, config)
    assert torch.equal(forward(loaded, pack), forward(model, pack))


def test_explicit_dtype_and_device_map(tmp_path):
    config = tiny_config(rope=True)
    model = make_model(config)
    target = unique_dir(tmp_path, "dtypeload")
    model.save_pretrained(target)
    pack = make_pack(GRIDS, config)
    reference = forward(model, pack)

    bf16 = AutoModel.from_pretrained(target, trust_remote_code=True, **{DTYPE_KWARG: torch.bfloat16})
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    out = forward(bf16, pack)  # fp32 pixels are cast to the model's dtype
    assert out.dtype == torch.bfloat16
    cos = torch.nn.functional.cosine_similarity(out.float().flatten(), reference.flatten(), dim=0).item()
    assert cos >= 0.999

    mapped = AutoModel.from_pretrained(target, trust_remote_code=True, device_map="auto", **{DTYPE_KWARG: torch.float32})
    assert mapped.device.type == "cpu"
    assert torch.equal(forward(mapped, pack), reference)


def test_root_config_json_is_bagel_vit_as_bagel_runs_it(tmp_path):
    data = json.loads((ROOT / "config.json").read_text())
    expected = dict(
        model_type="siglip_navit", hidden_size=1152, intermediate_size=4304, num_attention_heads=16,
        num_hidden_layers=26, patch_size=14, image_size=980, rope=False, hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6, num_channels=3,
    )  # fmt: skip
    for key, value in expected.items():
        assert data[key] == value, key
    assert data["auto_map"] == {
        "AutoConfig": "configuration_siglip_navit.SiglipNaViTConfig",
        "AutoModel": "modeling_siglip_navit.SiglipVisionModel",
    }
    target = copy_remote_code(unique_dir(tmp_path, "rootcfg"))
    (target / "config.json").write_text((ROOT / "config.json").read_text())
    config = AutoConfig.from_pretrained(target, trust_remote_code=True)
    assert config.rope is False and config.num_hidden_layers == 26
    with torch.device("meta"):
        model = AutoModel.from_config(config, trust_remote_code=True)
    assert len(model.state_dict()) == 421


def test_bagel_vit_config_json_reads_as_is(tmp_path):
    """BAGEL-7B-MoT's vit_config.json: 7 keys, the stock model_type; rope defaults to True and 27 layers."""
    path = tmp_path / "vit_config.json"
    path.write_text(json.dumps({
        "hidden_size": 1152, "image_size": 980, "intermediate_size": 4304, "model_type": "siglip_vision_model",
        "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14,
    }))  # fmt: skip
    config = cfg_mod.SiglipNaViTConfig.from_json_file(str(path))
    assert config.model_type == "siglip_navit"
    assert config.rope is True and config.num_hidden_layers == 27
    assert config.hidden_act == "gelu_pytorch_tanh" and config.layer_norm_eps == 1e-6 and config.num_channels == 3
    # what BAGEL then does
    config.rope = False
    config.num_hidden_layers -= 1
    with torch.device("meta"):
        model = model_mod.SiglipVisionModel(config)
    assert len(model.state_dict()) == 421


def test_config_names_and_validation():
    assert cfg_mod.SiglipVisionConfig is cfg_mod.SiglipNaViTConfig
    assert cfg_mod.SiglipNaViTConfig.__name__ != transformers.SiglipVisionConfig.__name__
    assert issubclass(cfg_mod.SiglipNaViTConfig, transformers.SiglipVisionConfig)
    assert cfg_mod.SiglipNaViTConfig.model_type not in ("siglip", "siglip_vision_model")
    defaults = cfg_mod.SiglipNaViTConfig()
    assert (defaults.hidden_size, defaults.intermediate_size, defaults.num_hidden_layers) == (768, 3072, 12)
    assert (defaults.num_attention_heads, defaults.num_channels, defaults.image_size, defaults.patch_size) == (12, 3, 224, 16)
    assert (defaults.hidden_act, defaults.layer_norm_eps, defaults.attention_dropout) == ("gelu_pytorch_tanh", 1e-6, 0.0)
    assert defaults.rope is True
    with pytest.raises(ValueError, match=r"rope=True needs head_dim .* divisible by 4"):
        cfg_mod.SiglipNaViTConfig(hidden_size=36, num_attention_heads=6)  # head_dim 6
    cfg_mod.SiglipNaViTConfig(hidden_size=36, num_attention_heads=6, rope=False)  # fine without RoPE
    with pytest.raises(ValueError, match=r"`hidden_size` \(30\) must be divisible by `num_attention_heads` \(4\)"):
        cfg_mod.SiglipNaViTConfig(hidden_size=30, num_attention_heads=4, rope=False)
    with pytest.raises(ValueError, match=r"`image_size` \(30\) must be a multiple of `patch_size` \(4\)"):
        cfg_mod.SiglipNaViTConfig(image_size=30, patch_size=4)


# ---- save / load across fresh processes ------------------------------------------------------------------------

LOAD_RUN_SAVE = """
    import sys, torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel
    src, pack_file, out_file, resave = sys.argv[1:] if len(sys.argv) > 1 else ({args})
    model = AutoModel.from_pretrained(src, trust_remote_code=True, {dtype_kwarg}=torch.float32)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    pack = load_file(pack_file)
    pack["max_seqlen"] = int(pack["max_seqlen"])
    with torch.no_grad():
        out = model(**pack).last_hidden_state
    save_file({{"out": out}}, out_file)
    if resave:
        model.save_pretrained(resave)
"""


@pytest.mark.parametrize("rope", [False, True])
def test_save_pretrained_then_from_pretrained_in_fresh_processes(tmp_path, rope):
    config = tiny_config(rope=rope)
    model = make_model(config)
    pack = make_pack(GRIDS, config)
    expected = forward(model, pack)
    first = unique_dir(tmp_path, "saved")
    model.save_pretrained(first)
    assert {"configuration_siglip_navit.py", "modeling_siglip_navit.py", "config.json"} <= set(os.listdir(first))
    save_pack(pack, tmp_path / "pack.safetensors")

    # process A loads what we saved and saves it again (the 4.49 pitfall: .py files must be written too)
    second = unique_dir(tmp_path, "resaved")
    args = [str(first), str(tmp_path / "pack.safetensors"), str(tmp_path / "a.safetensors"), str(second)]
    proc = run_fresh_python(LOAD_RUN_SAVE.format(args=repr(args), dtype_kwarg=DTYPE_KWARG))
    assert proc.returncode == 0, proc.stderr
    assert {"configuration_siglip_navit.py", "modeling_siglip_navit.py", "config.json"} <= set(os.listdir(second))

    # process B loads the re-saved folder
    args = [str(second), str(tmp_path / "pack.safetensors"), str(tmp_path / "b.safetensors"), ""]
    proc = run_fresh_python(LOAD_RUN_SAVE.format(args=repr(args), dtype_kwarg=DTYPE_KWARG))
    assert proc.returncode == 0, proc.stderr
    noisy = [line for line in proc.stderr.splitlines() if any(w in line.lower() for w in ("warn", "missing", "unexpected", "deprecat"))]
    assert not noisy, noisy  # the written config loads silently

    for name in ("a", "b"):
        assert torch.equal(load_file(str(tmp_path / f"{name}.safetensors"))["out"], expected)


# ---- no silent stock model without trust_remote_code -------------------------------------------------------------


def test_loading_without_trust_remote_code_fails_clearly(tmp_path):
    config = tiny_config()
    target = unique_dir(tmp_path, "notrust")
    make_model(config).save_pretrained(target)
    code = f"""
        import torch
        from transformers import AutoConfig, AutoModel
        results = []
        for name, fn in [
            ("from_pretrained", lambda: AutoModel.from_pretrained({str(target)!r})),
            ("AutoConfig", lambda: AutoConfig.from_pretrained({str(target)!r})),
            ("from_config", lambda: AutoModel.from_config(AutoConfig.from_pretrained({str(target)!r}, trust_remote_code=True))),
        ]:
            try:
                obj = fn()
                results.append(name + ": BUILT " + type(obj).__module__ + "." + type(obj).__name__)
            except ValueError as err:
                assert "trust_remote_code=True" in str(err), str(err)
                results.append(name + ": ValueError")
        print("RESULT " + "|".join(results))
    """
    proc = run_fresh_python(code)
    assert proc.returncode == 0, proc.stderr
    result = proc.stdout.split("RESULT ")[-1].strip()  # transformers' y/N prompt is printed before it
    assert result == "from_pretrained: ValueError|AutoConfig: ValueError|from_config: ValueError"


def test_from_config_of_a_fresh_config_never_builds_the_stock_model():
    with pytest.raises(ValueError, match="Unrecognized configuration class"):
        AutoModel.from_config(tiny_config())
    assert "siglip_navit" not in transformers.CONFIG_MAPPING


def test_attn_implementation_argument(tmp_path):
    config = tiny_config()
    model = make_model(config)
    target = unique_dir(tmp_path, "attnarg")
    model.save_pretrained(target)
    pack = make_pack(GRIDS, config)
    eager = AutoModel.from_pretrained(target, trust_remote_code=True, attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"
    sdpa = AutoModel.from_pretrained(target, trust_remote_code=True, attn_implementation="sdpa")
    assert sdpa.config._attn_implementation == "sdpa"
    assert (forward(eager, pack) - forward(sdpa, pack)).abs().max().item() <= 1e-5
    loaded_config = AutoConfig.from_pretrained(target, trust_remote_code=True)
    built = AutoModel.from_config(loaded_config, trust_remote_code=True, attn_implementation="eager")
    assert built.config._attn_implementation == "eager"
    # (from_config writes the choice into the config object it is given: load a fresh one)
    default = AutoModel.from_config(AutoConfig.from_pretrained(target, trust_remote_code=True), trust_remote_code=True)
    assert default.config._attn_implementation == "sdpa"
    with pytest.raises((ImportError, ValueError)):  # no flash-attn on this machine: refused at load time
        AutoModel.from_pretrained(target, trust_remote_code=True, attn_implementation="flash_attention_2")


UNSUPPORTED_BACKENDS = ["paged|eager", "flex_attention", "kernels-community/flash-attn", "sdpa_paged", "Eager"]
UNSUPPORTED_MESSAGE = r"Unsupported attn_implementation.*'eager', 'sdpa', 'flash_attention_2'"


@pytest.mark.parametrize("name", UNSUPPORTED_BACKENDS)
def test_unsupported_backends_are_refused_at_load_time(tmp_path, name):
    config = tiny_config()
    target = build_hub_dir(tmp_path, config, make_model(config))
    with pytest.raises(ValueError, match=UNSUPPORTED_MESSAGE):
        AutoModel.from_pretrained(target, trust_remote_code=True, attn_implementation=name)
    with pytest.raises(ValueError, match=UNSUPPORTED_MESSAGE):
        AutoModel.from_config(
            AutoConfig.from_pretrained(target, trust_remote_code=True), trust_remote_code=True, attn_implementation=name
        )
    with pytest.raises(ValueError, match=UNSUPPORTED_MESSAGE):
        model_mod.SiglipVisionModel.from_pretrained(target, attn_implementation=name)
    with pytest.raises(ValueError, match=UNSUPPORTED_MESSAGE):
        model_mod.SiglipVisionModel._from_config(tiny_config(), attn_implementation=name)
    direct = tiny_config()
    direct._attn_implementation = name
    with pytest.raises(ValueError, match=UNSUPPORTED_MESSAGE):
        model_mod.SiglipVisionModel(direct)


def test_flash_attention_2_without_flash_attn_is_refused_at_load_time(tmp_path):
    config = tiny_config()
    target = build_hub_dir(tmp_path, config, make_model(config))
    message = r"flash_attention_2.*needs the `flash-attn` package"
    with pytest.raises(ValueError, match=message):
        AutoModel.from_pretrained(target, trust_remote_code=True, attn_implementation="flash_attention_2")
    with pytest.raises(ValueError, match=message):
        AutoModel.from_config(
            AutoConfig.from_pretrained(target, trust_remote_code=True),
            trust_remote_code=True,
            attn_implementation="flash_attention_2",
        )


@pytest.mark.parametrize("name", [None, "eager", "sdpa"])
def test_supported_backends_still_load_everywhere(tmp_path, name):
    config = tiny_config()
    target = build_hub_dir(tmp_path, config, make_model(config))
    kwargs = {} if name is None else {"attn_implementation": name}
    expected = name or "sdpa"
    loaded = AutoModel.from_pretrained(target, trust_remote_code=True, **kwargs)
    assert loaded.config._attn_implementation == expected
    built = AutoModel.from_config(AutoConfig.from_pretrained(target, trust_remote_code=True), trust_remote_code=True,
                                  **kwargs)  # fmt: skip
    assert built.config._attn_implementation == expected
    direct = tiny_config()
    if name is not None:
        direct._attn_implementation = name
    assert model_mod.SiglipVisionModel(direct).config._attn_implementation == expected


def test_backend_set_after_loading_is_still_checked_at_the_forward(tmp_path):
    """The load-time check does not replace the forward-time one: `config._attn_implementation` can change later."""
    config = tiny_config()
    target = build_hub_dir(tmp_path, config, make_model(config))
    loaded = AutoModel.from_pretrained(target, trust_remote_code=True, attn_implementation="eager")
    loaded.config._attn_implementation = "paged|eager"
    with pytest.raises(ValueError, match=UNSUPPORTED_MESSAGE):
        loaded(**make_pack(GRIDS, config))


# ---- training-side integration --------------------------------------------------------------------------------


CHECKPOINTING_METHODS = ["gradient_checkpointing_enable"]
if hasattr(transformers.PreTrainedModel, "activation_checkpointing_enable"):  # 5.x's new name
    CHECKPOINTING_METHODS.append("activation_checkpointing_enable")


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("method", CHECKPOINTING_METHODS)
@pytest.mark.parametrize("rope", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(rope, method, use_reentrant):
    config = tiny_config(rope=rope)
    pack = make_pack(GRIDS, config)
    target = torch.randn(47, config.hidden_size, generator=torch.Generator().manual_seed(2))

    def grads(checkpointing: bool):
        model = make_model(config, attn="sdpa", seed=11)
        if checkpointing:
            kwargs_name = method.replace("_enable", "_kwargs")  # gradient_/activation_checkpointing_kwargs
            getattr(model, method)(**{kwargs_name: {"use_reentrant": use_reentrant}})
            assert model.vision_model.encoder.gradient_checkpointing
        model.train()
        out = model(**pack).last_hidden_state
        loss = ((out - target) ** 2).mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_plain, plain = grads(False)
    loss_ckpt, ckpt = grads(True)
    assert torch.equal(loss_plain, loss_ckpt)
    assert plain.keys() == ckpt.keys()
    for name in plain:
        assert plain[name].abs().sum() > 0, name  # every parameter gets a gradient
        torch.testing.assert_close(ckpt[name], plain[name], rtol=0, atol=1e-7, msg=name)


def test_hidden_states_and_tuple_output():
    config = tiny_config(rope=True)
    model = make_model(config)
    pack = make_pack(GRIDS, config)
    with torch.no_grad():
        out = model(**pack, output_hidden_states=True)
        plain = model(**pack, return_dict=False)
        inner = model.vision_model(**pack)
    assert isinstance(out, transformers.modeling_outputs.BaseModelOutput)
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    assert all(h.shape == (47, config.hidden_size) for h in out.hidden_states)
    torch.testing.assert_close(model.vision_model.post_layernorm(out.hidden_states[-1]), out.last_hidden_state)
    assert isinstance(plain, tuple) and torch.equal(plain[0], out.last_hidden_state)
    assert isinstance(inner, torch.Tensor) and torch.equal(inner, out.last_hidden_state)  # upstream's plain tensor
    model.config.output_hidden_states = True
    with torch.no_grad():
        assert len(model(**pack).hidden_states) == config.num_hidden_layers + 1


def test_main_input_name_and_public_names():
    assert model_mod.SiglipVisionModel.main_input_name == "packed_pixel_values"
    for name in ["RotaryEmbedding2D", "rotate_half", "apply_rotary_pos_emb", "SiglipVisionEmbeddings",
                 "SiglipAttention", "SiglipFlashAttention2", "SiglipMLP", "SiglipEncoderLayer", "SiglipEncoder",
                 "SiglipVisionTransformer", "SiglipPreTrainedModel", "SiglipVisionModel",
                 "convert_conv2d_to_linear"]:  # fmt: skip
        assert hasattr(model_mod, name), name
    assert callable(model_mod.SiglipVisionEmbeddings.convert_conv2d_to_linear)
