"""Keeps ARCHITECTURE.md true: layers import downwards only, and the engines
are imported where the page says and nowhere else."""

from __future__ import annotations

import ast
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "src" / "ptemu"

LAYERS = {
    "errors": 0, "engines": 0, "status": 0, "values": 0, "registers": 0, "memory": 0,
    "atomic": 0,
    "paging": 1, "writestate": 1, "results": 1,
    "decoder.families": 2, "decoder.model": 2,
    "decoder.capstone_adapter": 3, "emulator": 3, "fastpath": 3, "bench": 5,
    "vcpu": 4, "handler": 4,
    "fixtures": 5, "capture": 5, "kvm": 5, "monitor": 5,
    "cli": 6, "__main__": 6, "__init__": 6, "decoder": 2,
}
CAPSTONE_USERS = {"decoder.capstone_adapter", "bench.naive"}
UNICORN_USERS = {"emulator", "capture.machine", "bench.naive"}


def _layer(module: str) -> int:
    parts = module.split(".")
    for length in range(len(parts), 0, -1):
        key = ".".join(parts[:length])
        if key in LAYERS:
            return LAYERS[key]
    raise AssertionError(f"module {module} has no layer in ARCHITECTURE.md")


def _modules():
    for path in sorted(SOURCE.rglob("*.py")):
        relative = path.relative_to(SOURCE).with_suffix("")
        name = ".".join(relative.parts)
        name = name.removesuffix(".__init__")
        yield name, ast.parse(path.read_text(), str(path))


def _imports(tree: ast.AST, *, runtime_only: bool):
    for node in ast.walk(tree):
        if runtime_only and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []  # imports only for type annotations do not count
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def test_layers_import_downwards_only():
    problems = []
    for name, tree in _modules():
        if name in ("__init__", "__main__", "cli") or name.startswith("cli"):
            continue
        own = _layer(name)
        for imported in _imports(tree, runtime_only=True):
            if imported.startswith("ptemu."):
                target = imported[len("ptemu."):]
                if target == "__version__":
                    continue
                if _layer(target) > own:
                    problems.append(f"{name} (layer {own}) imports {target} "
                                    f"(layer {_layer(target)})")
    assert problems == []


def test_engines_are_imported_in_their_adapters_only():
    capstone, unicorn = set(), set()
    for name, tree in _modules():
        for imported in _imports(tree, runtime_only=False):
            root = imported.split(".")[0]
            if root == "capstone":
                capstone.add(name)
            elif root == "unicorn":
                unicorn.add(name)
    assert capstone <= CAPSTONE_USERS
    assert unicorn <= UNICORN_USERS


def test_paging_imports_without_the_engines():
    for name, tree in _modules():
        if name.startswith("paging"):
            for imported in _imports(tree, runtime_only=False):
                assert imported.split(".")[0] not in ("capstone", "unicorn"), name
