"""The tools package's layers point one way: `errors` at the bottom (imports nothing of the package), `io` below the
tools (never imports convert, extract or the CLI skeleton), and only the two commands' `cli.py` modules import the
shared `cli` skeleton (the top of the stack)."""

import ast
from pathlib import Path

import siglip_navit_tools

PACKAGE = Path(siglip_navit_tools.__file__).parent


def package_imports(path: Path) -> set[str]:
    """The package modules `path` imports, as dotted names relative to the package (`io.atomic`, `cli`, `errors`)."""
    here = path.relative_to(PACKAGE).with_suffix("").parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(here[: len(here) - node.level + 1])
                module = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").startswith("siglip_navit_tools"):
                module = node.module[len("siglip_navit_tools") :].lstrip(".")
            else:
                continue
            names = [a.name for a in node.names]
            found.update(f"{module}.{n}".lstrip(".") for n in names)
            found.add(module)
        elif isinstance(node, ast.Import):
            prefix = "siglip_navit_tools."
            found.update(a.name[len(prefix) :] for a in node.names if a.name.startswith(prefix))
    return {name for name in found if name}


def modules(under: str = "") -> list[Path]:
    return sorted((PACKAGE / under).rglob("*.py"))


def imports_top(path: Path, top: str) -> bool:
    return any(name == top or name.startswith(top + ".") for name in package_imports(path))


def test_errors_is_the_bottom_layer():
    assert package_imports(PACKAGE / "errors.py") == set()


def test_io_imports_neither_the_tools_nor_the_cli_skeleton():
    for path in modules("io"):
        for top in ("cli", "convert", "extract", "pictures", "testing"):
            assert not imports_top(path, top), f"{path.relative_to(PACKAGE)} imports {top}"


def test_only_the_commands_import_the_cli_skeleton():
    importers = {str(p.relative_to(PACKAGE)) for p in modules() if imports_top(p, "cli")}
    assert importers == {"convert/cli.py", "extract/cli.py", "serve/cli.py"}


def test_the_import_walker_sees_relative_and_absolute_imports():
    # the checks above are only as good as package_imports: it must see the forms this package uses
    assert "errors.ToolError" in package_imports(PACKAGE / "io" / "atomic.py")
    assert "errors" in package_imports(PACKAGE / "convert" / "options.py")
    assert imports_top(PACKAGE / "extract" / "cli.py", "cli")
