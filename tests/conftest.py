"""pytest's root conftest: fixtures shared by every test folder (a folder's own conftest.py holds that folder's).

Test modules import what they need directly: the tiny-checkpoint builders from `siglip_navit_tools.testing`, the
remote-code modules through `siglip_navit_tools.repo_code`, helper modules from beside them. Never `from conftest
import ...`: every folder's conftest.py is imported under that same name."""

import subprocess
import sys

import pytest


@pytest.fixture
def dead_pid() -> int:
    """The id of a process that has exited: what the marker of a killed run names."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid
