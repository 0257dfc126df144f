"""A network error while reading a tar or parquet file of --input (the Hub's HfHubHTTPError 429 / 503, a timeout)
is not damage: the run stops with one paragraph (exit 1), nothing of that file's shard is written and it is not
listed as skipped, so the rerun reads it again and every image ends up encoded. Real damage (a truncated image,
ArrowInvalid, pyarrow's "Invalid page header", a missing file) is still skipped and listed. The remote files are
served by a local fsspec filesystem (protocol "flaky") that raises once a read reaches a given byte."""

import io
import json

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _extract_corpora import (
    assert_matches_reference,
    decoded,
    extract,
    image_bytes,
    member_offset,
    read_outputs,
    reference,
    write_tar,
)
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from siglip_navit_tools.extract.inputs import is_bad_image_error


def hub_http_error(message: str) -> OSError:
    """huggingface_hub's HfHubHTTPError (an OSError without an errno), built without a response object (its
    constructor differs between huggingface_hub 0.x and 1.x)."""
    from huggingface_hub.errors import HfHubHTTPError

    error = HfHubHTTPError.__new__(HfHubHTTPError)
    OSError.__init__(error, message)
    return error


class FlakyFileSystem(LocalFileSystem):
    """Local files under "flaky://"; `fail[name] = (exception, byte)`: the next read of file `name` that reaches
    `byte` raises `exception` (once; byte 0: opening it raises)."""

    protocol = ("flaky",)
    root_marker = "/"
    fail: dict = {}
    raised: list = []

    @classmethod
    def _strip_protocol(cls, path):
        path = path[len("flaky://"):] if str(path).startswith("flaky://") else path
        return super()._strip_protocol(path)

    def _open(self, path, mode="rb", **kwargs):
        name = path.rsplit("/", 1)[-1]
        if name in self.fail and self.fail[name][1] == 0:
            self.raised.append(name)
            raise self.fail.pop(name)[0]
        return _FlakyFile(super()._open(path, mode, **kwargs), name, self)


class _FlakyFile(io.RawIOBase):
    def __init__(self, inner, name, fs):
        self.inner, self.name, self.fs = inner, name, fs

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, offset, whence=0):
        return self.inner.seek(offset, whence)

    def tell(self):
        return self.inner.tell()

    def readinto(self, buffer):
        start = self.inner.tell()
        if self.name in self.fs.fail and start <= self.fs.fail[self.name][1] < start + len(buffer):
            self.fs.raised.append(self.name)
            raise self.fs.fail.pop(self.name)[0]
        data = self.inner.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self):
        self.inner.close()
        super().close()


def shard_inputs(out) -> list:
    """The inputs of the shard files on disk (each carries its own; the manifest is rewritten only at the end), after
    checking that no temporary is left."""
    from safetensors import safe_open

    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [".lock"]
    names = []
    for path in sorted(out.glob("shard-*.safetensors")):
        with safe_open(str(path), "pt") as f:
            names += json.loads(f.metadata()["units"])
    return names


@pytest.fixture
def flaky():
    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
    FlakyFileSystem.fail, FlakyFileSystem.raised = {}, []
    yield FlakyFileSystem
    FlakyFileSystem.fail = {}


