"""extract_features.py on webdataset tar shards (issue 19 item 1): tars made here with `tarfile`, named by a brace
range, a glob, a list, a folder or a file:// URL; webdataset's key rule (dots in folder names belong to the key, a
dot in a file name ends it), a sample without an image, a corrupt member, a truncated tar -> every good sample
encoded exactly once, equal to one forward per image, every skipped one listed with its reason; the same under two
gloo ranks claiming tars dynamically; a killed run resumed with every sample still exactly once."""

import os
import signal
import subprocess
import sys
import time

import pytest
from _extract_corpora import (
    assert_matches_reference,
    decoded,
    extract,
    image_bytes,
    member_offset,
    read_outputs,
    reference,
    script_env,
    torchrun,
    write_tar,
    SLOW_RANK_WORKER,
)

from siglip_navit_tools.extract.packing import plan_batches, plan_windows

GOOD = {  # id -> encoded image
    "00000.tar/000000": image_bytes(40, 24, 0, "JPEG"),
    "00000.tar/000001": image_bytes(64, 64, 1),
    "00000.tar/images.v1/000005": image_bytes(100, 30, 5),  # a dot in a folder name is part of the key
    "00000.tar/000007": image_bytes(17, 50, 7),  # stored as 000007.PNG: webdataset lower-cases extensions
    "00001.tar/000010": image_bytes(33, 33, 10, "JPEG"),
    "00001.tar/000011": image_bytes(90, 90, 11),
    "00001.tar/000012": image_bytes(20, 80, 12, "WEBP"),
    "00002.tar/000020": image_bytes(48, 36, 20),
    "00002.tar/000021": image_bytes(16, 16, 21),
}
SKIPPED = {  # id -> a piece of its reason
    "00000.tar/000002": "no image entry",
    "00000.tar/000003": "UnidentifiedImageError",
    "00000.tar/000004": "truncated",
    "00000.tar/000006": "pass --image-key v2.png",  # "000006.v2.png": webdataset's key is "000006"
    "00002.tar/000022": "damaged or truncated",
    "00002.tar": "reading stopped in member '000022.png'",
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Three tars: one with every kind of bad sample, one plain, one truncated inside its third sample's image."""
    root = tmp_path_factory.mktemp("wds") / "shards"
    truncated_png = image_bytes(70, 20, 4)
    write_tar(root / "00000.tar", [
        ("000000.jpg", GOOD["00000.tar/000000"]), ("000000.txt", b"a caption"),
        ("000001.png", GOOD["00000.tar/000001"]), ("000001.json", b"{}"),
        ("000002.txt", b"a sample without an image"),
        ("000003.jpg", b"this is not an image"),
        ("000004.png", truncated_png[: len(truncated_png) // 2]),  # a valid header, half the pixels
        ("images.v1/000005.png", GOOD["00000.tar/images.v1/000005"]),
        ("000006.v2.png", image_bytes(20, 20, 6)), ("000006.txt", b"dots"),
        ("000007.PNG", GOOD["00000.tar/000007"]),
    ])  # fmt: skip
    write_tar(root / "00001.tar", [(f"{key.split('/')[1]}.{ext}", GOOD[key]) for key, ext in
                                   [("00001.tar/000010", "jpeg"), ("00001.tar/000011", "png"), ("00001.tar/000012", "webp")]])  # fmt: skip
    broken = write_tar(root / "00002.tar", [
        ("000020.png", GOOD["00002.tar/000020"]), ("000020.txt", b"x"),
        ("000021.png", GOOD["00002.tar/000021"]), ("000021.txt", b"y"),
        ("000022.png", image_bytes(50, 50, 22)), ("000022.txt", b"z"),
    ])  # fmt: skip
    cut = member_offset(broken, "000022.png") + 100
    broken.write_bytes(broken.read_bytes()[:cut])
    return root


@pytest.fixture(scope="module")
def expected(model_dir):
    return reference(model_dir, {image_id: decoded(data) for image_id, data in GOOD.items()})


def check_run(output, expected, grids=True):
    manifest, found = read_outputs(output)
    assert manifest["complete"] and manifest["input_kind"] == "webdataset" and manifest["num_shards"] == 3
    assert_matches_reference(found, expected, grids)
    reasons = {entry["id"]: entry["error"] for entry in manifest["skipped"]}
    assert set(reasons) == set(SKIPPED), reasons
    for image_id, piece in SKIPPED.items():
        assert piece in reasons[image_id], (image_id, reasons[image_id])
    assert manifest["num_encoded"] == len(GOOD) and manifest["num_skipped"] == len(SKIPPED)
    return manifest


def test_plan_windows_packs_each_window_first_fit_decreasing_and_holds_no_more():
    sizes = [30, 70, 20, 50, 50, 10, 80, 40, 60, 5]
    held = []

    def stream():
        for i, size in enumerate(sizes):
            held.append(i)
            yield i, size

    batches = []
    for batch in plan_windows(stream(), 100, window=4):
        assert len(held) <= 4 * (batch[0] // 4 + 1)  # a batch of window w comes before window w + 1 is read
        batches.append(batch)
    assert sorted(i for b in batches for i in b) == list(range(len(sizes)))
    assert all(sum(sizes[i] for i in b) <= 100 for b in batches)
    for start in range(0, len(sizes), 4):  # each window packed on its own, exactly as plan_batches packs it
        window = list(range(start, min(start + 4, len(sizes))))
        mine = [b for b in batches if b[0] in window]
        assert mine == [[window[i] for i in b] for b in plan_batches([sizes[i] for i in window], 100)]
    with pytest.raises(ValueError, match="window must be a positive"):
        list(plan_windows(iter([]), 100, 0))


def test_brace_range_every_good_sample_once_equal_to_per_image_forwards(model_dir, shards, expected, tmp_path):
    out = tmp_path / "feats"
    spec = f"{shards}/{{00000..00002}}.tar"
    assert extract(model_dir, spec, out, "--save-grids", "--max-patches-per-batch", 300, "--lookahead", 3) == 0
    manifest = check_run(out, expected)
    # one tar -> one shard, ids in tar order, the tar named in the manifest
    assert [s["input"] for s in manifest["shards"]] == ["00000.tar", "00001.tar", "00002.tar"]
    assert manifest["shards"][0]["ids"] == ["00000.tar/000000", "00000.tar/000001", "00000.tar/images.v1/000005",
                                            "00000.tar/000007"]  # fmt: skip
    run = manifest["last_run"]
    assert run["largest_forward"] <= 300 and 0 < run["packing_efficiency"] <= 1


@pytest.mark.parametrize("how", ["glob", "list", "folder", "file_url", "single"])
def test_glob_list_folder_and_file_url_name_the_same_tars(model_dir, shards, expected, tmp_path, how):
    listing = tmp_path / "tars.txt"
    listing.write_text("".join(f"{shards}/{n:05d}.tar\n" for n in range(3)))
    spec = {"glob": f"{shards}/*.tar", "list": listing, "folder": shards,
            "file_url": f"file://{shards}/{{00000..00002}}.tar", "single": shards / "00001.tar"}[how]  # fmt: skip
    out = tmp_path / "feats"
    assert extract(model_dir, spec, out, "--num-workers", 1 if how == "glob" else 0) == 0
    if how == "single":
        manifest, found = read_outputs(out)
        assert manifest["complete"] and manifest["num_shards"] == 1 and manifest["num_skipped"] == 0
        assert_matches_reference(found, {k: v for k, v in expected.items() if k.startswith("00001.tar/")}, grids=False)
    else:
        check_run(out, expected, grids=False)


def test_image_key_picks_the_entry_and_a_dotted_file_name_needs_it(model_dir, shards, tmp_path):
    out = tmp_path / "feats"
    assert extract(model_dir, shards / "00000.tar", out, "--image-key", "v2.png;png;jpg") == 0
    manifest, found = read_outputs(out)
    assert "00000.tar/000006" in found and "00000.tar/000007" in found
    assert {e["id"] for e in manifest["skipped"]} == {"00000.tar/000002", "00000.tar/000003", "00000.tar/000004"}
    ref = reference(model_dir, {"00000.tar/000006": decoded(image_bytes(20, 20, 6))})
    assert_matches_reference({"00000.tar/000006": found["00000.tar/000006"]}, ref, grids=False)


def test_bad_tar_arguments_are_named(model_dir, shards, tmp_path, capsys):
    assert extract(model_dir, shards, tmp_path / "a", "--shard-size", 2) == 2
    assert "--shard-size does not apply" in capsys.readouterr().err
    assert extract(model_dir, shards, tmp_path / "b", "--image-column", "jpg") == 2
    assert "whose image is chosen with --image-key" in capsys.readouterr().err
    assert extract(model_dir, shards, tmp_path / "c", "--image-key", "jpg; png") == 2
    assert "--image-key must be extensions separated by ';'" in capsys.readouterr().err
    mixed = tmp_path / "mixed.txt"
    mixed.write_text(f"{shards}/00000.tar\n{tmp_path}/x.png\n")
    assert extract(model_dir, mixed, tmp_path / "d") == 2
    assert "names tar / parquet files and other files together" in capsys.readouterr().err


def test_a_missing_tar_of_a_brace_range_is_listed_and_the_run_goes_on(model_dir, shards, tmp_path):
    out = tmp_path / "feats"
    assert extract(model_dir, f"{shards}/{{00001..00003}}.tar", out) == 0
    manifest, found = read_outputs(out)
    assert manifest["complete"] and manifest["num_shards"] == 3
    assert sorted(found) == sorted(k for k in GOOD if k.startswith(("00001.tar/", "00002.tar/")))
    reasons = {e["id"]: e["error"] for e in manifest["skipped"]}
    assert "cannot open the tar" in reasons["00003.tar"] and "FileNotFoundError" in reasons["00003.tar"]


def test_two_gloo_ranks_claim_tars_dynamically_and_encode_every_sample_once(model_dir, tmp_path):
    root = tmp_path / "many"
    images = {}
    for t in range(6):
        members = []
        for s in range(2):
            key = f"{t:02d}{s:04d}"
            images[f"{t:05d}.tar/{key}"] = image_bytes(20 + 9 * t, 30 + 7 * s, 100 * t + s)
            members += [(f"{key}.png", images[f"{t:05d}.tar/{key}"]), (f"{key}.txt", key.encode())]
        write_tar(root / f"{t:05d}.tar", members)
    out = tmp_path / "feats"
    env = script_env()  # rank 1 is slow (slow="1:3"): it must end up with fewer tars
    command = torchrun(model_dir, f"{root}/{{00000..00005}}.tar", out, "--save-grids", slow="1:3")
    proc = subprocess.run(command, env=env,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    manifest, found = read_outputs(out)
    assert manifest["complete"] and manifest["num_shards"] == 6 and manifest["num_skipped"] == 0
    fast, slow = manifest["last_run"]["shards_per_rank"]
    assert fast + slow == 6 and slow < fast, (fast, slow)
    assert_matches_reference(found, reference(model_dir, {k: decoded(v) for k, v in images.items()}))


def test_killed_run_resumes_and_every_sample_is_encoded_once(model_dir, shards, expected, tmp_path):
    out = tmp_path / "feats"
    cmd = [sys.executable, str(SLOW_RANK_WORKER), "0:4", "--model", str(model_dir), "--input",  # shards slowed
           f"{shards}/{{00000..00002}}.tar", "--output", str(out), "--no-progress", "--num-workers", "1",
           "--save-grids"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=script_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("shard-*.safetensors")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        first = sorted(out.glob("shard-*.safetensors"))
        assert len(first) == 1, "the first shard should be written while the second waits"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    stamp = (first[0].stat().st_ino, first[0].stat().st_mtime_ns)
    assert extract(model_dir, f"{shards}/{{00000..00002}}.tar", out, "--save-grids") == 0
    assert (first[0].stat().st_ino, first[0].stat().st_mtime_ns) == stamp  # kept, not redone
    manifest = check_run(out, expected)
    assert manifest["last_run"]["shards_resumed"] == 1 and manifest["last_run"]["shards_written"] == 2
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [".lock"]  # no temporary left
