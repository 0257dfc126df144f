"""A folder that cannot be listed (permissions, an I/O error) inside a walked tree is passed over with a warning that
names it -- never silently, so the files missing from the run are explained. The walk still lists the rest."""

import logging
import os

from siglip_navit_tools.io import files


def test_an_unreadable_subfolder_is_named_in_a_warning(tmp_path, monkeypatch, caplog):
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "a.png").write_bytes(b"x")
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "b.png").write_bytes(b"x")
    real_scandir = os.scandir

    def scandir(path="."):  # as chmod 000 would do (tests may run as root, which reads any folder)
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(files.os, "scandir", scandir)
    with caplog.at_level(logging.WARNING, logger="siglip_navit_tools.io.files"):
        entries = files.tree_entries(tmp_path)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in entries) == ["locked", "ok", "ok/a.png"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(tmp_path / "locked") in warnings[0], warnings
    assert "Permission denied" in warnings[0] and "left out" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="siglip_navit_tools.io.files"):
        found = files.glob_files(f"{tmp_path}/**/*.png")
    assert found == [str(tmp_path / "ok" / "a.png")]
    assert any(str(tmp_path / "locked") in r.getMessage() for r in caplog.records)
