"""An fsspec URL whose backend package is not installed (s3:// without s3fs, https:// without aiohttp) or whose
protocol fsspec does not know is one line naming --input and what to install, exit 2, before the model is loaded
and before --output is created -- never an ImportError traceback mid-run."""

import importlib.util

import fsspec
import pytest
from _extract_corpora import extract


@pytest.fixture
def missing_backend():
    """A protocol "nopkg" whose backend lives in a package that does not exist (as s3fs is, when not installed)."""
    fsspec.register_implementation("nopkg", "nopkg_backend_not_installed.NoFileSystem", clobber=True,
                                   errtxt="Install nopkg-backend to access nopkg://")  # fmt: skip
    yield "nopkg"
    from fsspec.registry import known_implementations

    known_implementations.pop("nopkg", None)


@pytest.mark.parametrize("spec", ["nopkg://bucket/a.parquet", "nopkg://bucket/{00000..00001}.tar",
                                  "nopkg://bucket/*.tar", "list"])  # fmt: skip
def test_a_missing_backend_is_named_before_anything_runs(model_dir, tmp_path, capsys, missing_backend, spec):
    if spec == "list":
        (tmp_path / "tars.txt").write_text("nopkg://bucket/00000.tar\nnopkg://bucket/00001.tar\n")
        spec = tmp_path / "tars.txt"
    out = tmp_path / "feats"
    assert extract(model_dir, spec, out) == 2
    err = capsys.readouterr().err
    assert "--input" in err and "reading nopkg:// URLs needs a package that is not installed" in err, err
    assert "Install nopkg-backend" in err and "Traceback" not in err
    assert not out.exists()


def test_an_unknown_protocol_is_named(model_dir, tmp_path, capsys):
    out = tmp_path / "feats"
    assert extract(model_dir, "nosuchprotocol://bucket/a.tar", out) == 2
    assert "fsspec knows no protocol 'nosuchprotocol'" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.skipif(importlib.util.find_spec("s3fs") is not None, reason="s3fs is installed here")
def test_s3_without_s3fs_says_to_install_it(model_dir, tmp_path, capsys):
    out = tmp_path / "feats"
    assert extract(model_dir, "s3://bucket/data/a.parquet", out) == 2
    assert "reading s3:// URLs needs a package that is not installed (Install s3fs" in capsys.readouterr().err
    assert not out.exists()
