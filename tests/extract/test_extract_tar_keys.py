"""Tar member names: `--image-key` matches extensions whatever their case (webdataset lower-cases extensions, so
`--image-key JPG` means .jpg / .JPG); a key repeated later in the tar is skipped with a reason that says "duplicate
key" (the id itself stands for the earlier sample, which is encoded)."""

from _extract_corpora import assert_matches_reference, decoded, extract, image_bytes, read_outputs, reference, write_tar


def test_image_key_is_case_insensitive(model_dir, tmp_path):
    images = {"0000": image_bytes(30, 20, 1, "JPEG"), "0001": image_bytes(20, 40, 2, "JPEG")}
    write_tar(tmp_path / "t" / "00000.tar", [("0000.JPG", images["0000"]), ("0001.jpg", images["0001"])])
    out = tmp_path / "feats"
    assert extract(model_dir, tmp_path / "t" / "00000.tar", out, "--image-key", "JPG") == 0
    manifest, found = read_outputs(out)
    assert manifest["num_skipped"] == 0, manifest["skipped"]
    expected = reference(model_dir, {f"00000.tar/{k}": decoded(v) for k, v in images.items()})
    assert_matches_reference(found, expected, grids=False)
    # the same run as --image-key jpg: resumed, nothing redone
    assert extract(model_dir, tmp_path / "t" / "00000.tar", out, "--image-key", "jpg") == 0
    assert read_outputs(out)[0]["last_run"]["shards_written"] == 0


def test_a_repeated_key_says_duplicate_key(model_dir, tmp_path):
    first, later = image_bytes(30, 20, 1), image_bytes(20, 30, 2)
    write_tar(tmp_path / "t" / "00000.tar", [("0000.png", first), ("0001.png", image_bytes(16, 16, 3)),
                                             ("0000.jpg", later)])  # fmt: skip
    out = tmp_path / "feats"
    assert extract(model_dir, tmp_path / "t" / "00000.tar", out) == 0
    manifest, found = read_outputs(out)
    assert manifest["shards"][0]["ids"] == ["00000.tar/0000", "00000.tar/0001"]
    (entry,) = manifest["skipped"]
    assert entry["id"] == "00000.tar/0000" and entry["error"].startswith("duplicate key '0000'"), entry
    assert_matches_reference({"00000.tar/0000": found["00000.tar/0000"]},
                             reference(model_dir, {"00000.tar/0000": decoded(first)}), grids=False)  # fmt: skip
