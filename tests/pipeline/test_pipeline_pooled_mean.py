"""The pooled mean has one owner (issue 17 item 2): the image processor's `mean_pool`, float32 `(k, C)` whatever the
model's dtype. The pipeline's `pool=True` (and so the handler's) and the extractor's `pooled` tensor are it, bit for
bit, also for a bf16 model (the pipeline used to return the model's dtype)."""

import PIL.Image
import pytest
import torch
import transformers

from siglip_navit_tools import repo_code
from siglip_navit_tools.compat import dtype_kwarg
from siglip_navit_tools.extract import pipeline as extract_pipeline
from siglip_navit_tools.testing import copy_remote_code, make_model, tiny_config, unique_dir

ipm = repo_code.image_processing()
PROCESSOR = dict(max_image_size=24, min_image_size=8, image_stride=4, patch_size=4, max_num_patches_per_side=6)
IMAGES = [PIL.Image.effect_noise(size, 50).convert("RGB") for size in [(24, 16), (9, 30), (20, 20)]]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    folder = copy_remote_code(unique_dir(tmp_path_factory.mktemp("pool"), "poolrepo"))
    model = make_model(tiny_config(), seed=7)
    model.config.custom_pipelines = repo_code.custom_pipelines()
    model.save_pretrained(folder)
    ipm.SiglipNaViTImageProcessor(**PROCESSOR).save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_mean_pool_is_the_float32_mean_of_each_images_patches():
    processor = ipm.SiglipNaViTImageProcessor(**PROCESSOR)
    inputs = processor(images=IMAGES, return_tensors="pt")
    features = torch.randn(int(inputs["cu_seqlens"][-1]), 5, generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float32, torch.bfloat16):
        pooled = processor.mean_pool(features.to(dtype), inputs)
        assert pooled.dtype == torch.float32 and pooled.shape == (3, 5)
        cu = inputs["cu_seqlens"].tolist()
        for i in range(3):
            want = features.to(dtype)[cu[i] : cu[i + 1]].double().mean(0)
            torch.testing.assert_close(pooled[i].double(), want, atol=1e-6, rtol=1e-6)
    assert torch.equal(processor.mean_pool(features, inputs), processor.mean_pool(features, inputs["image_grid_hw"]))
    with pytest.raises(ValueError, match="unpack: the features hold 4 patches"):
        processor.mean_pool(features[:4], inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pipeline_pool_and_extractor_pooled_are_the_processors_mean_pool(repo, dtype):
    extractor = transformers.pipeline(model=str(repo), trust_remote_code=True, **{dtype_kwarg(): dtype})
    processor = extractor.image_processor
    inputs = processor(images=IMAGES, return_tensors="pt")
    with torch.no_grad():
        hidden = extractor.model(**inputs).last_hidden_state
    assert hidden.dtype == dtype
    want = processor.mean_pool(hidden, inputs)
    # the extractor's forward step, on this very pack
    pooled, maps = extract_pipeline._forward(extractor.model, processor, dict(inputs), torch.device("cpu"))
    assert pooled.dtype == torch.float32 and torch.equal(pooled, want)
    assert [tuple(m.shape[:2]) for m in maps] == [tuple(g) for g in inputs["image_grid_hw"].tolist()]
    # the pipeline, all three images in one forward: float32 rows, the same numbers
    got = extractor(IMAGES, pool=True, return_tensors=True, batch_size=3)
    assert all(g.dtype == torch.float32 and g.shape == (1, hidden.shape[1]) for g in got)
    assert torch.equal(torch.cat(got), want)
    assert "mean_pool" in extract_pipeline.PROCESSOR_METHODS
