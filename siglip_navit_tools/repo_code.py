# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""The ONE way tools, tests, benchmarks and scripts import the repo root's remote-code files.

The remote-code files use relative imports (`from .configuration_siglip_navit import ...`), as the Hub's dynamic
module loader expects, so they can only be imported as members of a package. This module registers the repo root
as the package `siglip_navit` (without touching `sys.path`) and imports from it. It must not copy, fetch or run any
other code.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

from .io.files import read_regular_text

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "siglip_navit"
CONFIG_FILE = "configuration_siglip_navit.py"
MODELING_FILE = "modeling_siglip_navit.py"
PACKING_FILE = "packing_siglip_navit.py"  # the checks of a pack's forward arguments (imported by the model)
PROCESSING_FILE = "image_processing_siglip_navit.py"
PIPELINE_FILE = "pipeline_siglip_navit.py"
HANDLER_FILE = "handler.py"  # Inference Endpoints imports it as a top-level module: not part of the package
# What `trust_remote_code=True` runs (the package members), and what a converted repo ships.
REMOTE_CODE_FILES = (CONFIG_FILE, MODELING_FILE, PACKING_FILE, PROCESSING_FILE, PIPELINE_FILE)
HUB_CODE_FILES = REMOTE_CODE_FILES + (HANDLER_FILE,)


def _package() -> str:
    """Register the repo root as a package and return its name (another `siglip_navit` already imported, e.g. a
    user's copy, is left alone: ours then gets a private name)."""
    for name in (PACKAGE, f"_{PACKAGE}_repo_code"):
        pkg = sys.modules.get(name)
        if pkg is None:
            spec = importlib.util.spec_from_loader(name, loader=None, is_package=True)
            pkg = importlib.util.module_from_spec(spec)
            pkg.__path__ = [str(REPO_ROOT)]
            sys.modules[name] = pkg
            return name
        if [str(Path(p).resolve()) for p in getattr(pkg, "__path__", [])] == [str(REPO_ROOT)]:
            return name
    raise ImportError(f"cannot register {REPO_ROOT} as a package: both names are taken by other modules")


def module(name: str) -> ModuleType:
    """One remote-code module by its file stem, e.g. `module("modeling_siglip_navit")`."""
    return importlib.import_module(f"{_package()}.{name}")


def configuration() -> ModuleType:
    return module(Path(CONFIG_FILE).stem)


def modeling() -> ModuleType:
    return module(Path(MODELING_FILE).stem)


def image_processing() -> ModuleType:
    return module(Path(PROCESSING_FILE).stem)


def pipeline() -> ModuleType:
    return module(Path(PIPELINE_FILE).stem)


def handler() -> ModuleType:
    """`handler.py`: the request format and its limits (the server decodes requests with it). It has no relative
    imports, so it loads as a member of the package too."""
    return module(Path(HANDLER_FILE).stem)


def auto_map(*classes: type) -> dict[str, str]:
    """An `auto_map` entry for remote-code `classes`, read off what each registered itself as (the
    `register_for_auto_class` call at the end of its file is the ONE place that says it): {"AutoModel":
    "modeling_siglip_navit.SiglipVisionModel", ...}."""
    entries = {}
    for cls in classes:
        if getattr(cls, "_auto_class", None) is None:
            raise ValueError(f"{cls.__name__} is not registered for an Auto class (register_for_auto_class)")
        entries[cls._auto_class] = f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"
    return entries


def config_auto_map() -> dict[str, str]:
    """config.json's `auto_map`: the configuration and the model class."""
    return auto_map(configuration().SiglipNaViTConfig, modeling().SiglipVisionModel)


def processor_auto_map() -> dict[str, str]:
    """preprocessor_config.json's `auto_map`: the image processor class."""
    return auto_map(image_processing().SiglipNaViTImageProcessor)


def architectures() -> list[str]:
    """config.json's `architectures`: the model class's name."""
    return [modeling().SiglipVisionModel.__name__]


def template_config() -> dict:
    """The repo root's config.json: BAGEL-7B-MoT's tower as BAGEL runs it (the ONE place its geometry is written)."""
    return json.loads(read_regular_text(REPO_ROOT / "config.json"))


def custom_pipelines() -> dict:
    """config.json's `custom_pipelines` entry that makes `pipeline(model=repo, trust_remote_code=True)` use ours."""
    return copy.deepcopy(pipeline().CUSTOM_PIPELINES)
