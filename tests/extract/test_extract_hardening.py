"""extract_features.py against hostile folders (issue 12 item 6) and `--dtype auto` (issue 13 item 6): non-regular
files are skipped unopened, the output lock dies with the main process (kill -9 with live DataLoader workers), stale
temporaries are removed on resume, a missing / empty / corrupt / foreign manifest is recovered from the shard files,
dangling symlinks are listed as skipped, one file under several spellings is encoded once, each skip is logged once."""

import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from _extract_helpers import extract, good_paths, read_outputs, reference, synthetic
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from siglip_navit_tools import cpu, repo_code
from siglip_navit_tools.extract import ExtractOptions, UsageError
from siglip_navit_tools.extract import cli as extract_cli
from siglip_navit_tools.extract.pipeline import resolve_dtype
from siglip_navit_tools.extract.shards import lock_output
from siglip_navit_tools.testing import no_hang

ROOT = repo_code.REPO_ROOT




def script_env(**extra):
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH="", **extra)


def script(model_dir, input_spec, output, *extra):
    return [sys.executable, str(ROOT / "extract_features.py"), "--model", str(model_dir), "--input", str(input_spec),
            "--output", str(output), "--no-progress", *map(str, extra)]  # fmt: skip


# ---- non-regular files, dangling symlinks, each skip logged once --------------------------------------------------
@pytest.fixture
def hostile_dir(tmp_path):
    """Two images, a FIFO, a unix socket, a dangling symlink and a folder, all with image names."""
    root = tmp_path / "h"
    root.mkdir()
    synthetic(30, 20, 0).save(root / "a.png")
    synthetic(20, 40, 1).save(root / "b.png")
    os.mkfifo(root / "fifo.png")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "sock.png"))
    (root / "dangling.png").symlink_to(root / "gone.png")
    (root / "folder.png").mkdir()
    yield root
    sock.close()


