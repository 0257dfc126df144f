"""The measured CPU dtype figures have one owner (issue 17 item 2): README's marked section. Every converted repo's
model card quotes it word for word, and the converter's own source writes no figure of its own."""

import inspect
import re

import pytest

from siglip_navit_tools import repo_code
from siglip_navit_tools.convert import hub
from siglip_navit_tools.errors import ConversionError
from siglip_navit_tools.testing import tiny_converted_repo


def readme_section() -> str:
    text = (repo_code.REPO_ROOT / "README.md").read_text()
    start, end = hub.CPU_DTYPE_SECTION
    return text[text.index(start) + len(start) : text.index(end)].strip()


def test_the_card_quotes_readmes_section(tmp_path):
    section = readme_section()
    assert "0.24x" in section and "4-6x" in section  # the section holds the figures
    card = (tiny_converted_repo(tmp_path / "repo", work=tmp_path) / "README.md").read_text()
    assert section in card
    assert card.count("0.24x") == section.count("0.24x")  # quoted once, not also written by the template


def test_the_converter_writes_no_figure_of_its_own():
    assert not re.findall(r"\b\d+(?:\.\d+)?x\b", inspect.getsource(hub)), "figures belong in README's section"


def test_a_readme_without_the_section_is_a_clear_error(tmp_path):
    (tmp_path / "README.md").write_text("# a README without the CPU dtype section\n")
    with pytest.raises(ConversionError, match="lacks the section between"):
        hub.cpu_dtype_note(tmp_path / "README.md")
    with pytest.raises(ConversionError, match="lacks the section between"):
        hub.cpu_dtype_note(tmp_path / "missing.md")
