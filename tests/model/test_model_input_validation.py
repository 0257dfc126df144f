"""Bad packs get a clear error naming the argument; checks run once per forward."""

import numpy as np
import pytest
import torch

from siglip_navit_tools import repo_code
from siglip_navit_tools.testing import make_model, make_pack, tiny_config

model_mod = repo_code.modeling()

GRIDS = [(6, 6), (2, 5), (1, 1)]  # 47 patches, cu_seqlens [0, 36, 46, 47]


@pytest.fixture(scope="module")
def model():
    return make_model(tiny_config(rope=False), attn="sdpa")


@pytest.fixture
def pack():
    return make_pack(GRIDS, tiny_config(rope=False))


def with_(pack, **changes):
    new = dict(pack)
    new.update(changes)
    return new


BAD_INPUTS = {
    # name: (changes given the valid pack, exception, message regex)
    "pixels 3-D": (lambda p: {"packed_pixel_values": p["packed_pixel_values"][None]}, ValueError,
                   r"`packed_pixel_values` must have shape \(total_patches, .*\(N, 48\).*got shape \(1, 47, 48\)"),
    "pixels wrong patch dim": (lambda p: {"packed_pixel_values": p["packed_pixel_values"][:, :40]}, ValueError,
                               r"`packed_pixel_values`.*\(N, 48\)"),
    "pixels integer": (lambda p: {"packed_pixel_values": p["packed_pixel_values"].to(torch.uint8)}, TypeError,
                       r"`packed_pixel_values` must be a floating-point tensor"),
    "pixels numpy": (lambda p: {"packed_pixel_values": p["packed_pixel_values"].numpy()}, TypeError,
                     r"`packed_pixel_values` must be a torch.Tensor"),
    "empty pack": (lambda p: {"packed_pixel_values": torch.zeros(0, 48),
                              "packed_flattened_position_ids": torch.zeros(0, dtype=torch.long),
                              "cu_seqlens": torch.tensor([0], dtype=torch.int32), "max_seqlen": 0},
                   ValueError, r"empty pack"),
    "positions 2-D": (lambda p: {"packed_flattened_position_ids": p["packed_flattened_position_ids"][None]},
                      TypeError, r"`packed_flattened_position_ids` must be a 1-D integer tensor"),
    "positions float": (lambda p: {"packed_flattened_position_ids": p["packed_flattened_position_ids"].float()},
                        TypeError, r"`packed_flattened_position_ids` must be a 1-D integer tensor.*float32"),
    "positions wrong length": (lambda p: {"packed_flattened_position_ids": p["packed_flattened_position_ids"][:-1]},
                               ValueError, r"one id per patch: got 46 ids for 47 patches"),
    "positions too large": (lambda p: {"packed_flattened_position_ids": p["packed_flattened_position_ids"] + 30},
                            ValueError, r"`packed_flattened_position_ids` must lie in \[0, 36\).*\[30, 65\]"),
    "positions negative": (lambda p: {"packed_flattened_position_ids": p["packed_flattened_position_ids"] - 1},
                           ValueError, r"must lie in \[0, 36\)"),
    "cu_seqlens list": (lambda p: {"cu_seqlens": [0, 36, 46, 47]}, TypeError, r"`cu_seqlens` must be a torch.Tensor"),
    "cu_seqlens float": (lambda p: {"cu_seqlens": p["cu_seqlens"].float()}, TypeError,
                         r"`cu_seqlens` must be a 1-D integer tensor"),
    "cu_seqlens 2-D": (lambda p: {"cu_seqlens": p["cu_seqlens"][None]}, TypeError, r"`cu_seqlens` must be a 1-D"),
    "cu_seqlens one entry": (lambda p: {"cu_seqlens": torch.tensor([47], dtype=torch.int32)}, ValueError,
                             r"`cu_seqlens` must be \[0, n1, n1\+n2, ...\] with at least 2 entries"),
    "cu_seqlens not from 0": (lambda p: {"cu_seqlens": torch.tensor([1, 36, 46, 47], dtype=torch.int32),
                                         "image_grid_hw": None}, ValueError, r"`cu_seqlens` must start at 0"),
    "cu_seqlens decreasing": (lambda p: {"cu_seqlens": torch.tensor([0, 36, 30, 47], dtype=torch.int32),
                                         "image_grid_hw": None}, ValueError, r"`cu_seqlens` must be non-decreasing"),
    "cu_seqlens empty image": (lambda p: {"cu_seqlens": torch.tensor([0, 36, 36, 47], dtype=torch.int32),
                                          "image_grid_hw": None}, ValueError, r"`cu_seqlens` has an empty image"),
    "cu_seqlens short end": (lambda p: {"cu_seqlens": torch.tensor([0, 36, 46], dtype=torch.int32),
                                        "image_grid_hw": None}, ValueError,
                             r"`cu_seqlens` must end at the number of patches \(47\), got 46"),
    "max_seqlen too small": (lambda p: {"max_seqlen": 35}, ValueError,
                             r"`max_seqlen` \(35\) is below the longest image in the pack \(36 patches\)"),
    "max_seqlen tensor too small": (lambda p: {"max_seqlen": torch.tensor(10)}, ValueError,
                                    r"`max_seqlen` \(10\) is below"),
    "max_seqlen float": (lambda p: {"max_seqlen": 36.0}, TypeError, r"`max_seqlen` must be an int or a 0-d integer"),
    "max_seqlen float tensor": (lambda p: {"max_seqlen": torch.tensor(36.0)}, TypeError,
                                r"`max_seqlen` must be an int or a 0-d integer tensor"),
    "grid wrong count": (lambda p: {"image_grid_hw": p["image_grid_hw"][:2]}, ValueError,
                         r"`image_grid_hw` must have shape \(num_images, 2\) = \(3, 2\).*\(2, 2\)"),
    "grid disagrees": (lambda p: {"image_grid_hw": torch.tensor([[6, 6], [5, 2], [1, 2]])}, ValueError,
                       r"`image_grid_hw\[2\]` = \(1, 2\) gives 2 patches but cu_seqlens gives image 2 1 patches"),
    "grid float": (lambda p: {"image_grid_hw": p["image_grid_hw"].float()}, TypeError,
                   r"`image_grid_hw` must be a 2-D integer tensor"),
    "grid wider than the model": (lambda p: {"image_grid_hw": torch.tensor([[6, 6], [1, 10], [1, 1]])}, ValueError,
                                  r"`image_grid_hw\[1\]` = \(1, 10\) is outside the model's 6x6 patch grid"),
    "pixels on another device": (lambda p: {"packed_pixel_values": p["packed_pixel_values"].to("meta")}, ValueError,
                                 r"`packed_pixel_values` is on meta but the model is on cpu"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_a_clear_error(model, pack, case):
    change, exc, pattern = BAD_INPUTS[case]
    with pytest.raises(exc, match=pattern):
        model(**with_(pack, **change(pack)))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_valid_variants_are_accepted(attn, pack):
    model = make_model(tiny_config(rope=False), attn=attn)
    with torch.no_grad():
        base = model(**pack).last_hidden_state
        variants = [
            with_(pack, max_seqlen=torch.tensor(36)),  # what a BatchFeature holds
            with_(pack, max_seqlen=100),  # an upper bound is fine
            with_(pack, image_grid_hw=None),
            with_(pack, cu_seqlens=pack["cu_seqlens"].long(), packed_flattened_position_ids=pack[
                "packed_flattened_position_ids"].int()),
            with_(pack, packed_pixel_values=pack["packed_pixel_values"].double()),  # cast to the model dtype
        ]
        for variant in variants:
            out = model(**variant).last_hidden_state
            assert out.dtype == torch.float32
            assert (out - base).abs().max().item() <= 1e-6
        unchecked = model(**pack, validate_inputs=False).last_hidden_state
        assert torch.equal(unchecked, base)


# every whole-byte integer dtype torch has (uint16/32/64 from torch 2.3): each is widened to int64 once per forward
INDEX_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64] + [
    getattr(torch, name) for name in ("uint16", "uint32", "uint64") if hasattr(torch, name)
]


def with_index_dtype(pack, dtype):
    return with_(pack, packed_flattened_position_ids=pack["packed_flattened_position_ids"].to(dtype),
                 cu_seqlens=pack["cu_seqlens"].to(dtype), image_grid_hw=pack["image_grid_hw"].to(dtype),
                 max_seqlen=torch.tensor(36, dtype=dtype))  # fmt: skip


@pytest.mark.parametrize("dtype", INDEX_DTYPES, ids=str)
@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_every_integer_index_dtype_gives_the_int64_result(attn, rope, dtype):
    """uint8 ids were a boolean mask under rope, int8/int16 a raw torch error: now all equal the int64 result."""
    config = tiny_config(rope=rope)
    model = make_model(config, attn=attn)
    pack = make_pack(GRIDS, config)
    with torch.no_grad():
        base = model(**pack).last_hidden_state
        for validate in (True, False):
            out = model(**with_index_dtype(pack, dtype), validate_inputs=validate).last_hidden_state
            assert torch.equal(out, base), (dtype, validate)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.uint8], ids=str)