def test_non_regular_files_are_skipped_unopened_and_each_skip_is_logged_once(model_dir, hostile_dir, tmp_path):
    """A FIFO (reading it blocks forever), a socket, a character device, a folder named in a list, a dangling
    symlink: each is listed under `skipped` with its reason, never opened, and its warning printed exactly once
    (DataLoader workers on, through the real command line)."""
    listing = tmp_path / "list.txt"
    named = [hostile_dir / n for n in ("a.png", "fifo.png", "sock.png", "dangling.png", "folder.png", "b.png")]
    listing.write_text("\n".join(map(str, [*named, "/dev/null"])) + "\n")
    for spec, out in [(hostile_dir, tmp_path / "from_folder"), (listing, tmp_path / "from_list"),
                      (f"{hostile_dir}/*.png", tmp_path / "from_glob")]:  # fmt: skip
        proc = subprocess.run(script(model_dir, spec, out, "--num-workers", 2, "--shard-size", 3), env=script_env(),
                              capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        manifest, found = read_outputs(out)
        assert sorted(found) == [str(hostile_dir / "a.png"), str(hostile_dir / "b.png")] and manifest["complete"]
        reasons = {os.path.basename(s["id"]): s["error"] for s in manifest["skipped"]}
        assert "not a regular file (a FIFO)" in reasons["fifo.png"]
        assert "not a regular file (a socket)" in reasons["sock.png"]
        assert "dangling symlink" in reasons["dangling.png"] and "gone.png" in reasons["dangling.png"]
        if spec == listing:  # a folder where a file is expected, and a device
            assert "not a regular file (a directory)" in reasons["folder.png"]
            assert "not a regular file (a character device)" in reasons["null"]
        else:  # a folder in a folder / glob is a container: not listed
            assert "folder.png" not in reasons
        for entry in manifest["skipped"]:
            assert proc.stderr.count(f"skipping image {entry['id']!r}") == 1, proc.stderr
    ref = reference(model_dir, sorted(found))
    for path, (pooled, _, _) in found.items():
        torch.testing.assert_close(pooled, ref[path][0], atol=1e-5, rtol=1e-5)


def test_a_fifo_as_the_input_list_is_refused_without_reading_it(model_dir, tmp_path, capsys):
    os.mkfifo(tmp_path / "list.txt")
    with no_hang(30):
        assert extract(model_dir, tmp_path / "list.txt", tmp_path / "out") == 2
    assert "not a regular file (a FIFO)" in capsys.readouterr().err
    os.mkfifo(tmp_path / "one.png")  # a single-image input that is a FIFO: skipped, the run completes
    with no_hang(60):
        assert extract(model_dir, tmp_path / "one.png", tmp_path / "out1") == 0
    manifest = json.loads((tmp_path / "out1" / "manifest.json").read_text())
    assert manifest["num_encoded"] == 0 and "a FIFO" in manifest["skipped"][0]["error"]


def test_each_skip_is_logged_once_in_process_with_workers(model_dir, image_dir, tmp_path, caplog):
    assert extract(model_dir, image_dir, tmp_path / "out", "--num-workers", 1, "--shard-size", 4) == 0
    skips = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping image")]
    assert len(skips) == len(set(skips)) == 2, skips


# ---- one file, several spellings ----------------------------------------------------------------------------------
def test_one_file_under_several_spellings_is_encoded_once_under_its_first_spelling(model_dir, tmp_path):
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    synthetic(30, 20, 0).save(d / "x.png")
    synthetic(20, 30, 1).save(d / "y.png")
    (d / "link.png").symlink_to(d / "x.png")
    spellings = [f"{d}/x.png", f"{d}/./x.png", f"{d}/sub/../x.png", f"{d}/link.png", f"{d}/y.png", f"{d}/x.png"]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(spellings) + "\n")
    out = tmp_path / "out"
    assert extract(model_dir, listing, out) == 0
    manifest, found = read_outputs(out)
    assert sorted(found) == [f"{d}/x.png", f"{d}/y.png"] and manifest["num_inputs"] == 2
    assert manifest["duplicates"] == [{"id": s, "same_as": f"{d}/x.png"} for s in spellings[1:4] + spellings[5:]]
    # a folder holding a file and a symlink to it: once, under the first name in sorted order
    assert extract(model_dir, d, tmp_path / "folder") == 0
    manifest, found = read_outputs(tmp_path / "folder")
    assert sorted(found) == [f"{d}/link.png", f"{d}/y.png"]
    assert manifest["duplicates"] == [{"id": f"{d}/x.png", "same_as": f"{d}/link.png"}]


# ---- the lock dies with the main process ----------------------------------------------------------------------------
def children(pid):
    """Live child processes of `pid` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry))
    return found


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc to find the DataLoader workers")
def test_rerun_right_after_kill_9_is_not_refused_while_orphaned_workers_linger(model_dir, image_dir, tmp_path):
    out = tmp_path / "out"
    slow = [str(ROOT / "tests" / "extract" / "_extract_slow_rank_worker.py"), "0:60"]  # slows rank 0 from outside
    command = [sys.executable, *slow, *script(model_dir, image_dir, out, "--num-workers", 2, "--shard-size", 4)[2:]]
    env = script_env()  # rank 0 sleeps before its first shard: the workers are up
    proc = subprocess.Popen(command, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while len(children(proc.pid)) < 2:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no DataLoader workers appeared"
            time.sleep(0.2)
        workers = children(proc.pid)
    finally:
        proc.kill()  # SIGKILL: no cleanup of any kind
        proc.wait()
        proc.stderr.close()
    assert any(os.path.exists(f"/proc/{w}") for w in workers)  # orphans still alive (they poll for the parent)
    lock_output(out).release()  # at once: not "in use"
    assert extract(model_dir, image_dir, out) == 0
    manifest, found = read_outputs(out)
    assert manifest["complete"] and sorted(found) == good_paths(image_dir)


def test_lock_is_not_held_by_forked_children(tmp_path):
    """A forked child (a DataLoader worker) gets no copy of the lock's descriptor: closed right after the fork."""
    lock = lock_output(tmp_path)
    try:
        pid = os.fork()
        if pid == 0:
            try:
                os.fstat(lock.fd)
                os._exit(1)  # the child still holds the descriptor, hence the lock
            except OSError:
                os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0
        assert os.get_inheritable(lock.fd) is False  # and exec'd children (spawn, subprocess) never get it
    finally:
        lock.release()


