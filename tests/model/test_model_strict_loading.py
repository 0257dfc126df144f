"""No silent random weights: every loader refuses a checkpoint that lacks, adds or reshapes tensors, naming them."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModel

from siglip_navit_tools import repo_code
from siglip_navit_tools.testing import (
    build_hub_dir,
    make_model,
    save_safetensors,
    saved_repo,
    tiny_config,
    unique_dir,
)

MISSING = "vision_model.encoder.layers.1.mlp.fc2.weight"


def _rewrite(folder: Path, drop=(), add=None, reshape=None) -> Path:
    """Rewrite `folder`'s model.safetensors without the `drop` keys, with `add` tensors and `reshape` replacements."""
    state = load_file(str(folder / "model.safetensors"))
    for key in drop:
        del state[key]
    state.update(add or {})
    state.update(reshape or {})
    save_safetensors(state, folder / "model.safetensors")
    return folder


@pytest.fixture
def complete_repo(tmp_path):
    return saved_repo(unique_dir(tmp_path, "strict"), tiny_config())


@pytest.mark.parametrize(
    "change, named",
    [
        (dict(drop=[MISSING]), rf"missing: {MISSING}"),
        (dict(add={"vision_model.extra.weight": torch.zeros(3)}), r"unexpected: vision_model\.extra\.weight"),
        (
            dict(drop=[MISSING, "vision_model.post_layernorm.bias"], add={"stray": torch.zeros(1)}),
            r"missing: vision_model\.encoder\.layers\.1\.mlp\.fc2\.weight, vision_model\.post_layernorm\.bias; "
            r"unexpected: stray",
        ),
    ],
    ids=["missing", "unexpected", "both"],
)
def test_from_pretrained_refuses_a_checkpoint_that_does_not_match(complete_repo, change, named):
    folder = _rewrite(complete_repo, **change)
    model_cls = repo_code.modeling().SiglipVisionModel
    with pytest.raises(RuntimeError, match=named):
        model_cls.from_pretrained(folder)
    with pytest.raises(RuntimeError, match=rf"SiglipVisionModel\.from_pretrained\(.*\): the checkpoint does not match.*{named}"):
        AutoModel.from_pretrained(folder, trust_remote_code=True)


def test_misshaped_tensors_are_named_even_when_transformers_is_told_to_ignore_them(complete_repo):
    key = "vision_model.post_layernorm.weight"
    folder = _rewrite(complete_repo, reshape={key: torch.ones(7)})
    with pytest.raises(RuntimeError, match=rf"misshaped: {key}"):
        AutoModel.from_pretrained(folder, trust_remote_code=True, ignore_mismatched_sizes=True)


def test_output_loading_info_hands_the_report_to_the_caller(complete_repo):
    folder = _rewrite(complete_repo, drop=[MISSING])
    model, info = AutoModel.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
    assert MISSING in info["missing_keys"]
    assert isinstance(model, torch.nn.Module)


def test_complete_checkpoints_still_load_and_upstream_rope_tables_are_still_ignored(tmp_path):
    config = tiny_config(rope=True)
    model = make_model(config)
    side = config.image_size // config.patch_size
    # upstream BAGEL (--vit_rope True) stored its RoPE tables persistently: ignored on load, never "unexpected"
    tables = {f"vision_model.rope.{n}": torch.zeros(side * side, 4) for n in ("cos_h", "sin_h", "cos_w", "sin_w")}
    folder = build_hub_dir(tmp_path, config, model, extra_tensors=tables)
    loaded = AutoModel.from_pretrained(folder, trust_remote_code=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_the_pipeline_refuses_it_too(complete_repo):
    folder = _rewrite(complete_repo, drop=[MISSING])
    # 4.x lets the RuntimeError through; 5.x tries its other candidate classes first, then raises a ValueError that
    # quotes every class's error, ours included
    with pytest.raises((RuntimeError, ValueError), match=rf"missing: {MISSING}"):
        transformers.pipeline(model=str(folder), trust_remote_code=True)
    # the Inference Endpoints handler, imported the way the endpoint does (a top-level module from the folder)
    spec = importlib.util.spec_from_file_location(f"handler_{folder.name}", folder / repo_code.HANDLER_FILE)
    handler = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(handler)
    with pytest.raises((RuntimeError, ValueError), match=rf"missing: {MISSING}"):
        handler.EndpointHandler(str(folder))


def test_the_extractor_refuses_it_with_exit_code_2_and_writes_nothing(complete_repo, tmp_path):
    folder = _rewrite(complete_repo, drop=[MISSING])
    images = tmp_path / "images"
    images.mkdir()
    import PIL.Image

    PIL.Image.new("RGB", (30, 20), (10, 200, 30)).save(images / "a.png")
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(repo_code.REPO_ROOT / "extract_features.py"), "--model", str(folder), "--input",
         str(images), "--output", str(out), "--num-workers", "0", "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert f"missing: {MISSING}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (out / "manifest.json").exists()
