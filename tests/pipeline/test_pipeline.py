"""The repo's own pipeline (`pipeline_siglip_navit.py`), loaded as users do: `transformers.pipeline(..., model=dir,
trust_remote_code=True)` on a converted-repo folder, with and without a task, on transformers 4.49 and 5.x.

Every output is compared with the model's own forward on that image alone (fp32, max|diff| <= 1e-5)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import transformers
from _pipeline_repo import (
    CUSTOM_PIPELINES,
    PIPELINE_CLASS,
    PIPELINE_FILE,
    TASK,
    close,
    count_forwards,
    images,
    make_pipeline_repo,
    reference,
)

from siglip_navit_tools import repo_code
from siglip_navit_tools.testing import dtype_kwarg, make_model, tiny_config, unique_dir

DTYPE_KWARG = dtype_kwarg()


@pytest.fixture(scope="module")
def tiny_model():
    return make_model(tiny_config(), attn="sdpa", seed=3)


@pytest.fixture(scope="module")
def repo(tmp_path_factory, tiny_model) -> Path:
    return make_pipeline_repo(tmp_path_factory.mktemp("pipeline"), tiny_model)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def pipe(repo):
    return load_pipeline(repo, task=TASK)


def load_pipeline(repo: Path, task=TASK, **kwargs):
    kwargs.setdefault(DTYPE_KWARG, torch.float32)
    if task is None:
        return transformers.pipeline(model=str(repo), trust_remote_code=True, device="cpu", **kwargs)
    return transformers.pipeline(task, model=str(repo), trust_remote_code=True, device="cpu", **kwargs)


# ---- resolution -------------------------------------------------------------------------------------------------
def test_task_resolves_our_class_with_its_processor(pipe):
    assert type(pipe).__name__ == PIPELINE_CLASS
    assert type(pipe.image_processor).__name__ == "SiglipNaViTImageProcessor"  # 4.49 gave None before
    assert type(pipe.model).__name__ == "SiglipVisionModel"
    assert pipe.model.dtype == torch.float32


def test_no_task_uses_custom_pipelines_offline(repo):
    """`pipeline(model=dir)` takes the task from config.json's single `custom_pipelines` entry: no Hub call."""
    pipe = load_pipeline(repo, task=None)
    assert type(pipe).__name__ == PIPELINE_CLASS
    assert pipe.task == TASK
    image = images()[0]
    close(pipe(image, return_tensors=True)[0], reference(pipe, image).reshape(-1, pipe.model.config.hidden_size))


def test_refused_without_trust_remote_code(repo):
    with pytest.raises(ValueError, match="trust_remote_code"):
        transformers.pipeline(TASK, model=str(repo), device="cpu")


# ---- outputs ----------------------------------------------------------------------------------------------------
def test_single_image_nesting_and_values(pipe):
    image = images()[1]
    want = reference(pipe, image)
    h, w, c = want.shape
    out = pipe(image)
    assert isinstance(out, list) and len(out) == 1 and len(out[0]) == h * w and len(out[0][0]) == c
    close(out, want.reshape(1, h * w, c))
    tensor = pipe(image, return_tensors=True)
    assert isinstance(tensor, torch.Tensor) and tensor.shape == (1, h * w, c)
    close(tensor, want.reshape(1, h * w, c))


def test_list_batch_size_packs_into_one_forward(pipe):
    imgs = images()
    calls, handle = count_forwards(pipe.model)
    try:
        out = pipe(imgs, batch_size=len(imgs), return_tensors=True)
    finally:
        handle.remove()
    assert len(calls) == 1, f"{len(calls)} forwards for one batch"
    assert isinstance(out, list) and len(out) == len(imgs)
    for got, image in zip(out, imgs):
        want = reference(pipe, image)
        close(got, want.reshape(1, -1, want.shape[-1]))


def test_list_without_batch_size_one_forward_per_image(pipe):
    imgs = images()[:3]
    calls, handle = count_forwards(pipe.model)
    try:
        out = pipe(imgs)
    finally:
        handle.remove()
    assert len(calls) == 3
    for got, image in zip(out, imgs):
        want = reference(pipe, image)
        close(got, want.reshape(1, -1, want.shape[-1]))


def test_batch_size_groups_in_order(pipe):
    imgs = images()
    calls, handle = count_forwards(pipe.model)
    try:
        out = pipe(imgs, batch_size=2, pool=True)
    finally:
        handle.remove()
    assert len(calls) == 3  # 5 images -> 2 + 2 + 1
    for got, image in zip(out, imgs):
        close(got, reference(pipe, image).reshape(-1, pipe.model.config.hidden_size).mean(0, keepdim=True))


def test_patch_budget(pipe):
    imgs = images()  # 36, 10, 12, 12, 16 patches
    lengths = [reference(pipe, im).shape[0] * reference(pipe, im).shape[1] for im in imgs]
    assert lengths == [36, 10, 12, 12, 16]
    calls, handle = count_forwards(pipe.model)
    try:
        out = pipe(imgs, max_patches_per_batch=36, return_grid=True, return_tensors=True)
    finally:
        handle.remove()
    assert len(calls) == 3  # in order: [36], [10 + 12 + 12], [16] (34 + 16 > 36)
    for got, image in zip(out, imgs):
        close(got, reference(pipe, image))