# ---- stale temporaries ---------------------------------------------------------------------------------------------
def test_stale_temporaries_are_removed_on_resume_only_when_holding_the_lock(model_dir, image_dir, tmp_path):
    import fcntl

    out = tmp_path / "out"
    assert extract(model_dir, image_dir, out, "--shard-size", 5) == 0
    (out / "shard-00001-of-00003.safetensors").unlink()
    planted = [out / ".shard-00001-of-00003.safetensors.tmp-99999", out / ".manifest.json.tmp-4242"]
    for path in planted:
        path.write_bytes(b"half a file")
    with open(out / ".lock", "w") as held:  # another run holds the folder: its temporaries are its own
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert extract(model_dir, image_dir, out) == 2
        assert all(path.exists() for path in planted)
    assert extract(model_dir, image_dir, out) == 0
    assert not any(path.exists() for path in planted)
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [".lock"]
    manifest, found = read_outputs(out)
    assert manifest["complete"] and sorted(found) == good_paths(image_dir)


# ---- the manifest is rebuilt from the shard files ---------------------------------------------------------------
def stamps(out):
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("shard-*")}


@pytest.mark.parametrize(
    "damage", [b"", b"\n", b'{"format": "siglip-navit-features/1", "shards": [', b"\xff\xfe\x00",
               b'{"format": "siglip-navit-features/1"}', None],  # fmt: skip
    ids=["empty", "blank", "truncated", "binary", "no-keys", "missing"],
)
def test_a_broken_manifest_is_rebuilt_from_the_shard_files(model_dir, image_dir, tmp_path, capsys, caplog, damage):
    out = tmp_path / "out"
    assert extract(model_dir, image_dir, out, "--shard-size", 4) == 0
    (out / "shard-00001-of-00004.safetensors").unlink()
    kept = stamps(out)
    if damage is None:
        (out / "manifest.json").unlink()
    else:
        (out / "manifest.json").write_bytes(damage)
    capsys.readouterr()
    assert extract(model_dir, image_dir, out) == 0
    assert "1 shard(s) written, 3 already done" in capsys.readouterr().out
    assert "rebuilt from the 3 shard file(s) of this run" in caplog.text
    assert {name: stamp for name, stamp in stamps(out).items() if name in kept} == kept
    manifest, found = read_outputs(out)
    assert manifest["complete"] and manifest["shard_size"] == 4 and sorted(found) == good_paths(image_dir)
    if damage is not None:  # --overwrite: always possible, and a fresh start
        (out / "manifest.json").write_bytes(damage)
        capsys.readouterr()
        assert extract(model_dir, image_dir, out, "--overwrite", "--shard-size", 4) == 0
        assert "4 shard(s) written, 0 already done" in capsys.readouterr().out


def strip_plan_metadata(out):
    for path in out.glob("shard-*"):
        with safe_open(str(path), framework="pt") as f:
            metadata = {key: value for key, value in f.metadata().items() if key != "plan"}
        save_file(load_file(str(path)), str(path), metadata=metadata)


def test_shards_written_before_the_plan_metadata_are_measured(model_dir, image_dir, tmp_path, capsys):
    """Shard files of the earlier format (no `plan` key) still rebuild the manifest: shard_size from their sizes
    (a shard other than the last holds shard_size inputs; the last one alone also says it)."""
    out = tmp_path / "out"
    assert extract(model_dir, image_dir, out, "--shard-size", 4) == 0
    for round, (gone, expected) in enumerate([((0, 2), "2 shard(s) written, 2"), ((0, 1, 2), "3 shard(s) written, 1")]):
        strip_plan_metadata(out)
        for k in gone:
            (out / f"shard-0000{k}-of-00004.safetensors").unlink()
        (out / "manifest.json").write_text("")
        capsys.readouterr()
        assert extract(model_dir, image_dir, out) == 0, round
        assert f"{expected} already done" in capsys.readouterr().out
        manifest, found = read_outputs(out)
        assert manifest["complete"] and manifest["num_shards"] == 4 and sorted(found) == good_paths(image_dir)


