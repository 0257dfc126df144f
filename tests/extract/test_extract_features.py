"""extract_features.py: token-budget packing, outputs equal to per-image forwards, resumable atomic shards,
corrupt images skipped, datasets input, and 2-process data parallelism through torchrun (gloo)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from _extract_helpers import extract, good_paths, read_outputs, reference, synthetic
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from siglip_navit_tools import repo_code
from siglip_navit_tools.extract import inputs as extract_inputs
from siglip_navit_tools.extract import run as extract_run
from siglip_navit_tools.extract.packing import plan_batches

ROOT = repo_code.REPO_ROOT


# ---- packing plan --------------------------------------------------------------------------------------------
def test_plan_batches_first_fit_decreasing():
    lengths = [30, 70, 20, 50, 50, 10, 80, 40]
    batches = plan_batches(lengths, 100)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 100 for b in batches)
    assert len(batches) == 4  # 350 patches: the optimum 4 bins of 100 (FFD finds 80+20, 70+30, 50+50, 40+10)
    for b in batches:
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
    with pytest.raises(ValueError, match="does not fit a budget of 60"):
        plan_batches([70], 60)


def test_plan_batches_random_sizes_are_packed_tightly():
    rng = np.random.default_rng(0)
    lengths = [int(h) * int(w) for h, w in rng.integers(4, 71, (200, 2))]
    budget = 16384
    batches = plan_batches(lengths, budget)
    assert sorted(i for b in batches for i in b) == list(range(200))
    assert max(sum(lengths[i] for i in b) for b in batches) <= budget
    assert len(batches) <= -(-sum(lengths) // budget) + 1  # within one forward of the lower bound


# ---- single process ------------------------------------------------------------------------------------------
def test_folder_input_matches_per_image_forwards_and_skips_broken_files(model_dir, image_dir, tmp_path, capsys, caplog):
    out = tmp_path / "feats"
    assert extract(model_dir, image_dir, out, "--max-patches-per-batch", 300, "--save-grids", "--shard-size", 4) == 0
    manifest, found = read_outputs(out)
    paths = good_paths(image_dir)
    assert sorted(found) == paths
    assert manifest["complete"] and manifest["num_encoded"] == len(paths) and manifest["num_skipped"] == 2
    skipped = {s["id"]: s["error"] for s in manifest["skipped"]}
    assert set(skipped) == {str(image_dir / "sub" / "garbage.jpg"), str(image_dir / "truncated.bmp")}
    assert "UnidentifiedImageError" in skipped[str(image_dir / "sub" / "garbage.jpg")]
    logged = caplog.text
    assert "garbage.jpg" in logged and "truncated.bmp" in logged
    ref = reference(model_dir, paths)
    for path in paths:
        pooled, grid, fmap = found[path]
        assert grid == ref[path][1]
        torch.testing.assert_close(pooled, ref[path][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fmap, ref[path][2], atol=1e-5, rtol=1e-5)
    # shards keep input order, hold at most --shard-size inputs; the budget is never exceeded
    ids_in_order = [i for s in manifest["shards"] for i in s["ids"]]
    assert ids_in_order == [i for i in sorted(map(str, (p for p in image_dir.rglob("*") if p.is_file()))) if i in found]
    assert all(len(s["ids"]) + len(s["skipped"]) <= 4 for s in manifest["shards"])
    modes = {
        (out / name).stat().st_mode & 0o777 for name in ["manifest.json"] + [s["file"] for s in manifest["shards"]]
    }
    assert len(modes) == 1, f"shards and manifest should share the umask's permissions, got {sorted(map(oct, modes))}"
    run = manifest["last_run"]
    assert run["largest_forward"] <= 300 and run["forwards"] >= -(-run["patches"] // 300)
    assert 0 < run["packing_efficiency"] <= 1
    printed = capsys.readouterr().out
    assert "packing efficiency" in printed and "images/s" in printed and "skipped 2 unreadable" in printed


def test_rerun_skips_finished_shards_and_redoes_missing_ones(model_dir, image_dir, tmp_path, capsys):
    out = tmp_path / "feats"
    assert extract(model_dir, image_dir, out, "--shard-size", 5) == 0
    shards = sorted(out.glob("shard-*.safetensors"))
    assert len(shards) == 3
    stamps = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards}
    capsys.readouterr()
    assert extract(model_dir, image_dir, out) == 0  # resume: the first run's --shard-size is kept
    assert "0 shard(s) written, 3 already done" in capsys.readouterr().out
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("shard-*")} == stamps
    shards[1].unlink()
    assert extract(model_dir, image_dir, out) == 0
    assert "1 shard(s) written, 2 already done" in capsys.readouterr().out
    manifest, found = read_outputs(out)
    assert manifest["complete"] and sorted(found) == good_paths(image_dir)


def test_interrupted_run_leaves_no_partial_shard_and_resumes(model_dir, image_dir, tmp_path, monkeypatch):
    out = tmp_path / "feats"
    real_save = save_file
    calls = []

    def save_then_interrupt(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:  # Ctrl-C while the second shard is being written: half a file on disk
            with open(filename, "wb") as f:
                f.write(b"partial")
            raise KeyboardInterrupt
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr("safetensors.torch.save_file", save_then_interrupt)
    assert extract(model_dir, image_dir, out, "--shard-size", 5) == 130
    assert sorted(p.name for p in out.iterdir()) == [".lock", "manifest.json", "shard-00000-of-00003.safetensors"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and [s["file"] for s in manifest["shards"]] == ["shard-00000-of-00003.safetensors"]
    monkeypatch.setattr("safetensors.torch.save_file", real_save)
    assert extract(model_dir, image_dir, out) == 0
    manifest, found = read_outputs(out)
    assert manifest["complete"] and sorted(found) == good_paths(image_dir)
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [".lock"]  # no temporary left


def test_other_run_in_the_same_output_is_refused_then_overwritten(model_dir, image_dir, tmp_path, capsys):
    out = tmp_path / "feats"
    assert extract(model_dir, image_dir, out) == 0
    before = sorted(p.name for p in out.iterdir())
    assert extract(model_dir, image_dir, out, "--save-grids") == 2
    assert "holds features of a different run" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before
    assert extract(model_dir, image_dir, out, "--save-grids", "--overwrite") == 0
    manifest, found = read_outputs(out)
    assert manifest["save_grids"] and all(v[2] is not None for v in found.values())


def test_glob_and_list_inputs(model_dir, image_dir, tmp_path):
    out = tmp_path / "glob"
    assert extract(model_dir, f"{image_dir}/**/*.png", out) == 0
    _, found = read_outputs(out)
    assert sorted(found) == sorted(str(p) for p in image_dir.rglob("*.png"))
    listing = tmp_path / "list.txt"
    chosen = good_paths(image_dir)[:3]
    listing.write_text("\n".join(chosen) + "\n")
    assert extract(model_dir, listing, tmp_path / "list") == 0
    _, found = read_outputs(tmp_path / "list")
    assert sorted(found) == chosen


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--max-patches-per-batch", "100"], "smaller than the largest image this processor makes (256 patches"),
        (["--max-patches-per-batch", "0"], "--max-patches-per-batch must be a positive"),
        (["--shard-size", "0"], "--shard-size must be a positive"),
    ],
)
def test_bad_arguments_are_named(model_dir, image_dir, tmp_path, capsys, extra, message):
    assert extract(model_dir, image_dir, tmp_path / "x", *extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_bad_inputs_are_named(model_dir, tmp_path, capsys):
    assert extract(model_dir, tmp_path / "missing" / "folder", tmp_path / "x") == 2
    assert "no such file, folder or glob" in capsys.readouterr().err
    assert extract(model_dir, f"{tmp_path}/*.png", tmp_path / "x") == 2
    assert "matches no files" in capsys.readouterr().err
    assert extract(tmp_path / "no_model", tmp_path, tmp_path / "x") == 2
    err = capsys.readouterr().err
    assert "--input folder" in err or "--model" in err


# ---- datasets input ------------------------------------------------------------------------------------------
def test_saved_dataset_input_ids_are_row_indices(model_dir, image_dir, tmp_path):
    import datasets

    paths = good_paths(image_dir)[:5]
    ds = datasets.Dataset.from_dict({"label": list(range(5)), "picture": paths}).cast_column(
        "picture", datasets.Image()
    )
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "feats"
    assert extract(model_dir, tmp_path / "ds", out, "--split", "train") == 0
    manifest, found = read_outputs(out)
    assert manifest["input_kind"] == "dataset" and sorted(found) == [0, 1, 2, 3, 4]
    ref = reference(model_dir, paths)
    for i, path in enumerate(paths):
        torch.testing.assert_close(found[i][0], ref[path][0], atol=1e-5, rtol=1e-5)
    assert extract(model_dir, tmp_path / "ds", tmp_path / "x", "--split", "test") == 2
    assert extract(model_dir, tmp_path / "ds", tmp_path / "y", "--image-column", "label") == 2


# ---- data parallel through torchrun ---------------------------------------------------------------------------
def test_torchrun_two_gloo_processes_cover_every_input_once(model_dir, image_dir, tmp_path):
    out = tmp_path / "feats"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
           str(ROOT / "extract_features.py"), "--model", str(model_dir), "--input", str(image_dir), "--output", str(out),
           "--max-patches-per-batch", "400", "--num-workers", "1", "--save-grids", "--device", "cpu"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH="")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "on 2 process(es)" in proc.stdout
    manifest, found = read_outputs(out)
    assert manifest["complete"] and manifest["num_shards"] == 2 and manifest["num_skipped"] == 2
    assert sorted(found) == good_paths(image_dir)
    with safe_open(str(out / manifest["shards"][0]["file"]), framework="pt") as f:
        assert f.metadata()["fingerprint"] == manifest["fingerprint"]
    ref = reference(model_dir, good_paths(image_dir))
    for path, (pooled, grid, fmap) in found.items():
        assert grid == ref[path][1]
        torch.testing.assert_close(pooled, ref[path][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fmap, ref[path][2], atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (NCCL); the gloo test above covers CPU")
def test_torchrun_nccl_one_process_per_gpu(model_dir, image_dir, tmp_path):
    out = tmp_path / "feats"
    n = torch.cuda.device_count()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", str(n),
           str(ROOT / "extract_features.py"), "--model", str(model_dir), "--input", str(image_dir), "--output", str(out),
           "--max-patches-per-batch", "400", "--num-workers", "1"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest, found = read_outputs(out)
    assert manifest["complete"] and sorted(found) == good_paths(image_dir)
    ref = reference(model_dir, good_paths(image_dir))
    for path, (pooled, grid, _) in found.items():
        assert grid == ref[path][1]
        torch.testing.assert_close(pooled, ref[path][0], atol=1e-4, rtol=1e-4)  # fp32 on the GPU vs the CPU


def test_hub_dataset_id_goes_through_load_dataset(model_dir, image_dir, tmp_path, monkeypatch):
    """A name that is no local path is a Hub dataset id: passed to datasets.load_dataset with --split (no network
    here, so load_dataset is replaced by a local dataset; the wiring around it is what is tested)."""
    import datasets

    paths = good_paths(image_dir)[:3]
    local = datasets.Dataset.from_dict({"img": paths, "caption": ["a", "b", "c"]}).cast_column("img", datasets.Image())
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return local

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    out = tmp_path / "feats"
    assert extract(model_dir, "someone/some-images", out, "--split", "validation", "--dataset-config", "small") == 0
    assert calls == [("someone/some-images", "small", "validation")]
    manifest, found = read_outputs(out)
    assert manifest["input"] == "someone/some-images" and sorted(found) == [0, 1, 2]
    ref = reference(model_dir, paths)
    for i, path in enumerate(paths):
        torch.testing.assert_close(found[i][0], ref[path][0], atol=1e-5, rtol=1e-5)


# ---- resumability: what counts as "the same run" ----------------------------------------------------------------
def test_rerun_with_other_weights_or_another_dataset_is_refused(model_dir, image_dir, tmp_path, capsys):
    """The fingerprint covers the weights (not just the path) and the dataset's content (not just its length)."""
    import shutil

    import datasets

    retrained = tmp_path / model_dir.name  # same folder name, same config, other weights
    shutil.copytree(model_dir, retrained)
    state = load_file(str(retrained / "model.safetensors"))
    state["vision_model.post_layernorm.bias"] = state["vision_model.post_layernorm.bias"] + 0.5
    save_file(state, str(retrained / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "feats"
    assert extract(model_dir, image_dir, out) == 0
    assert extract(retrained, image_dir, out) == 2
    assert "holds features of a different run" in capsys.readouterr().err

    paths = good_paths(image_dir)
    for name, chosen in [("a", paths[:3]), ("b", paths[3:6])]:
        ds = datasets.Dataset.from_dict({"image": chosen}).cast_column("image", datasets.Image())
        ds.save_to_disk(str(tmp_path / ("ds" if name == "a" else "ds_b")))
    assert extract(model_dir, tmp_path / "ds", tmp_path / "dsfeats") == 0
    shutil.rmtree(tmp_path / "ds")
    shutil.move(str(tmp_path / "ds_b"), str(tmp_path / "ds"))  # same path, same length, other images
    assert extract(model_dir, tmp_path / "ds", tmp_path / "dsfeats") == 2
    assert "holds features of a different run" in capsys.readouterr().err


def test_dataset_rows_decode_as_datasets_does_and_other_columns_do_not_matter(model_dir, tmp_path):
    """Row i is encoded exactly as `processor(ds[i]["image"])`: datasets applies EXIF orientation. A corrupt value
    in ANOTHER image column does not cost the row its image."""
    import io as _io

    import datasets
    from transformers import AutoImageProcessor, AutoModel

    rotated = _io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees": stored 60x20, shown 20x60
    synthetic(60, 20, 1).save(rotated, "JPEG", exif=exif)
    plain = _io.BytesIO()
    synthetic(30, 50, 2).save(plain, "PNG")
    ds = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": rotated.getvalue(), "path": None}, {"bytes": plain.getvalue(), "path": None}],
            "mask": [{"bytes": b"not an image", "path": None}, {"bytes": plain.getvalue(), "path": None}],
        }
    ).cast_column("image", datasets.Image()).cast_column("mask", datasets.Image())
    ds.save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "feats"
    assert extract(model_dir, tmp_path / "ds", out, "--image-column", "image", "--save-grids") == 0
    manifest, found = read_outputs(out)
    assert sorted(found) == [0, 1] and manifest["num_skipped"] == 0

    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(model_dir, trust_remote_code=True)
    loaded = datasets.load_from_disk(str(tmp_path / "ds")).select_columns(["image"])  # ds[i] would decode "mask" too
    assert loaded[0]["image"].size == (20, 60)  # what a datasets user gets
    for i in range(2):
        inputs = processor(images=loaded[i]["image"])
        with torch.no_grad():
            hidden = model(**inputs).last_hidden_state
        assert found[i][1] == tuple(inputs["image_grid_hw"][0].tolist())
        torch.testing.assert_close(found[i][0], hidden.mean(0), atol=1e-5, rtol=1e-5)
    assert found[0][1][0] > found[0][1][1]  # portrait grid: the rotation was applied


