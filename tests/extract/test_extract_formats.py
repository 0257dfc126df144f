"""extract_features.py --format (issue 19 items 3-4): parquet and npy outputs read back by their consumers (pyarrow,
pandas, `datasets.load_dataset("parquet")`, numpy + faiss-cpu the way autofaiss / embedding-reader read the npy
layout) and equal to the safetensors output of the same run; one format per folder (another refused unless
--overwrite); resume and lost-manifest recovery per format; --save-grids streams each grid to the shard's
temporary file as it is computed (the shard's grids are never all held); the streamed safetensors file's header
fallbacks."""

import glob
import io
import json
import os
import weakref

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from _extract_corpora import extract, image_bytes, read_outputs
from safetensors.torch import load_file

from siglip_navit_tools.extract import writers

SIZES = [(40, 24), (64, 64), (100, 30), (17, 50), (33, 33), (20, 80), (48, 36), (16, 16)]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    for i, (w, h) in enumerate(SIZES):
        (root / f"{i:02d}.png").write_bytes(image_bytes(w, h, i))
    (root / "broken.png").write_bytes(b"not an image")
    return root


@pytest.fixture(scope="module")
def runs(model_dir, photos, tmp_path_factory):
    """The same inputs written in every format (3 shards of 3), grids saved where the format holds them."""
    root = tmp_path_factory.mktemp("runs")
    for fmt, extra in [("safetensors", ["--save-grids"]), ("parquet", ["--save-grids"]), ("npy", [])]:
        assert extract(model_dir, photos, root / fmt, "--format", fmt, "--shard-size", 3, *extra) == 0
    return root


def parquet_rows(files):
    """{id: (pooled, (h, w), features bytes or None)} from pyarrow tables, checking each id once."""
    found = {}
    for path in files:
        table = pq.read_table(path)
        for row in table.to_pylist():
            assert row["id"] not in found
            found[row["id"]] = (torch.tensor(row["pooled"]), (row["grid_h"], row["grid_w"]), row.get("features"))
    return found


def test_parquet_output_read_by_pyarrow_pandas_and_datasets_equals_safetensors(runs, tmp_path):
    import datasets
    import pandas as pd

    manifest, reference = read_outputs(runs / "safetensors")
    out = runs / "parquet"
    parquet_manifest = json.loads((out / "manifest.json").read_text())
    assert parquet_manifest["output_format"] == "parquet" and parquet_manifest["complete"]
    assert parquet_manifest["skipped"] == manifest["skipped"]
    files = sorted(glob.glob(f"{out}/*.parquet"))
    assert [os.path.basename(f) for f in files] == [s["file"] for s in parquet_manifest["shards"]]
    hidden = reference[next(iter(reference))][0].shape[0]
    schema = pq.read_schema(files[0])
    assert str(schema.field("pooled").type) == f"fixed_size_list<element: float>[{hidden}]"
    assert [str(schema.field(n).type) for n in ("id", "grid_h", "grid_w", "features")] == ["string", "int32",
                                                                                           "int32", "binary"]  # fmt: skip
    assert pq.read_metadata(files[0]).metadata[b"features_dtype"] == b"float32"

    found = parquet_rows(files)  # pyarrow
    assert sorted(found) == sorted(reference)
    for image_id, (pooled, grid, features) in found.items():
        assert grid == reference[image_id][1]
        assert torch.equal(pooled, reference[image_id][0])
        fmap = torch.from_numpy(np.frombuffer(features, dtype="<f4").reshape(*grid, hidden).copy())
        assert torch.equal(fmap, reference[image_id][2])

    frame = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)  # pandas
    assert sorted(frame["id"]) == sorted(reference) and frame["grid_h"].dtype == np.int32
    for image_id, pooled in zip(frame["id"], frame["pooled"]):
        assert torch.equal(torch.from_numpy(np.array(pooled, dtype=np.float32)), reference[image_id][0])

    ds = datasets.load_dataset("parquet", data_files=f"{out}/*.parquet", split="train", cache_dir=str(tmp_path))
    assert len(ds) == len(reference) and sorted(ds["id"]) == sorted(reference)
    for row in ds.with_format("torch"):
        assert torch.equal(row["pooled"], reference[row["id"]][0])
        assert (int(row["grid_h"]), int(row["grid_w"])) == reference[row["id"]][1]


