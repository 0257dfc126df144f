"""ONE dtype rule (issue 17 item 2): `pipeline_siglip_navit.default_dtype` (remote code) decides bf16 or fp32 per
device; the Inference Endpoints handler reads it from the repo's own code (offline, without the tools package), and
the tools' `cpu.auto_dtype` / `compat.dtype_kwarg` delegate to the same functions."""

import ast
import importlib.util
import sys

import pytest
import torch
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from siglip_navit_tools import compat, cpu, repo_code
from siglip_navit_tools.testing import copy_remote_code, make_model, tiny_config, unique_dir

rule = repo_code.pipeline()


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize(
    "device, cuda, cuda_bf16, cpu_kind, expected",
    [
        ("cuda:0", True, True, rule.EMULATED_BF16, torch.bfloat16),
        ("cuda", True, False, rule.NATIVE_BF16[0], torch.float32),  # an old GPU without bf16
        ("cpu", True, True, rule.EMULATED_BF16, torch.float32),  # the device asked for, not the machine's GPU
        ("cpu", False, False, rule.NATIVE_BF16[0], torch.bfloat16),
        ("cpu", False, False, rule.NATIVE_BF16[1], torch.bfloat16),
        (-1, False, False, rule.NATIVE_BF16[1], torch.bfloat16),  # transformers' old spelling of the CPU
        (None, True, True, rule.EMULATED_BF16, torch.bfloat16),  # None: cuda:0 when there is one, as pipeline() does
        (None, False, True, rule.EMULATED_BF16, torch.float32),
        ("meta", False, False, rule.NATIVE_BF16[0], torch.float32),
    ],
)
def test_the_rule(monkeypatch, device, cuda, cuda_bf16, cpu_kind, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)
    monkeypatch.setattr(rule, "cpu_bf16_support", lambda: cpu_kind)
    assert rule.default_dtype(device) == expected
    if device is not None and device != -1:
        assert cpu.auto_dtype(torch.device(device)) == expected  # the tools ask the same rule


def test_the_tools_delegate(monkeypatch):
    monkeypatch.setattr(rule, "cpu_bf16_support", lambda: "a CPU from the future")
    assert cpu.bf16_support() == "a CPU from the future" and not cpu.has_native_bf16()
    assert "a CPU from the future" in cpu.describe()
    assert cpu.NATIVE_BF16 is rule.NATIVE_BF16 and cpu.EMULATED_BF16 is rule.EMULATED_BF16
    monkeypatch.setattr(rule, "dtype_kwarg", lambda: "some_dtype")
    assert compat.dtype_kwarg() == "some_dtype"


def test_the_detection_matches_torchs_probes():
    native = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    assert (rule.cpu_bf16_support() in rule.NATIVE_BF16) == native


def test_the_handler_defines_no_rule_of_its_own_and_imports_no_tools():
    tree = ast.parse((repo_code.REPO_ROOT / repo_code.HANDLER_FILE).read_text())
    functions = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    assert not functions & {"_default_dtype", "_dtype_kwarg", "default_dtype", "dtype_kwarg"}
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names} | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(name and name.startswith("siglip_navit_tools") for name in imported)


def test_the_handler_loads_in_the_dtype_the_repos_own_rule_gives(tmp_path, monkeypatch):
    """The repo's copy of the rule, as transformers loads it from the folder (offline): changing what that copy
    detects changes the handler's dtype."""
    folder = copy_remote_code(unique_dir(tmp_path, "handlerdtype"))
    model = make_model(tiny_config(), seed=3)
    model.config.custom_pipelines = repo_code.custom_pipelines()
    model.save_pretrained(folder)
    repo_code.image_processing().SiglipNaViTImageProcessor(
        max_image_size=24, min_image_size=8, image_stride=4, patch_size=4, max_num_patches_per_side=6
    ).save_pretrained(folder)
    spec = importlib.util.spec_from_file_location("handler_dtype_rule", folder / "handler.py")
    handler_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(handler_module)
    loaded = get_class_from_dynamic_module("pipeline_siglip_navit.default_dtype", str(folder))
    repos_rule = sys.modules[loaded.__module__]
    assert repos_rule is not rule  # the folder's own copy, not this checkout's module
    monkeypatch.setattr(repos_rule, "cpu_bf16_support", lambda: repos_rule.NATIVE_BF16[0])
    assert handler_module.EndpointHandler(str(folder)).pipeline.model.dtype == torch.bfloat16
    monkeypatch.setattr(repos_rule, "cpu_bf16_support", lambda: repos_rule.EMULATED_BF16)
    assert handler_module.EndpointHandler(str(folder)).pipeline.model.dtype == torch.float32
    assert handler_module.EndpointHandler(str(folder), dtype=torch.float64).pipeline.model.dtype == torch.float64