def test_glob_through_a_link_loop_lists_each_file_once(model_dir, tmp_path):
    root = tmp_path / "pics"
    (root / "a").mkdir(parents=True)
    synthetic(20, 20, 0).save(root / "a" / "x.png")
    synthetic(24, 20, 1).save(root / "y.png")
    (root / "a" / "loop").symlink_to(root, target_is_directory=True)
    out = tmp_path / "feats"
    assert extract(model_dir, f"{root}/**/*.png", out) == 0
    _, found = read_outputs(out)
    assert sorted(os.path.realpath(p) for p in found) == sorted(os.path.realpath(p) for p in root.rglob("*.png"))
    assert len(found) == 2


def test_io_errors_stop_the_run_instead_of_skipping_and_a_rerun_finishes(model_dir, image_dir, tmp_path, monkeypatch):
    """A missing file is skipped (the issue's "unreadable image"); an I/O error of the file system is not the image's
    fault: the run stops (nothing recorded as skipped) and a rerun encodes the image."""
    import errno

    victim = good_paths(image_dir)[4]
    real_load = extract_inputs.FileSource.load

    def flaky_load(self, image_id):
        if image_id == victim:
            raise OSError(errno.EIO, "Input/output error", image_id)
        return real_load(self, image_id)

    monkeypatch.setattr(extract_inputs.FileSource, "load", flaky_load)
    out = tmp_path / "feats"
    with pytest.raises(OSError, match="Input/output error"):
        extract(model_dir, image_dir, out, "--shard-size", 20)
    monkeypatch.setattr(extract_inputs.FileSource, "load", real_load)
    assert extract(model_dir, image_dir, out) == 0
    manifest, found = read_outputs(out)
    assert victim in found and manifest["num_skipped"] == 2
    assert extract_inputs.is_bad_image_error(FileNotFoundError(errno.ENOENT, "gone")) is True
    assert extract_inputs.is_bad_image_error(OSError("image file is truncated")) is True
    assert extract_inputs.is_bad_image_error(OSError(errno.EMFILE, "Too many open files")) is False
    assert extract_inputs.is_bad_image_error(MemoryError()) is False
    assert extract_inputs.is_bad_image_error(NameError("x")) is False


