"""convert_checkpoint.py never harms what is at --out (issue 20 item 3, and item 6's symlinked --out): the rules are
checked again right before the final rename, a second converter into the same --out is refused while one writes, an
--out that is, contains or lies inside anything the source reads (by the path given or the path it resolves to) is
refused even with --force, --force replaces only a folder that looks like a checkpoint (a thesis and photos survive,
and the refusal lists them), and an empty --out is not the current directory. Attacks as a clumsy or hostile user
makes them; tiny BAGEL checkpoints built in the test."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from siglip_navit_tools.convert import cli as convert_cli
from siglip_navit_tools.convert import run as convert_run
from siglip_navit_tools.convert import target as convert_target
from siglip_navit_tools.io import atomic
from siglip_navit_tools.io.lock import FileLock
from siglip_navit_tools.repo_code import REPO_ROOT
from siglip_navit_tools.testing import tiny_bagel_checkpoint, unique_dir


def convert(*args) -> int:
    return convert_cli.main([str(a) for a in args] + ["--no-progress"])


def error_paragraph(err: str) -> str:
    """The error: the last line of stderr, one paragraph starting with "error: ", never an unexpected exception."""
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and all(not l.startswith("error: ") for l in lines[:-1]), err
    assert "unexpected" not in lines[-1] and "Traceback" not in err, err
    return lines[-1]


def snapshot(folder: Path) -> dict:
    """Every file below `folder` (symlinks not followed) -> its bytes (or link target): what must survive."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(root) / name
            if p.is_symlink():
                found[str(p.relative_to(folder))] = ("link", os.readlink(p))
            elif p.is_file():
                found[str(p.relative_to(folder))] = p.read_bytes()
    return found


def no_leftovers(parent: Path) -> bool:
    names = [p.name for p in parent.iterdir()]
    return not [n for n in names if ".tmp-" in n or ".old-" in n or n.endswith(".lock")]


@pytest.fixture
def src(tmp_path):
    return tiny_bagel_checkpoint(unique_dir(tmp_path, "bagel"))


def thesis_folder(path: Path) -> Path:
    """What a user keeps in a folder they mistype as --out: nothing a model repo holds."""
    (path / "photos").mkdir(parents=True)
    (path / "thesis.pdf").write_bytes(b"%PDF-1.7 five years of work")
    (path / "notes.txt").write_text("do not delete")
    (path / "photos" / "a.jpg").write_bytes(b"\xff\xd8jpeg")
    return path


# ---- an empty --out is not the current directory ----------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--out", "--src", "--config"])
@pytest.mark.parametrize("value", ["", "   "])
def test_empty_paths_are_refused_not_the_current_directory(tmp_path, src, monkeypatch, capsys, flag, value):
    cwd = thesis_folder(tmp_path / "cwd")
    (cwd / "config.json").write_text("{}")  # a checkpoint-looking cwd: --force alone must not make it the target
    monkeypatch.chdir(cwd)
    before = snapshot(cwd)
    args = {"--src": src, "--out": tmp_path / "out", "--config": None, flag: value}
    argv = [a for k, v in args.items() if v is not None for a in (k, v)]
    assert convert(*argv, "--force") == 1
    err = error_paragraph(capsys.readouterr().err)
    assert f"{flag} is empty" in err and "current directory is never assumed" in err
    assert snapshot(cwd) == before and not (tmp_path / "out").exists()


# ---- checked again at the final rename ----------------------------------------------------------------------------
def _create_during_run(monkeypatch, out: Path, make) -> None:
    """Run `make(out)` after the weights are written and verified, just before the final checks and rename."""
    real = atomic.fsync_tree

    def fsync_then_interfere(directory):
        real(directory)
        make(out)

    monkeypatch.setattr(atomic, "fsync_tree", fsync_then_interfere)


@pytest.mark.parametrize("force", [False, True])
def test_folder_created_at_out_during_the_run_is_not_replaced(tmp_path, src, monkeypatch, capsys, force):
    out = unique_dir(tmp_path, "out")
    _create_during_run(monkeypatch, out, thesis_folder)
    assert convert("--src", src, "--out", out, *(["--force"] if force else [])) == 1
    err = error_paragraph(capsys.readouterr().err)
    assert "changed during the run" in err and "discarded" in err
    assert (out / "thesis.pdf").read_bytes() == b"%PDF-1.7 five years of work" and (out / "photos" / "a.jpg").exists()
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "photos", "thesis.pdf"]
    assert no_leftovers(tmp_path)


