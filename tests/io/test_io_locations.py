"""Location.child_within: a name from an index may only be a file inside the folder."""

import pytest

from siglip_navit_tools.io.locations import Location


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
