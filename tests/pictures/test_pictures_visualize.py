"""visualize.py: picture sizes for non-square inputs, PNG output, which position id is drawn in which patch, PCA
separating two halves (robust scaling, dtype-aware "no variance"), the pack strip's segment boundaries and labels,
exact recovery of the resized images, attention heat maps (hottest cell, marker), error messages, and the README
figures (rebuilt and compared with docs/)."""

import os
import subprocess
import sys

import numpy as np
import PIL.Image
import PIL.ImageFont
import pytest
import torch

import visualize as vis
from siglip_navit_tools import repo_code
from siglip_navit_tools.pictures import _draw as pictures_draw
from siglip_navit_tools.pictures import pack as pictures_pack
from siglip_navit_tools.testing import make_model, make_pack, tiny_config

ROOT = repo_code.REPO_ROOT
ipm = repo_code.image_processing()

GRIDS = [(3, 5), (7, 2)]  # non-square patch grids (rows, cols), both orientations


def grid_image(h, w, p, seed=0):
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (h * p, w * p, 3), dtype=np.uint8))


def reopen(path):
    with PIL.Image.open(path) as im:
        im.load()
        return im.format, im.mode, im.size


def fake_inputs(grids, p, seed=0):
    """A processor-style output built by hand: uint8 images, patchified and normalised as the processor does."""
    rng = np.random.default_rng(seed)
    pixels, ids, images = [], [], []
    for h, w in grids:
        u8 = rng.integers(0, 256, (h * p, w * p, 3), dtype=np.uint8)
        images.append(u8)
        pixels.append(ipm.patchify(torch.from_numpy(u8).permute(2, 0, 1).contiguous(), p))
        ids.append(ipm.position_ids_extrapolate(h, w, 70))
    packed = ipm.normalize_uint8(torch.cat(pixels).to(torch.uint8))
    lengths = [h * w for h, w in grids]
    inputs = dict(
        packed_pixel_values=packed,
        packed_flattened_position_ids=torch.cat(ids),
        cu_seqlens=ipm.build_cu_seqlens(lengths),
        max_seqlen=max(lengths),
        image_grid_hw=torch.tensor(grids),
    )
    return inputs, images


# ---- (a) patch grid ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("scale", [1, 3])
def test_draw_patch_grid_size_and_png(tmp_path, grid, scale):
    h, w = grid
    p = 14
    img = grid_image(h, w, p)
    ids = torch.arange(h * w) + 100
    path = tmp_path / "sub" / "grid.png"
    pic = vis.draw_patch_grid(img, grid, position_ids=ids, scale=scale, save_to=path)
    assert pic.mode == "RGB" and pic.size == (w * p * scale, h * p * scale)
    assert reopen(path) == ("PNG", "RGB", pic.size)
    # grid lines are drawn on the patch boundaries: there the picture blends towards white, elsewhere it is the
    # (upscaled) input; the labels darken their corners
    plain = np.asarray(vis.draw_patch_grid(img, grid, scale=scale)).astype(int)
    base = np.asarray(img.resize(pic.size, PIL.Image.NEAREST)).astype(int)
    on_line = np.zeros(plain.shape[:2], bool)
    on_line[:, [min(j * p * scale, w * p * scale - 1) for j in range(w + 1)]] = True
    on_line[[min(i * p * scale, h * p * scale - 1) for i in range(h + 1)], :] = True
    assert (plain[on_line] >= base[on_line]).all() and (plain[on_line] > base[on_line]).any()
    assert np.array_equal(plain[~on_line], base[~on_line])
    assert (np.asarray(pic).astype(int) < plain).any()