def test_npy_output_is_the_autofaiss_layout_and_faiss_finds_each_vector_itself(runs):
    """Read as autofaiss / embedding-reader read it (sorted embeddings/*.npy, metadata/*.parquet paired by sorted
    order, rows in the same order), then a FAISS index over it: each stored vector's nearest neighbour is itself."""
    import faiss

    _, reference = read_outputs(runs / "safetensors")
    out = runs / "npy"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["output_format"] == "npy" and manifest["complete"] and manifest["num_shards"] == 3
    embeddings = sorted(glob.glob(f"{out}/embeddings/*.npy"))
    metadata = sorted(glob.glob(f"{out}/metadata/*.parquet"))
    assert [os.path.basename(p) for p in embeddings] == ["00000.npy", "00001.npy", "00002.npy"]
    assert [os.path.basename(p) for p in metadata] == ["00000.parquet", "00001.parquet", "00002.parquet"]
    arrays = [np.load(p) for p in embeddings]
    tables = [pq.read_table(p) for p in metadata]
    for array, table in zip(arrays, tables):
        assert array.dtype == np.float32 and array.ndim == 2 and array.shape[0] == table.num_rows
    vectors = np.concatenate(arrays)
    ids = [i for t in tables for i in t.column("id").to_pylist()]
    grids = [(h, w) for t in tables for h, w in zip(t.column("grid_h").to_pylist(), t.column("grid_w").to_pylist())]
    assert sorted(ids) == sorted(reference)
    for n, image_id in enumerate(ids):
        assert torch.equal(torch.from_numpy(vectors[n]), reference[image_id][0])
        assert grids[n] == reference[image_id][1]

    index = faiss.IndexFlatL2(vectors.shape[1])
    index.add(vectors)
    distances, neighbours = index.search(vectors, 2)
    assert neighbours[:, 0].tolist() == list(range(len(ids)))
    assert np.all(distances[:, 0] <= 1e-6) and np.all(distances[:, 1] > 1e-3)


def test_bf16_grids_in_parquet_decode_as_documented(model_dir, photos, tmp_path):
    for fmt in ("safetensors", "parquet"):
        assert extract(model_dir, photos, tmp_path / fmt, "--format", fmt, "--save-grids", "--dtype",
                       "bfloat16") == 0  # fmt: skip
    _, reference = read_outputs(tmp_path / "safetensors")
    files = sorted(glob.glob(f"{tmp_path / 'parquet'}/*.parquet"))
    assert pq.read_metadata(files[0]).metadata[b"features_dtype"] == b"bfloat16"
    found = parquet_rows(files)
    assert sorted(found) == sorted(reference)
    for image_id, (pooled, grid, features) in found.items():
        fmap = torch.frombuffer(bytearray(features), dtype=torch.bfloat16).reshape(*grid, -1)
        assert reference[image_id][2].dtype == torch.bfloat16 and torch.equal(fmap, reference[image_id][2])
        assert torch.equal(pooled, reference[image_id][0])


def test_another_format_into_the_same_folder_is_refused_unless_overwrite(model_dir, photos, tmp_path, capsys):
    out = tmp_path / "feats"
    assert extract(model_dir, photos, out, "--shard-size", 4) == 0
    before = sorted(p.name for p in out.iterdir())
    assert extract(model_dir, photos, out, "--format", "parquet") == 2
    assert "holds safetensors features; this run writes --format parquet" in capsys.readouterr().err
    (out / "manifest.json").unlink()  # without a manifest the shard files on disk say it
    assert extract(model_dir, photos, out, "--format", "npy") == 2
    assert "holds safetensors features; this run writes --format npy" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == sorted(set(before) - {"manifest.json"})
    assert extract(model_dir, photos, out, "--format", "parquet", "--overwrite") == 0
    assert not list(out.glob("*.safetensors")) and len(list(out.glob("shard-*.parquet"))) == 1
    assert json.loads((out / "manifest.json").read_text())["output_format"] == "parquet"
    assert extract(model_dir, photos, out, "--format", "npy", "--save-grids") == 2
    assert "--format npy holds the pooled vectors only" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["parquet", "npy"])
def test_resume_and_a_lost_manifest_per_format(model_dir, photos, tmp_path, capsys, fmt):
    out = tmp_path / "feats"
    assert extract(model_dir, photos, out, "--format", fmt, "--shard-size", 3) == 0
    first = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").unlink()
    capsys.readouterr()
    assert extract(model_dir, photos, out, "--format", fmt) == 0  # rebuilt from the shard files
    assert "0 shard(s) written, 3 already done" in capsys.readouterr().out
    victim = out / ("shard-00001-of-00003.parquet" if fmt == "parquet" else "embeddings/00001.npy")
    victim.unlink()  # npy: the metadata file alone does not make a finished shard
    assert extract(model_dir, photos, out, "--format", fmt) == 0
    assert "1 shard(s) written, 2 already done" in capsys.readouterr().out
    again = json.loads((out / "manifest.json").read_text())
    assert again["complete"] and again["shards"] == first["shards"] and again["fingerprint"] == first["fingerprint"]
    assert not [p for p in out.rglob(".*") if p.name != ".lock"]  # no temporaries


