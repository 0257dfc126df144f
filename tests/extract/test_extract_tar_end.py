"""A tar cut where a member header should be (or with a damaged header) is reported, never taken for a complete tar:
tarfile's stream mode reads a missing, short or invalid header as the end of the archive, which would drop every
sample after the cut silently and commit the tar as done. Whole tars (written by `tarfile`, webdataset's TarWriter
and the `tar` command, with or without padding to a record, gzipped) still read without a complaint."""

import io
import shutil
import subprocess
import tarfile

import pytest
from _extract_corpora import decoded, extract, image_bytes, read_outputs, reference, assert_matches_reference, write_tar

KEYS = [f"{k:04d}" for k in range(6)]


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """A tar of 6 samples (.png + .txt each), and its images."""
    root = tmp_path_factory.mktemp("tars")
    images = {key: image_bytes(20 + 5 * i, 30, 40 + i) for i, key in enumerate(KEYS)}
    path = write_tar(root / "whole" / "00000.tar",
                     [m for key in KEYS for m in ((f"{key}.png", images[key]), (f"{key}.txt", key.encode()))])
    return path, images


def header_offset(path, name):
    with tarfile.open(path) as tar:
        return tar.getmember(name).offset


def cut_copy(path, folder, data):
    target = folder / path.name
    folder.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return target


@pytest.mark.parametrize("cut", ["at_header", "inside_header", "damaged_header", "no_end_blocks"])
def test_a_tar_cut_at_a_header_lists_the_tar_and_its_last_sample(model_dir, whole, tmp_path, cut):
    path, images = whole
    data = path.read_bytes()
    at = header_offset(path, "0003.png")
    if cut == "at_header":
        data = data[:at]
    elif cut == "inside_header":
        data = data[: at + 200]
    elif cut == "damaged_header":
        data = data[:at] + b"x" * 512 + data[at + 512 :]
    else:  # every member whole, the two zero blocks (and the record's padding) gone
        with tarfile.open(path) as tar:
            last = tar.getmembers()[-1]
        data = data[: last.offset_data + -(-last.size // 512) * 512]
    tar = cut_copy(path, tmp_path / "cut", data)
    out = tmp_path / "feats"
    assert extract(model_dir, tar, out) == 0
    manifest, found = read_outputs(out)
    reasons = {e["id"]: e["error"] for e in manifest["skipped"]}
    reason = reasons.get("00000.tar", "")
    assert ("no end-of-archive marker" in reason) if cut != "damaged_header" else ("damaged member header" in reason)
    if cut == "no_end_blocks":
        encoded, last = KEYS[:-1], KEYS[-1]
    else:
        encoded, last = KEYS[:2], KEYS[2]
    # the sample before the cut may have lost members after it: listed, not encoded; nothing after it is claimed
    assert f"00000.tar/{last}" in reasons and "may be incomplete" in reasons[f"00000.tar/{last}"]
    assert sorted(found) == [f"00000.tar/{k}" for k in encoded]
    assert set(reasons) == {"00000.tar", f"00000.tar/{last}"}
    ref = reference(model_dir, {f"00000.tar/{k}": decoded(images[k]) for k in encoded})
    assert_matches_reference(found, ref, grids=False)


def whole_tars(folder, images):
    """The same samples as whole tars written four ways (each a separate tar of the run)."""
    import webdataset as wds

    folder.mkdir(parents=True)
    names = {}
    with wds.TarWriter(str(folder / "writer.tar")) as writer:
        for key in KEYS[:2]:
            writer.write({"__key__": key, "png": images[key], "txt": key})
    names["writer.tar"] = KEYS[:2]
    plain = folder / "plain.tar"
    write_tar(plain, [(f"{key}.png", images[key]) for key in KEYS[2:4]])
    names["plain.tar"] = KEYS[2:4]
    with tarfile.open(folder / "zipped.tar.gz", "w:gz") as tar:
        for key in KEYS[4:]:
            info = tarfile.TarInfo(f"{key}.png")
            info.size = len(images[key])
            tar.addfile(info, io.BytesIO(images[key]))
    names["zipped.tar.gz"] = KEYS[4:]
    if shutil.which("tar"):
        src = folder.parent / "src"
        src.mkdir()
        for key in KEYS[:3]:
            (src / f"{key}.png").write_bytes(images[key])
        members = [f"{key}.png" for key in KEYS[:3]]
        subprocess.run(["tar", "-cf", str(folder / "gnu.tar"), "-C", str(src), *members], check=True)
        unpadded = ["tar", "-b", "1", "-cf", str(folder / "gnu-unpadded.tar"), "-C", str(src), *members]
        subprocess.run(unpadded, check=True)
        names["gnu.tar"] = names["gnu-unpadded.tar"] = KEYS[:3]
    return names


def test_whole_tars_of_every_writer_read_without_a_complaint(model_dir, whole, tmp_path):
    _, images = whole
    names = whole_tars(tmp_path / "tars", images)
    out = tmp_path / "feats"
    assert extract(model_dir, f"{tmp_path}/tars/*", out) == 0
    manifest, found = read_outputs(out)
    assert manifest["complete"] and manifest["num_skipped"] == 0, manifest["skipped"]
    assert sorted(found) == sorted(f"{name}/{key}" for name, keys in names.items() for key in keys)
