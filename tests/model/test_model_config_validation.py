"""Config validation (issue 12, item 5): every integer size field is checked against ONE table of bounds, in the
config's __init__ (so every way transformers builds a config goes through it) and again when a model is built.
Absurd, negative, zero, bool, float and non-int sizes are a ValueError naming the field, on both majors."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModel

from siglip_navit_tools import repo_code
from siglip_navit_tools.testing import copy_remote_code, dtype_kwarg, make_model, tiny_config, unique_dir

cfg_mod = repo_code.configuration()
model_mod = repo_code.modeling()
DTYPE_KWARG = dtype_kwarg()

Config = cfg_mod.SiglipNaViTConfig
BOUNDS = cfg_mod.SIZE_FIELD_BOUNDS
BAGEL_VIT_CONFIG = {
    "hidden_size": 1152, "image_size": 980, "intermediate_size": 4304, "model_type": "siglip_vision_model",
    "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14,
}  # fmt: skip


def test_the_table_covers_every_integer_size_field():
    assert set(BOUNDS) == {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "num_channels", "image_size", "patch_size"}  # fmt: skip
    assert all(low == 1 and high >= 1024 for low, high in BOUNDS.values())


def out_of_bounds(name):
    low, high = BOUNDS[name]
    return [low - 1, -1, -(2**31), high + 1, 10**12]


@pytest.mark.parametrize("name", list(BOUNDS))
def test_out_of_bounds_sizes_are_a_value_error_naming_the_field(name):
    low, high = BOUNDS[name]
    for value in out_of_bounds(name):
        with pytest.raises(ValueError, match=rf"`{name}` must be in \[{low}, {high}\], got {value}"):
            Config(**{name: value})


@pytest.mark.parametrize("value", [True, False, 2.0, 2.5, None, "12", (224, 224), [16]], ids=repr)
@pytest.mark.parametrize("name", list(BOUNDS))
def test_non_int_sizes_are_a_value_error_naming_the_field(name, value):
    """Also on transformers 5.x, whose strict dataclass would otherwise raise its own non-ValueError first."""
    with pytest.raises(ValueError, match=rf"`{name}` must be an int, got "):
        Config(**{name: value})


def test_the_examples_from_the_issue():
    with pytest.raises(ValueError, match=r"`num_hidden_layers` must be in \[1, 1024\], got 0"):
        Config(num_hidden_layers=0)
    with pytest.raises(ValueError, match=r"`intermediate_size` must be in \[1, 262144\], got 0"):
        Config(intermediate_size=0)
    with pytest.raises(ValueError, match=r"`num_hidden_layers` must be in \[1, 1024\], got 100001"):
        Config(**dict(BAGEL_VIT_CONFIG, num_hidden_layers=100_001))


@pytest.mark.parametrize("sizes", [
    dict(num_hidden_layers=1), dict(num_hidden_layers=1024), dict(intermediate_size=1), dict(intermediate_size=262_144),
    dict(hidden_size=65_536, num_attention_heads=16), dict(hidden_size=16_384, num_attention_heads=4096),
    dict(num_channels=1), dict(num_channels=1024), dict(image_size=65_536, patch_size=64),
    dict(image_size=64 * 1024, patch_size=1024),
    dict(image_size=1, patch_size=1), dict(hidden_size=4, num_attention_heads=1),
], ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))  # fmt: skip
def test_sizes_at_the_bounds_are_accepted(sizes):
    config = Config(**sizes)
    for name, value in sizes.items():
        assert getattr(config, name) == value


def test_position_grid_bound():
    with pytest.raises(ValueError, match=r"`image_size // patch_size` \(65536 // 16 = 4096\) must be at most 1024"):
        Config(image_size=65_536, patch_size=16)
    Config(image_size=1024 * 14, patch_size=14)


def test_relations_between_sizes_are_still_checked():
    with pytest.raises(ValueError, match=r"`hidden_size` \(30\) must be divisible by `num_attention_heads` \(4\)"):
        Config(hidden_size=30, num_attention_heads=4, rope=False)
    with pytest.raises(ValueError, match=r"`image_size` \(30\) must be a multiple of `patch_size` \(4\)"):
        Config(image_size=30, patch_size=4)
    with pytest.raises(ValueError, match=r"rope=True needs head_dim"):
        Config(hidden_size=36, num_attention_heads=6)
    with pytest.raises(ValueError, match=r"`num_attention_heads` must be in \[1, 4096\], got 0"):
        Config(num_attention_heads=0)  # not a ZeroDivisionError


def test_every_construction_path_still_builds_valid_configs(tmp_path):
    defaults = Config()
    assert Config.from_dict(defaults.to_dict()).to_dict() == defaults.to_dict()
    assert json.loads(defaults.to_json_string())["hidden_size"] == 768  # 5.x diffs against a default config
    bagel = tmp_path / "vit_config.json"
    bagel.write_text(json.dumps(BAGEL_VIT_CONFIG))
    config = Config.from_json_file(str(bagel))
    assert (config.num_hidden_layers, config.rope) == (27, True)
    target = unique_dir(tmp_path, "cfgpaths")
    config.save_pretrained(target)
    assert Config.from_pretrained(target).to_dict() == config.to_dict()
    copy_remote_code(target)
    assert AutoConfig.from_pretrained(target, trust_remote_code=True).num_hidden_layers == 27


def bad_config_dir(tmp_path, **changes):
    target = copy_remote_code(unique_dir(tmp_path, "badcfg"))
    data = tiny_config(rope=True).to_dict()
    data.update(changes, auto_map={"AutoConfig": "configuration_siglip_navit.SiglipNaViTConfig",
                                   "AutoModel": "modeling_siglip_navit.SiglipVisionModel"})  # fmt: skip
    (target / "config.json").write_text(json.dumps(data))
    return target


@pytest.mark.parametrize("change", [dict(num_hidden_layers=0), dict(intermediate_size=-4), dict(hidden_size=0),
                                    dict(num_hidden_layers=100_001), dict(patch_size=True)], ids=str)  # fmt: skip
def test_bad_sizes_in_files_fail_on_every_loading_path(tmp_path, change):
    name = next(iter(change))
    target = bad_config_dir(tmp_path, **change)
    bagel = tmp_path / "vit_config.json"
    bagel.write_text(json.dumps(dict(BAGEL_VIT_CONFIG, **change)))
    loaders = {
        "from_json_file": lambda: Config.from_json_file(str(bagel)),
        "from_dict": lambda: Config.from_dict(json.loads(bagel.read_text())),
        "Config.from_pretrained": lambda: Config.from_pretrained(target),
        "AutoConfig": lambda: AutoConfig.from_pretrained(target, trust_remote_code=True),
        "AutoModel": lambda: AutoModel.from_pretrained(target, trust_remote_code=True, **{DTYPE_KWARG: torch.float32}),
    }
    for loader_name, load in loaders.items():
        with pytest.raises(ValueError, match=rf"SiglipNaViTConfig: `{name}` must be "):
            load()  # on failure, `loader_name` in the traceback says which path let it through


def test_a_field_broken_after_construction_is_caught_when_the_model_is_built():
    """BAGEL edits `num_hidden_layers` after reading its file; the model checks the config again."""
    config = tiny_config(num_hidden_layers=1)
    config.num_hidden_layers -= 1
    with pytest.raises(ValueError, match=r"`num_hidden_layers` must be in \[1, 1024\], got 0"):
        model_mod.SiglipVisionModel(config)
    config.num_hidden_layers = 2
    config.intermediate_size = 0
    with pytest.raises(ValueError, match=r"`intermediate_size` must be in \[1, 262144\], got 0"):
        make_model(config)
