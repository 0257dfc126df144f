"""The converter's pure pieces, without running a conversion: the key map, the safetensors header parser and writer,
card front matter, options, sharding. (End-to-end behaviour is in test_convert_checkpoint.py.)"""

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from siglip_navit_tools.convert import cli as convert_cli
from siglip_navit_tools.convert.hub import card_metadata
from siglip_navit_tools.convert.keymap import KeyLayout, map_key, source_key
from siglip_navit_tools.convert.options import ConversionError, ConvertOptions, parse_size
from siglip_navit_tools.io.locations import ByteReader, Location
from siglip_navit_tools.io.safetensors import (
    MAX_HEADER_BYTES,
    SafetensorsError,
    SafetensorsWriter,
    TensorSpec,
    parse_header,
    verify_file,
)
from siglip_navit_tools.testing import unique_dir

BAGEL = KeyLayout("bagel", "vit_model.")
STOCK_4X = KeyLayout("siglip")
STOCK_5X = KeyLayout("siglip", unprefixed=True)
OURS = KeyLayout("siglip-navit")
V = "vision_model."
NOT_VIT = "not part of the ViT (other BAGEL modules; never read)"
HEAD = "pooling head (vision_model.head.*; not part of this tower)"
ROPE = "persistent RoPE tables (vision_model.rope.*; recomputed by the model)"

# (layout, source key, our key or None, drop reason or None)
KEYMAP_CASES = [
    (BAGEL, "vit_model.vision_model.encoder.layers.3.mlp.fc1.weight", V + "encoder.layers.3.mlp.fc1.weight", None),
    (BAGEL, "vit_model.vision_model.embeddings.patch_embedding.weight", V + "embeddings.patch_embedding.weight", None),
    (BAGEL, "connector.fc1.weight", None, NOT_VIT),
    (BAGEL, "vit_pos_embed.pos_embed", None, NOT_VIT),
    (BAGEL, "language_model.model.embed_tokens.weight", None, NOT_VIT),
    (BAGEL, "vit_model.vision_model.rope.cos_h", None, ROPE),
    (KeyLayout("bagel", "module.vit."), "module.vit.vision_model.post_layernorm.bias", V + "post_layernorm.bias", None),
    (KeyLayout("bagel", "module.vit."), "vit_model.vision_model.post_layernorm.bias", None, NOT_VIT),
    (STOCK_4X, V + "encoder.layers.0.self_attn.q_proj.weight", V + "encoder.layers.0.self_attn.q_proj.weight", None),
    (STOCK_4X, "text_model.embeddings.token_embedding.weight", None, "text tower (text_model.*)"),
    (STOCK_4X, "logit_scale", None, "logit scale / bias"),
    (STOCK_4X, "logit_bias", None, "logit scale / bias"),
    (STOCK_4X, V + "head.probe", None, HEAD),
    (STOCK_4X, V + "head.attention.in_proj_weight", None, HEAD),
    (STOCK_4X, V + "embeddings.position_ids", None, "position_ids buffer"),
    (STOCK_5X, "embeddings.patch_embedding.weight", V + "embeddings.patch_embedding.weight", None),
    (STOCK_5X, "encoder.layers.1.layer_norm2.bias", V + "encoder.layers.1.layer_norm2.bias", None),
    (STOCK_5X, "head.mlp.fc1.weight", None, HEAD),
    (OURS, V + "post_layernorm.weight", V + "post_layernorm.weight", None),
    (OURS, V + "rope.sin_w", None, ROPE),
    (OURS, V + "rope.inv_freq", V + "rope.inv_freq", None),  # not a known drop: the plan reports it as unexpected
]


@pytest.mark.parametrize("layout, key, ours, reason", KEYMAP_CASES)
def test_key_map_table(layout, key, ours, reason):
    assert tuple(map_key(key, layout)) == (ours, reason)
    if ours is not None:
        assert source_key(ours, layout) == key  # the inverse names missing keys in the source's own terms


def test_key_map_layer_cut():
    key = "vit_model.vision_model.encoder.layers.2.mlp.fc2.bias"
    assert map_key(key, BAGEL, keep_layers=3, layers_stored=4).key == V + "encoder.layers.2.mlp.fc2.bias"
    dropped = map_key(key, BAGEL, keep_layers=2, layers_stored=4)
    assert dropped == (None, "encoder layers 2..3 (--num-hidden-layers 2)")
    assert map_key("vit_model.vision_model.post_layernorm.weight", BAGEL, 1, 4).key == V + "post_layernorm.weight"