def test_checkpoint_created_during_the_run_is_replaced_only_with_force(tmp_path, src, monkeypatch, capsys):
    def old_checkpoint(out):
        out.mkdir()
        (out / "config.json").write_text('{"old": true}')

    out = unique_dir(tmp_path, "out")
    _create_during_run(monkeypatch, out, old_checkpoint)
    assert convert("--src", src, "--out", out) == 1
    assert "not empty; pass --force" in error_paragraph(capsys.readouterr().err)
    assert json.loads((out / "config.json").read_text()) == {"old": True}
    monkeypatch.undo()
    assert convert("--src", src, "--out", out, "--force") == 0
    assert (out / "model.safetensors").is_file() and "old" not in json.loads((out / "config.json").read_text())
    assert no_leftovers(tmp_path)


def test_something_appearing_between_the_last_check_and_the_rename_is_left_alone(tmp_path, src, monkeypatch, capsys):
    """The last window: the kernel's rename itself refuses to replace a non-empty folder without --force."""
    out = unique_dir(tmp_path, "out")
    real = convert_run._check_again

    def check_then_interfere(out_, source, force):
        real(out_, source, force)
        thesis_folder(out_)

    monkeypatch.setattr(convert_run, "_check_again", check_then_interfere)
    assert convert("--src", src, "--out", out) == 1
    err = error_paragraph(capsys.readouterr().err)
    assert "changed during the run" in err and "left as it is" in err
    assert (out / "thesis.pdf").read_bytes() == b"%PDF-1.7 five years of work" and no_leftovers(tmp_path)


# ---- one converter at a time per --out --------------------------------------------------------------------------
def test_out_locked_by_another_process_is_refused_and_freed_when_it_dies(tmp_path, src, capsys):
    out = unique_dir(tmp_path, "out")
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent("""
            import sys, time
            from pathlib import Path
            from siglip_navit_tools.convert.target import lock_path
            from siglip_navit_tools.io.lock import FileLock
            FileLock(lock_path(Path(sys.argv[1])), remove=True)
            print("held", flush=True)
            time.sleep(120)
        """), str(out)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        assert convert("--src", src, "--out", out) == 1
        err = error_paragraph(capsys.readouterr().err)
        assert "being written by another convert_checkpoint.py run" in err and "nothing was changed" in err
        assert not out.exists()
    finally:
        holder.kill()  # kill -9: the kernel frees the flock at once
        holder.wait()
    assert convert("--src", src, "--out", out) == 0
    assert (out / "model.safetensors").is_file() and no_leftovers(tmp_path)


SLOW_CONVERTER = """
import sys, time
from pathlib import Path
from siglip_navit_tools.convert import cli, run
real = run.write_weights
def slow(*args, **kwargs):  # writing: say so, then wait until the test lets go (at most 5 minutes)
    Path(sys.argv[1]).write_text("writing")
    deadline = time.monotonic() + 300
    while not Path(sys.argv[2]).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return real(*args, **kwargs)
run.write_weights = slow
sys.exit(cli.main(sys.argv[3:]))
"""