def test_narrow_position_ids_out_of_range_are_still_a_value_error(model, pack, dtype):
    ids = pack["packed_flattened_position_ids"].clone()
    ids[5] = 36 if dtype != torch.int8 else 100  # one past the 6x6 grid
    with pytest.raises(ValueError, match=r"`packed_flattened_position_ids` must lie in \[0, 36\)"):
        model(**with_(pack, packed_flattened_position_ids=ids.to(dtype)))
    if dtype != torch.uint8:
        ids[5] = -1
        with pytest.raises(ValueError, match=r"must lie in \[0, 36\).*got values in \[-1, "):
            model(**with_(pack, packed_flattened_position_ids=ids.to(dtype)))


@pytest.mark.skipif(not hasattr(torch, "uint64"), reason="torch.uint64 needs torch >= 2.3")
def test_uint64_ids_beyond_int64_are_rejected_not_wrapped(model, pack):
    ids = pack["packed_flattened_position_ids"].to(torch.uint64)
    ids[3] = torch.tensor(2**64 - 1, dtype=torch.uint64)  # -1 once widened to int64: caught by the range check
    with pytest.raises(ValueError, match=r"`packed_flattened_position_ids` must lie in \[0, 36\)"):
        model(**with_(pack, packed_flattened_position_ids=ids))


