"""Tar shards or parquet files of the same names in another folder are another run's inputs: a run into an --output
that holds the first folder's features is refused (unless --overwrite), never reported as "already done" with the
other folder's features in it. The same folder spelled another way (relative / absolute) is the same run and
resumes; image files named by relative paths from another working directory are other files, refused the same way."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _extract_corpora import (
    assert_matches_reference,
    decoded,
    extract,
    image_bytes,
    read_outputs,
    reference,
    write_tar,
)


def corpus(folder, kind, seed):
    """Two files, 00000 and 00001, of two images each (different images for each `seed`); {id: image bytes}."""
    images = {}
    for n in range(2):
        name = f"{n:05d}.{kind}"
        data = [image_bytes(20 + 11 * k + seed, 30 + 5 * n, 1000 * seed + 10 * n + k) for k in range(2)]
        if kind == "tar":
            write_tar(folder / name, [(f"{k:04d}.png", b) for k, b in enumerate(data)])
            images.update({f"{name}/{k:04d}": b for k, b in enumerate(data)})
        else:
            folder.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table({"png": pa.array(data, pa.binary())}), str(folder / name))
            images.update({f"{name}:{k}": b for k, b in enumerate(data)})
    return images


@pytest.mark.parametrize("kind", ["tar", "parquet"])
def test_same_file_names_in_another_folder_are_another_run(model_dir, tmp_path, capsys, monkeypatch, kind):
    first, second = corpus(tmp_path / "v1", kind, 1), corpus(tmp_path / "v2", kind, 2)
    assert sorted(first) == sorted(second)  # the same ids: only the folder tells the corpora apart
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out1"
    assert extract(model_dir, f"v1/*.{kind}", out) == 0
    capsys.readouterr()
    assert extract(model_dir, f"v2/*.{kind}", out) == 2
    assert "different run" in capsys.readouterr().err
    _, found = read_outputs(out)
    assert_matches_reference(found, reference(model_dir, {k: decoded(v) for k, v in first.items()}), grids=False)
    # the same folder spelled another way is the same run: resumed, nothing redone
    assert extract(model_dir, f"{tmp_path}/v1/*.{kind}", out) == 0
    assert "0 shard(s) written, 2 already done" in capsys.readouterr().out
    # --overwrite: the other folder's features
    assert extract(model_dir, f"v2/*.{kind}", out, "--overwrite") == 0
    manifest, found = read_outputs(out)
    assert manifest["complete"]
    assert_matches_reference(found, reference(model_dir, {k: decoded(v) for k, v in second.items()}), grids=False)


def test_relative_image_paths_from_another_directory_are_another_run(model_dir, tmp_path, capsys, monkeypatch):
    for seed, where in ((1, "a"), (2, "b")):
        (tmp_path / where / "photos").mkdir(parents=True)
        (tmp_path / where / "photos" / "x.png").write_bytes(image_bytes(30, 20, seed))
    out = tmp_path / "feats"
    monkeypatch.chdir(tmp_path / "a")
    assert extract(model_dir, "photos", out) == 0
    monkeypatch.chdir(tmp_path / "b")
    capsys.readouterr()
    assert extract(model_dir, "photos", out) == 2  # the same id "photos/x.png", another file
    assert "different run" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path / "a")
    assert extract(model_dir, "photos", out) == 0  # from where it started: resumed
    assert "0 shard(s) written, 1 already done" in capsys.readouterr().out
