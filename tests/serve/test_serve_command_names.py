"""The server names itself as the user called it: the console script `siglip-navit-serve` in its usage, help and
error lines, `serve.py` when run as that file; its help prints each default once (as the other two commands)."""

import re

import pytest

from siglip_navit_tools import repo_code
from siglip_navit_tools.serve import cli as serve_cli
from siglip_navit_tools.testing import console_script, run_commands

ROOT = repo_code.REPO_ROOT


@pytest.mark.parametrize("how", ["console script", "file"])
def test_usage_help_and_errors_name_the_command_as_called(tmp_path, how):
    entry = console_script(tmp_path, "siglip-navit-serve") if how == "console script" else ROOT / "serve.py"
    name = entry.name
    misuse = ("--model", tmp_path / "m", "--max-patches-per-batch", "0")
    help_text, refused = run_commands((entry, "--help"), (entry, *misuse))
    assert help_text.returncode == 0 and help_text.stdout.startswith(f"usage: {name} ")
    assert refused.returncode == 2, refused.stderr
    assert f"{name}: error: --max-patches-per-batch must be a positive integer, got 0" in refused.stderr
    other = "serve.py" if how == "console script" else "siglip-navit-serve"
    assert other not in help_text.stdout + refused.stderr


def test_help_prints_each_default_once():
    options = serve_cli.build_parser().format_help().split("options:", 1)[1]
    entries = [block for block in re.split(r"\n  (?=-)", options) if block.strip()]
    assert len(entries) >= 23
    for entry in entries:
        flat = " ".join(entry.split())
        assert flat.count("default") <= 1, flat
        assert "(default: None)" not in flat and "(default: False)" not in flat, flat
    for flag, default in [("--host", "127.0.0.1"), ("--port", "8000"), ("--max-patches-per-batch", "16384"),
                          ("--batching", "continuous"), ("--max-images-per-request", "64")]:  # fmt: skip
        (entry,) = [e for e in entries if e.startswith(flag)]
        assert f"default: {default})" in " ".join(entry.split()), entry
