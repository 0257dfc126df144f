"""The extractor names itself as the user called it (issue 17 item 3): the console script `siglip-navit-extract`
in its usage, help and error lines, `extract_features.py` when run as that file; its help prints each default once."""

import re
import sys

import pytest

from siglip_navit_tools import repo_code
from siglip_navit_tools.testing import console_script, run_commands
from siglip_navit_tools.extract import cli as extract_cli

ROOT = repo_code.REPO_ROOT


@pytest.mark.parametrize("how", ["console script", "file"])
def test_usage_help_and_errors_name_the_command_as_called(tmp_path, how):
    script = how == "console script"
    entry = console_script(tmp_path, "siglip-navit-extract") if script else ROOT / "extract_features.py"
    name = entry.name
    misuse = ("--model", "m", "--input", "i", "--output", tmp_path / "o", "--max-patches-per-batch", "0")
    help_text, refused = run_commands((entry, "--help"), (entry, *misuse))
    assert help_text.returncode == 0 and help_text.stdout.startswith(f"usage: {name} ")
    assert refused.returncode == 2
    assert refused.stderr.strip().endswith(f"{name}: error: --max-patches-per-batch must be a positive number of "
                                           "patches, got 0")  # fmt: skip
    other = "extract_features.py" if how == "console script" else "siglip-navit-extract"
    assert other not in help_text.stdout + refused.stderr


def help_entries(text):
    """Each option's help block (its lines up to the next option) in argparse's output."""
    options = text.split("options:", 1)[1]
    return [block for block in re.split(r"\n  (?=-)", options) if block.strip()]


def test_help_prints_each_default_once():
    text = extract_cli.build_parser().format_help()
    entries = help_entries(text)
    assert len(entries) >= 19
    for entry in entries:
        flat = " ".join(entry.split())
        assert flat.count("default") <= 1, flat
        assert "(default: None)" not in flat and "(default: False)" not in flat, flat
    for flag, default in [("--max-patches-per-batch", "16384"), ("--dtype", "float32"), ("--num-workers", "2"),
                          ("--attn-implementation", "sdpa"), ("--dist-timeout-minutes", "360.0")]:  # fmt: skip
        (entry,) = [e for e in entries if e.startswith(flag)]
        assert f"(default: {default})" in " ".join(entry.split()), entry


def test_called_as_a_function_it_keeps_the_files_name(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["/somewhere/pytest"])
    assert extract_cli.main(["--model", "m", "--input", "i", "--output", "o", "--max-patches-per-batch", "0"]) == 2
    assert capsys.readouterr().err.startswith("extract_features.py: error: ")
