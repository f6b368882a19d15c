"""Layers import downwards only (DESIGN.md): frontend -> app -> coro -> native."""

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "qstack"

FRONTEND = {"cli", "config", "config_sources", "embed", "server", "supervisor", "stats", "metrics",
            "layout", "__main__"}
LAYER_OF = {"app": 2, "coro": 1, "native": 0, "_native": 0, "errors": -1}
FORBIDDEN = {
    "app": FRONTEND,
    "coro": FRONTEND | {"app"},
    "native": FRONTEND | {"app", "coro"},
}


def qstack_imports(path):
    """First component under qstack of every qstack module `path` imports."""
    tree = ast.parse(path.read_text())
    rel = path.relative_to(PKG).parts
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "qstack" and len(parts) > 1:
                    yield parts[1]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(rel[:-1])[: len(rel) - node.level]
                parts = base + (node.module.split(".") if node.module else [])
                if parts:
                    yield parts[0]
                else:
                    yield from (a.name for a in node.names)
            elif node.module and node.module.split(".")[0] == "qstack":
                parts = node.module.split(".")
                yield parts[1] if len(parts) > 1 else node.names[0].name


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_only_downwards(layer):
    bad = []
    for path in sorted((PKG / layer).rglob("*.py")):
        for target in qstack_imports(path):
            if target.removesuffix(".py") in FORBIDDEN[layer]:
                bad.append(f"{path.relative_to(PKG)} imports qstack.{target}")
    assert not bad, bad