def test_network_errors_are_not_damage_and_damage_still_is():
    truncated = image_bytes(40, 40, 1)
    with pytest.raises(OSError) as pil_error:
        Image.open(io.BytesIO(truncated[: len(truncated) // 2])).load()
    with pytest.raises(OSError) as arrow_error:  # pyarrow's own damage: a plain OSError without an errno
        buffer = io.BytesIO()
        pq.write_table(pa.table({"b": pa.array([b"x" * 100] * 4, pa.binary())}), buffer)
        data = bytearray(buffer.getvalue())
        data[4:24] = bytes(b ^ 0xFF for b in data[4:24])
        pq.read_table(io.BytesIO(bytes(data)))
    damage = [pil_error.value, arrow_error.value, pa.lib.ArrowInvalid("Parquet magic bytes not found"),
              FileNotFoundError("https://host/missing.tar"), PermissionError(13, "denied")]  # fmt: skip
    for exc in damage:
        assert is_bad_image_error(exc), repr(exc)
    wrapped = OSError("read failed")
    wrapped.__cause__ = TimeoutError("timed out")
    network = [hub_http_error("429 Client Error: Too Many Requests"), hub_http_error("503 Server Error"),
               TimeoutError("timed out"), ConnectionResetError(104, "Connection reset by peer"),
               OSError(5, "Input/output error"), wrapped]  # fmt: skip
    for exc in network:
        assert not is_bad_image_error(exc), repr(exc)


def test_parquet_read_failing_with_http_429_mid_file_stops_and_the_rerun_encodes_every_row(model_dir, tmp_path, capsys,
                                                                                            flaky):  # fmt: skip
    folder = tmp_path / "data"
    folder.mkdir()
    images = {}
    for name in ("a.parquet", "b.parquet"):
        rows = [image_bytes(100, 100, 10 * len(images) + i) for i in range(8)]  # ~30 KB each: 4 row groups
        pq.write_table(pa.table({"png": pa.array(rows, pa.binary())}), str(folder / name), row_group_size=2)
        images.update({f"{name}:{i}": b for i, b in enumerate(rows)})
    third = pq.ParquetFile(str(folder / "b.parquet")).metadata.row_group(3).column(0)
    flaky.fail["b.parquet"] = (hub_http_error("429 Client Error: Too Many Requests"), third.data_page_offset + 10)
    out = tmp_path / "feats"
    spec = f"flaky://{folder}/*.parquet"
    assert extract(model_dir, spec, out) == 1
    assert flaky.raised == ["b.parquet"]  # the error came where planned: in b's last row group
    err = capsys.readouterr().err
    assert "reading --input file 'b.parquet' failed (HfHubHTTPError: 429" in err and "rerun the same command" in err
    assert shard_inputs(out) == ["a.parquet"]  # a's shard on disk, nothing of b's (no temporary either)
    assert extract(model_dir, spec, out) == 0
    assert "1 shard(s) written, 1 already done" in capsys.readouterr().out
    manifest, found = read_outputs(out)
    assert manifest["complete"] and manifest["num_skipped"] == 0
    assert_matches_reference(found, reference(model_dir, {k: decoded(v) for k, v in images.items()}), grids=False)


@pytest.mark.parametrize("when", ["opening", "mid_tar"])
def test_tar_read_failing_with_503_or_a_timeout_stops_and_the_rerun_encodes_every_sample(model_dir, tmp_path, capsys,
                                                                                         flaky, when):  # fmt: skip
    images = {}
    for t in range(2):
        members = []
        for k in range(4):
            images[f"{t:05d}.tar/{k:04d}"] = image_bytes(20 + 5 * k, 30 + 9 * t, 100 * t + k)
            members.append((f"{k:04d}.png", images[f"{t:05d}.tar/{k:04d}"]))
        write_tar(tmp_path / "shards" / f"{t:05d}.tar", members)
    if when == "opening":
        flaky.fail["00001.tar"] = (hub_http_error("503 Server Error: Service Unavailable"), 0)
    else:
        flaky.fail["00001.tar"] = (TimeoutError("The read operation timed out"),
                                   member_offset(tmp_path / "shards" / "00001.tar", "0002.png") + 10)  # fmt: skip
    out = tmp_path / "feats"
    spec = f"flaky://{tmp_path}/shards/{{00000..00001}}.tar"
    assert extract(model_dir, spec, out) == 1
    assert flaky.raised == ["00001.tar"]
    err = capsys.readouterr().err
    what = "HfHubHTTPError: 503" if when == "opening" else "TimeoutError: The read operation timed out"
    assert f"reading --input file '00001.tar' failed ({what}" in err
    assert shard_inputs(out) == ["00000.tar"]
    assert extract(model_dir, spec, out) == 0
    assert "1 shard(s) written, 1 already done" in capsys.readouterr().out
    manifest, found = read_outputs(out)
    assert manifest["complete"] and manifest["num_skipped"] == 0
    assert_matches_reference(found, reference(model_dir, {k: decoded(v) for k, v in images.items()}), grids=False)