def changed_cells(a, b, cell):
    """The set of (row, col) cells of size `cell` in which pictures a and b differ."""
    diff = np.argwhere((np.asarray(a) != np.asarray(b)).any(-1))
    return {(int(y) // cell, int(x) // cell) for y, x in diff}


@pytest.mark.parametrize("grid,patch", [((3, 5), (1, 3)), ((7, 2), (5, 0)), ((7, 2), (2, 1))])
def test_draw_patch_grid_puts_each_id_in_its_own_patch(grid, patch):
    """Two id lists that differ only at patch (i, j) (row-major index i * cols + j) give pictures that differ only
    inside that patch's cell -- a transposed or constant index would change another cell, or none."""
    h, w = grid
    i, j = patch
    p, scale = 14, 3
    img = grid_image(h, w, p, seed=7)
    ids = list(range(100, 100 + h * w))
    other = list(ids)
    other[i * w + j] = 999
    kwargs = dict(scale=scale, label_every=1)
    a = vis.draw_patch_grid(img, grid, position_ids=ids, **kwargs)
    b = vis.draw_patch_grid(img, grid, position_ids=other, **kwargs)
    assert changed_cells(a, b, p * scale) == {(i, j)}


def test_patch_grids_take_each_images_ids_from_its_own_slice():
    inputs, _ = fake_inputs(GRIDS, 14)
    (h0, w0), (h1, w1) = GRIDS
    i, j = 5, 1  # a patch of the second (7 x 2) image
    ids = inputs["packed_flattened_position_ids"].clone()
    ids[h0 * w0 + i * w1 + j] = 999
    before = vis.patch_grids(inputs, scale=3)
    after = vis.patch_grids(dict(inputs, packed_flattened_position_ids=ids), scale=3)
    assert np.array_equal(np.asarray(before[0]), np.asarray(after[0]))
    assert changed_cells(before[1], after[1], 14 * 3) == {(i, j)}
    # and the first image's own ids: change one, only that image's picture changes, in that patch
    ids = inputs["packed_flattened_position_ids"].clone()
    ids[1 * w0 + 4] = 999
    after = vis.patch_grids(dict(inputs, packed_flattened_position_ids=ids), scale=3)
    assert changed_cells(before[0], after[0], 14 * 3) == {(1, 4)}
    assert np.array_equal(np.asarray(before[1]), np.asarray(after[1]))


def test_draw_patch_grid_infers_patch_size_and_checks_it():
    img = grid_image(3, 5, 6)
    assert vis.draw_patch_grid(img, (3, 5)).size == (30, 18)
    with pytest.raises(ValueError, match="grid_hw"):
        vis.draw_patch_grid(img, (3, 0))
    with pytest.raises(ValueError, match=r"`image` is 30x18 .*4x5"):
        vis.draw_patch_grid(img, (4, 5))
    with pytest.raises(ValueError, match=r"`image` is 30x18 .*14 px patches"):
        vis.draw_patch_grid(img, (3, 5), patch_size=14)
    with pytest.raises(ValueError, match="`position_ids` has 4 entries but the 3x5 grid has 15"):
        vis.draw_patch_grid(img, (3, 5), position_ids=[0, 1, 2, 3])
    with pytest.raises(ValueError, match="`scale`"):
        vis.draw_patch_grid(img, (3, 5), scale=0)
    with pytest.raises(ValueError, match="`image` must be a PIL image"):
        vis.draw_patch_grid("nope.png", (3, 5))
    with pytest.raises(ValueError, match=r"`scale` must be an integer >= 1, got 2\.0"):
        vis.draw_patch_grid(img, (3, 5), scale=2.0)
    with pytest.raises(ValueError, match="`label_every` must be an integer >= 1 or None"):
        vis.draw_patch_grid(img, (3, 5), label_every=True)


def test_numpy_integers_and_unsupported_image_dtypes():
    img = grid_image(3, 5, 6)
    i64, i32 = np.int64, np.int32
    pic = vis.draw_patch_grid(img, (3, 5), position_ids=np.arange(15), scale=i64(2), label_every=i32(2))
    assert pic.size == (60, 36)
    assert vis.pca_view(img, torch.randn(3, 5, 4), gap=i64(3)).size == (63, 18)
    assert vis.hstack([img, img], gap=np.uint8(1)).size == (61, 18)
    assert vis.pack_strip([0, 10, 30], width=i64(120), height=i32(60)).size == (120, 60)
    # an (H, W, 3) uint8 tensor works like the array; other dtypes get a ValueError that says what is accepted
    tensor = torch.from_numpy(np.asarray(img).copy())
    assert np.array_equal(np.asarray(vis.draw_patch_grid(tensor, (3, 5))), np.asarray(vis.draw_patch_grid(img, (3, 5))))
    accepted = r"must be a PIL image, or an \(H, W, 3\) or \(H, W\) uint8 numpy array or torch tensor"
    for bad in (tensor.to(torch.bfloat16), tensor.float(), np.asarray(img).astype(np.float32)):
        with pytest.raises(ValueError, match=accepted):
            vis.draw_patch_grid(bad, (3, 5))
        with pytest.raises(ValueError, match=accepted):
            vis.hstack([img, bad])


def test_resized_images_are_exact_and_patch_grids_follow_the_pack(tmp_path):
    inputs, originals = fake_inputs(GRIDS, 14)
    images = vis.resized_images(inputs)
    for got, want in zip(images, originals):
        assert got.mode == "RGB" and np.array_equal(np.asarray(got), want)  # bit-exact inverse of the normalisation
    pictures = vis.patch_grids(inputs, save_to=tmp_path / "grids.png")
    assert [p.size for p in pictures] == [(w * 14, h * 14) for h, w in GRIDS]
    assert reopen(tmp_path / "grids.png")[2] == (5 * 14 + 8 + 2 * 14, 7 * 14)
    bad = dict(inputs, image_grid_hw=torch.tensor([(3, 5), (7, 3)]))
    with pytest.raises(ValueError, match="holds 29 patches but `inputs\\['image_grid_hw'\\]` describes 36"):
        vis.resized_images(bad)
    with pytest.raises(ValueError, match="'packed_pixel_values'"):
        vis.resized_images({"image_grid_hw": [(1, 1)]})


def test_resized_images_match_the_processor():
    proc = ipm.SiglipNaViTImageProcessor()
    rng = np.random.default_rng(3)
    originals = [rng.integers(0, 256, (60, 90, 3), dtype=np.uint8), rng.integers(0, 256, (200, 50, 3), dtype=np.uint8)]
    inputs = proc(images=originals, return_tensors="pt")
    s = proc._resolve_settings({})
    for k, got in enumerate(vis.resized_images(inputs)):
        assert np.array_equal(np.asarray(got), proc._image_to_uint8(originals[k], k, s))


# ---- (b) PCA -------------------------------------------------------------------------------------------------
def two_halves(h=6, w=8, c=32, seed=0, noise=0.05):
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randn(c, generator=gen), torch.randn(c, generator=gen)
    fmap = torch.empty(h, w, c)
    fmap[:, : w // 2] = a
    fmap[:, w // 2 :] = b
    return fmap + noise * torch.randn(h, w, c, generator=gen)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pca_separates_two_halves(seed):
    rgb = vis.pca_rgb(two_halves(seed=seed))
    assert rgb.shape == (6, 8, 3) and rgb.dtype == np.uint8
    first = rgb[..., 0].astype(float)
    left, right = first[:, :4].ravel(), first[:, 4:].ravel()
    # the first component IS the left/right split: the halves sit at opposite ends of the red range...
    assert abs(left.mean() - right.mean()) > 200
    assert max(left.std(), right.std()) < 15
    assert left.max() < right.min() or right.max() < left.min()
    # ... and in full RGB the halves' means are far apart compared with the spread inside each half
    pix = rgb.reshape(-1, 3).astype(float)
    mask = np.zeros((6, 8), bool)
    mask[:, :4] = True
    mask = mask.ravel()
    between = np.linalg.norm(pix[mask].mean(0) - pix[~mask].mean(0))
    within = np.sqrt(((pix[mask] - pix[mask].mean(0)) ** 2).sum(1).mean())
    assert between > 200 and between > 2 * within


@pytest.mark.parametrize("c", [32, 100])  # more patches (48) than channels, and fewer: the two code paths
def test_pca_is_deterministic_and_sign_fixed(c):
    fmap = two_halves(c=c, seed=4)
    assert np.array_equal(vis.pca_rgb(fmap), vis.pca_rgb(fmap.clone()))
    assert np.array_equal(vis.pca_rgb(fmap), vis.pca_rgb(fmap.numpy().astype(np.float64)))
    # an independent reference: eigenvectors of the covariance (their signs are arbitrary too) with the documented
    # rule -- largest-|loading| entry positive -- and the documented robust 1 % / 99 % scaling
    x = fmap.reshape(-1, fmap.shape[-1]).double()
    x = x - x.mean(0)
    _, vecs = torch.linalg.eigh(x.T @ x)
    vecs = vecs[:, -3:].flip(1).T  # top 3 components, largest first
    vecs = vecs * torch.sign(vecs[torch.arange(3), vecs.abs().argmax(1)])[:, None]
    comps = x @ vecs.T
    lo, hi = torch.quantile(comps, 0.01, dim=0), torch.quantile(comps, 0.99, dim=0)
    ref = ((comps - lo) / (hi - lo)).clamp(0, 1).mul(255).round().reshape(6, 8, 3).numpy()
    assert np.abs(vis.pca_rgb(fmap).astype(float) - ref).max() <= 1


def test_pca_degenerate_inputs_are_grey():
    assert (vis.pca_rgb(torch.ones(2, 3, 5)) == 128).all()  # no variance at all
    one = vis.pca_rgb(torch.randn(1, 1, 8))
    assert one.shape == (1, 1, 3) and (one == 128).all()
    two = vis.pca_rgb(torch.tensor([[[0.0, 0.0], [1.0, 1.0]]]))  # 2 patches, 2 channels: one real component
    assert two.shape == (1, 2, 3) and sorted(two[0, :, 0].tolist()) == [0, 255] and (two[..., 1:] == 128).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pca_rank_two_data_leaves_the_third_channel_grey(dtype):
    """Rank-2 data stored in a low-precision dtype: its third singular value is rounding noise, not variance."""
    gen = torch.Generator().manual_seed(0)
    a, b, offset = (torch.randn(48, generator=gen) for _ in range(3))
    alpha, beta = torch.randn(6, 8, 1, generator=gen), torch.randn(6, 8, 1, generator=gen)
    fmap = (alpha * a + 0.5 * beta * b + offset).to(dtype)
    rgb = vis.pca_rgb(fmap)
    assert (rgb[..., 2] == 128).all()
    assert rgb[..., 0].min() < 10 and rgb[..., 0].max() > 245  # the two real components are drawn
    assert rgb[..., 1].min() < 10 and rgb[..., 1].max() > 245
    joint = vis.pca_rgb_joint([fmap, fmap[:3]])
    assert all((part[..., 2] == 128).all() for part in joint)


def test_pca_quantile_clipping_ignores_one_outlier_patch():
    """One extreme patch must not squeeze every other patch into a corner of the colour range."""
    h, w, c = 20, 20, 8
    ramp = torch.linspace(-1, 1, h * w)
    x = torch.zeros(h * w, c, dtype=torch.float64)
    x[:, 0] = ramp
    x[:, 1] = 0.3 * torch.sin(ramp * 7)
    x[:, 2] = 0.1 * torch.cos(ramp * 13)
    x[137, 0] = 100.0  # the outlier, far out along the first component
    fmap = x.reshape(h, w, c)
    red = vis.pca_rgb(fmap)[..., 0].reshape(-1).astype(int)
    others = np.delete(red, 137)
    assert red[137] == 255  # clipped at the top of the range
    assert others.min() <= 3 and others.max() >= 250  # the rest still spans ~0..255
    assert np.percentile(others, 75) - np.percentile(others, 25) > 100
    squeezed = np.delete(vis.pca_rgb(fmap, quantile=0.0)[..., 0].reshape(-1).astype(int), 137)
    assert squeezed.max() < 10  # without clipping the outlier takes the whole range


def test_joint_pca_gives_one_colour_per_feature_across_images(tmp_path):
    gen = torch.Generator().manual_seed(5)
    a, b, c = (torch.randn(24, generator=gen) for _ in range(3))
    m1 = torch.stack([a, b, c, a]).reshape(2, 2, 24)  # (2, 2) grid
    m2 = torch.stack([c, c, c, b, a, a]).reshape(3, 2, 24)  # (3, 2) grid
    r1, r2 = vis.pca_rgb_joint([m1, m2])
    assert r1.shape == (2, 2, 3) and r2.shape == (3, 2, 3)
    colour = {"a": r1[0, 0], "b": r1[0, 1], "c": r1[1, 0]}
    assert len({tuple(v) for v in colour.values()}) == 3
    assert (r1[1, 1] == colour["a"]).all() and (r2[0, 0] == colour["c"]).all()
    assert (r2[1, 1] == colour["b"]).all() and (r2[2, 0] == colour["a"]).all()
    imgs = [grid_image(2, 2, 5), grid_image(3, 2, 5)]
    views = vis.pca_views(imgs, [m1, m2], gap=2, save_to=tmp_path / "views.png")
    assert [v.size for v in views] == [(22, 10), (22, 15)]
    assert reopen(tmp_path / "views.png")[2] == (22, 10 + 2 + 15)
    assert np.array_equal(np.asarray(views[1])[::5, 12::5], r2)
    alone = vis.pca_views(imgs, [m1, m2], joint=False)
    assert np.array_equal(np.asarray(alone[1])[:, 12:], np.asarray(vis.pca_view(imgs[1], m2))[:, 12:])
    with pytest.raises(ValueError, match="one channel count"):
        vis.pca_rgb_joint([m1, torch.randn(2, 2, 5)])
    with pytest.raises(ValueError, match="got 2 `images` and 1 `feature_maps`"):
        vis.pca_views(imgs, [m1])
    mismatch = r"`feature_maps\[0\]` is a 2x2 grid that does not match `images\[0\]`: `images\[0\]` is 10x15"
    with pytest.raises(ValueError, match=mismatch):
        vis.pca_views(imgs[::-1], [m1, m2])


@pytest.mark.parametrize("grid", GRIDS)
def test_pca_view_size_and_png(tmp_path, grid):
    h, w = grid
    img = grid_image(h, w, 14)
    fmap = torch.randn(h, w, 16)
    pic = vis.pca_view(img, fmap, gap=6, save_to=tmp_path / "pca.png")
    assert pic.size == (2 * w * 14 + 6, h * 14)
    assert reopen(tmp_path / "pca.png") == ("PNG", "RGB", pic.size)
    # right panel = the PCA picture upsampled nearest-neighbour: every 14x14 patch is one colour
    right = np.asarray(pic)[:, w * 14 + 6 :]
    assert np.array_equal(right[::14, ::14], vis.pca_rgb(fmap))
    assert np.array_equal(right, np.repeat(np.repeat(vis.pca_rgb(fmap), 14, 0), 14, 1))


def test_pca_errors():
    with pytest.raises(ValueError, match=r"`feature_map` must have shape \(h, w, C\).*\(12, 16\)"):
        vis.pca_rgb(torch.randn(12, 16))
    with pytest.raises(ValueError, match="NaN"):
        vis.pca_rgb(torch.full((2, 2, 3), float("nan")))
    with pytest.raises(ValueError, match="`quantile`"):
        vis.pca_rgb(torch.randn(2, 2, 3), quantile=0.5)
    with pytest.raises(ValueError, match=r"`feature_map` is a 5x3 grid that does not match `image`"):
        vis.pca_view(grid_image(3, 5, 14), torch.randn(5, 3, 8))


# ---- (c) pack strip ------------------------------------------------------------------------------------------
def segments(row):
    """[(start, end, colour)] runs of equal colour along one pixel row."""
    runs, start = [], 0
    for x in range(1, len(row) + 1):
        if x == len(row) or (row[x] != row[start]).any():
            runs.append((start, x, tuple(row[start])))
            start = x
    return runs


@pytest.mark.parametrize("width,height", [(800, 72), (333, 50), (97, 20)])
def test_pack_strip_boundaries_at_scaled_cu_seqlens(tmp_path, width, height):
    grids = [(3, 5), (7, 2), (16, 16), (1, 1), (4, 9)]
    lengths = [h * w for h, w in grids]
    cu = np.concatenate([[0], np.cumsum(lengths)])
    pic = vis.pack_strip(torch.tensor(cu, dtype=torch.int32), grids, width=width, height=height,
                         save_to=tmp_path / "strip.png")
    assert pic.size == (width, height)
    assert reopen(tmp_path / "strip.png") == ("PNG", "RGB", (width, height))
    runs = segments(np.asarray(pic)[height // 2])
    edges = [round(c * width / cu[-1]) for c in cu]
    for i in range(1, len(edges)):  # the (1, 1) image is under one column wide at 97 px: it still gets one
        edges[i] = max(edges[i], edges[i - 1] + 1)
    assert edges[-1] == width
    want = [(a, b, vis.PALETTE[i % 10]) for i, (a, b) in enumerate(zip(edges, edges[1:]))]
    assert runs == want
    assert runs[0][0] == 0 and runs[-1][1] == width


@pytest.mark.parametrize(
    "cu,width",
    [
        ([0, 1, 100000], 800),  # a 1-token image first
        ([0, 100000, 100001, 100002], 800),  # two tiny images last: the edges before them move left
        (np.cumsum([0] + [50000, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 50000, 2, 3]).tolist(), 300),  # > 10 tiny ones
        (list(range(0, 41)), 40),  # exactly one column each
    ],
)
def test_pack_strip_every_image_gets_a_column(cu, width):
    k = len(cu) - 1
    runs = segments(np.asarray(vis.pack_strip(cu, width=width, height=60))[30])
    assert len(runs) == k, "every image is visible"
    assert [colour for _, _, colour in runs] == [vis.PALETTE[i % 10] for i in range(k)]
    assert all(b > a for a, b, _ in runs) and runs[0][0] == 0 and runs[-1][1] == width
    assert all(r[2] != s[2] for r, s in zip(runs, runs[1:])), "neighbours share a colour"
    if k > 2:
        with pytest.raises(ValueError, match=f"too narrow for {k} images"):
            vis.pack_strip(cu, width=k - 1)


def test_pack_strip_always_shows_the_total(monkeypatch):
    # the helper: the last label is placed first, then the others left to right where they do not overlap
    assert pictures_pack.place_labels([0, 635, 796, 799], [6, 24, 24, 24], 800) == [0, 623, None, 776]
    assert pictures_pack.place_labels([0, 20, 40], [6, 6, 6], 100) == [0, 17, 37]
    assert pictures_pack.place_labels([0, 30, 34], [6, 6, 6], 100) == [0, None, 31]
    assert pictures_pack.place_labels([0, 60], [6, 200], 100) == [0, None]  # wider than the picture
    # and the strip itself: record what gets written
    drawn = []
    put_text = pictures_pack.put_text

    def recording_put_text(draw, left, top, text, *args):
        drawn.append(text)
        put_text(draw, left, top, text, *args)

    monkeypatch.setattr(pictures_pack, "put_text", recording_put_text)
    vis.pack_strip([0, 2700, 3384, 3400], width=800)
    assert "3400" in drawn and "0" in drawn and "2700" in drawn and "3384" not in drawn  # 3384 would overlap 3400


def test_pack_strip_labels_and_errors():
    pic = vis.pack_strip([0, 10, 30], labels=["cat", "dog"], width=200)
    assert pic.size == (200, 72)
    assert (np.asarray(pic)[:20] != 255).any()  # some label text above the bar
    with pytest.raises(ValueError, match="strictly increasing"):
        vis.pack_strip([0, 10, 10])
    with pytest.raises(ValueError, match="strictly increasing"):
        vis.pack_strip([1, 10])
    with pytest.raises(ValueError, match=r"`grid_hw\[1\]` = 2x2 = 4 patches, but `cu_seqlens` gives image 1 20"):
        vis.pack_strip([0, 10, 30], [(2, 5), (2, 2)])
    with pytest.raises(ValueError, match="`labels` has 1 entries"):
        vis.pack_strip([0, 10, 30], labels=["a"])
    with pytest.raises(ValueError, match="`cu_seqlens` must hold integers"):
        vis.pack_strip(torch.tensor([0.0, 2.5]))
    with pytest.raises(ValueError, match="`width`"):
        vis.pack_strip([0, 4], width=1)


def test_bitmap_font_fallback(monkeypatch):
    """Pillow < 10.1 has no `load_default(size=)`: the fixed bitmap font is used and every picture still works."""
    bitmap = getattr(PIL.ImageFont, "load_default_imagefont", None)
    if bitmap is None:
        pytest.skip("this Pillow has no separate bitmap default font")

    def old_load_default(*args, **kwargs):
        if args or kwargs:
            raise TypeError("load_default() takes no arguments")
        return bitmap()

    monkeypatch.setattr(PIL.ImageFont, "load_default", old_load_default)
    assert isinstance(pictures_draw.load_font(12), PIL.ImageFont.ImageFont)
    inputs, _ = fake_inputs(GRIDS, 14)
    assert [p.size for p in vis.patch_grids(inputs, scale=2)] == [(140, 84), (56, 196)]
    strip = vis.pack_strip(inputs["cu_seqlens"], inputs["image_grid_hw"], width=300)
    assert strip.size == (300, 72) and (np.asarray(strip)[:20] != 255).any()


def test_stack_and_save_png(tmp_path):
    a, b = grid_image(3, 5, 4), grid_image(7, 2, 4)
    assert vis.hstack([a, b], gap=3).size == (20 + 3 + 8, 28)
    assert vis.vstack([a, b], gap=0).size == (20, 12 + 28)
    with pytest.raises(ValueError, match=".png"):
        vis.save_png(a, tmp_path / "x.jpg")


# ---- the README figures are up to date --------------------------------------------------------------------------
def test_make_figures_script(tmp_path):
    """Runs `python scripts/make_figures.py` as a user would (a fresh process, HF_HOME pointed into tmp_path) and
    compares the pictures with the committed docs/*.png pixel for pixel; the remote code it loads must not land in
    the Hugging Face modules cache."""
    hf_home = tmp_path / "hf_home"
    env = {k: v for k, v in os.environ.items() if k != "HF_MODULES_CACHE"}
    env.update(HF_HOME=str(hf_home), TMPDIR=str(tmp_path))
    out = tmp_path / "figures"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_figures.py"), "--out", str(out)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert not (hf_home / "modules").exists(), "make_figures.py wrote to the Hugging Face modules cache"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("figures", "hf_home")]
    assert not leftovers, f"make_figures.py left temporary files behind: {leftovers}"
    for name in ("patch_grid.png", "pca.png", "pack_strip.png"):
        assert reopen(out / name)[:2] == ("PNG", "RGB") and (out / name).stat().st_size < 200_000
        with PIL.Image.open(out / name) as new, PIL.Image.open(ROOT / "docs" / name) as old:
            new_px, old_px = np.asarray(new.convert("RGB")), np.asarray(old.convert("RGB"))
        stale = f"docs/{name} is out of date: rerun `python scripts/make_figures.py` and commit docs/*.png"
        assert new_px.shape == old_px.shape, f"{stale} (size {old_px.shape} -> {new_px.shape})"
        assert np.array_equal(new_px, old_px), f"{stale} ({(new_px != old_px).any(-1).sum()} pixels differ)"


# ---- (d) attention maps --------------------------------------------------------------------------------------
def fake_attentions(grids, heads=3, layers=2, seed=0):
    """`output.attentions`-shaped maps: a tuple per layer of per-image (heads, n, n) softmax rows."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(
        [torch.softmax(3 * torch.randn(heads, h * w, h * w, generator=gen), dim=-1) for h, w in grids]
        for _ in range(layers)
    )


def cell_centres(pic, grid, cell):
    """Brightness (R + G + B) at the centre pixel of every cell, as an (h, w) array."""
    a = np.asarray(pic).astype(int)
    h, w = grid
    return np.array([[a[i * cell + cell // 2, j * cell + cell // 2].sum() for j in range(w)] for i in range(h)])


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("scale", [1, 3])
def test_attention_map_size_and_png(tmp_path, grid, scale):
    h, w = grid
    p = 14
    attn = fake_attentions([(2, 2), grid])
    path = tmp_path / "attn" / "map.png"
    pic = vis.attention_map(grid_image(h, w, p), attn, patch=(h - 1, w - 1), image_index=1, scale=scale, save_to=path)
    assert pic.mode == "RGB" and pic.size == (w * p * scale, h * p * scale)
    assert reopen(path) == ("PNG", "RGB", pic.size)
    explicit = vis.attention_map(grid_image(h, w, p), attn, (h - 1, w - 1), -1, 1, grid_hw=grid, scale=scale)
    assert np.array_equal(np.asarray(explicit), np.asarray(pic))


def test_attention_grid_values():
    grid = (3, 5)
    attn = fake_attentions([(2, 2), grid], heads=4)
    probs = attn[0][1]
    mean = vis.attention_grid(attn, grid, (1, 2), layer=0, image_index=1)
    assert mean.shape == grid and mean.dtype == np.float64
    np.testing.assert_allclose(mean.reshape(-1), probs[:, 1 * 5 + 2].double().mean(0).numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(mean.sum(), 1.0, atol=1e-6)
    one = vis.attention_grid(attn, grid, (1, 2), layer=0, image_index=1, head=2)
    np.testing.assert_allclose(one.reshape(-1), probs[2, 7].double().numpy(), rtol=0, atol=1e-12)
    last = vis.attention_grid(attn, grid, (0, 0), image_index=-1)  # Python indexing: last layer, last image
    np.testing.assert_allclose(last.reshape(-1), attn[-1][1][:, 0].double().mean(0).numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("head", [None, 0, 2])
def test_attention_map_hottest_cell_and_marker(head):
    grid, p, scale = (3, 5), 4, 4
    cell = p * scale
    attn = fake_attentions([grid], heads=3, seed=3)
    grey = PIL.Image.new("RGB", (5 * p, 3 * p), (128, 128, 128))  # a flat image: only the heat map varies
    patch = (2, 1)
    pic = vis.attention_map(grey, attn, patch=patch, head=head, scale=scale)
    values = vis.attention_grid(attn, grid, patch, head=head)
    bright = cell_centres(pic, grid, cell)
    # the hot scale's brightness rises strictly with the value: the brightest cell is the map's maximum and the
    # order of all cells is the order of their attention
    assert np.unravel_index(bright.argmax(), grid) == np.unravel_index(values.argmax(), grid)
    order = np.argsort(values.reshape(-1), kind="stable")
    assert (np.diff(bright.reshape(-1)[order]) >= 0).all()
    # the query patch is outlined in MARKER, on all four sides; no other cell's corner is
    a = np.asarray(pic)
    top, left = patch[0] * cell, patch[1] * cell
    for y, x in [(top, left), (top, left + cell - 1), (top + cell - 1, left), (top + cell - 1, left + cell - 1),
                 (top, left + cell // 2), (top + cell // 2, left)]:  # fmt: skip
        assert tuple(a[y, x]) == vis.MARKER, (y, x)
    corners = [(i * cell, j * cell) for i in range(grid[0]) for j in range(grid[1]) if (i, j) != patch]
    assert all(tuple(a[y, x]) != vis.MARKER for y, x in corners)
    assert tuple(a[top + cell // 2, left + cell // 2]) != vis.MARKER  # the inside keeps its heat colour


def test_attention_map_alpha_zero_is_the_image():
    img = grid_image(3, 5, 4)
    pic = vis.attention_map(img, fake_attentions([(3, 5)]), patch=(0, 0), alpha=0.0, scale=2)
    base = np.asarray(img.resize(pic.size, PIL.Image.NEAREST))
    marker = np.all(np.asarray(pic) == vis.MARKER, axis=-1)
    assert marker[:8, :8].any() and not marker[8:, 8:].any()
    assert np.array_equal(np.asarray(pic)[~marker], base[~marker])


def test_attention_map_from_an_eager_model():
    config = tiny_config(rope=True)
    model = make_model(config, attn="eager")
    grids = [(6, 6), (2, 5)]
    pack = make_pack(grids, config)
    with torch.no_grad():
        out = model(**pack, output_attentions=True)
    image = vis.resized_images(pack)[1]
    pic = vis.attention_map(image, out, patch=(1, 4), image_index=1, head=1, scale=2)  # the output object works too
    assert pic.size == (5 * 4 * 2, 2 * 4 * 2)
    values = vis.attention_grid(out.attentions, grids[1], (1, 4), image_index=1, head=1)
    np.testing.assert_allclose(values.reshape(-1), out.attentions[-1][1][1, 9].double().numpy(), atol=1e-12)


def test_attention_map_errors_name_the_argument():
    grid, p = (3, 5), 4
    img = grid_image(*grid, p)
    attn = fake_attentions([(2, 2), grid], heads=3, layers=2)
    cases = [
        (dict(patch=(3, 0)), r"`patch` must be a \(row, col\) pair of integers inside the 3x5 grid, got \(3, 0\)"),
        (dict(patch=(0, 5)), r"`patch`.*3x5"),
        (dict(patch=(-1, 0)), r"`patch`"),
        (dict(patch=(0.0, 1)), r"`patch`"),
        (dict(patch=5), r"`patch`"),
        (dict(patch=(1, 1), layer=2), r"`layer` must be an integer in \[-2, 2\) \(2 layers\), got 2"),
        (dict(patch=(1, 1), layer=-3), r"`layer`"),
        (dict(patch=(1, 1), layer="last"), r"`layer`"),
        (dict(patch=(1, 1), image_index=2), r"`image_index` must be an integer in \[-2, 2\) \(2 images in the pack\)"),
        (dict(patch=(1, 1), head=3), r"`head` must be an integer in \[-3, 3\) \(3 heads\), got 3"),
        (dict(patch=(1, 1), alpha=1.5), r"`alpha`"),
        (dict(patch=(1, 1), scale=0), r"`scale`"),
    ]
    for kwargs, message in cases:
        kwargs.setdefault("image_index", 1)
        with pytest.raises(ValueError, match=message):
            vis.attention_map(img, attn, **kwargs)
    with pytest.raises(ValueError, match=r"`attentions` must be the model's `output.attentions`.*eager"):
        vis.attention_map(img, None, patch=(0, 0))  # what sdpa would have given
    with pytest.raises(ValueError, match=r"`image` is 20x12 \(WxH\), which is not a grid of 4 square patches"):
        vis.attention_map(img, attn, patch=(0, 0), image_index=0)  # the 2x2 image's map over the 3x5 image
    with pytest.raises(ValueError, match=r"covers 4 patches, not the 15 of `grid_hw`"):
        vis.attention_grid(attn, grid, (0, 0), image_index=0)
    with pytest.raises(ValueError, match=r"`attentions\[0\]\[0\]` must be a \(heads, n, n\) map"):
        vis.attention_grid(([torch.zeros(4, 4)],), (2, 2), (0, 0), layer=0)
