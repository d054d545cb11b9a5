"""The package's dependencies point one way (docs/architecture.md draws the layers): no module imports one
from a higher layer, and no modules import each other in a cycle. Lazy imports inside functions count:
they are dependencies too, only deferred."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "popo_megatron"

# Lowest first. A module belongs to the longest prefix listed; modules of one layer may import each other
# (without a cycle), never a module of a later layer.
LAYERS = [
    ["errors", "logs", "config", "config.schema", "config.load"],
    ["platform", "launch"],
    ["metrics"],
    ["model"],
    ["weights"],
    ["data", "reward", "rollout", "algo"],
    ["objectives"],
    ["config.validate"],
    ["checkpoint", "convert", "evaluate"],
    ["trainer", "parity", "layout_plan"],
    ["named_models", "cli", "__main__"],
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path, known: set[str]) -> set[str]:
    """Modules of the package that `path` imports (anywhere in the file), as names relative to the package."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import sub` imports the submodule when there is one
            targets = [f"{node.module}.{alias.name}" for alias in node.names]
            targets = [t if t.removeprefix("popo_megatron.") in known else node.module for t in targets]
        else:
            continue
        for target in targets:
            if target.startswith("popo_megatron."):
                found.add(target.removeprefix("popo_megatron."))
    return found & known


def _layer(module: str) -> int:
    best, best_len = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best is not None, f"popo_megatron.{module} is in no layer: add it to LAYERS (and docs/architecture.md)"
    return best


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(path, known) - {name} for name, path in modules.items() if name}


def test_no_module_imports_a_higher_layer():
    upward = [
        f"popo_megatron.{module} (layer {_layer(module)}) imports popo_megatron.{target} (layer {_layer(target)})"
        for module, targets in sorted(_graph().items())
        for target in sorted(targets)
        if _layer(target) > _layer(module)
    ]
    assert not upward, "\n".join(upward)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return out


def test_no_import_cycles():
    # A package's __init__ re-exporting its own submodules is not a cycle of concepts.
    graph = {m: {t for t in targets if not m or not t.startswith(m + ".")} for m, targets in _graph().items()}
    assert not _cycles(graph), _cycles(graph)


def test_the_checks_catch_what_they_look_for():
    """The two checks on graphs made up for the purpose: a cycle is found, an upward import is seen."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    assert _layer("trainer.recipe") > _layer("checkpoint.training") > _layer("algo.twin") > _layer("model.builder")
    assert _layer("config.validate") > _layer("data.synthetic") > _layer("config.schema")
