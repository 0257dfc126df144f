# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""Small shared pieces of the pictures: argument checks with messages that name the argument, PIL's built-in font
and text placement, stacking images, and PNG output.

Owns no picture of its own and no model knowledge; must not know the patch layout (the processor owns it) and must
not download anything (fonts are PIL's built-in ones).
"""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import torch

PathLike = Union[str, Path]
ImageLike = Union[PIL.Image.Image, np.ndarray]
Color = tuple[int, int, int]

WHITE: Color = (255, 255, 255)
NEAREST = PIL.Image.Resampling.NEAREST if hasattr(PIL.Image, "Resampling") else PIL.Image.NEAREST


# ---- output ------------------------------------------------------------------------------------------------------
def save_png(image: PIL.Image.Image, path: PathLike) -> Path:
    """Write `image` as a PNG (parent folders are created) and return the path."""
    if not isinstance(image, PIL.Image.Image):
        raise ValueError(f"save_png: `image` must be a PIL image, got {type(image).__name__}")
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"save_png: `path` must end in .png, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", optimize=True)
    return path


def finish(image: PIL.Image.Image, save_to: Optional[PathLike]) -> PIL.Image.Image:
    """`image`, also written to `save_to` (a PNG path) unless that is None."""
    if save_to is not None:
        save_png(image, save_to)
    return image


# ---- text --------------------------------------------------------------------------------------------------------
def load_font(size: int) -> PIL.ImageFont.ImageFont:
    """PIL's built-in font (no download); sized where this Pillow supports it (>= 10.1), else the fixed bitmap."""
    try:
        return PIL.ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: no size argument
        return PIL.ImageFont.load_default()


def text_size(draw: PIL.ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    """Width and height of the inked box of `text` in `font`."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def put_text(draw: PIL.ImageDraw.ImageDraw, left: float, top: float, text: str, font, fill) -> None:
    """Draw `text` with its inked box's top-left corner at (left, top) (no `anchor=`: bitmap fonts lack it)."""
    l, t, _, _ = draw.textbbox((0, 0), text, font=font)
    draw.text((round(left - l), round(top - t)), text, font=font, fill=fill)


# ---- argument checks ---------------------------------------------------------------------------------------------
_IMAGE_KINDS = "a PIL image, or an (H, W, 3) or (H, W) uint8 numpy array or torch tensor"


def as_rgb(image: Any, name: str) -> PIL.Image.Image:
    """A PIL image (converted to RGB) or an (H, W, 3) / (H, W) uint8 array or tensor -> RGB PIL image."""
    if isinstance(image, PIL.Image.Image):
        if image.width == 0 or image.height == 0:
            raise ValueError(f"`{name}` is an empty image ({image.width}x{image.height})")
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8:  # checked first: .numpy() itself fails on bfloat16 with a TypeError
            raise ValueError(
                f"`{name}` must be {_IMAGE_KINDS}; got a {image.dtype} tensor of shape {tuple(image.shape)}"
            )
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
            raise ValueError(
                f"`{name}` must be {_IMAGE_KINDS}; got shape {image.shape} and dtype {image.dtype}"
            )
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise ValueError(f"`{name}` is empty (shape {image.shape})")
        return PIL.Image.fromarray(image).convert("RGB")
    raise ValueError(f"`{name}` must be {_IMAGE_KINDS}; got {type(image).__name__}")


def check_int(value: Any, name: str, least: int, allow_none: bool = False) -> Optional[int]:
    """An integer >= `least` (Python or numpy integers; not bool) -> int; ValueError otherwise."""
    if value is None and allow_none:
        return None
    if not isinstance(value, numbers.Integral) or isinstance(value, (bool, np.bool_)) or value < least:
        kind = f"an integer >= {least}" + (" or None" if allow_none else "")
        raise ValueError(f"`{name}` must be {kind}, got {value!r}")
    return int(value)


def check_gap(gap: Any) -> int:
    """The `gap` argument: white pixels between panels, an integer >= 0."""
    return check_int(gap, "gap", 0)


def as_int_list(values: Any, name: str) -> list[int]:
    """A 1-D sequence, tensor or array of integers -> list of int; ValueError for floats that are not integers."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        if values.is_floating_point():
            raise ValueError(f"`{name}` must hold integers, got a {values.dtype} tensor")
        values = values.tolist()
    elif isinstance(values, np.ndarray):
        if not np.issubdtype(values.dtype, np.integer):
            raise ValueError(f"`{name}` must hold integers, got an array of dtype {values.dtype}")
        values = values.tolist()
    try:
        out = [int(v) for v in values]
    except (TypeError, ValueError) as err:
        raise ValueError(f"`{name}` must be a 1-D sequence of integers: {err}") from err
    for v, orig in zip(out, values):
        if isinstance(orig, float) and orig != v:
            raise ValueError(f"`{name}` must hold integers, got {orig!r}")
    return out


def as_grid(grid_hw: Any, name: str = "grid_hw") -> tuple[int, int]:
    """A `(rows, cols)` pair of positive integers (sequence, tensor or array) -> tuple of int."""
    if isinstance(grid_hw, (torch.Tensor, np.ndarray)):
        grid_hw = grid_hw.tolist()
    try:
        h, w = (int(v) for v in grid_hw)
    except (TypeError, ValueError) as err:
        raise ValueError(f"`{name}` must be a (rows, cols) pair of positive integers, got {grid_hw!r}") from err
    if h <= 0 or w <= 0:
        raise ValueError(f"`{name}` must be a (rows, cols) pair of positive integers, got {(h, w)}")
    return h, w


def as_grid_list(grid_hw: Any, name: str = "grid_hw") -> list[tuple[int, int]]:
    """A non-empty `(k, 2)` list / tensor / array of grids -> list of `(rows, cols)`."""
    if isinstance(grid_hw, (torch.Tensor, np.ndarray)):
        grid_hw = grid_hw.tolist()
    if not isinstance(grid_hw, (list, tuple)) or len(grid_hw) == 0:
        raise ValueError(f"`{name}` must be a non-empty (k, 2) list / tensor of (rows, cols), got {grid_hw!r}")
    return [as_grid(hw, f"{name}[{i}]") for i, hw in enumerate(grid_hw)]


def get_input(inputs: Any, key: str) -> Any:
    """`inputs[key]` of the processor's output; ValueError saying what `inputs` must be otherwise."""
    try:
        return inputs[key]
    except (KeyError, TypeError, IndexError) as err:
        raise ValueError(
            f"`inputs` must be the image processor's output (a mapping with {key!r}); it has no {key!r}"
        ) from err


def cell_size(image: PIL.Image.Image, grid: tuple[int, int], patch_size: Optional[int], name: str) -> int:
    """The patch size in pixels of `image` for a `grid` of patches; ValueError unless the image IS that grid."""
    h, w = grid
    if patch_size is not None:
        if int(patch_size) <= 0:
            raise ValueError(f"`patch_size` must be a positive integer, got {patch_size!r}")
        p = int(patch_size)
        if image.size != (w * p, h * p):
            raise ValueError(
                f"`{name}` is {image.width}x{image.height} (WxH) but a {h}x{w} (rows x cols) grid of {p} px patches "
                f"is {w * p}x{h * p}; pass the processor's resized image (see resized_images())"
            )
        return p
    if image.width % w or image.height % h or image.width // w != image.height // h:
        raise ValueError(
            f"`{name}` is {image.width}x{image.height} (WxH), which is not a {h}x{w} (rows x cols) grid of square "
            "patches; pass the processor's resized image (see resized_images())"
        )
    return image.width // w


# ---- layout ------------------------------------------------------------------------------------------------------
def stack(images: Sequence[ImageLike], gap: int, background: Color, horizontal: bool) -> PIL.Image.Image:
    """Images side by side (top-aligned) or one below the other (left-aligned), `gap` px apart on `background`."""
    if not isinstance(images, (list, tuple)) or not images:
        raise ValueError("`images` must be a non-empty list of images")
    gap = check_gap(gap)
    imgs = [as_rgb(im, f"images[{i}]") for i, im in enumerate(images)]
    if horizontal:
        size = (sum(im.width for im in imgs) + gap * (len(imgs) - 1), max(im.height for im in imgs))
    else:
        size = (max(im.width for im in imgs), sum(im.height for im in imgs) + gap * (len(imgs) - 1))
    canvas = PIL.Image.new("RGB", size, tuple(background))
    offset = 0
    for im in imgs:
        canvas.paste(im, (offset, 0) if horizontal else (0, offset))
        offset += (im.width if horizontal else im.height) + gap
    return canvas


# ---- layout (public: re-exported by the package) ------------------------------------------------------------
def hstack(images: Sequence[ImageLike], *, gap: int = 8, background: Color = WHITE) -> PIL.Image.Image:
    """Images side by side (top-aligned) on a `background` canvas, `gap` pixels apart."""
    return stack(images, gap, background, horizontal=True)


def vstack(images: Sequence[ImageLike], *, gap: int = 8, background: Color = WHITE) -> PIL.Image.Image:
    """Images one below the other (left-aligned) on a `background` canvas, `gap` pixels apart."""
    return stack(images, gap, background, horizontal=False)
