# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""Pictures of a SigLIP-NaViT pack, under the name notebooks import (`import visualize as vis`): the public names of
`siglip_navit_tools.pictures`, where every picture lives (one module per picture). Not remote code.

    inputs = processor(images=[a, b, c], return_tensors="pt")
    maps = processor.unpack(model(**inputs).last_hidden_state, inputs)
    grids = vis.patch_grids(inputs)                                  # (a) patch grid + position ids per image
    views = vis.pca_views(vis.resized_images(inputs), maps)           # (b) PCA of the features, beside each image
    strip = vis.pack_strip(inputs["cu_seqlens"], inputs["image_grid_hw"])          # (c) the packed sequence
    heat = vis.attention_map(vis.resized_images(inputs)[1], out.attentions, patch=(3, 5), image_index=1)  # (d)

* `resized_images(inputs)`: the exact resized RGB images the model saw, recovered from the processor's output.
* `draw_patch_grid(image, grid_hw, ...)` / `patch_grids(inputs)`: patch grid and position ids over each image.
* `pca_rgb(feature_map)` / `pca_rgb_joint(feature_maps)`: the first three principal components as uint8 colours
  (joint: one PCA over all images, so colours compare across images); `pca_view(image, feature_map)` /
  `pca_views(images, feature_maps)`: the input beside its PCA picture.
* `pack_strip(cu_seqlens, grid_hw=None, labels=None)`: where each image's tokens sit in the packed sequence.
* `attention_grid(attentions, grid_hw, patch)` / `attention_map(image, attentions, patch=(row, col), layer=-1,
  image_index=0)`: where one patch looks (the model's eager `output_attentions`), as numbers and as a heat map.
* `hstack`, `vstack`, `save_png`: small layout and output helpers; `PALETTE`, `MARKER`: the colours used.
"""

from siglip_navit_tools.pictures import *  # noqa: F401,F403  (the public names, listed in __all__)
from siglip_navit_tools.pictures import __all__  # noqa: F401
