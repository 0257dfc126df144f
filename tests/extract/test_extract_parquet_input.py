"""extract_features.py on parquet files (issue 19 item 2): Hugging Face's {"bytes", "path"} image struct (as
`datasets` writes it) and a plain binary column, one file per shard, ids "<file name>:<row>", rows decoded exactly as
`load_dataset("parquet")` decodes them; rows without an image and unreadable files listed; tar and parquet files
read lazily (a row group / a member at a time), never whole."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _extract_corpora import (
    assert_matches_reference,
    counting_opens,
    decoded,
    extract,
    image_bytes,
    read_outputs,
    reference,
    write_tar,
)
from PIL import Image

from siglip_navit_tools.extract import parquet_input, tar_input
from siglip_navit_tools.extract.inputs import resolve_input


def exif_rotated_jpeg() -> bytes:
    """A 60x20 JPEG whose EXIF says "rotate 90 degrees": `datasets` shows it 20x60."""
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    decoded(image_bytes(60, 20, 9)).save(buffer, "JPEG", exif=exif)
    return buffer.getvalue()


def test_hf_image_struct_rows_decode_as_load_dataset_does(model_dir, tmp_path):
    import datasets

    folder = tmp_path / "data"
    folder.mkdir()
    rows = {
        "train-00000.parquet": [exif_rotated_jpeg(), image_bytes(40, 24, 1), None, b"not an image"],
        "train-00001.parquet": [image_bytes(64, 64, 2), image_bytes(17, 50, 3)],
    }
    for name, images in rows.items():
        values = [None if b is None else {"bytes": b, "path": None} for b in images]
        ds = datasets.Dataset.from_dict({"image": values, "n": list(range(len(images)))})
        ds.cast_column("image", datasets.Image()).to_parquet(str(folder / name))
    out = tmp_path / "feats"
    assert extract(model_dir, folder, out) == 0  # a folder of parquet files; the Image feature found unnamed
    manifest, found = read_outputs(out)
    assert manifest["complete"] and manifest["input_kind"] == "parquet" and manifest["num_shards"] == 2
    assert [s["input"] for s in manifest["shards"]] == list(rows)
    reasons = {e["id"]: e["error"] for e in manifest["skipped"]}
    assert set(reasons) == {"train-00000.parquet:2", "train-00000.parquet:3"}
    assert "holds no image" in reasons["train-00000.parquet:2"]
    assert "UnidentifiedImageError" in reasons["train-00000.parquet:3"]

    loaded = datasets.load_dataset("parquet", data_files=sorted(map(str, folder.glob("*.parquet"))), split="train",
                                   cache_dir=str(tmp_path / "cache"))  # fmt: skip
    assert loaded[0]["image"].size == (20, 60)  # what a datasets user gets: the EXIF rotation applied
    ids = ["train-00000.parquet:0", "train-00000.parquet:1", None, None, "train-00001.parquet:0",
           "train-00001.parquet:1"]  # fmt: skip
    expected = reference(model_dir, {i: loaded[n]["image"] for n, i in enumerate(ids) if i is not None})
    assert_matches_reference(found, expected, grids=False)
    assert found["train-00000.parquet:0"][1][0] > found["train-00000.parquet:0"][1][1]  # portrait grid


def test_binary_column_over_several_row_groups(model_dir, tmp_path):
    images = [image_bytes(20 + 7 * i, 50 - 3 * i, 10 + i, "PNG") for i in range(7)]
    table = pa.table({"caption": [f"c{i}" for i in range(7)], "jpg": pa.array(images, pa.binary())})
    pq.write_table(table, str(tmp_path / "part.parquet"), row_group_size=2)  # four row groups
    out = tmp_path / "feats"
    assert extract(model_dir, tmp_path / "part.parquet", out, "--image-column", "jpg", "--save-grids",
                   "--lookahead", 3) == 0  # fmt: skip
    manifest, found = read_outputs(out)
    assert manifest["complete"] and manifest["num_skipped"] == 0
    assert manifest["shards"][0]["ids"] == [f"part.parquet:{i}" for i in range(7)]  # row order kept
    assert_matches_reference(found, reference(model_dir, {f"part.parquet:{i}": decoded(b) for i, b in enumerate(images)}))
    # without --image-column: the first binary column is the image column
    assert extract(model_dir, tmp_path / "part.parquet", tmp_path / "auto") == 0
    assert sorted(read_outputs(tmp_path / "auto")[1]) == sorted(found)


def test_bad_parquet_inputs_are_named_or_listed(model_dir, tmp_path, capsys):
    table = pa.table({"caption": ["a"], "jpg": pa.array([image_bytes(20, 20, 0)], pa.binary())})
    pq.write_table(table, str(tmp_path / "a.parquet"))
    assert extract(model_dir, tmp_path / "a.parquet", tmp_path / "x", "--image-column", "png") == 2
    err = capsys.readouterr().err
    assert "--image-column 'png' is not a column" in err and "['caption', 'jpg']" in err
    assert extract(model_dir, tmp_path / "a.parquet", tmp_path / "y", "--image-column", "caption") == 2
    assert "is string, not a binary column" in capsys.readouterr().err
    pq.write_table(pa.table({"caption": ["a"]}), str(tmp_path / "b.parquet"))
    (tmp_path / "c.parquet").write_bytes(b"PAR1 not really parquet")
    out = tmp_path / "z"
    assert extract(model_dir, f"{tmp_path}/*.parquet", out) == 0  # b and c are listed, the run goes on
    manifest, found = read_outputs(out)
    reasons = {e["id"]: e["error"] for e in manifest["skipped"]}
    assert sorted(found) == ["a.parquet:0"] and set(reasons) == {"b.parquet", "c.parquet"}
    assert "has no image column" in reasons["b.parquet"] and "cannot be read" in reasons["c.parquet"]
    (tmp_path / "0.parquet").write_bytes(b"garbage")  # the first file unreadable: the column comes from the next
    assert extract(model_dir, f"{tmp_path}/[0a].parquet", tmp_path / "first") == 0
    manifest, found = read_outputs(tmp_path / "first")
    assert sorted(found) == ["a.parquet:0"] and [e["id"] for e in manifest["skipped"]] == ["0.parquet"]
    assert extract(model_dir, tmp_path / "0.parquet", tmp_path / "none") == 2
    assert "none readable as parquet" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["tar", "parquet"])
def test_streamed_sources_read_a_member_or_row_group_at_a_time(tmp_path, monkeypatch, kind):
    """The first image comes out of a 6 MB file after reading a small part of it: nothing reads a whole file."""
    blobs = [np.random.default_rng(i).bytes(500_000) for i in range(12)]  # incompressible, not decoded here
    if kind == "tar":
        path = write_tar(tmp_path / "big.tar", [(f"{i:04d}.jpg", b) for i, b in enumerate(blobs)])
        module = tar_input
    else:
        path = tmp_path / "big.parquet"
        pq.write_table(pa.table({"jpg": pa.array(blobs, pa.binary())}), str(path), row_group_size=2)
        module = parquet_input
    source = resolve_input(str(path))
    opened = counting_opens(monkeypatch, module)
    items = source.items(source.ids)
    first = next(items)
    assert first.payload is not None and first.error is None
    assert opened[-1].read_bytes < path.stat().st_size / 3, (opened[-1].read_bytes, path.stat().st_size)
    assert len(list(items)) == 11