def test_a_second_run_into_the_same_output_is_refused_while_the_first_holds_it(model_dir, image_dir, tmp_path, capsys):
    import fcntl

    out = tmp_path / "feats"
    out.mkdir()
    with open(out / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert extract(model_dir, image_dir, out) == 2
        assert "is in use by another extract_features.py run" in capsys.readouterr().err
    assert extract(model_dir, image_dir, out) == 0


def test_repo_code_and_trust_remote_code_give_the_same_features(model_dir, image_dir, tmp_path):
    assert extract(model_dir, image_dir, tmp_path / "ours") == 0
    assert extract(model_dir, image_dir, tmp_path / "remote", "--trust-remote-code") == 0
    _, ours = read_outputs(tmp_path / "ours")
    _, remote = read_outputs(tmp_path / "remote")
    assert sorted(ours) == sorted(remote)
    for image_id in ours:
        assert torch.equal(ours[image_id][0], remote[image_id][0])


def test_torchrun_resumes_a_single_process_run(model_dir, image_dir, tmp_path, monkeypatch):
    """The plan is fixed by the first run, whatever the number of processes of the next one."""
    out = tmp_path / "feats"
    real_write = extract_run.write_shard
    written = []

    def write_two_then_interrupt(path, tensors, metadata):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(path.name)
        real_write(path, tensors, metadata)

    monkeypatch.setattr(extract_run, "write_shard", write_two_then_interrupt)
    assert extract(model_dir, image_dir, out, "--shard-size", 3) == 130
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
           str(ROOT / "extract_features.py"), "--model", str(model_dir), "--input", str(image_dir), "--output", str(out),
           "--num-workers", "0", "--device", "cpu", "--no-progress"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH="")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "3 shard(s) written, 2 already done" in proc.stdout
    manifest, found = read_outputs(out)
    assert manifest["complete"] and manifest["num_shards"] == 5 and sorted(found) == good_paths(image_dir)


def test_next_shard_is_planned_and_started_during_the_last_forward_of_the_current_one(
    model_dir, image_dir, tmp_path, monkeypatch
):
    """Shard k+1's header pass and DataLoader start while shard k's last forward runs (asynchronously on a GPU),
    i.e. before shard k is written: the model is not left idle at shard boundaries."""
    events = []
    real_job, real_write = extract_run.ShardJob, extract_run.write_shard

    class RecordingJob(real_job):
        def __init__(self, k, *args, **kwargs):
            events.append(("start", k))
            super().__init__(k, *args, **kwargs)

    def recording_write(path, tensors, metadata):
        events.append(("write", int(path.name.split("-")[1])))
        real_write(path, tensors, metadata)

    monkeypatch.setattr(extract_run, "ShardJob", RecordingJob)
    monkeypatch.setattr(extract_run, "write_shard", recording_write)
    assert extract(model_dir, image_dir, tmp_path / "feats", "--shard-size", 5, "--num-workers", 1) == 0
    assert events == [("start", 0), ("start", 1), ("write", 0), ("start", 2), ("write", 1), ("write", 2)]
    _, found = read_outputs(tmp_path / "feats")
    assert sorted(found) == good_paths(image_dir)
