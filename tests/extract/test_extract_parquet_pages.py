"""Parquet input is read a batch of rows (`parquet_input.ROWS_PER_READ`) at a time, page by page, not a row group:
a file written as ONE row group (240 x 40 KB images) yields its first row after reading a small part of it, and
every row after that."""


import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from _extract_corpora import counting_opens

from siglip_navit_tools.extract import parquet_input
from siglip_navit_tools.extract.inputs import resolve_input


def test_one_row_group_file_is_read_page_by_page(tmp_path, monkeypatch):
    blobs = [np.random.default_rng(i).bytes(40_000) for i in range(240)]  # incompressible, not decoded here
    path = tmp_path / "one-group.parquet"
    pq.write_table(pa.table({"jpg": pa.array(blobs, pa.binary())}), str(path), row_group_size=1000, write_batch_size=8)
    assert pq.ParquetFile(str(path)).metadata.num_row_groups == 1
    source = resolve_input(str(path))
    opened = counting_opens(monkeypatch, parquet_input)
    items = source.items(source.ids)
    first = next(items)
    assert first.payload == {"bytes": blobs[0], "path": None}
    assert parquet_input.ROWS_PER_READ * 40_000 < path.stat().st_size / 3
    assert opened[-1].read_bytes < path.stat().st_size / 2, (opened[-1].read_bytes, path.stat().st_size)
    assert [item.payload["bytes"] for item in items] == blobs[1:]
