"""Shared test helpers. The builders live in `siglip_navit_tools.testing` (the one tiny-checkpoint builder, also used
by benchmarks, scripts and the notebook); the remote-code files are imported through `siglip_navit_tools.repo_code`."""

from pathlib import Path

import pytest

from siglip_navit_tools import repo_code
from siglip_navit_tools.testing import (  # noqa: F401  (re-exported for the test modules)
    build_hub_dir,
    copy_remote_code,
    dtype_kwarg,
    make_model,
    make_pack,
    positions_for,
    randomize_,
    save_safetensors,
    tiny_config,
    transformers_major,
    unique_dir,
)

ROOT: Path = repo_code.REPO_ROOT
REMOTE_CODE_FILES = list(repo_code.REMOTE_CODE_FILES)
cfg_mod = repo_code.configuration()
model_mod = repo_code.modeling()


@pytest.fixture
def tiny():
    return tiny_config


TRANSFORMERS_MAJOR = transformers_major()
# transformers 5.x renamed from_pretrained's `torch_dtype=` to `dtype=` (the old name warns there).
DTYPE_KWARG = dtype_kwarg()
