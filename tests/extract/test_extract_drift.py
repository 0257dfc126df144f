"""extract_features.py with inputs that drift or surprise (issue 20 item 7): list files written by Windows editors
(UTF-8 byte-order mark, CRLF, UTF-16), a glob or folder that covers --output (the run must never read its own
results, and its identical rerun must resume, not be refused as "a different run"), and files that change between
planning (header read) and decoding: the budget is checked again after decoding, an image that no longer fits is
planned again into another forward, never forced in, and one that cannot fit any forward is listed as skipped."""

import codecs
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from _extract_corpora import (
    PROCESSOR,
    assert_matches_reference,
    decoded,
    extract,
    image_bytes,
    read_outputs,
    reference,
    tiny_model_dir,
)

from siglip_navit_tools.extract import inputs as extract_inputs


@pytest.fixture
def photos(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    for i, (w, h) in enumerate([(32, 32), (40, 24), (17, 50), (32, 32), (20, 30), (64, 16)]):
        (root / f"{i:02d}.png").write_bytes(image_bytes(w, h, i))
    return root


@pytest.mark.parametrize("encoding", ["utf-8-sig + CRLF", "utf-8 + CRLF", "utf-8-sig", "utf-16"])
def test_list_files_from_windows_editors(model_dir, photos, tmp_path, encoding):
    paths = sorted(str(p) for p in photos.iterdir())[:4]
    text = ("\r\n" if "CRLF" in encoding else "\n").join(["# my photos", *paths, ""])
    data = text.encode("utf-16") if encoding == "utf-16" else text.encode(encoding.split(" ")[0])
    assert data.startswith((codecs.BOM_UTF8, codecs.BOM_UTF16_LE)) == ("sig" in encoding or "16" in encoding)
    listing = tmp_path / "list.txt"
    listing.write_bytes(data)
    out = tmp_path / "feats"
    assert extract(model_dir, listing, out) == 0
    manifest, found = read_outputs(out)
    assert sorted(found) == paths and manifest["num_skipped"] == 0  # no "\ufeff/...", no "...png\r"


@pytest.mark.parametrize("layout", ["glob", "folder"])
def test_an_input_covering_the_output_never_reads_it_and_the_rerun_resumes(model_dir, photos, capsys, layout):
    """`--input "photos/**/*"` (or the folder) with `--output photos/feats`: the run's own files are no input."""
    out = photos / "feats"
    spec = f"{photos}/**/*" if layout == "glob" else photos
    assert extract(model_dir, spec, out, "--shard-size", 2) == 0
    first, found = read_outputs(out)
    assert sorted(found) == sorted(str(p) for p in photos.glob("*.png")) and first["num_skipped"] == 0
    capsys.readouterr()
    assert extract(model_dir, spec, out) == 0  # identical rerun: shard files and manifest are not inputs
    assert "0 shard(s) written, 3 already done" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["fingerprint"] == first["fingerprint"]


def test_a_parquet_glob_covering_a_parquet_output_resumes(model_dir, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    table = pa.table({"image": pa.array([image_bytes(30, 20 + i, i) for i in range(3)], pa.binary())})
    pq.write_table(table, str(data / "part-0.parquet"))
    out = data / "feats"  # --format parquet writes data/feats/shard-*.parquet, which the glob also matches
    assert extract(model_dir, f"{data}/**/*.parquet", out, "--format", "parquet") == 0
    capsys.readouterr()
    assert extract(model_dir, f"{data}/**/*.parquet", out, "--format", "parquet") == 0
    assert "0 shard(s) written, 1 already done" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_inputs"] == 1 and manifest["num_encoded"] == 3


def grow_after_planning(monkeypatch, victim, new_bytes):
    """Replace `victim` on disk right after its header is read for the plan (a file rewritten by another program
    between planning and decoding)."""
    real_size = extract_inputs.FileSource.size

    def size_then_grow(self, image_id):
        size = real_size(self, image_id)
        if image_id == str(victim):
            victim.write_bytes(new_bytes)
        return size

    monkeypatch.setattr(extract_inputs.FileSource, "size", size_then_grow)


def test_a_file_that_grows_after_planning_is_planned_again_never_forced_in(model_dir, photos, tmp_path, monkeypatch):
    """Planned at 32x32 (64 patches, four to a forward of 256), decoded at 64x64 (256 patches): it gets a forward
    of its own; no forward exceeds the budget and the summary's packing efficiency stays <= 100%."""
    victim = photos / "00.png"
    grown = image_bytes(64, 64, 99)
    grow_after_planning(monkeypatch, victim, grown)
    out = tmp_path / "feats"
    assert extract(model_dir, photos, out, "--max-patches-per-batch", 256, "--save-grids") == 0
    manifest, found = read_outputs(out)
    run = manifest["last_run"]
    assert run["largest_forward"] <= 256 and 0 < run["packing_efficiency"] <= 1
    assert manifest["num_skipped"] == 0 and found[str(victim)][1] == (16, 16)  # the image as decoded
    images = {str(p): decoded(p.read_bytes()) for p in photos.glob("*.png")}
    assert_matches_reference(found, reference(model_dir, images))


def test_a_file_that_grows_past_the_budget_after_planning_is_skipped(tmp_path, monkeypatch):
    """Without resizing, an image can outgrow any forward: listed as skipped with its size, the rest encoded."""
    model = tiny_model_dir(tmp_path / "model", {**PROCESSOR, "do_resize": False})
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        (photos / f"{i}.png").write_bytes(image_bytes(32, 16, i))  # 8 x 4 = 32 patches
    grow_after_planning(monkeypatch, photos / "1.png", image_bytes(48, 48, 7))  # 12 x 12 = 144 patches
    out = tmp_path / "feats"
    assert extract(model, photos, out, "--max-patches-per-batch", 64) == 0
    manifest, found = read_outputs(out)
    assert sorted(found) == [str(photos / "0.png"), str(photos / "2.png")]
    [entry] = manifest["skipped"]
    assert entry["id"] == str(photos / "1.png")
    assert "12x12 = 144 patches after decoding, more than --max-patches-per-batch" in entry["error"]
    assert manifest["last_run"]["largest_forward"] <= 64
    torch.testing.assert_close(found[str(photos / "0.png")][0],
                               reference(model, {0: decoded((photos / "0.png").read_bytes())})[0][0],
                               atol=1e-5, rtol=1e-5)  # fmt: skip
