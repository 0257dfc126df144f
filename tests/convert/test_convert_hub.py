"""What the converter writes for the Hub: preprocessor settings that follow the model, the model card (base_model,
license, the source's front matter), and --push-to-hub's calls (nothing is sent)."""

import os

import pytest
import torch
import transformers
from _convert_helpers import convert, load_ours, make_bagel, no_warnings

from siglip_navit_tools.convert import cli as convert_cli
from siglip_navit_tools.convert import hub
from siglip_navit_tools.convert.hub import card_metadata
from siglip_navit_tools.testing import tiny_config, unique_dir


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


def test_hf_url_base_model_and_card(tmp_path):
    assert hub.hf_repo_id("hf://ByteDance-Seed/BAGEL-7B-MoT") == "ByteDance-Seed/BAGEL-7B-MoT"
    assert hub.hf_repo_id("hf://ByteDance-Seed/BAGEL-7B-MoT@main/ema.safetensors") == "ByteDance-Seed/BAGEL-7B-MoT"
    assert hub.hf_repo_id("hf://datasets/x/y") is None and hub.hf_repo_id("/local/path") is None
    src, _ = make_bagel(tmp_path)
    out = unique_dir(tmp_path, "card")
    assert convert("--src", src, "--out", out, "--license", "other", "--base-model", "me/base") == 0
    front = (out / "README.md").read_text().split("---")[1]
    assert "license: other" in front and "base_model: me/base" in front


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


def test_preprocessor_settings_follow_the_model():
    bagel = hub.navit_preprocessor_dict(tiny_config(hidden_size=1152, num_attention_heads=16, image_size=980, patch_size=14))
    assert (bagel["patch_size"], bagel["image_stride"], bagel["max_num_patches_per_side"]) == (14, 14, 70)
    assert (bagel["max_image_size"], bagel["min_image_size"]) == (980, 224)
    assert bagel["max_pixels"] == 1_806_336  # BAGEL's own budget is kept for BAGEL's geometry (img_num divides it)
    stock = hub.navit_preprocessor_dict(tiny_config(image_size=378, patch_size=14, hidden_size=32))
    assert (stock["max_num_patches_per_side"], stock["max_image_size"], stock["min_image_size"]) == (27, 378, 224)
    assert stock["max_pixels"] == 378 * 378
    assert stock["auto_map"] == {"AutoImageProcessor": "image_processing_siglip_navit.SiglipNaViTImageProcessor"}


@pytest.mark.parametrize(
    "front, expected",
    [
        ("base_model: a/b\nlicense: mit", {"base_model": "a/b", "license": "mit"}),
        ("base_model:\n- a/b\n", {"base_model": ["a/b"]}),  # a YAML list: its entries, never the string "- a/b"
        ("base_model:\n  - a/b\n  - c/d\nlicense: other", {"base_model": ["a/b", "c/d"], "license": "other"}),
        ("base_model: 'q/r'  # quoted, with a comment", {"base_model": "q/r"}),
        ("tags:\n- x", {}),
    ],
)
def test_card_metadata_reads_yaml(front, expected):
    assert card_metadata(f"---\n{front}\n---\n\n# A card\n") == expected


def test_card_metadata_without_front_matter():
    assert card_metadata("# just a title\n\nbase_model: a/b\n") == {}


def test_source_card_base_model_list_reaches_the_output_card(tmp_path):
    """A converted repo whose card lists two base models: the re-converted card lists the same two."""
    from huggingface_hub import ModelCard

    from siglip_navit_tools.testing import tiny_converted_repo

    src = tiny_converted_repo(unique_dir(tmp_path, "listed"), work=tmp_path)
    card = (src / "README.md").read_text()
    front, body = card.split("---\n", 2)[1:]
    front = "\n".join(line for line in front.splitlines() if not line.startswith("base_model")) + "\n"
    (src / "README.md").write_text(f"---\n{front}base_model:\n- a/b\n- c/d\n---\n{body}")
    out = unique_dir(tmp_path, "relisted")
    assert convert_cli.main(["--src", str(src), "--out", str(out), "--no-progress", "--quiet"]) == 0
    data = ModelCard.load(out / "README.md").data
    assert data.base_model == ["a/b", "c/d"]
    assert "- a/b" not in (out / "README.md").read_text().split("---")[2]  # the body names them, not a YAML line
