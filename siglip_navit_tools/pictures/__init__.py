# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""Pictures of a SigLIP-NaViT pack: the ONE place they live (`import visualize` at the repo root is this package's
public names under a notebook-friendly name). Not remote code (not downloaded with a model); torch, numpy and PIL
only, drawn with `PIL.ImageDraw` and PIL's built-in font (nothing is downloaded). Every picture function returns a
`PIL.Image.Image` (RGB) and, with `save_to=path`, also writes it as a PNG.

    inputs = processor(images=[a, b, c], return_tensors="pt")
    maps = processor.unpack(model(**inputs).last_hidden_state, inputs)
    grids = patch_grids(inputs)                                  # (a) patch grid + position ids per resized image
    views = pca_views(resized_images(inputs), maps)               # (b) PCA of the features, beside each image
    strip = pack_strip(inputs["cu_seqlens"], inputs["image_grid_hw"])          # (c) the packed sequence

One module per picture, each owning its numbers and its drawing:

    grid       resized_images (the exact images the model saw, through the processor), draw_patch_grid, patch_grids
    pca        pca_rgb / pca_rgb_joint (the colours), pca_view / pca_views (beside the images)
    pack       pack_strip and its layout (argument checks, segment edges, label placement), PALETTE
    attention  attention_grid (one patch's row of an eager attention map), attention_map (the heat map), MARKER
    _draw      the shared pieces: argument checks, PIL's built-in font and text, hstack / vstack, save_png

Must not re-derive any image <-> pack geometry (the image processor owns it: `resized_images` calls it) and must not
be imported by the remote-code files.
"""

from ._draw import hstack, save_png, vstack
from .attention import MARKER, attention_grid, attention_map
from .grid import draw_patch_grid, patch_grids, resized_images
from .pack import PALETTE, pack_strip
from .pca import pca_rgb, pca_rgb_joint, pca_view, pca_views

__all__ = [
    "MARKER",
    "PALETTE",
    "resized_images",
    "draw_patch_grid",
    "patch_grids",
    "pca_rgb",
    "pca_rgb_joint",
    "pca_view",
    "pca_views",
    "pack_strip",
    "attention_grid",
    "attention_map",
    "hstack",
    "vstack",
    "save_png",
]
