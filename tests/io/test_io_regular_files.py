"""siglip_navit_tools.io.files and its users (issue 20 item 4): every file the tools open is checked to be a regular
file first, by ONE helper, and listings never follow symlinked directories into loops. FIFOs (reading one blocks until
a writer comes: forever), sockets, devices, directories and dangling symlinks are refused unopened -- also when swapped
in after the check -- through local paths and fsspec Locations; glob patterns and folder walks over symlink loops
finish, and list exactly what glob.glob / rglob list on trees without loops."""

import ast
import glob
import os
import random
import socket
import stat
from pathlib import Path

import pytest

from siglip_navit_tools.testing import no_hang

import siglip_navit_tools
from siglip_navit_tools.io import files
from siglip_navit_tools.io.files import NotARegularFile
from siglip_navit_tools.io.lock import FileLock
from siglip_navit_tools.io.locations import ByteReader, Location, LocationError




@pytest.fixture
def zoo(tmp_path):
    """One of each kind of thing that is not a regular file, plus a regular file and a symlink to each."""
    z = tmp_path / "zoo"
    z.mkdir()
    (z / "regular").write_bytes(b"data")
    os.mkfifo(z / "fifo")
    (z / "folder").mkdir()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(z / "socket"))
    (z / "device").symlink_to("/dev/null")
    (z / "dangling").symlink_to(z / "gone")
    (z / "link_to_fifo").symlink_to(z / "fifo")
    yield z
    sock.close()


KINDS = {"fifo": "a FIFO", "folder": "a directory", "socket": "a socket", "device": "a character device",
         "dangling": "a dangling symlink", "link_to_fifo": "a FIFO"}  # fmt: skip


@pytest.mark.parametrize("name", list(KINDS))
def test_open_regular_file_refuses_every_other_kind_without_blocking(zoo, name):
    readers = (files.open_regular_file, files.read_regular_bytes, files.read_regular_text, files.check_regular_file)
    for reader in readers:
        with no_hang(20), pytest.raises(NotARegularFile) as info:
            reader(zoo / name)
        assert info.value.kind == KINDS[name] and isinstance(info.value, ValueError)
        assert str(info.value).startswith("not a regular file" if name != "dangling" else "dangling symlink")
    assert files.is_regular_file(zoo / name) is False
    assert files.read_regular_bytes(zoo / "regular") == b"data" and files.is_regular_file(zoo / "regular")


def test_a_fifo_swapped_in_after_the_check_is_caught_on_the_descriptor(zoo, monkeypatch):
    """The type is checked again on the opened descriptor, which is opened non-blocking: a FIFO that replaces the
    file between the check and the open cannot hang the reader."""
    real_stat = os.stat

    def stat_says_regular(path, *args, **kwargs):  # the check sees a regular file; the open then meets the FIFO
        result = real_stat(path, *args, **kwargs)
        if str(path).endswith("fifo"):
            return os.stat_result((stat.S_IFREG | 0o644, *result[1:]))
        return result

    monkeypatch.setattr(os, "stat", stat_says_regular)
    with no_hang(20), pytest.raises(NotARegularFile, match="a FIFO"):
        files.open_regular_file(zoo / "fifo")


def test_bounded_reads(tmp_path):
    big = tmp_path / "big"
    big.write_bytes(b"x" * 101)
    assert files.read_regular_bytes(big, limit=101) == b"x" * 101
    with pytest.raises(files.FileTooLarge, match="larger than 100 bytes"):
        files.read_regular_bytes(big, limit=100)


# ---- fsspec Locations open local files too ------------------------------------------------------------------------
@pytest.mark.parametrize("url", [False, True])
@pytest.mark.parametrize("name", ["fifo", "folder", "device"])
def test_locations_never_open_a_non_regular_local_file(zoo, url, name):
    spec = f"file://{zoo / name}" if url else str(zoo / name)
    loc = Location.parse(spec)
    with no_hang(20):
        with pytest.raises(NotARegularFile, match=KINDS[name]):
            loc.read_text()
        with pytest.raises(LocationError, match=f"is not a regular file \\({KINDS[name]}\\)"):
            ByteReader(loc)
    assert Location.parse(str(zoo / "regular")).read_text() == "data"
    reader = ByteReader(Location.parse(str(zoo / "regular")))
    assert bytes(reader.read(1, 2)) == b"at"
    reader.close()


# ---- the lock file ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["fifo", "folder", "socket", "device", "dangling"])
def test_the_lock_never_opens_nor_follows_anything_but_its_own_regular_file(zoo, name):
    with no_hang(20), pytest.raises(NotARegularFile):
        FileLock(zoo / name)
    assert not (zoo / "gone").exists()  # the dangling symlink's target was not created through it
    with FileLock(zoo / "new.lock", remove=True):
        assert (zoo / "new.lock").is_file()
    assert not (zoo / "new.lock").exists()


# ---- listings that end ----------------------------------------------------------------------------------------------
def _tree(root: Path, seed: int) -> list[Path]:
    """A random tree of folders (hidden ones too) and .png/.txt files (hidden ones too); returns the files."""
    rng = random.Random(seed)
    folders, made = [root], []
    for i in range(12):
        parent = rng.choice(folders)
        folders.append(parent / (("." if rng.random() < 0.2 else "") + f"d{i}"))
        folders[-1].mkdir()
    for i in range(30):
        f = rng.choice(folders) / (("." if rng.random() < 0.15 else "") + f"f{i}.{rng.choice(['png', 'txt'])}")
        f.write_text("x")
        made.append(f)
    return made


