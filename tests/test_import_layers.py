"""The package's imports run one way: no cycles, and no import from a lower layer to a higher one.

Every ``import`` statement counts, including the ones inside functions (a lazy import is still a
dependency). The layers are the ones drawn in ``docs/architecture.md``, bottom first; a module may
import its own layer and the layers below it.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import visar

ROOT = Path(visar.__file__).parent

#: bottom to top; a module belongs to the first layer whose prefix it starts with
LAYERS = [
    ("base", ("visar.utils", "visar.registry", "visar.conditions")),
    ("nn", ("visar.nn", "visar.ops")),
    ("data", ("visar.data",)),
    ("tokenizers", ("visar.tokenizers",)),
    ("generators", ("visar.generators",)),
    ("samplers", ("visar.samplers",)),
    ("pipeline", ("visar.pipeline", "visar.text")),
    ("applications", ("visar.convert", "visar.eval", "visar.train", "visar.zoo")),
    ("cli", ("visar.cli", "visar.__main__")),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> int | None:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None  # the package root (lazy public API) sits above everything


def imports_of(path: Path, module: str) -> set[str]:
    """``visar.*`` modules imported anywhere in ``path`` (resolved to existing modules)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    pkg = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("visar")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            if not base.startswith("visar"):
                continue
            for a in node.names:  # `from visar.x import y` may import the submodule visar.x.y
                found.add(f"{base}.{a.name}" if (ROOT.parent / f"{base}.{a.name}".replace(".", "/")).exists()
                          or (ROOT.parent / (f"{base}.{a.name}".replace(".", "/") + ".py")).exists() else base)
    return found


def graph() -> dict[str, set[str]]:
    mods = {module_name(p): p for p in ROOT.rglob("*.py")}
    g = {}
    for m, p in mods.items():
        g[m] = {d for d in imports_of(p, m) if d in mods and d != m}
    return g


def test_no_upward_imports():
    bad = []
    for m, deps in graph().items():
        lm = layer_of(m)
        if lm is None:
            continue
        for d in deps:
            ld = layer_of(d)
            if ld is not None and ld > lm:
                bad.append(f"{m} ({LAYERS[lm][0]}) imports {d} ({LAYERS[ld][0]})")
    assert not bad, "imports from a lower layer to a higher one:\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
    g = graph()
    # package __init__ modules are namespaces; importing a submodule runs them, so a cycle through
    # one would be real: keep them in the graph
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(g[m]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("module,expected", [("visar.samplers.base", "samplers"), ("visar.nn.guidance", "nn"),
                                             ("visar.conditions", "base"), ("visar.cli", "cli")])
def test_layer_table(module, expected):
    assert LAYERS[layer_of(module)][0] == expected


def test_ops_imports_only_torch_and_itself():
    """``visar.ops`` sits at the bottom beside ``visar.nn`` (which builds on it): it imports no other visar module,
    and nothing but the standard library, torch and (lazily, in ``visar.ops.kernels``) triton."""
    allowed_roots = {"torch", "triton", "contextlib", "functools", "importlib", "os", "types", "typing",
                     "__future__", "math"}
    bad = []
    for path in (ROOT / "ops").rglob("*.py"):
        module = module_name(path)
        bad += [f"{module} imports {d}" for d in imports_of(path, module) if not d.startswith("visar.ops")]
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and not node.level else [])
            bad += [f"{module} imports {n}" for n in names if n and n.split(".")[0] not in allowed_roots | {"visar"}]
    assert not bad, "\n".join(sorted(bad))
