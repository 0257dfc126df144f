"""Fuzz test of the safetensors header parser (issue 12 item 8): random bytes, random JSON headers (nested values,
wrong types, huge numbers, negative and overlapping offsets), random length prefixes. The parser either accepts a
consistent header or raises its own SafetensorsError (a ToolError: the converter's one-paragraph error), never
anything else, and each example runs well under a second (hypothesis `deadline`)."""

import json
import math
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from siglip_navit_tools.cli import ToolError
from siglip_navit_tools.io.safetensors import DTYPES, SafetensorsError, parse_header

FUZZ = settings(max_examples=150, deadline=1000, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
BIG = st.integers(min_value=-(2**70), max_value=2**70)
SMALL = st.integers(min_value=-3, max_value=40)
JSON_LEAF = st.one_of(st.none(), st.booleans(), BIG, st.floats(allow_nan=False), st.text(max_size=8))
JSON_ANY = st.recursive(
    JSON_LEAF, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=20,
)
DTYPE = st.one_of(st.sampled_from(sorted(DTYPES)), st.sampled_from(["F12", "", "f32"]), JSON_ANY)
SHAPE = st.one_of(st.lists(st.one_of(SMALL, BIG), max_size=4), JSON_ANY)
OFFSETS = st.one_of(st.lists(st.one_of(SMALL, BIG), min_size=2, max_size=2), JSON_ANY)


def _reader(data: bytes):
    return lambda start, length: data[start : start + length]


def check(data: bytes) -> None:
    """parse_header on `data`: a consistent Header, or SafetensorsError; nothing else."""
    try:
        header = parse_header(_reader(data), len(data), "fuzz.safetensors")
    except SafetensorsError as exc:
        assert isinstance(exc, ToolError) and str(exc).startswith("fuzz.safetensors")
        return
    cursor = header.nbytes
    for info in sorted(header.tensors.values(), key=lambda t: (t.start, t.end)):
        assert info.start == cursor and info.end - info.start == math.prod(info.shape) * info.dtype.itemsize
        cursor = info.end
    assert cursor == len(data)  # the tensors tile the data section exactly
    assert isinstance(header.metadata, dict) and all(isinstance(v, str) for v in header.metadata.values())


def blob(header_obj, data_len: int, pad: int = 0) -> bytes:
    raw = json.dumps(header_obj).encode() + b" " * pad
    return struct.pack("<Q", len(raw)) + raw + b"\0" * data_len


@FUZZ
@given(st.binary(max_size=256))
def test_random_bytes(data):
    check(data)


@FUZZ
@given(st.integers(min_value=0, max_value=2**64 - 1), st.binary(max_size=64))
def test_random_length_prefix(length, rest):
    check(struct.pack("<Q", length) + rest)


ENTRY = st.fixed_dictionaries({"dtype": DTYPE, "shape": SHAPE, "data_offsets": OFFSETS})


@FUZZ
@given(st.dictionaries(st.text(max_size=6), ENTRY, max_size=5), st.one_of(st.none(), JSON_ANY), st.integers(0, 300))
def test_random_entries(entries, metadata, data_len):
    header = dict(entries)
    if metadata is not None:
        header["__metadata__"] = metadata
    check(blob(header, data_len))


@FUZZ
@given(JSON_ANY, st.integers(0, 64))
def test_random_json_documents(doc, data_len):
    check(blob(doc, data_len))


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(sorted(DTYPES)), st.lists(st.integers(0, 5), max_size=3)), min_size=1,
                max_size=6), st.integers(-2, 2), st.integers(0, 5), st.integers(-3, 3), st.booleans())  # fmt: skip
def test_near_valid_headers(tensors, shift, which, data_delta, overlap):
    """Mostly consistent headers, then one offset shifted, tensors made to overlap, or the file cut / padded."""
    header, offset = {}, 0
    for i, (dtype, shape) in enumerate(tensors):
        n = math.prod(shape) * DTYPES[dtype].itemsize
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    key = f"t{which % len(tensors)}"
    header[key]["data_offsets"] = [max(0, o + shift) for o in header[key]["data_offsets"]]
    if overlap and len(tensors) > 1:
        header["t1"]["data_offsets"] = list(header["t0"]["data_offsets"])
    check(blob(header, max(0, offset + data_delta)))


@settings(max_examples=20, deadline=1000, derandomize=True)
@given(st.integers(1, 300_000), st.sampled_from(["[", '{"a":']))
def test_deep_nesting(depth, opener):
    closer = "]" if opener == "[" else "}"
    raw = (opener * depth + "1" + closer * depth).encode()
    check(struct.pack("<Q", len(raw)) + raw)


def test_huge_numbers_are_refused_not_crashed():
    for header in (
        {"a": {"dtype": "F32", "shape": [2**64, 2**64], "data_offsets": [0, 2**130]}},
        {"a": {"dtype": "F32", "shape": [10**6] * 1000, "data_offsets": [0, 4]}},
        {"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}},
        {"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}},
    ):
        check(blob(header, 4))
    # a 5000-digit offset (Python's int() refuses more than 4300 digits: the parser must still answer in its words)
    raw = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,' + b"9" * 5000 + b"]}}"
    check(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
