"""The converter's --out: an existing target needs --force and is never the source, an interrupted or failed run
changes nothing there, leftovers of killed runs are cleaned up (or restored) and said, an unwritable target is one
paragraph."""

import errno
import os
import pathlib
import socket

import pytest
from _convert_helpers import convert, leftovers, make_bagel, one_paragraph

from siglip_navit_tools.io import safetensors as st_io
from siglip_navit_tools.io import atomic
from siglip_navit_tools.testing import unique_dir


def test_existing_target_needs_force(tmp_path, capsys):
    src, ref = make_bagel(tmp_path)
    out = unique_dir(tmp_path, "existing")
    out.mkdir()
    (out / "config.json").write_text("an earlier checkpoint")  # --force replaces only a checkpoint folder
    (out / "model-00001-of-00002.safetensors").write_text("an earlier shard")
    assert convert("--src", src, "--out", out) == 1
    assert "--force" in capsys.readouterr().err
    assert (out / "config.json").read_text() == "an earlier checkpoint"
    assert convert("--src", src, "--out", out, "--force") == 0
    assert not (out / "model-00001-of-00002.safetensors").exists() and (out / "model.safetensors").exists()
    assert leftovers(tmp_path) == []
    empty = unique_dir(tmp_path, "empty")
    empty.mkdir()
    assert convert("--src", src, "--out", empty) == 0  # an empty directory is not "existing data"
    # never over the source itself
    assert convert("--src", src, "--out", src, "--force") == 1
    assert (src / "ema.safetensors").exists()


@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch, capsys, existing):
    src, _ = make_bagel(tmp_path)
    out = unique_dir(tmp_path, "interrupted")
    if existing:
        out.mkdir()
        (out / "config.json").write_text("old")  # an earlier checkpoint: what --force may replace
    calls = []
    real = st_io._write_tensor_data

    def interrupt(f, data):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        real(f, data)

    monkeypatch.setattr(st_io, "_write_tensor_data", interrupt)
    args = ["--src", src, "--out", out] + (["--force"] if existing else [])
    assert convert(*args) == 130
    assert "interrupted" in capsys.readouterr().err
    assert leftovers(tmp_path) == []
    if existing:
        assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    else:
        assert not out.exists()


# ---- leftovers of killed runs ------------------------------------------------------------------------------------
def _plant_tmp(out, tag, marker_pid=None):
    tmp = out.parent / f".{out.name}.tmp-{tag}"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"partial")
    if marker_pid is not None:
        (tmp / atomic.DIR_MARKER).write_text(f"{socket.gethostname()} {marker_pid}\n")
    return tmp


def test_stale_temporaries_of_ours_are_removed_and_said(tmp_path, capsys, dead_pid):
    src, _ = make_bagel(tmp_path)
    parent = unique_dir(tmp_path, "parent")
    parent.mkdir()
    out = parent / "out"
    dead = _plant_tmp(out, "0123abcd", dead_pid)
    foreign = _plant_tmp(out, "deadbeef")  # no marker: not ours
    live = _plant_tmp(out, "cafe0001", os.getpid())  # a run that is still going
    assert convert("--src", src, "--out", out) == 0
    err = capsys.readouterr().err
    assert f"remove {dead.name}" in err and "interrupted run" in err and not dead.exists()
    assert foreign.exists() and live.exists() and f"left {live.name} alone" in err
    assert not (out / atomic.DIR_MARKER).exists()  # the marker never reaches the output


def test_crash_between_force_renames_is_restored_first(tmp_path, capsys):
    src, _ = make_bagel(tmp_path)
    parent = unique_dir(tmp_path, "parent")
    parent.mkdir()
    out = parent / "out"
    old = parent / ".out.old-1234abcd"
    old.mkdir()
    (old / "old.txt").write_text("old output")
    assert convert("--src", src, "--out", out, "--dry-run") == 0
    assert "would restore" in capsys.readouterr().err and old.exists() and not out.exists()
    assert convert("--src", src, "--out", out) == 1  # restored first, then: not empty, needs --force
    err = capsys.readouterr().err
    assert "restore" in err and old.name in err and "--force" in err
    assert (out / "old.txt").read_text() == "old output" and not old.exists()
    old2, old3 = parent / ".out2.old-00000001", parent / ".out2.old-00000002"
    old2.mkdir(), old3.mkdir()
    assert convert("--src", src, "--out", parent / "out2") == 0  # several parked: left alone, said
    assert "several parked outputs" in capsys.readouterr().err and old2.exists() and old3.exists()


# ---- a target that cannot be written -----------------------------------------------------------------------------
REASONS = {errno.ENOSPC: "no space left on device", errno.EROFS: "read-only file system",
           errno.EACCES: "permission denied", errno.EDQUOT: "disk quota exceeded"}  # fmt: skip


@pytest.mark.parametrize("code", list(REASONS))
@pytest.mark.parametrize("where", ["tensor", "side_file", "tmpdir"])
def test_unwritable_target_is_one_paragraph(tmp_path, capsys, monkeypatch, code, where):
    src, _ = make_bagel(tmp_path)
    out = unique_dir(tmp_path, "full")
    out.mkdir()
    (out / "config.json").write_text("previous")  # an earlier checkpoint: what --force may replace

    def fail(*a, **k):
        raise OSError(code, os.strerror(code))

    if where == "tensor":
        monkeypatch.setattr(st_io, "_write_tensor_data", fail)
    elif where == "side_file":
        monkeypatch.setattr("siglip_navit_tools.convert.write.shutil.copyfile", fail)
    else:
        real_mkdir = pathlib.Path.mkdir
        monkeypatch.setattr(pathlib.Path, "mkdir",
                            lambda self, *a, **k: fail() if ".tmp-" in self.name else real_mkdir(self, *a, **k))
    assert convert("--src", src, "--out", out, "--force") == 1
    err = one_paragraph(capsys.readouterr().err)
    assert f"{REASONS[code]} while writing" in err and "nothing was changed at --out" in err
    assert sorted(p.name for p in out.iterdir()) == ["config.json"] and leftovers(tmp_path) == []
    assert (out / "config.json").read_text() == "previous"
