"""The converter names itself as the user called it (issue 17 item 3): `siglip-navit-convert` (the console script)
or `python convert_checkpoint.py` in its usage, examples, argument errors and the model card's command line."""

import pytest

from siglip_navit_tools import repo_code
from siglip_navit_tools.testing import console_script, run_commands
from siglip_navit_tools.convert import cli as convert_cli

ROOT = repo_code.REPO_ROOT


@pytest.mark.parametrize("how", ["console script", "file"])
def test_usage_examples_and_argument_errors_name_the_command_as_called(tmp_path, how):
    if how == "console script":
        entry = console_script(tmp_path, "siglip-navit-convert")
        name, typed, other = entry.name, "siglip-navit-convert", "convert_checkpoint.py"
    else:
        entry = ROOT / "convert_checkpoint.py"
        name, typed, other = "convert_checkpoint.py", "python convert_checkpoint.py", "siglip-navit-convert"
    help_text, misuse = run_commands((entry, "--help"), (entry, "--src", "s", "--out", "o", "--private"))
    assert help_text.returncode == 0 and help_text.stdout.startswith(f"usage: {name} ")
    assert f"\n  {typed} --src /path/to/BAGEL-7B-MoT --out siglip-navit-bagel\n" in help_text.stdout
    assert other not in help_text.stdout
    assert misuse.returncode == 2 and f"{name}: error: --private and --revision only apply" in misuse.stderr


def test_the_card_command_is_what_the_user_typed():
    argv = ["--src", "in dir", "--out", "o"]
    args = convert_cli.build_parser("siglip-navit-convert").parse_args(argv)
    assert convert_cli.options_from_args(args, argv, "siglip-navit-convert").command_line() == (
        "siglip-navit-convert --src 'in dir' --out o"
    )
    by_file = convert_cli.options_from_args(args, argv)
    assert by_file.command_line() == "python convert_checkpoint.py --src 'in dir' --out o"
