"""The image processor's settings come from ONE table (`SETTINGS`): the TypedDict transformers 5.x routes
`from_pretrained` kwargs through, the constructor, the saved keys, the docstring and the validation are derived from
it; every setting that sizes an allocation is bounded at construction, alone and in combination (issue 20 item 2),
and the grid-side limit is the configuration's own `MAX_PATCHES_PER_SIDE`, also when the processor is loaded as
remote code in a fresh process."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from siglip_navit_tools import repo_code
from siglip_navit_tools.testing import copy_remote_code, unique_dir

ipm = repo_code.image_processing()
cfg = repo_code.configuration()
Processor = ipm.SiglipNaViTImageProcessor
INT_SETTINGS = [name for name, spec in ipm.SETTINGS.items() if spec.type is int]


def test_the_table_is_the_one_declaration():
    annotations = ipm.SiglipNaViTImagesKwargs.__annotations__  # what transformers 5.x reads as `valid_kwargs`
    assert Processor.valid_kwargs is ipm.SiglipNaViTImagesKwargs
    assert {name: annotations[name] for name in ipm.SETTINGS} == {n: s.type for n, s in ipm.SETTINGS.items()}
    saved = {k: v for k, v in Processor().to_dict().items() if not k.startswith("_")}  # 4.49 adds _processor_class
    assert saved == {name: spec.default for name, spec in ipm.SETTINGS.items()}
    for name in ipm.SETTINGS:
        assert f"        {name} (`" in Processor.__doc__
    with pytest.raises(TypeError, match="valid: " + ", ".join(ipm.SETTINGS) + ", return_tensors"):
        Processor()(images=None, colour=1)
    assert INT_SETTINGS == ["max_image_size", "min_image_size", "image_stride", "max_pixels", "img_num", "patch_size",
                            "max_num_patches_per_side"]  # fmt: skip
    # the type decides the check: no list of names selected by position
    for name in ipm.SETTINGS:
        with pytest.raises(ValueError, match=f"`{name}` must be"):
            Processor(**{name: "nonsense" if ipm.SETTINGS[name].type is not str else 3})
    with pytest.raises(ValueError, match="`position_id_mode` must be one of"):
        Processor(position_id_mode=np.array(["extrapolate", "interpolate"]))


def test_the_grid_side_limit_has_one_owner():
    assert ipm.MAX_PATCHES_PER_SIDE is cfg.MAX_PATCHES_PER_SIDE
    assert ipm.SETTINGS["max_num_patches_per_side"].limit == cfg.MAX_PATCHES_PER_SIDE
    assert ipm.MAX_PATCH_SIZE == cfg.SIZE_FIELD_BOUNDS["patch_size"][1]  # the model's own patch bound
    assert not hasattr(ipm, "MAX_GRID_SIDE")


# the largest accepted value of each int setting, with the other settings it needs to be accepted
AT_LIMIT = {
    "max_image_size": dict(position_id_mode="interpolate"),
    "min_image_size": {},
    "image_stride": dict(patch_size=ipm.MAX_PATCH_SIZE, max_image_size=ipm.MAX_IMAGE_SIDE),
    "max_pixels": {},
    "img_num": {},
    "patch_size": dict(image_stride=ipm.MAX_PATCH_SIZE, max_image_size=ipm.MAX_IMAGE_SIDE),
    "max_num_patches_per_side": dict(position_id_mode="interpolate"),
}


@pytest.mark.parametrize("name", INT_SETTINGS)
def test_every_int_setting_is_bounded_at_construction_and_per_call(name):
    limit = ipm.SETTINGS[name].limit
    at_limit = Processor(**{name: limit}, **AT_LIMIT[name])
    assert at_limit.to_dict()[name] == limit
    message = f"`{name}` = {limit + 1} is more than the supported {limit}"
    with pytest.raises(ValueError, match=message):
        Processor(**{name: limit + 1}, **AT_LIMIT[name])
    with pytest.raises(ValueError, match=message):
        at_limit.patch_grid(10, 10, **{name: limit + 1})


def test_the_reported_3_gb_setting_is_refused_and_the_largest_accepted_one_stays_small():
    # a 1x1 image became 342,225 patches (3 GB) with in-bound sides and an unbounded pixel budget
    hostile = dict(max_image_size=8190, min_image_size=8190, max_pixels=10**9, position_id_mode="interpolate")
    with pytest.raises(ValueError, match=r"`max_pixels` = 1000000000 is more than the supported 16777216"):
        Processor(**hostile)
    largest = Processor(**{**hostile, "max_pixels": ipm.MAX_PIXELS})
    grid_h, grid_w = largest.patch_grid(1, 1)
    assert grid_h * grid_w * 14 * 14 <= ipm.MAX_PIXELS
    assert grid_h * grid_w < 342_225 // 4


RULES = st.fixed_dictionaries(
    {
        "max_image_size": st.integers(1, ipm.MAX_IMAGE_SIDE),
        "min_image_size": st.integers(1, ipm.MAX_IMAGE_SIDE),
        "image_stride": st.sampled_from([1, 2, 7, 14, 16, 64, 333, 1024]),
        "max_pixels": st.integers(1, ipm.MAX_PIXELS),
        "img_num": st.integers(1, ipm.MAX_IMG_NUM),
        "bagel_interleaved_resize": st.booleans(),
    }
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(width=st.integers(1, 10**6), height=st.integers(1, 10**6), rule=RULES)
def test_every_accepted_combination_keeps_images_within_the_pixel_budget(width, height, rule):
    """Bounded settings bound the allocation: an image never has more pixels than the budget `max_pixels / img_num`
    plus the stride rounding of its two sides, nor more than MAX_PATCHES_PER_SIDE patches per side."""
    stride = rule["image_stride"]
    try:
        processor = Processor(patch_size=stride, max_num_patches_per_side=ipm.MAX_PATCHES_PER_SIDE,
                              position_id_mode="interpolate", **rule)  # fmt: skip
    except ValueError:
        return  # refused at construction: nothing to bound
    grid_h, grid_w = processor.patch_grid(width, height)
    h, w = grid_h * stride, grid_w * stride
    assert grid_h <= ipm.MAX_PATCHES_PER_SIDE and grid_w <= ipm.MAX_PATCHES_PER_SIDE
    budget = rule["max_pixels"] / rule["img_num"]
    assert w * h <= max(budget, stride * stride) + stride * (w + h) + 2 * stride * stride
    assert w * h <= 3 * ipm.MAX_PIXELS  # whatever the settings: never gigabytes of pixels


def test_from_pretrained_overrides_are_validated_and_the_config_limit_is_copied_with_the_remote_code(tmp_path):
    """A fresh process, offline, as a user loads a converted repo: transformers copies the processor's relative
    import (the configuration file) into its module cache."""
    folder = copy_remote_code(unique_dir(tmp_path, "procrepo"))
    settings_json = Processor.settings_for_model(cfg.SiglipNaViTConfig())
    settings_json["auto_map"] = repo_code.processor_auto_map()
    (folder / "preprocessor_config.json").write_text(json.dumps(settings_json))
    code = textwrap.dedent(
        f"""
        import sys
        from transformers import AutoImageProcessor
        folder = {str(folder)!r}
        processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
        module = sys.modules[type(processor).__module__]
        config_module = sys.modules[module.__name__.rsplit(".", 1)[0] + ".configuration_siglip_navit"]
        assert module.MAX_PATCHES_PER_SIDE is config_module.MAX_PATCHES_PER_SIDE
        override = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True, max_pixels=500_000)
        assert override.max_pixels == 500_000
        try:
            AutoImageProcessor.from_pretrained(folder, trust_remote_code=True, max_pixels=10**9)
        except ValueError as err:
            print("refused:", err)
        """
    )
    env = dict(os.environ, PYTHONPATH="", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                          stdin=subprocess.DEVNULL)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "refused: SiglipNaViTImageProcessor: `max_pixels` = 1000000000 is more than the supported" in proc.stdout
