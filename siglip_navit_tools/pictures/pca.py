# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""Picture (b), the PCA of patch features: `pca_rgb` (one map) and `pca_rgb_joint` (one PCA over several maps) as
uint8 colours, with their argument checks, the top-components solver and the sign and scaling rules; `pca_view` /
`pca_views` put the colours beside the resized images.

Must not know where the maps came from (any `(h, w, C)` tensor or array is fine).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import numpy as np
import PIL.Image
import torch

from ._draw import NEAREST, ImageLike, PathLike, as_rgb, cell_size, check_gap, finish, hstack, save_png, vstack


def as_feature_map(feature_map: Any, name: str) -> tuple[torch.Tensor, float]:
    """-> (the map in float64, the relative precision of the values as given: eps of their float dtype, or of
    float64 for integers)."""
    if not isinstance(feature_map, (torch.Tensor, np.ndarray)):
        raise ValueError(f"`{name}` must be an (h, w, C) tensor or array, got {type(feature_map).__name__}")
    x = torch.as_tensor(feature_map).detach().cpu()
    if x.dim() != 3 or min(x.shape) == 0:
        raise ValueError(f"`{name}` must have shape (h, w, C) with no zero sizes, got {tuple(x.shape)}")
    if not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"`{name}` must hold numbers, got dtype {x.dtype}")
    eps = torch.finfo(x.dtype if x.is_floating_point() else torch.float64).eps
    x = x.to(torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError(f"`{name}` contains NaN or infinite values")
    return x, eps


def check_quantile(quantile: float) -> float:
    """The `quantile` argument: a number in [0, 0.5) -> float."""
    if not isinstance(quantile, (int, float)) or not 0.0 <= float(quantile) < 0.5:
        raise ValueError(f"`quantile` must be in [0, 0.5), got {quantile!r}")
    return float(quantile)


def top_components(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values (k,) and right singular vectors (k, C), largest first, of a centred (n, C) float64 matrix,
    from the eigendecomposition of the smaller of the C x C covariance and the n x n Gram matrix (no n x C factor
    is ever built, as a full SVD would)."""
    n, c = x.shape
    if c <= n:
        lam, vecs = torch.linalg.eigh(x.T @ x)  # ascending
        lam, vh = lam.flip(0)[:k], vecs.flip(1)[:, :k].T
        return lam.clamp_min(0).sqrt(), vh
    lam, u = torch.linalg.eigh(x @ x.T)
    lam, u = lam.flip(0)[:k], u.flip(1)[:, :k]
    s = lam.clamp_min(0).sqrt()
    vh = (x.T @ u / torch.where(s > 0, s, torch.ones_like(s))).T  # rows with s == 0 are never used
    return s, vh


def pca_uint8(x: torch.Tensor, quantile: float, eps: float) -> torch.Tensor:
    """(n, C) float64 -> (n, 3) uint8: centre, top components, sign rule, robust per-component scaling (see
    `pca_rgb`). `eps`: the relative precision of the values as given (their dtype's machine epsilon)."""
    n, c = x.shape
    raw_norm = torch.linalg.vector_norm(x)
    x = x - x.mean(dim=0, keepdim=True)
    out = torch.full((n, 3), 128.0, dtype=torch.float64)
    k = min(3, n, c)
    if k > 0 and x.abs().max() > 0:
        s, vh = top_components(x, k)
        # "no variance": a singular value within the input's rounding error (each value is off by <= eps * |value|,
        # so by Weyl's inequality a direction the data does not have shows up at most at eps * ||x||_F), or within
        # what the float64 covariance / eigendecomposition can resolve
        tol = max(eps * raw_norm.item(), math.sqrt(max(n, c) * torch.finfo(torch.float64).eps)
                  * torch.linalg.vector_norm(x).item())
        # sign: the largest-|loading| entry of each component is positive
        signs = torch.sign(vh[torch.arange(k), vh.abs().argmax(dim=1)])
        signs[signs == 0] = 1.0
        comps = (x @ vh.T) * signs
        for i in range(k):
            if s[i] <= tol:
                continue  # no variance along this direction: stays grey
            col = comps[:, i]
            lo, hi = torch.quantile(col, quantile), torch.quantile(col, 1.0 - quantile)
            if hi - lo <= col.abs().max() * 1e-12:
                continue
            out[:, i] = ((col - lo) / (hi - lo)).clamp(0, 1) * 255.0
    return out.round().to(torch.uint8)


def pca_rgb(feature_map: Union[torch.Tensor, np.ndarray], *, quantile: float = 0.01) -> np.ndarray:
    """The first three principal components of an `(h, w, C)` feature map as an `(h, w, 3)` uint8 RGB image.

    The `h * w` feature vectors are centred and their principal components found in float64 (eigendecomposition
    of the C x C covariance, or of the n x n Gram matrix when there are fewer patches than channels); component k
    (k = 0, 1, 2) becomes channel k (R, G, B). Each component's sign is fixed deterministically (its loading
    vector's largest-|value| entry is made positive) and each is scaled to 0..255 independently with a robust
    min / max (the `quantile` and `1 - quantile` quantiles; values beyond are clipped). Components that do not
    exist (fewer than 3 patches or channels) or carry no variance are mid-grey (128); "no variance" means a
    singular value within the rounding error of the input's dtype (`eps * ||map||_F`: float32, bfloat16 and float16
    maps each get their own), or below what the float64 computation resolves.

    Args:
        feature_map: `(h, w, C)` tensor or array, e.g. one entry of `processor.unpack(...)`.
        quantile: the fraction clipped at each end of every component's range (0 <= quantile < 0.5).

    Returns:
        an `(h, w, 3)` uint8 numpy array.
    """
    q = check_quantile(quantile)
    x, eps = as_feature_map(feature_map, "feature_map")
    h, w, c = x.shape
    return pca_uint8(x.reshape(h * w, c), q, eps).reshape(h, w, 3).numpy()


def pca_rgb_joint(
    feature_maps: Sequence[Union[torch.Tensor, np.ndarray]], *, quantile: float = 0.01
) -> list[np.ndarray]:
    """`pca_rgb` with ONE PCA fitted on the patches of all maps together, so a colour means the same feature in every
    image (the per-image `pca_rgb` picks each image's own axes and colours).

    Args:
        feature_maps: `(h_i, w_i, C)` maps with the same C (e.g. the list `processor.unpack(...)` returns).
        quantile: see `pca_rgb` (the range is taken over all patches).

    Returns:
        one `(h_i, w_i, 3)` uint8 array per map.
    """
    q = check_quantile(quantile)
    if not isinstance(feature_maps, (list, tuple)) or not feature_maps:
        raise ValueError("`feature_maps` must be a non-empty list of (h, w, C) maps")
    maps, epss = zip(*(as_feature_map(m, f"feature_maps[{i}]") for i, m in enumerate(feature_maps)))
    channels = {m.shape[2] for m in maps}
    if len(channels) != 1:
        raise ValueError(f"`feature_maps` must share one channel count C, got {[m.shape[2] for m in maps]}")
    rgb = pca_uint8(torch.cat([m.reshape(-1, m.shape[2]) for m in maps]), q, max(epss))
    sizes = [m.shape[0] * m.shape[1] for m in maps]
    return [part.reshape(m.shape[0], m.shape[1], 3).numpy() for part, m in zip(torch.split(rgb, sizes), maps)]


def _pca_panel(img: PIL.Image.Image, rgb: np.ndarray, gap: int, name: str, image_name: str) -> PIL.Image.Image:
    h, w = rgb.shape[:2]
    try:
        cell_size(img, (h, w), None, image_name)
    except ValueError as err:
        raise ValueError(f"`{name}` is a {h}x{w} grid that does not match `{image_name}`: {err}") from None
    pca = PIL.Image.fromarray(rgb).resize(img.size, NEAREST)
    return hstack([img, pca], gap=gap)


def pca_view(
    image: ImageLike,
    feature_map: Union[torch.Tensor, np.ndarray],
    *,
    gap: int = 8,
    quantile: float = 0.01,
    save_to: Optional[PathLike] = None,
) -> PIL.Image.Image:
    """The input image side by side with the PCA picture of its features (`pca_rgb`), upsampled nearest-neighbour
    to the image's size so every patch stays a visible square.

    Args:
        image: the resized image the model saw (see `resized_images`); its size must be the feature map's `(h, w)`
            grid times the patch size.
        feature_map: `(h, w, C)` features of that image (one entry of `processor.unpack(...)`).
        gap: white pixels between the two panels.
        quantile: see `pca_rgb`.
        save_to: also write the picture to this PNG path.

    Returns:
        an RGB image of `(2 * W + gap) x H` pixels (W x H: the image's size).
    """
    img = as_rgb(image, "image")
    gap = check_gap(gap)
    return finish(_pca_panel(img, pca_rgb(feature_map, quantile=quantile), gap, "feature_map", "image"), save_to)


def pca_views(
    images: Sequence[ImageLike],
    feature_maps: Sequence[Union[torch.Tensor, np.ndarray]],
    *,
    joint: bool = True,
    gap: int = 8,
    quantile: float = 0.01,
    save_to: Optional[PathLike] = None,
) -> list[PIL.Image.Image]:
    """`pca_view` for several images; with `joint=True` (default) the colours come from one PCA over all of them
    (`pca_rgb_joint`), so they can be compared across images.

    Args:
        images: the resized images (`resized_images(inputs)`).
        feature_maps: their `(h, w, C)` maps (`processor.unpack(...)`), in the same order.
        joint: one PCA for all images (True) or one per image (False, as `pca_view`).
        gap, quantile: see `pca_view`.
        save_to: also write the pictures one below the other (`vstack`) to this PNG path.

    Returns:
        one `(2 * W_i + gap) x H_i` picture per image.
    """
    if not isinstance(images, (list, tuple)) or not isinstance(feature_maps, (list, tuple)):
        raise ValueError("`images` and `feature_maps` must be lists")
    if len(images) != len(feature_maps) or not images:
        raise ValueError(f"got {len(images)} `images` and {len(feature_maps)} `feature_maps`; pass one map per image")
    gap = check_gap(gap)
    imgs = [as_rgb(im, f"images[{i}]") for i, im in enumerate(images)]
    if joint:
        rgbs = pca_rgb_joint(feature_maps, quantile=quantile)
    else:
        rgbs = [pca_rgb(m, quantile=quantile) for m in feature_maps]
    pictures = [
        _pca_panel(im, rgb, gap, f"feature_maps[{i}]", f"images[{i}]") for i, (im, rgb) in enumerate(zip(imgs, rgbs))
    ]
    if save_to is not None:
        save_png(vstack(pictures, gap=gap), save_to)
    return pictures
