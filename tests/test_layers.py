"""Layers import downwards only (DESIGN.md, docs/ARCHITECTURE.md).

Every module of the package, and every compiled module beside it, belongs to
one layer of LAYERS; MAY_IMPORT says which layers each may import.  The
imports are read from the source (ast: module level and inside functions,
absolute and relative, and importlib.import_module / __import__ of a constant
name), so a lazy import is checked like any other.  A module that belongs to
no layer fails test_every_module_has_a_layer: a new package or a moved module
is placed here on purpose, not by default.

In particular the app layer reaches the native stack only through the hub:
it never imports the compiled module (qstack._native) nor the binding.
"""

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "qstack"

# layer -> its modules, as dotted names; a package stands for all it holds.
LAYERS = {
    "api": ["qstack"],                   # the package itself: re-exports (exactly "qstack")
    "frontend": ["qstack.__main__", "qstack.cli", "qstack.config", "qstack.config_sources",
                 "qstack.embed", "qstack.layout", "qstack.metrics", "qstack.redisctl",
                 "qstack.server", "qstack.stats", "qstack.supervisor"],
    "apps": ["qstack.apps"],             # shipped applications: the public API only
    "loadgen": ["qstack.loadgen", "qstack._loadgen"],
    "app": ["qstack.app"],
    "hub": ["qstack.coro", "qstack._qsview"],
    "binding": ["qstack.transport"],     # the Python face of the ABI
    "abi": ["qstack._native"],           # compiled from qstack/native/include/qstack.h
    "base": ["qstack.errors", "qstack.memif"],   # memif: EAL arguments, no imports
    "build": ["qstack.native"],          # cffi build scripts, run on their own
    "harness": ["qstack._ustack_test", "qstack._qsdpdk"],   # tests' and dlopen()'s only
}

MAY_IMPORT = {
    "api": {"frontend", "app", "base"},
    "frontend": {"api", "frontend", "loadgen", "app", "hub", "binding", "base"},
    "apps": {"api", "app", "base"},
    "loadgen": {"loadgen", "base"},
    "app": {"app", "hub", "base"},
    "hub": {"hub", "binding", "base"},
    "binding": {"binding", "abi", "base"},
    "abi": set(),
    "base": {"base"},
    "build": set(),
    "harness": set(),
}


def layer_of(name):
    """The layer of a dotted module name (longest match), or None."""
    best, layer = -1, None
    for lay, modules in LAYERS.items():
        for m in modules:
            exact_only = m == "qstack"
            if name == m or (not exact_only and name.startswith(m + ".")):
                if len(m) > best:
                    best, layer = len(m), lay
    return layer


def is_module(dotted):
    """Whether qstack.<...> names a module or package (source or compiled)."""
    parts = dotted.split(".")[1:]
    if not parts:
        return True
    base = PKG.joinpath(*parts)
    return (base.with_suffix(".py").is_file() or base.is_dir()
            or any(base.parent.glob(base.name + ".*so"))
            or any(dotted in modules for modules in LAYERS.values()))   # not built yet


def module_name(path):
    rel = path.relative_to(PKG).with_suffix("")
    parts = ["qstack", *rel.parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(path, source):
    """Every qstack module the module at `path` imports, as a dotted name."""
    pkg = module_name(path).split(".")
    if path.name != "__init__.py":
        pkg.pop()                        # a module's relative imports start at its package
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "qstack":
                    yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[:len(pkg) - node.level + 1]
                mod = ".".join(base + (node.module.split(".") if node.module else []))
            elif node.module and node.module.split(".")[0] == "qstack":
                mod = node.module
            else:
                continue
            subs = [f"{mod}.{a.name}" for a in node.names if is_module(f"{mod}.{a.name}")]
            yield from subs
            if len(subs) < len(node.names):
                yield mod                # names defined in mod itself
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id == "__import__"))
              and node.args[0].value.split(".")[0] == "qstack"):
            yield node.args[0].value


def violations(path, source=None):
    """`path`'s imports its layer may not make."""
    source = path.read_text() if source is None else source
    rel = path.relative_to(PKG)
    mine = layer_of(module_name(path))
    bad = []
    for target in imported(path, source):
        theirs = layer_of(target)
        if theirs is None or theirs not in MAY_IMPORT[mine]:
            bad.append(f"{rel} ({mine}) imports {target} ({theirs})")
    return bad


def sources():
    return sorted(PKG.rglob("*.py"))


def test_every_module_has_a_layer():
    compiled = {p.name.split(".")[0] for p in PKG.glob("*.so")}
    names = [module_name(p) for p in sources()] + [f"qstack.{c}" for c in sorted(compiled)]
    assert not [n for n in names if layer_of(n) is None], "add them to LAYERS"
    # the table names nothing that does not exist (a rename updates it)
    stale = [m for ms in LAYERS.values() for m in ms if not m.startswith("qstack._")
             and not (PKG.joinpath(*m.split(".")[1:]).with_suffix(".py").is_file()
                      or PKG.joinpath(*m.split(".")[1:]).is_dir())]
    assert not stale, stale
    assert set(MAY_IMPORT) == set(LAYERS)


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_layer_imports_only_downwards(layer):
    bad = []
    for path in sources():
        if layer_of(module_name(path)) == layer:
            bad += violations(path)
    assert not bad, bad


def test_the_check_sees_every_layer():
    """Every layer with Python sources has some: a table entry that matches
    no file would let its modules through unchecked."""
    seen = {layer_of(module_name(p)) for p in sources()}
    assert seen >= {"api", "frontend", "apps", "loadgen", "app", "hub", "binding", "base",
                    "build"}, seen


@pytest.mark.parametrize("source", [
    "import qstack._native",
    "import qstack._native as n",
    "from qstack._native import ffi, lib",
    "from qstack import _native",
    "from .. import _native",
    "from .._native import lib",
    "def f():\n    from qstack._native import lib\n",
    "import importlib\nlib = importlib.import_module('qstack._native').lib\n",
    "from ..transport import lib",
    "from qstack import transport",
    "from qstack.transport.binding import lib",
])
def test_app_importing_the_native_module_fails(source):
    """The app layer reaches the stack through the hub only: the compiled
    module or the binding, imported any way, is a violation."""
    bad = violations(PKG / "app" / "request.py", source)
    assert len(bad) == 1 and bad[0].startswith("app/request.py (app) imports qstack."), bad
    assert bad[0].endswith(("(abi)", "(binding)")), bad


@pytest.mark.parametrize("path, source", [
    ("loadgen/engine.py", "from qstack.coro import hub"),
    ("loadgen/engine.py", "from qstack import server"),
    ("coro/hub.py", "from ..app import Request"),
    ("coro/hub.py", "import qstack.loadgen"),
    ("transport/binding.py", "from qstack.coro.hub import Hub"),
    ("apps/echo.py", "from qstack._native import lib"),
    ("errors.py", "from qstack import config"),
    ("native/build.py", "import qstack.errors"),
])
def test_upward_imports_fail(path, source):
    assert len(violations(PKG / path, source)) == 1