def test_a_broken_manifest_beside_another_runs_shards_is_refused_then_overwritten(model_dir, image_dir, tmp_path,
                                                                                  capsys):  # fmt: skip
    out = tmp_path / "out"
    assert extract(model_dir, image_dir, out, "--save-grids") == 0
    (out / "manifest.json").write_text("{")
    before = stamps(out)
    assert extract(model_dir, image_dir, out) == 2  # other settings: the shards are not this run's
    err = capsys.readouterr().err
    assert "manifest.json that is corrupt" in err and "shard files are of a different run" in err
    assert stamps(out) == before
    assert extract(model_dir, image_dir, out, "--overwrite") == 0
    manifest, _ = read_outputs(out)
    assert manifest["complete"] and not manifest["save_grids"]


def test_a_foreign_manifest_is_refused_but_overwrite_replaces_it(model_dir, image_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"format": "someone-else/3"}))
    assert extract(model_dir, image_dir, out) == 2
    assert "holds a manifest.json this script did not write" in capsys.readouterr().err
    assert extract(model_dir, image_dir, out, "--overwrite") == 0
    manifest, found = read_outputs(out)
    assert manifest["complete"] and sorted(found) == good_paths(image_dir)


# ---- --dtype auto ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("support, expected", [(cpu.NATIVE_BF16[1], "bfloat16"), (cpu.EMULATED_BF16, "float32")])
def test_dtype_auto_picks_by_cpu_kind_says_so_and_fingerprints_the_choice(
    model_dir, image_dir, tmp_path, monkeypatch, capsys, caplog, support, expected
):
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(repo_code.pipeline(), "cpu_bf16_support", lambda: support)  # the repo's one dtype rule
    out = tmp_path / "out"
    assert extract(model_dir, image_dir, out, "--dtype", "auto", "--device", "cpu") == 0
    manifest, found = read_outputs(out)
    assert manifest["dtype"] == expected and f"--dtype auto chose {expected} on cpu" in manifest["dtype_choice"]
    assert support in manifest["dtype_choice"] and f"--dtype auto chose {expected}" in caplog.text
    assert sorted(found) == good_paths(image_dir)
    capsys.readouterr()
    assert extract(model_dir, image_dir, out, "--dtype", expected) == 0  # the resolved dtype, not "auto", is the run
    assert "0 shard(s) written, 1 already done" in capsys.readouterr().out
    other = "float32" if expected == "bfloat16" else "bfloat16"
    assert extract(model_dir, image_dir, out, "--dtype", other) == 2


def test_dtype_auto_on_cuda_and_other_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", torch.device("cuda", 0))[0] == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    name, why = resolve_dtype("auto", torch.device("cuda", 0))
    assert name == "float32" and "lacks bf16" in why
    assert resolve_dtype("auto", torch.device("meta"))[0] == "float32"
    assert resolve_dtype("float16", torch.device("cpu")) == ("float16", "--dtype float16")
    ExtractOptions(model="m", input="i", output="o", dtype="auto").validate()
    assert ExtractOptions(model="m", input="i", output="o").dtype == "float32"  # the default stays float32
    parsed = extract_cli.options_from_args(extract_cli.build_parser().parse_args(
        ["--model", "m", "--input", "i", "--output", "o", "--dtype", "auto"]))  # fmt: skip
    assert parsed.dtype == "auto"
    with pytest.raises(UsageError, match="'auto'"):
        ExtractOptions(model="m", input="i", output="o", dtype="bf16").validate()
