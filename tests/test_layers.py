"""The package is layered (DESIGN.md invariant 7): every import, function-level ones included, goes down a layer
or stays in its own folder; ``train``, ``eval`` and ``serve`` never import each other; nothing imports ``cli``;
``model`` reads no data, retrieval or run code; only ``train/parallel.py`` may import torch.distributed; and the
import graph has no cycle."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import knnformer

PACKAGE = Path(knnformer.__file__).parent
BASE = {"knnformer", "config", "io", "runtime"}  # the root package and its three shared modules
BELOW = {  # layer -> the layers it may import (its own folder always)
    "base": set(),
    "data": {"base"},
    "retrieval": {"base", "data"},
    "model": {"base"},
    "run": {"base", "data", "retrieval", "model"},
    "train": {"base", "data", "retrieval", "model", "run"},
    "eval": {"base", "data", "retrieval", "model", "run"},
    "serve": {"base", "data", "retrieval", "model", "run"},
    "experiments": {"base", "data", "retrieval", "model", "run", "train", "eval", "serve"},
    "export": {"base", "data", "retrieval", "model", "run", "train"},  # Hugging Face folders from runs, and back
    "cli": {"base", "data", "retrieval", "model", "run", "train", "eval", "serve", "experiments", "export"},
    "__main__": {"cli"},  # ``python -m knnformer``: the one module above cli, and the only one that may import it
}
DISTRIBUTED_HOME = "knnformer.train.parallel"


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in BASE:
        return "base"
    return parts[1]


def imports_of(path: Path, module: str, root: Path):
    """(line, imported module) for every import in the file, at any depth, relative ones resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from knnformer.eval import knnlm` imports the submodule
                sub = f"{base}.{alias.name}"
                as_path = root.parent / Path(*sub.split("."))
                yield node.lineno, sub if as_path.with_suffix(".py").is_file() or as_path.is_dir() else base


def layering_faults(root: Path = PACKAGE) -> list[str]:
    """Every import that breaks the layer rules, and every import cycle, each named by file and line."""
    faults, graph = [], {}
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        layer = layer_of(module)
        rel = path.relative_to(root.parent)
        graph.setdefault(module, {})
        for line, target in imports_of(path, module, root):
            if target.startswith("torch.distributed") and module != DISTRIBUTED_HOME:
                faults.append(f"{rel}:{line} imports {target}: only {DISTRIBUTED_HOME} may know torch.distributed")
            if target != "knnformer" and not target.startswith("knnformer."):
                continue
            graph[module].setdefault(target, line)
            dest = layer_of(target)
            if dest == layer and layer != "base" or dest in BELOW[layer]:
                continue
            if layer == "base" and dest == "base":
                continue
            allowed = ", ".join(sorted(BELOW[layer])) or "nothing in knnformer"
            faults.append(f"{rel}:{line} imports {target}: layer {layer!r} may import only {allowed}")
    faults += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph)]
    return faults


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module (Tarjan), as a path."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(path_within(graph, set(component)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def path_within(graph: dict[str, dict[str, int]], component: set[str]) -> list[str]:
    """A cycle inside one strongly connected component, found by walking its edges from its first module."""
    start = min(component)
    path, seen, v = [start], {start}, start
    while True:
        v = min(w for w in graph[v] if w in component)
        path.append(v)
        if v in seen:
            return path[path.index(v):]
        seen.add(v)


def test_the_package_is_layered_without_cycles():
    faults = layering_faults()
    assert not faults, "\n".join(faults)


def test_the_check_names_a_planted_upward_import_and_cycle(tmp_path):
    root = tmp_path / "knnformer"
    shutil.copytree(PACKAGE, root, ignore=shutil.ignore_patterns("__pycache__"))
    model = root / "model" / "layers.py"
    model.write_text(model.read_text() + "\n\ndef _planted():\n    from knnformer.run.record import load_run\n")
    faults = layering_faults(root)
    line = len(model.read_text().splitlines())
    assert f"knnformer/model/layers.py:{line} imports knnformer.run.record: layer 'model' may import only base" \
        in faults
    assert any(f.startswith("import cycle:") and "knnformer.model.layers" in f for f in faults)
    io = root / "io.py"
    io.write_text("import torch.distributed\n" + io.read_text())
    assert any(f.startswith("knnformer/io.py:1 imports torch.distributed") for f in layering_faults(root))
