"""The pictures live in one place (issue 17 item 3): `siglip_navit_tools.pictures`, one module per picture; the
root `visualize.py` (what notebooks, README and the figure script import) only re-exports its public names."""

import ast

import visualize
from siglip_navit_tools import pictures, repo_code

PUBLIC_BEFORE = [  # visualize's public API before the move: every name stays
    "PALETTE", "MARKER", "resized_images", "draw_patch_grid", "patch_grids", "pca_rgb", "pca_rgb_joint", "pca_view",
    "pca_views", "pack_strip", "attention_grid", "attention_map", "hstack", "vstack", "save_png",
]  # fmt: skip


def test_visualize_is_the_packages_public_names_and_nothing_else():
    assert set(PUBLIC_BEFORE) == set(visualize.__all__) == set(pictures.__all__)
    for name in PUBLIC_BEFORE:
        assert getattr(visualize, name) is getattr(pictures, name), name
    tree = ast.parse((repo_code.REPO_ROOT / "visualize.py").read_text())
    assert not [node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Assign))]


def test_each_picture_is_drawn_where_its_numbers_are():
    from siglip_navit_tools.pictures import attention, grid, pack, pca

    assert pictures.pack_strip.__module__ == pack.__name__ and pictures.PALETTE is pack.PALETTE
    assert pictures.pca_views.__module__ == pictures.pca_rgb.__module__ == pca.__name__
    assert pictures.attention_map.__module__ == pictures.attention_grid.__module__ == attention.__name__
    assert pictures.patch_grids.__module__ == pictures.resized_images.__module__ == grid.__name__