def test_two_real_converters_into_one_out_one_fails_clearly(tmp_path, src):
    """Two command lines at once, each in its own process (the first one held while it writes, until the second has
    finished): before, both exited 0 and one silently replaced the other's output."""
    out = unique_dir(tmp_path, "out")
    started, release = tmp_path / "started", tmp_path / "release"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    argv = ["--src", str(src), "--out", str(out), "--no-progress", "--force"]
    first = subprocess.Popen([sys.executable, "-c", SLOW_CONVERTER, str(started), str(release), *argv], env=env,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while not started.exists():
        ended = first.poll() is not None
        assert not ended and time.monotonic() < deadline, first.stderr.read() if ended else "never started writing"
        time.sleep(0.05)
    second = subprocess.run([sys.executable, str(REPO_ROOT / "convert_checkpoint.py"), *argv], env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    release.write_text("go")
    first_err = first.communicate(timeout=300)[1]
    assert first.returncode == 0, first_err
    assert second.returncode == 1, second.stderr
    assert "being written by another convert_checkpoint.py run" in error_paragraph(second.stderr)
    assert (out / "model.safetensors").is_file() and no_leftovers(tmp_path)


def test_lock_file_is_never_followed_nor_left_behind(tmp_path, src, capsys):
    out = unique_dir(tmp_path, "out")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    convert_target.lock_path(out).symlink_to(victim)  # a planted symlink at the lock's name
    assert convert("--src", src, "--out", out) == 1
    err = error_paragraph(capsys.readouterr().err)
    assert "(the lock beside --out) is a symlink" in err and victim.read_text() == "precious" and not out.exists()
    convert_target.lock_path(out).unlink()
    convert_target.lock_path(out).mkdir()
    assert convert("--src", src, "--out", out) == 1
    assert "is a directory" in error_paragraph(capsys.readouterr().err)
    convert_target.lock_path(out).rmdir()
    deep = tmp_path / "new" / "parents" / "out"
    assert convert("--src", src, "--out", deep, "--num-hidden-layers", "9") == 1  # fails after the lock was taken
    assert not (tmp_path / "new").exists()  # parents made for the lock are removed again when nothing was written
    assert convert("--src", src, "--out", deep) == 0 and no_leftovers(deep.parent)


def test_a_taker_that_loses_the_race_with_a_removing_holder_retries_on_the_new_file(tmp_path, monkeypatch):
    """remove=True: a taker that opened the lock file just before its holder unlinked it (on release) must not believe
    it holds the lock -- the next taker would create and lock a new file at the name. It tries again instead."""
    path = tmp_path / ".o.lock"
    real_open = FileLock._open
    opened = []

    def open_then_holder_removes(self):
        fd = real_open(self)
        opened.append(fd)
        if len(opened) == 1:
            os.unlink(self.path)  # the holder's release, between this taker's open and its flock
        return fd

    monkeypatch.setattr(FileLock, "_open", open_then_holder_removes)
    lock = FileLock(path, remove=True)
    assert len(opened) == 2 and os.fstat(lock.fd).st_ino == os.stat(path).st_ino
    lock.release()
    assert not path.exists()


# ---- never over the source, by given or resolved path --------------------------------------------------------------
def _linked_weights(tmp_path, src):
    """DIR holds vit_config.json and a symlink ema.safetensors -> REAL/ema.safetensors (REAL holds only the weights)."""
    real = unique_dir(tmp_path, "real")
    real.mkdir()
    (src / "ema.safetensors").rename(real / "ema.safetensors")
    (src / "ema.safetensors").symlink_to(real / "ema.safetensors")
    return real


@pytest.mark.parametrize(
    "case",
    ["out_is_src", "out_inside_src", "out_contains_src", "out_is_weights_real_folder", "src_file_via_symlinked_dir",
     "out_symlink_to_src", "out_is_folder_of_src_file"],
)  # fmt: skip
def test_out_over_anything_the_source_reads_is_refused_even_with_force(tmp_path, src, capsys, case):
    real = _linked_weights(tmp_path, src)
    parent = src.parent
    link = unique_dir(tmp_path, "linkdir")
    link.symlink_to(src)
    src_arg, out = {
        "out_is_src": (src, src),
        "out_inside_src": (src, src / "converted"),
        "out_contains_src": (src, parent),
        "out_is_weights_real_folder": (src, real),  # REAL looks like a checkpoint: only the resolved path says no
        "src_file_via_symlinked_dir": (link / "ema.safetensors", src),
        "out_symlink_to_src": (src, link),
        "out_is_folder_of_src_file": (src / "ema.safetensors", src),
    }[case]
    before_src, before_real = snapshot(src), snapshot(real)
    assert convert("--src", src_arg, "--out", out, "--force") == 1
    err = error_paragraph(capsys.readouterr().err)
    assert f"refusing to write to {out}" in err and "which the source" in err and "resolve" in err
    assert snapshot(src) == before_src and snapshot(real) == before_real
    assert (real / "ema.safetensors").stat().st_size > 0 and no_leftovers(parent)


def test_out_beside_the_source_is_fine(tmp_path, src):
    _linked_weights(tmp_path, src)
    assert convert("--src", src, "--out", src.parent / "beside") == 0


# ---- --force replaces only a checkpoint folder ----------------------------------------------------------------------
def test_force_never_deletes_a_thesis_and_photos(tmp_path, src, capsys):
    out = thesis_folder(unique_dir(tmp_path, "documents"))
    (out / "config.json").write_text("{}")  # even next to a config.json
    before = snapshot(out)
    for extra in ([], ["--dry-run"]):
        assert convert("--src", src, "--out", out, "--force", *extra) == 1
        err = error_paragraph(capsys.readouterr().err)
        assert "does not look like a checkpoint folder" in err and "nothing was changed" in err
        assert "notes.txt, photos/, thesis.pdf" in err and "all 4 of its entries" in err  # exactly what would go
        assert snapshot(out) == before and no_leftovers(tmp_path)


@pytest.mark.parametrize(
    "entries, words",
    [
        ({"README.md": "my notes"}, "no config.json and no *.safetensors"),
        ({"model.safetensors": "x", ".git/HEAD": "ref"}, ".git/"),
        ({"config.json": "{}", "run.log": "..."}, "run.log"),
        ({"config.json": "{}", "data.json.bak": "..."}, "data.json.bak"),
    ],
)
def test_force_lists_what_a_model_repo_does_not_hold(tmp_path, src, capsys, entries, words):
    out = unique_dir(tmp_path, "out")
    for name, text in entries.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    before = snapshot(out)
    assert convert("--src", src, "--out", out, "--force") == 1
    assert words in error_paragraph(capsys.readouterr().err)
    assert snapshot(out) == before


def test_force_replaces_an_earlier_checkpoint_of_any_layout(tmp_path, src):
    out = unique_dir(tmp_path, "out")
    assert convert("--src", src, "--out", out) == 0
    (out / "model-00001-of-00002.safetensors").write_text("old shard")
    (out / "model.safetensors.index.json").write_text("{}")
    (out / ".gitattributes").write_text("*.safetensors filter=lfs")
    (out / ".cache" / "huggingface").mkdir(parents=True)  # what `hf download --local-dir` leaves
    assert convert("--src", src, "--out", out, "--force") == 0
    assert not (out / "model-00001-of-00002.safetensors").exists() and (out / "model.safetensors").is_file()
    assert no_leftovers(tmp_path)


def test_a_file_at_out_is_never_replaced(tmp_path, src, capsys):
    out = tmp_path / "thesis.pdf"
    out.write_bytes(b"%PDF")
    assert convert("--src", src, "--out", out, "--force") == 1
    assert "exists and is not a folder" in error_paragraph(capsys.readouterr().err)
    assert out.read_bytes() == b"%PDF"


# ---- a symlink at --out (item 6) --------------------------------------------------------------------------------
def test_symlink_to_an_empty_folder_is_explained_not_called_not_empty(tmp_path, src, capsys):
    empty = tmp_path / "empty_target"
    empty.mkdir()
    out = tmp_path / "link_out"
    out.symlink_to(empty)
    assert convert("--src", src, "--out", out) == 1
    err = error_paragraph(capsys.readouterr().err)
    assert "is a symlink to an empty folder" in err and "not empty" not in err and str(empty) in err
    assert convert("--src", src, "--out", empty) == 0  # the real folder, as the message says
    assert (empty / "model.safetensors").is_file()
    other = tmp_path / "other_empty"
    other.mkdir()
    out.unlink()
    out.symlink_to(other)
    assert convert("--src", src, "--out", out, "--force") == 0  # --force replaces the link, never its target
    assert not out.is_symlink() and (out / "model.safetensors").is_file() and list(other.iterdir()) == []


# ---- a read-only place for --out (item 6, the converter's side) ------------------------------------------------------
@pytest.mark.parametrize("where", ["out_in_read_only_folder", "read_only_parent_of_missing_parents"])
def test_a_read_only_out_is_one_paragraph(tmp_path, src, where):
    """A real read-only file system (as root: a read-only bind mount in a private mount namespace; otherwise the
    folder's write bits cleared); skipped only where neither can be made."""
    from siglip_navit_tools.testing import read_only_prefix

    ro = tmp_path / "ro"
    ro.mkdir()
    out = ro / "out" if where == "out_in_read_only_folder" else ro / "new" / "deeper" / "out"
    prefix, how = read_only_prefix(ro)
    if prefix is None:
        pytest.skip(f"cannot make a read-only location here: {how}")
    try:
        argv = [sys.executable, str(REPO_ROOT / "convert_checkpoint.py"), "--src", str(src), "--out", str(out),
                "--no-progress"]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
        result = subprocess.run([*prefix, *argv], capture_output=True, text=True, timeout=300, env=env)
    finally:
        os.chmod(ro, 0o755)
    assert result.returncode == 1, (how, result.stderr)
    err = error_paragraph(result.stderr)
    reason = "read-only file system" if os.geteuid() == 0 else "permission denied"
    assert err.startswith(f"error: {reason} while writing") and "nothing was changed at --out" in err, err
    assert list(ro.iterdir()) == []