# ---- card front matter ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "front, expected",
    [
        ("base_model: a/b\nlicense: mit", {"base_model": "a/b", "license": "mit"}),
        ("base_model:\n- a/b\n", {"base_model": ["a/b"]}),  # a YAML list: its entries, never the string "- a/b"
        ("base_model:\n  - a/b\n  - c/d\nlicense: other", {"base_model": ["a/b", "c/d"], "license": "other"}),
        ("base_model: 'q/r'  # quoted, with a comment", {"base_model": "q/r"}),
        ("tags:\n- x", {}),
    ],
)
def test_card_metadata_reads_yaml(front, expected):
    assert card_metadata(f"---\n{front}\n---\n\n# A card\n") == expected


def test_card_metadata_without_front_matter():
    assert card_metadata("# just a title\n\nbase_model: a/b\n") == {}


def test_source_card_base_model_list_reaches_the_output_card(tmp_path):
    """A converted repo whose card lists two base models: the re-converted card lists the same two."""
    from huggingface_hub import ModelCard

    from siglip_navit_tools.testing import tiny_converted_repo

    src = tiny_converted_repo(unique_dir(tmp_path, "listed"), work=tmp_path)
    card = (src / "README.md").read_text()
    front, body = card.split("---\n", 2)[1:]
    front = "\n".join(line for line in front.splitlines() if not line.startswith("base_model")) + "\n"
    (src / "README.md").write_text(f"---\n{front}base_model:\n- a/b\n- c/d\n---\n{body}")
    out = unique_dir(tmp_path, "relisted")
    assert convert_cli.main(["--src", str(src), "--out", str(out), "--no-progress", "--quiet"]) == 0
    data = ModelCard.load(out / "README.md").data
    assert data.base_model == ["a/b", "c/d"]
    assert "- a/b" not in (out / "README.md").read_text().split("---")[2]  # the body names them, not a YAML line


# ---- the safetensors header parser: one function, any transport ---------------------------------------------
def _reader_of(data: bytes):
    return lambda start, length: data[start : start + length]


def test_header_limit_is_what_safetensors_accepts():
    assert MAX_HEADER_BYTES == 100_000_000
    ok_len = struct.pack("<Q", MAX_HEADER_BYTES)  # accepted as a length: the (tiny) file is then too short for it
    with pytest.raises(SafetensorsError, match="is truncated: the header alone needs 100000008 bytes"):
        parse_header(_reader_of(ok_len + b"{}"), 10, "f")
    too_long = struct.pack("<Q", MAX_HEADER_BYTES + 1)
    with pytest.raises(SafetensorsError, match=r"corrupt safetensors header.*expected 1\.\.100000000"):
        parse_header(_reader_of(too_long + b"{}"), 10, "f")


def test_header_parser_is_transport_independent(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.zeros(3, 2), "b": torch.ones(5, dtype=torch.bfloat16)}, str(path), metadata={"format": "pt"})
    data = path.read_bytes()
    from_bytes = parse_header(_reader_of(data), len(data), "bytes")
    reader = ByteReader(Location.parse(str(path)))
    from_file = parse_header(reader.read, reader.size, "file")
    assert from_bytes == from_file
    assert reader.bytes_read == from_file.nbytes  # the header only, no tensor data
    assert from_file.metadata == {"format": "pt"}
    assert {k: (t.dtype, t.shape, t.nbytes) for k, t in from_file.tensors.items()} == {
        "a": (torch.float32, (3, 2), 24),
        "b": (torch.bfloat16, (5,), 10),
    }
    reader.close()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda h: h["a"].update(dtype="F12"), "unknown dtype 'F12'"),
        (lambda h: h["a"].update(shape=[3, -2]), "bad shape"),
        (lambda h: h["a"].update(data_offsets=[0]), "bad data_offsets"),
        (lambda h: h.pop("b"), "unexpected bytes after the last tensor"),
        (lambda h: h["b"].update(data_offsets=[20, 30]), "overlapping"),
    ],
)
def test_header_integrity_checks(tmp_path, edit, message):
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.zeros(3, 2), "b": torch.ones(5, dtype=torch.bfloat16)}, str(path))
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    blob = struct.pack("<Q", len(raw)) + raw + data[8 + n :]
    with pytest.raises(SafetensorsError, match=message):
        parse_header(_reader_of(blob), len(blob), "t")


def test_writer_matches_reference_reader_and_verify_catches_a_flipped_byte(tmp_path):
    tensors = {"x": torch.randn(4, 3), "y": torch.arange(6, dtype=torch.float16).reshape(2, 3), "z": torch.zeros(0)}
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    path = tmp_path / "w.safetensors"
    with SafetensorsWriter(path, specs) as writer:
        digests = {k: writer.write(k, v) for k, v in tensors.items()}
    loaded = load_file(str(path))
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    expected = {s.key: (s, digests[s.key]) for s in specs}
    verify_file(path, expected, chunk_bytes=5)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # the last byte of "y"
    path.write_bytes(bytes(data))
    with pytest.raises(Exception, match="tensor y in w.safetensors does not match what was written"):
        verify_file(path, expected, chunk_bytes=5)