NON_INTEGER_DTYPES = [torch.bool, torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64]
INDEX_ARGUMENTS = {
    # argument: (error message when its dtype is not an integer one)
    "packed_flattened_position_ids": r"`packed_flattened_position_ids` must be a 1-D integer tensor",
    "cu_seqlens": r"`cu_seqlens` must be a 1-D integer tensor",
    "image_grid_hw": r"`image_grid_hw` must be a 2-D integer tensor",
    "max_seqlen": r"`max_seqlen` must be an int or a 0-d integer tensor",
}


@pytest.mark.parametrize("dtype", NON_INTEGER_DTYPES, ids=str)
@pytest.mark.parametrize("argument", list(INDEX_ARGUMENTS))
def test_bool_float_and_complex_indices_are_a_type_error_naming_the_argument(model, pack, argument, dtype):
    value = pack[argument] if argument != "max_seqlen" else torch.tensor(36)
    with pytest.raises(TypeError, match=INDEX_ARGUMENTS[argument] + r".*dtype " + str(dtype).replace(".", r"\.")):
        model(**with_(pack, **{argument: value.to(dtype)}))


@pytest.mark.skipif(not hasattr(torch, "int4"), reason="sub-byte dtypes need torch >= 2.3")
def test_sub_byte_position_ids_are_a_type_error(model, pack):
    ids = torch.empty(47, dtype=torch.int4)  # torch cannot even copy these: refused before any use
    with pytest.raises(TypeError, match=r"`packed_flattened_position_ids` must be a 1-D integer tensor.*int4"):
        model(**with_(pack, packed_flattened_position_ids=ids))


def test_numpy_positions_are_rejected(model, pack):
    with pytest.raises(TypeError, match=r"`packed_flattened_position_ids` must be a torch.Tensor of integers"):
        model(**with_(pack, packed_flattened_position_ids=np.arange(47)))


def test_pack_is_checked_once_per_forward(monkeypatch, model, pack):
    calls = []
    real = model_mod.prepare_packed_sequences

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(model_mod, "prepare_packed_sequences", spy)
    with torch.no_grad():
        model(**pack)
    assert len(calls) == 1  # not once per layer


def test_unconverted_conv_embedding_is_a_clear_error():
    config = tiny_config()
    tower = model_mod.SiglipVisionTransformer(config)
    with pytest.raises(RuntimeError, match="convert_conv2d_to_linear"):
        tower(**make_pack(GRIDS, config))
