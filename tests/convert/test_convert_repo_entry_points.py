"""A converted repo (the converter's output, and demo.py --save's) ships every Hugging Face entry point: the Auto
classes, `pipeline(model=repo, trust_remote_code=True)` with no task, and Inference Endpoints' `handler.py` -- and
they all give the model's own forward on each image alone."""

import base64
import importlib.util
import io
import json

import numpy as np
import PIL.Image
import torch
import transformers

from siglip_navit_tools import repo_code
from siglip_navit_tools.testing import dtype_kwarg, tiny_converted_repo, unique_dir

DTYPE_KWARG = dtype_kwarg()


def test_converted_repo_serves_pipeline_and_handler(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tiny_converted_repo(unique_dir(tmp_path, "converted"), work=tmp_path)
    names = {p.name for p in repo.iterdir()}
    assert set(repo_code.HUB_CODE_FILES) <= names
    assert json.loads((repo / "config.json").read_text())["custom_pipelines"] == repo_code.custom_pipelines()

    images = [PIL.Image.fromarray(np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8))
              for i, (h, w) in enumerate([(60, 90), (300, 140)])]  # fmt: skip
    model = transformers.AutoModel.from_pretrained(repo, trust_remote_code=True, **{DTYPE_KWARG: torch.float32}).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(repo, trust_remote_code=True)
    with torch.no_grad():
        alone = [model(**processor(images=im, return_tensors="pt")).last_hidden_state.mean(0) for im in images]

    extractor = transformers.pipeline(model=str(repo), trust_remote_code=True, **{DTYPE_KWARG: torch.float32})
    assert type(extractor).__name__ == "SiglipNaViTFeatureExtractionPipeline"
    pooled = extractor(images, pool=True, batch_size=2)
    for got, want in zip(pooled, alone):
        assert (torch.tensor(got[0]) - want).abs().max().item() <= 1e-5

    spec = importlib.util.spec_from_file_location("converted_handler", repo / "handler.py")
    handler_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(handler_mod)
    handler = handler_mod.EndpointHandler(str(repo))
    buf = io.BytesIO()
    images[1].save(buf, "PNG")
    out = handler({"inputs": base64.b64encode(buf.getvalue()).decode(), "parameters": {"pool": True}})
    assert (torch.tensor(out[0]) - alone[1]).abs().max().item() <= 1e-5