def test_writer_refuses_out_of_order_tensors(tmp_path):
    specs = [TensorSpec("a", torch.float32, (2,)), TensorSpec("b", torch.float32, (2,))]
    with pytest.raises(ValueError, match="expected"):
        with SafetensorsWriter(tmp_path / "o.safetensors", specs) as writer:
            writer.write("b", torch.zeros(2))


# ---- options ----------------------------------------------------------------------------------------------------
def test_options_normalise_and_rebuild_the_command():
    options = ConvertOptions(src="in dir", out="out", vit_prefix="module.vit", dtype="float16", force=True, progress=False)
    assert options.vit_prefix == "module.vit."
    assert options.command_line() == (
        "python convert_checkpoint.py --src 'in dir' --out out --vit-prefix module.vit. --dtype float16 --force "
        "--no-progress"
    )
    assert ConvertOptions(src="a", out="b", command="python x.py --src a").command_line() == "python x.py --src a"


def test_cli_builds_the_same_options_as_the_library_defaults():
    args = convert_cli.build_parser().parse_args(["--src", "s", "--out", "o"])
    options = convert_cli.options_from_args(args, ["--src", "s", "--out", "o"])
    defaults = ConvertOptions(src="s", out="o")
    assert {**vars(options), "command": ""} == vars(defaults)


@pytest.mark.parametrize("text, size", [("5GB", 5 * 10**9), ("500MiB", 500 * 2**20), ("10KB", 10**4), ("1.5kib", 1536),
                                        ("4096", 4096), (123, 123)])  # fmt: skip
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["five", "0", "3XB"])
def test_parse_size_errors_name_the_flag(text):
    with pytest.raises(ConversionError, match="--read-chunk-size"):
        parse_size(text, "--read-chunk-size")


# ---- issue 12: bounds, containment, pieces ------------------------------------------------------------------
@pytest.mark.parametrize("text", ["-1", "10", "1000TB", "9" * 40, 0, -5, 2**40])
def test_read_chunk_bounds(text):
    from siglip_navit_tools.convert.options import READ_CHUNK_BOUNDS

    with pytest.raises(ConversionError, match="--read-chunk-size"):
        parse_size(text, "--read-chunk-size", READ_CHUNK_BOUNDS)


@pytest.mark.parametrize(
    "name, ok",
    [("model-00001-of-00002.safetensors", True), ("sub/x.safetensors", True), ("/etc/passwd", False),
     ("../x.safetensors", False), ("a/../../x.safetensors", False), ("./x.safetensors", False), ("a//b", False),
     ("C:\\x", False), ("s3://b/x.safetensors", False), ("x\0.safetensors", False), ("", False)],
)  # fmt: skip
def test_child_within_the_folder(tmp_path, name, ok):
    from siglip_navit_tools.io.locations import LocationError

    folder = Location.parse(str(tmp_path))
    if ok:
        assert folder.child_within(name, "index").path == str(tmp_path / name)
    else:
        with pytest.raises(LocationError, match="not a file inside"):
            folder.child_within(name, "index")


def test_piece_bounds_rows_for_relayouts_and_flat_otherwise():
    from types import SimpleNamespace

    from siglip_navit_tools.convert.write import piece_bounds
    from siglip_navit_tools.io.safetensors import TensorInfo

    info = TensorInfo("w", torch.float32, (8, 3, 2, 2), 0, 8 * 12 * 4)
    item = SimpleNamespace(entry=SimpleNamespace(info=info), transform="conv2d_to_linear")
    rows = list(piece_bounds(item, 100))
    assert rows == [(0, 24, (2, 3, 2, 2)), (24, 48, (2, 3, 2, 2)), (48, 72, (2, 3, 2, 2)), (72, 96, (2, 3, 2, 2))]
    flat = list(piece_bounds(SimpleNamespace(entry=SimpleNamespace(info=info), transform=None), 100))
    assert [b - a for a, b, _ in flat] == [25, 25, 25, 21] and all(s == (b - a,) for a, b, s in flat)


def test_writer_pieces_must_add_up(tmp_path):
    spec = TensorSpec("a", torch.float32, (4,))
    with pytest.raises(ValueError, match="8 bytes written, expected 16"):
        with SafetensorsWriter(tmp_path / "p.safetensors", [spec]) as writer:
            writer.write_pieces("a", [torch.zeros(1), torch.zeros(1)])
    with SafetensorsWriter(tmp_path / "q.safetensors", [spec]) as writer:
        writer.write_pieces("a", [torch.arange(3.0), torch.tensor([3.0])])
    assert torch.equal(load_file(str(tmp_path / "q.safetensors"))["a"], torch.arange(4.0))