def test_patch_budget_too_small_names_the_image(pipe):
    with pytest.raises(ValueError, match=r"image 0: its 36 patches do not fit max_patches_per_batch=20"):
        pipe(images(), max_patches_per_batch=20)


def test_pool_is_the_mean_over_patches(pipe):
    image = images()[2]
    want = reference(pipe, image)
    out = pipe(image, pool=True)
    assert len(out) == 1 and len(out[0]) == want.shape[-1]
    close(out, want.reshape(-1, want.shape[-1]).mean(0, keepdim=True))
    close(pipe(image, pool=True, return_tensors=True), want.reshape(-1, want.shape[-1]).mean(0, keepdim=True))


def test_grid(pipe):
    image = images()[3]
    want = reference(pipe, image)
    out = pipe(image, return_grid=True)
    assert len(out) == want.shape[0] and len(out[0]) == want.shape[1]
    close(out, want)
    tensor = pipe(image, return_grid=True, return_tensors=True)
    assert tensor.shape == want.shape
    close(tensor, want)


def test_inputs_numpy_path_generator(pipe, tmp_path):
    imgs = images()
    path = tmp_path / "rgba.png"
    imgs[4].save(path)
    array = np.asarray(imgs[1])
    out = pipe([str(path), array, path], batch_size=3, return_tensors=True)
    close(out[0][0], reference(pipe, PIL.Image.open(path)).reshape(-1, pipe.model.config.hidden_size))
    close(out[1][0], reference(pipe, array).reshape(-1, pipe.model.config.hidden_size))
    close(out[2], out[0])
    streamed = pipe((im for im in imgs[:2]), batch_size=2, pool=True)
    assert not isinstance(streamed, list)
    results = list(streamed)
    assert len(results) == 2
    for got, image in zip(results, imgs[:2]):
        close(got, reference(pipe, image).reshape(-1, pipe.model.config.hidden_size).mean(0, keepdim=True))


def test_construction_defaults(repo):
    pipe = load_pipeline(repo, batch_size=4, pool=True)
    imgs = images()
    calls, handle = count_forwards(pipe.model)
    try:
        out = pipe(imgs)
    finally:
        handle.remove()
    assert len(calls) == 2
    for got, image in zip(out, imgs):
        close(got, reference(pipe, image).reshape(-1, pipe.model.config.hidden_size).mean(0, keepdim=True))


def test_image_processor_kwargs(pipe):
    image = images()[0]
    out = pipe(image, image_processor_kwargs={"max_image_size": 12, "min_image_size": 4}, return_grid=True)
    want_inputs = pipe.image_processor(image, max_image_size=12, min_image_size=4)
    with torch.no_grad():
        want = pipe.image_processor.unpack(pipe.model(**want_inputs).last_hidden_state, want_inputs)[0]
    assert tuple(want.shape[:2]) == (3, 3)
    close(out, want)


# ---- errors -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(pool=True, return_grid=True), ValueError, "exclude each other"),
        (dict(batch_size=0), ValueError, "`batch_size` must be a positive integer"),
        (dict(max_patches_per_batch=-3), ValueError, "`max_patches_per_batch` must be a positive integer"),
        (dict(pool="yes"), ValueError, "`pool` must be True or False"),
        (dict(num_workers=2), TypeError, "unexpected keyword argument"),
        (dict(image_processor_kwargs=3), ValueError, "`image_processor_kwargs` must be a dict"),
    ],
)
def test_bad_options(pipe, kwargs, error, message):
    with pytest.raises(error, match=message):
        pipe(images()[0], **kwargs)


def test_bad_images_are_named_by_index(pipe, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        pipe([])
    with pytest.raises((ValueError, TypeError), match=r"^image 2: "):
        pipe([images()[0], images()[1], object()], batch_size=3)
    missing = tmp_path / "missing.png"
    with pytest.raises((ValueError, OSError), match=r"^image 1: "):
        pipe([images()[0], str(missing)])


# ---- saving -----------------------------------------------------------------------------------------------------
def test_config_entry_matches_the_module(pipe):
    module = repo_code.module("pipeline_siglip_navit")
    assert module.CUSTOM_PIPELINES == CUSTOM_PIPELINES
    assert module.TASK == TASK


def test_save_pretrained_reloads_as_our_pipeline(pipe, tmp_path):
    out = unique_dir(tmp_path, "saved_pipeline")
    pipe.save_pretrained(out)
    assert (out / PIPELINE_FILE).is_file() and (out / "preprocessor_config.json").is_file()
    assert json.loads((out / "config.json").read_text())["custom_pipelines"] == CUSTOM_PIPELINES
    again = load_pipeline(out, task=None)
    assert type(again).__name__ == PIPELINE_CLASS
    image = images()[2]
    close(again(image, return_grid=True, return_tensors=True), reference(pipe, image))


def test_renumbered_errors_keep_type_and_errno(pipe, tmp_path, monkeypatch):
    import errno

    path = tmp_path / "flaky.png"
    images()[0].save(path)

    def failing_disk(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error", str(path))

    monkeypatch.setattr(PIL.Image, "open", failing_disk)
    with pytest.raises(OSError, match=r"image 1: Input/output error") as info:
        pipe([np.zeros((8, 8, 3), np.uint8), str(path)])
    assert info.value.errno == errno.EIO and info.value.filename == str(path)
