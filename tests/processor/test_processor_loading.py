"""SiglipNaViTImageProcessor loaded as users do: AutoImageProcessor + AutoModel from a directory with
trust_remote_code, save / load round trips, and the repo's preprocessor_config.json being the default."""

import json
import warnings

import pytest
import torch
from _processor_reference import GOOD, assert_same_pack, rand_rgb, smooth_rgb

from siglip_navit_tools import repo_code
from siglip_navit_tools.testing import copy_remote_code, dtype_kwarg, make_model, tiny_config, unique_dir

ROOT = repo_code.REPO_ROOT
DTYPE_KWARG = dtype_kwarg()
ipm = repo_code.image_processing()

Processor = ipm.SiglipNaViTImageProcessor


# ----------------------------------------------------------------------------------------------------------------
# End to end: AutoImageProcessor + AutoModel from a directory, trust_remote_code
# ----------------------------------------------------------------------------------------------------------------
def tiny_processor(**kwargs):
    # matches tiny_config(): patch 4, 24 px -> a 6x6 position table
    return Processor(
        max_image_size=24, min_image_size=8, image_stride=4, patch_size=4, max_num_patches_per_side=6, **kwargs
    )


def test_auto_classes_end_to_end(tmp_path, capfd):
    from transformers import AutoImageProcessor, AutoModel

    config = tiny_config()
    model = make_model(config)
    folder = unique_dir(tmp_path, "navit_e2e")
    model.save_pretrained(folder)
    copy_remote_code(folder)
    tiny_processor().save_pretrained(folder)
    saved = json.loads((folder / "preprocessor_config.json").read_text())
    assert saved["auto_map"] == {"AutoImageProcessor": "image_processing_siglip_navit.SiglipNaViTImageProcessor"}
    assert "image_processor_type" not in saved

    capfd.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no (deprecation / use_fast / backend) warning when loading the processor
        processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    err = capfd.readouterr().err
    assert "slow" not in err and "use_fast" not in err and "backend" not in err, err
    assert type(processor).__name__ == "SiglipNaViTImageProcessor"
    assert processor.max_num_patches_per_side == 6 and processor.patch_size == 4

    loaded = AutoModel.from_pretrained(folder, trust_remote_code=True, **{DTYPE_KWARG: torch.float32}).eval()

    images = [rand_rgb(30, 20, 1), smooth_rgb(10, 17, 2), rand_rgb(5, 5, 3)]
    inputs = processor(images=images, return_tensors="pt")
    assert inputs["image_grid_hw"].tolist() == [[4, 6], [4, 2], [2, 2]]
    with torch.no_grad():
        out = loaded(**inputs, output_hidden_states=True)
        singles = [loaded(**processor(images=image, return_tensors="pt")).last_hidden_state for image in images]
    assert (out.last_hidden_state - torch.cat(singles)).abs().max() <= 1e-5

    maps = processor.unpack(out.last_hidden_state, inputs)
    assert [tuple(m.shape) for m in maps] == [(4, 6, 32), (4, 2, 32), (2, 2, 32)]
    for m, single in zip(maps, singles):
        assert (m.reshape(-1, 32) - single).abs().max() <= 1e-5
    layers = processor.unpack(out.hidden_states, inputs)
    assert len(layers) == config.num_hidden_layers + 1
    assert all([tuple(m.shape) for m in per_layer] == [(4, 6, 32), (4, 2, 32), (2, 2, 32)] for per_layer in layers)

    # BatchFeature.to keeps the index tensors integral; no return_tensors also runs
    with torch.no_grad():
        again = loaded(**inputs.to(torch.float32)).last_hidden_state
        plain = loaded(**processor(images=images)).last_hidden_state
    assert torch.equal(again, out.last_hidden_state) and torch.equal(plain, out.last_hidden_state)


def test_save_load_round_trip(tmp_path):
    from transformers import AutoImageProcessor

    settings = dict(
        max_image_size=980,
        min_image_size=378,
        max_pixels=2_007_040,
        img_num=2,
        position_id_mode="interpolate",
        bagel_interleaved_resize=True,
    )
    processor = Processor(**settings)
    folder = unique_dir(tmp_path, "navit_proc")
    processor.save_pretrained(folder)
    assert (folder / "image_processing_siglip_navit.py").is_file()  # registered: the code travels with the config

    direct = Processor.from_pretrained(folder)
    auto = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    for other in (direct, auto):
        assert other.to_dict() == processor.to_dict()
        for key, value in settings.items():
            assert getattr(other, key) == value
    images = [smooth_rgb(640, 480, 1), rand_rgb(30, 90, 2)]
    expected = processor(images=images, return_tensors="pt")
    for other in (direct, auto):
        assert_same_pack(other(images=images, return_tensors="pt"), {**expected, "max_seqlen": int(expected["max_seqlen"])})

    # from_pretrained kwargs override the saved settings (and are validated)
    override = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True, max_pixels=1_000_000)
    assert override.max_pixels == 1_000_000
    with pytest.raises(ValueError, match="image_stride"):
        AutoImageProcessor.from_pretrained(folder, trust_remote_code=True, image_stride=16)
    # settings changed after loading are validated at the next call
    override.image_stride = 16
    with pytest.raises(ValueError, match="image_stride"):
        override(images=GOOD)


def test_repo_preprocessor_config_is_the_default():
    saved = json.loads((ROOT / "preprocessor_config.json").read_text())
    assert saved["auto_map"] == {"AutoImageProcessor": "image_processing_siglip_navit.SiglipNaViTImageProcessor"}
    default = json.loads(Processor().to_json_string())  # what save_pretrained writes
    default.pop("auto_map", None)
    assert {k: v for k, v in saved.items() if k != "auto_map"} == default
    assert saved["max_image_size"] == 980 and saved["max_num_patches_per_side"] == 70
