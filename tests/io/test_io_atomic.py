"""Atomic directory replace: a temporary directory carries its owner's marker until renamed, and an old output whose
deletion was killed halfway is never "restored"."""

import os
import pathlib
import shutil
import socket

import pytest

from siglip_navit_tools.io import atomic


def test_old_output_deletion_killed_halfway_is_never_restored(tmp_path, monkeypatch, dead_pid):
    """After the second rename the old output is re-parked as a marked temporary before it is deleted: a deletion
    killed halfway leaves a dead run's `.OUT.tmp-*` (removed next time), never a `.OUT.old-*` that looks like a
    complete previous output and would be "restored" over a missing --out."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    new = tmp_path / ".out.tmp-0000beef"
    new.mkdir()
    (new / "new.txt").write_text("new")

    def killed(path, ignore_errors=False):
        (pathlib.Path(path) / "old.txt").unlink()  # half of the deletion happened, then the process died
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        atomic.replace_directory(new, out)
    monkeypatch.undo()
    assert (out / "new.txt").read_text() == "new"
    assert not list(tmp_path.glob(".out.old-*"))
    leftovers = list(tmp_path.glob(".out.tmp-*"))
    assert len(leftovers) == 1 and (leftovers[0] / atomic.DIR_MARKER).is_file()
    marker = leftovers[0] / atomic.DIR_MARKER
    marker.write_text(f"{socket.gethostname()} {dead_pid}\n")  # as seen by the next run: its owner is gone
    shutil.rmtree(out)  # even with --out missing, nothing is "restored"
    lines = atomic.recover_leftovers(out)
    assert not out.exists() and not leftovers[0].exists()
    assert any("remove" in line for line in lines) and not any("restore" in line for line in lines)


def test_temporary_directory_carries_a_marker_until_renamed(tmp_path):
    out = tmp_path / "o"
    with atomic.temporary_directory(out) as tmp:
        assert (tmp / atomic.DIR_MARKER).read_text().split()[1] == str(os.getpid())
        (tmp / "f").write_text("x")
        atomic.replace_directory(tmp, out)
    assert sorted(p.name for p in out.iterdir()) == ["f"]
