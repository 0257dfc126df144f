"""The converter's command line: ConvertOptions <-> flags, size options naming themselves, the real command's exit
codes and one-paragraph errors."""

import os
import subprocess
import sys

import pytest
from _convert_helpers import convert, make_bagel, one_paragraph

from siglip_navit_tools import repo_code
from siglip_navit_tools.convert import cli as convert_cli
from siglip_navit_tools.convert.options import ConversionError, ConvertOptions, parse_size
from siglip_navit_tools.testing import unique_dir

ROOT = repo_code.REPO_ROOT


def test_command_line_exit_codes(tmp_path):
    src, _ = make_bagel(tmp_path)
    out = unique_dir(tmp_path, "cli")
    cmd = [sys.executable, str(ROOT / "convert_checkpoint.py"), "--src", str(src), "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ok = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert (out / "model.safetensors").exists()
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 1
    assert again.stderr.startswith("error: ") and "--force" in again.stderr
    assert "Traceback" not in again.stderr and again.stderr.strip().count("\n") == 0  # one paragraph


@pytest.mark.parametrize("value", ["0", "-1", "-5MiB", "10", "1000TB", "9" * 40, "1e9", "abc", "0.5"])
@pytest.mark.parametrize("flag", ["--read-chunk-size", "--max-shard-size"])
def test_size_options_name_themselves(tmp_path, capsys, flag, value):
    if flag == "--max-shard-size" and value in ("10", "1000TB"):
        return  # valid shard sizes (10 bytes: one tensor per shard; 1000TB: one shard)
    assert convert("--src", tmp_path / "nope", "--out", tmp_path / "o", f"{flag}={value}") == 1
    err = one_paragraph(capsys.readouterr().err)
    other = "--max-shard-size" if flag == "--read-chunk-size" else "--read-chunk-size"
    assert flag in err and other not in err


def test_options_normalise_and_rebuild_the_command():
    options = ConvertOptions(src="in dir", out="out", vit_prefix="module.vit", dtype="float16", force=True, progress=False)
    assert options.vit_prefix == "module.vit."
    assert options.command_line() == (
        "python convert_checkpoint.py --src 'in dir' --out out --vit-prefix module.vit. --dtype float16 --force "
        "--no-progress"
    )
    assert ConvertOptions(src="a", out="b", command="python x.py --src a").command_line() == "python x.py --src a"


def test_cli_builds_the_same_options_as_the_library_defaults():
    args = convert_cli.build_parser().parse_args(["--src", "s", "--out", "o"])
    options = convert_cli.options_from_args(args, ["--src", "s", "--out", "o"])
    defaults = ConvertOptions(src="s", out="o")
    assert {**vars(options), "command": ""} == vars(defaults)


@pytest.mark.parametrize("text, size", [("5GB", 5 * 10**9), ("500MiB", 500 * 2**20), ("10KB", 10**4), ("1.5kib", 1536),
                                        ("4096", 4096), (123, 123)])  # fmt: skip
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["five", "0", "3XB"])
def test_parse_size_errors_name_the_flag(text):
    with pytest.raises(ConversionError, match="--read-chunk-size"):
        parse_size(text, "--read-chunk-size")


@pytest.mark.parametrize("text", ["-1", "10", "1000TB", "9" * 40, 0, -5, 2**40])
def test_read_chunk_bounds(text):
    from siglip_navit_tools.convert.options import READ_CHUNK_BOUNDS

    with pytest.raises(ConversionError, match="--read-chunk-size"):
        parse_size(text, "--read-chunk-size", READ_CHUNK_BOUNDS)