PATTERNS = ["**/*.png", "**", "*/**/*.png", "**/d*/*.txt", "d0/**/*", "**/.d*/*.png", "*.png", "*/*.txt", "**/**/f1*",
            "**/"]  # fmt: skip


@pytest.mark.parametrize("seed", range(4))
def test_glob_files_lists_what_glob_lists_on_trees_without_loops(tmp_path, monkeypatch, seed):
    root = tmp_path / "t"
    root.mkdir()
    _tree(root, seed)
    for base in (str(root), os.path.relpath(root), "./" + os.path.relpath(root)):
        for pattern in PATTERNS:
            spec = os.path.join(base, pattern)
            assert set(files.glob_files(spec)) - {spec.rstrip("*")} == set(glob.glob(spec, recursive=True)) - {
                spec.rstrip("*")}, spec  # glob's "DIR/" for a trailing ** is a folder: dropped by every caller
    monkeypatch.chdir(root)
    for pattern in PATTERNS:
        assert set(files.glob_files(pattern)) - {""} == set(glob.glob(pattern, recursive=True)) - {""}, pattern


def test_tree_entries_lists_what_rglob_lists(tmp_path):
    root = tmp_path / "t"
    root.mkdir()
    _tree(root, 7)
    (root / "d0" / "sideways").symlink_to(root / "d1" if (root / "d1").exists() else root)
    assert sorted(files.tree_entries(root)) == sorted(root.rglob("*"))


def _loops(root: Path) -> set[str]:
    """A photo tree whose symlinks loop back up (two per level: endless and exponential for glob.glob)."""
    (root / "a" / "b").mkdir(parents=True)
    for p in ("x.png", "a/y.png", "a/b/z.png"):
        (root / p).write_text("img")
    (root / "a" / "up").symlink_to("..")
    (root / "a" / "b" / "up").symlink_to("../..")
    (root / "a" / "b" / "self").symlink_to(".")
    (root / "a" / "b" / "abs").symlink_to(root)
    return {str(root / p) for p in ("x.png", "a/y.png", "a/b/z.png")}


def test_glob_and_walk_over_symlink_loops_finish(tmp_path):
    root = tmp_path / "loops"
    root.mkdir()
    expected = _loops(root)
    with no_hang(20):
        assert set(files.glob_files(str(root / "**" / "*.png"))) == expected
        assert set(files.glob_files(str(root / "**" / "**" / "*.png"))) == expected
        assert {str(p) for p in files.tree_entries(root) if p.suffix == ".png"} == expected
    # a symlinked directory named by a literal or single-level component is still followed (finite, as glob does)
    assert files.glob_files(str(root / "a" / "up" / "*.png")) == [str(root / "a" / "up" / "x.png")]


def test_a_directory_reached_twice_is_listed_once(tmp_path, monkeypatch):
    """A bind mount of a folder inside itself is a loop no symlink check sees: directories are also told apart by
    (device, inode), so one reached again is not entered again (simulated: every folder reports one inode)."""
    root = tmp_path / "bind"
    (root / "a" / "a").mkdir(parents=True)
    (root / "a" / "a" / "x.png").write_text("img")
    real_stat = os.stat

    def one_inode(path, *args, **kwargs):
        st = real_stat(path, *args, **kwargs)
        return os.stat_result((st.st_mode, 1 if stat.S_ISDIR(st.st_mode) else st.st_ino, 1, *st[3:]))

    monkeypatch.setattr(os, "stat", one_inode)
    assert files.glob_files(str(root / "**" / "*.png")) == []  # only root itself was entered
    assert files.tree_entries(root) == [root / "a"]


# ---- the class: no raw local reads anywhere in the tools ------------------------------------------------------
PACKAGE = Path(siglip_navit_tools.__file__).parent


def _raw_reads(tree: ast.AST) -> list[tuple[int, str]]:
    """Calls that read a local file without the helper: builtin open() for reading, json.load, .read_bytes(), and
    .read_text() on a path expression (`Path(...)` or `a / "b"`; a Name may be a Location, which checks itself)."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id == "open":
            given = [k.value for k in node.keywords if k.arg == "mode"]
            mode = node.args[1] if len(node.args) > 1 else (given[0] if given else None)
            text = mode.value if isinstance(mode, ast.Constant) else "r"
            if not set(text) & set("wax+"):
                found.append((node.lineno, "open() for reading"))
        elif isinstance(func, ast.Attribute):
            if func.attr == "load" and isinstance(func.value, ast.Name) and func.value.id == "json":
                found.append((node.lineno, "json.load"))
            elif func.attr == "read_bytes":
                found.append((node.lineno, ".read_bytes()"))
            elif func.attr == "read_text" and isinstance(func.value, (ast.Call, ast.BinOp)):
                found.append((node.lineno, ".read_text() of a path"))
    return found


def test_every_local_read_in_the_tools_goes_through_io_files():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "io" / "files.py":
            continue
        for line, what in _raw_reads(ast.parse(path.read_text(), str(path))):
            offenders.append(f"{path.relative_to(PACKAGE)}:{line}: {what}")
    hint = "read local files with siglip_navit_tools.io.files (regular files only):\n"
    assert not offenders, hint + "\n".join(offenders)


def test_the_scan_sees_what_it_looks_for():
    code = "open(p)\nopen(p, 'rb')\nopen(p, mode='wb')\njson.load(f)\nPath(p).read_text()\n(d / 'x').read_bytes()"
    assert [what for _, what in _raw_reads(ast.parse(code))] == [
        "open() for reading", "open() for reading", "json.load", ".read_text() of a path", ".read_bytes()"]