# ---- --save-grids streams ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def many_photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("many")
    for i in range(48):
        (root / f"{i:02d}.png").write_bytes(image_bytes(32, 32, 1000 + i))  # 8 x 8 = 64 patches each
    return root


def test_save_grids_streams_each_grid_to_the_temporary_file_as_it_is_computed(
    model_dir, many_photos, tmp_path, monkeypatch
):
    """One shard of 48 images, 4 per forward: when an image is handed to the writer, the grids of earlier forwards
    are already in the shard's temporary file on disk and no longer alive in memory. Holding a shard's grids until
    the shard is written (what the extractor did before) fails both checks."""
    real_add = writers.SafetensorsWriter._add
    alive_refs, seen = [], []

    def watching_add(self, image_id, pooled, grid_hw, grid):
        alive = sum(ref() is not None for ref in alive_refs)
        on_disk = os.path.getsize(self.stream.tmp) - 8 - self.stream.reserve
        seen.append((alive, on_disk, sum(g for g in written)))
        alive_refs.append(weakref.ref(grid))
        real_add(self, image_id, pooled, grid_hw, grid)
        written.append(grid.numel() * grid.element_size())

    written = []
    monkeypatch.setattr(writers.SafetensorsWriter, "_add", watching_add)
    out = tmp_path / "feats"
    assert extract(model_dir, many_photos, out, "--save-grids", "--shard-size", 48, "--max-patches-per-batch",
                   256) == 0  # fmt: skip
    manifest, found = read_outputs(out)
    assert len(found) == 48 and manifest["last_run"]["forwards"] == 12
    assert max(alive for alive, _, _ in seen) <= 4, [alive for alive, _, _ in seen]  # this forward's, at most
    for alive, on_disk, added in seen:
        assert on_disk >= added - io.DEFAULT_BUFFER_SIZE, (on_disk, added)  # at most one write buffer not on disk


def test_parquet_grids_are_written_a_row_group_at_a_time(model_dir, many_photos, tmp_path, monkeypatch):
    monkeypatch.setattr(writers, "PARQUET_ROW_GROUP_BYTES", 20_000)  # a grid is 64 x 32 x 4 = 8 KB: 3 per group
    held = []
    real_flush = writers.ParquetWriter._flush

    def watching_flush(self):
        held.append(len(self.buffer))
        real_flush(self)

    monkeypatch.setattr(writers.ParquetWriter, "_flush", watching_flush)
    out = tmp_path / "feats"
    assert extract(model_dir, many_photos, out, "--format", "parquet", "--save-grids", "--shard-size", 48,
                   "--max-patches-per-batch", 256) == 0  # fmt: skip
    [path] = out.glob("shard-*.parquet")
    assert pq.ParquetFile(path).num_row_groups == 16 and max(held) == 3
    assert pq.read_table(path).num_rows == 48


# ---- the streamed safetensors file, without a model -------------------------------------------------------------
@pytest.mark.parametrize("case", ["fits", "header_outgrows_its_room", "misaligned_data"])
def test_streamed_safetensors_shard_reads_back_in_every_case(tmp_path, monkeypatch, case):
    if case == "header_outgrows_its_room":
        monkeypatch.setattr(writers, "HEADER_BYTES_BASE", 64)
        monkeypatch.setattr(writers, "HEADER_BYTES_PER_IMAGE", 0)
    hidden = 3 if case == "misaligned_data" else 4  # bf16 maps of 3 channels: 6 bytes per patch
    gen = torch.Generator().manual_seed(0)
    images = {f"img{i}": (torch.randn(hidden, generator=gen), torch.randn(1 + i, 2, hidden, generator=gen).bfloat16())
              for i in range(5)}  # fmt: skip
    arrival = ["img3", "img0", "img4", "img1", "img2"]  # the order forwards finish in
    with writers.open_shard("safetensors", tmp_path, 2, 5, hidden, True, expected=5) as writer:
        for name in arrival:
            pooled, fmap = images[name]
            writer.add(name, pooled, tuple(fmap.shape[:2]), fmap)
        ids = writer.commit({"format": writers.FORMAT, "fingerprint": "f", "skipped": "[]"}, {f"img{i}": i for i in range(5)})
    assert ids == [f"img{i}" for i in range(5)]  # input order, whatever order they were added in
    path = tmp_path / writers.shard_name(2, 5)
    tensors = load_file(str(path))
    assert torch.equal(tensors["pooled"], torch.stack([images[f"img{i}"][0] for i in range(5)]))
    assert tensors["grid_hw"].tolist() == [[1 + i, 2] for i in range(5)]
    for j in range(5):
        assert torch.equal(tensors[f"features.{j}"], images[f"img{j}"][1])
    assert json.loads(writers.read_shard(path, "safetensors")["ids"]) == ids
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary left
