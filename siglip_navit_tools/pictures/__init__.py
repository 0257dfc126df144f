# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""The machinery behind `visualize.py` (the public pictures module users import; it re-exports what they need).

    _draw      argument checks (images, grids, integers), PIL's built-in font, text placement, stacking, PNG output
    pca        pca_rgb / pca_rgb_joint: principal components of feature maps as uint8 colours (the math only)
    attention  attention_grid: one patch's row of an eager attention map as a grid; the "hot" heat colours
    pack       the pack strip's layout: argument checks, segment edges, label candidates and label placement

Must not re-derive any image <-> pack geometry (the image processor owns it: `visualize.resized_images` calls it)
and must not be imported by the remote-code files.
"""
