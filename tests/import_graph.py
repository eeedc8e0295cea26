"""The package's import graph, read from the source (nothing is imported): which of our modules
each module imports, at its top or inside a function, and which heavy third-party libraries a
module loads when it is imported. test_code_shape.py holds the rules built on it."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "madpo_ray"
# Libraries whose import alone costs a second or more (torch, ray, vllm, transformers) or pulls a
# large tree (the rest): the only reason a function may import one of our modules lazily is that
# the module would bring one of these to an importer that does not load it already.
HEAVY = ("torch", "ray", "vllm", "transformers", "matplotlib", "mlflow", "peft", "pyarrow", "pandas", "datasets",
         "scipy", "fastapi", "starlette", "tensorboard", "optuna", "rouge_score", "nltk")


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module (a submodule when a name is one)
    top: bool  # at the module's top (also under a top-level if/try), not inside a function or class
    line: int


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "__pycache__" not in p.parts}


def top_level_nodes(tree: ast.Module) -> set[int]:
    """ids of the statements that run when the module is imported (including under if/try)."""
    ids, todo = set(), list(tree.body)
    while todo:
        node = todo.pop()
        ids.add(id(node))
        if isinstance(node, (ast.If, ast.Try)):
            todo += node.body + node.orelse + getattr(node, "finalbody", []) + \
                [s for h in getattr(node, "handlers", []) for s in h.body]
    return ids


def resolve(node: ast.ImportFrom, name: str, known: dict[str, Path]) -> str:
    base = node.module or ""
    if node.level:
        package = name if known[name].name == "__init__.py" else name.rsplit(".", 1)[0]
        parts = package.split(".")
        base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
    return base


def imports_of(name: str, known: dict[str, Path]) -> list[Import]:
    tree = ast.parse(known[name].read_text())
    top = top_level_nodes(tree)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = resolve(node, name, known)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        out += [Import(name, t, id(node) in top, node.lineno) for t in dict.fromkeys(targets)]
    return out


def graph() -> dict[str, list[Import]]:
    known = modules()
    return {name: imports_of(name, known) for name in known}


def internal(target: str, known) -> str | None:
    """The module of ours a target names (a name imported from a module is that module), else None."""
    while target and target not in known:
        target = target.rpartition(".")[0]
    return target or None


def parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def heavy_on_import(g: dict[str, list[Import]]) -> dict[str, set[str]]:
    """For each module, the heavy libraries importing it loads (its top-level imports, those of the
    modules it imports at top, and of their packages' __init__, transitively)."""
    direct = {m: {i.target.split(".")[0] for i in imps if i.top and i.target.split(".")[0] in HEAVY}
              for m, imps in g.items()}
    deps = {m: {d for i in imps if i.top for d in [internal(i.target, g)] if d and d != m} | set(parents(m)) - {m}
            for m, imps in g.items()}
    heavy = {m: set(v) for m, v in direct.items()}
    changed = True
    while changed:
        changed = False
        for m in g:
            new = set().union(heavy[m], *(heavy[d] for d in deps[m] if d in heavy))
            if new != heavy[m]:
                heavy[m], changed = new, True
    return heavy


def cycles(g: dict[str, list[Import]]) -> list[list[str]]:
    """Strongly connected groups of our modules (imports at top or in functions alike)."""
    edges = {m: sorted({d for i in imps for d in [internal(i.target, g)] if d and d != m}) for m, imps in g.items()}
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def unjustified_lazy_imports(g: dict[str, list[Import]]) -> list[Import]:
    """Function-level imports of our modules that would cost the importer nothing at its top: the
    imported module loads no heavy library the importer does not load already."""
    heavy = heavy_on_import(g)
    out = []
    for m, imps in g.items():
        for i in imps:
            target = internal(i.target, g)
            if not i.top and target and target != m and heavy[target] <= heavy[m]:
                out.append(i)
    return out
