"""siglip_navit_tools.extract without a model: the CLI <-> ExtractOptions mapping, exit codes, the option checks and
the output lock (the end-to-end behaviour is in test_extract_features.py)."""

import dataclasses
import subprocess
import sys

import pytest

from siglip_navit_tools.cli import ToolError
from siglip_navit_tools.extract import ExtractOptions, UsageError
from siglip_navit_tools.extract import cli as extract_cli
from siglip_navit_tools.extract.shards import lock_output

REQUIRED = ["--model", "m", "--input", "i", "--output", "o"]


def test_every_option_has_a_flag_and_the_defaults_agree():
    parsed = extract_cli.options_from_args(extract_cli.build_parser().parse_args(REQUIRED))
    assert parsed == ExtractOptions(model="m", input="i", output="o")
    flags = {action.dest for action in extract_cli.build_parser()._actions} - {"help", "no_progress"}
    assert flags | {"progress"} == {f.name for f in dataclasses.fields(ExtractOptions)}
    no_progress = extract_cli.build_parser().parse_args([*REQUIRED, "--no-progress", "--save-grids"])
    options = extract_cli.options_from_args(no_progress)
    assert options.progress is False and options.save_grids is True


def test_usage_errors_exit_2_and_interrupts_exit_130_and_the_process_group_is_left(monkeypatch, capsys):
    assert issubclass(UsageError, ToolError) and UsageError.exit_code == 2
    left = []
    monkeypatch.setattr(extract_cli.distributed, "shutdown", lambda: left.append(True))

    def refuse(options):
        raise UsageError("--output 'o' is refused")

    monkeypatch.setattr(extract_cli, "extract", refuse)
    assert extract_cli.main(REQUIRED) == 2
    assert capsys.readouterr().err.strip() == "extract_features.py: error: --output 'o' is refused"

    def interrupt(options):
        raise KeyboardInterrupt

    monkeypatch.setattr(extract_cli, "extract", interrupt)
    assert extract_cli.main(REQUIRED) == 130
    assert "interrupted; finished shards are kept, rerun to resume" in capsys.readouterr().err
    assert left == [True, True]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"max_patches_per_batch": 0}, "--max-patches-per-batch must be a positive number of patches, got 0"),
        ({"shard_size": -1}, "--shard-size must be a positive number of images, got -1"),
        ({"num_workers": -1}, "--num-workers must be 0 or more, got -1"),
        ({"dtype": "float8"}, "--dtype must be one of"),
        ({"attn_implementation": "paged|eager"}, "--attn-implementation must be one of"),
    ],
)
def test_options_validate(change, message):
    options = dataclasses.replace(ExtractOptions(model="m", input="i", output="o"), **change)
    with pytest.raises(UsageError, match=message.replace("|", r"\|")):
        options.validate()
    ExtractOptions(model="m", input="i", output="o").validate()


def test_output_lock_is_exclusive_and_released_on_release_and_on_process_exit(tmp_path):
    lock = lock_output(tmp_path)
    held_elsewhere = subprocess.run(
        [sys.executable, "-c", "import sys, fcntl; f = open(sys.argv[1], 'w'); fcntl.flock(f, fcntl.LOCK_EX | "
         "fcntl.LOCK_NB)", str(tmp_path / ".lock")], capture_output=True, text=True,
    )  # fmt: skip
    assert held_elsewhere.returncode != 0 and "BlockingIOError" in held_elsewhere.stderr
    lock.release()
    assert (tmp_path / ".lock").exists()  # the file stays: a waiter and the holder share one inode
    lock_output(tmp_path).release()
    # a run that dies holding the lock (no release, no cleanup) leaves it free
    code = (
        "import os, sys; from pathlib import Path; from siglip_navit_tools.extract.shards import lock_output; "
        "lock_output(Path(sys.argv[1])); os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)
    lock_output(tmp_path).release()
    with open(tmp_path / ".lock", "w") as held:
        import fcntl

        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UsageError, match="is in use by another extract_features.py run"):
            lock_output(tmp_path)
