"""The shape of the package: no import cycles among mixq's modules, no module over 400 lines, no stage imports the CLI,
``formats`` and ``config`` import no higher stage, no re-export shims (a module that only imports names for others, or a
name imported only to be passed on).

The import graph is read with ``ast`` from every module under ``src/mixq``: module-level and
function-level imports alike (an import inside a function is still a dependency, and a cycle dodged
by one is still a cycle), relative imports resolved, and ``from pkg import name`` counted as an import
of ``pkg.name`` when that is a module.  A module's own ancestors are not counted: Python initializes a
package before any of its modules, so ``from .. import x`` inside ``mixq.a.b`` is an edge to
``mixq.x`` only.  Imports by string (``importlib.import_module``) are not seen.
"""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = "mixq"
MAX_LINES = 400  # per module, no exceptions: the allow-list of modules over it was emptied by issue 14's splits


def modules(src: Path = SRC, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``src/package`` (``pkg/__init__.py`` is ``pkg``)."""
    out = {}
    for p in sorted((src / package).rglob("*.py")):
        parts = p.relative_to(src).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imported(name: str, path: Path, node: ast.AST) -> list[str]:
    """The dotted names an import statement in module ``name`` (file ``path``) may refer to."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return [target] + [f"{target}.{a.name}" for a in node.names]


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the modules of the package it imports (anywhere in its body)."""
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _imported(name, path, node):
                while target and target not in mods:  # pkg.attr -> pkg; a third-party name -> ""
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return sorted(found)


def _edges_within(graph: dict[str, set[str]], comp: list[str]) -> str:
    return "; ".join(f"{a} -> {b}" for a in comp for b in sorted(graph[a]) if b in comp)


def test_graph_reader_sees_every_kind_of_import(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .sub import c  # function-level\n")
    (pkg / "sub" / "__init__.py").write_text("from .. import a\n")
    (pkg / "sub" / "c.py").write_text("import pkg.a\nfrom ..b import f\nfrom . import nothing_here\n")
    (pkg / "d.py").write_text("import os\nfrom pkg.sub import c\n")
    graph = import_graph(modules(tmp_path, "pkg"))
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.sub", "pkg.sub.c"}, "pkg.sub": {"pkg.a"},
                     "pkg.sub.c": {"pkg.a", "pkg.b"}, "pkg.d": {"pkg.sub", "pkg.sub.c"}}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub", "pkg.sub.c"]]
    assert cycles({"x": {"y"}, "y": set()}) == []


def test_no_import_cycles():
    graph = import_graph(modules())
    found = cycles(graph)
    assert not found, "import cycles (module-level and function-level imports):\n" + "\n".join(
        f"  {' '.join(c)}\n    {_edges_within(graph, c)}" for c in found)


def test_no_stage_imports_the_cli():
    graph = import_graph(modules())
    cli = f"{PACKAGE}.cli"
    entry = f"{PACKAGE}.__main__"  # ``python -m mixq``: the command itself
    outside = sorted(m for m, targets in graph.items() if not (m in (cli, entry) or m.startswith(cli + "."))
                     and any(t == cli or t.startswith(cli + ".") for t in targets))
    assert not outside, f"modules outside {cli} import it: {', '.join(outside)}"


# ARCHITECTURE.md rule 9 for the two lowest stages: specs (config) and what values are stored (formats) import no stage
# above them, not even inside a function.  config is below formats (formats asks the registry for a spec's family).
LOWEST = ("config", "formats")
ABOVE = ("algorithms", "runtime", "calib", "measure", "allocate", "export", "eval", "cli")


def _in(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == f"{PACKAGE}.{p}" or module.startswith(f"{PACKAGE}.{p}.") for p in packages)


def test_formats_and_config_import_no_higher_stage():
    graph = import_graph(modules())
    up = [f"{m} -> {t}" for m in sorted(graph) if _in(m, LOWEST) for t in sorted(graph[m]) if _in(t, ABOVE)]
    up += [f"{m} -> {t}" for m in sorted(graph) if _in(m, ("config",)) for t in sorted(graph[m]) if _in(t, ("formats",))]
    assert not up, "lower stages import higher ones (module- or function-level; move the code to the stage it " \
        "belongs to):\n  " + "\n  ".join(up)


def test_no_module_over_400_lines():
    lengths = {p.relative_to(SRC).as_posix(): len(p.read_text().splitlines()) for p in modules().values()}
    over = sorted(f"{f} ({n} lines)" for f, n in lengths.items() if n > MAX_LINES)
    assert not over, f"modules over {MAX_LINES} lines: {', '.join(over)}: split them"


# ---------------------------------------------------------------------------- re-export shims
def _imported_names(tree: ast.Module) -> set[str]:
    """The names a module binds by importing (``from x import a as b`` binds ``b``; ``import a.b`` binds ``a``)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            out |= {a.asname or a.name for a in node.names if a.name != "*"}
        elif isinstance(node, ast.Import):
            out |= {a.asname or a.name.partition(".")[0] for a in node.names}
    return out


def _only_reexports(tree: ast.Module) -> bool:
    """Whether a module's body is nothing but a docstring, imports, ``__all__`` and aliases of imported names."""
    imported = _imported_names(tree)

    def passive(stmt: ast.stmt, i: int, fallback: bool = False) -> bool:
        if i == 0 and isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            return True  # the docstring
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            return True
        if isinstance(stmt, ast.Try):  # try: from x import k / except ImportError: k = None
            return (all(passive(s, -1) for s in stmt.body + stmt.finalbody)
                    and all(passive(s, -1, fallback=True) for h in stmt.handlers for s in h.body))
        targets = (stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
                   if isinstance(stmt, (ast.AnnAssign, ast.AugAssign)) else None)
        if not targets or not all(isinstance(t, ast.Name) for t in targets):
            return False
        if all(t.id == "__all__" for t in targets) or fallback and all(t.id in imported for t in targets):
            return True
        value = getattr(stmt, "value", None)
        while isinstance(value, ast.Attribute):
            value = value.value
        return isinstance(value, ast.Name) and value.id in imported  # X = imported_name: an alias, passed on
    return all(passive(stmt, i) for i, stmt in enumerate(tree.body))


def _unused_imports(tree: ast.Module) -> list[str]:
    """Names a module imports from its own package (relative imports) and never reads."""
    read = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] == PACKAGE):
            out += [b for a in node.names if (b := a.asname or a.name) != "*" and b not in read]
    return sorted(set(out))


def test_shim_readers_see_a_shim():
    shim = ast.parse('"""Moved."""\nfrom __future__ import annotations\nfrom .b import f, g\nh = f\n'
                     '__all__ = ["f", "g", "h"]\ntry:\n    from .c import k\nexcept ImportError:\n    k = None\n')
    assert _only_reexports(shim) and _unused_imports(shim) == ["g", "k"]
    real = ast.parse('from .b import f, g\nimport os\n\ndef run():\n    return f(g, os.sep)\n')
    assert not _only_reexports(real) and _unused_imports(real) == []
    assert not _only_reexports(ast.parse("from .b import f\nLIMIT = 3\n"))


def test_no_reexport_shim_modules():
    """A module (not a package's ``__init__``) whose body only imports, lists ``__all__`` or aliases imported names
    is a shim left by a move: import the names from where they are defined, and delete it."""
    shims = sorted(name for name, path in modules().items() if path.name != "__init__.py"
                   and _only_reexports(ast.parse(path.read_text(), filename=str(path))))
    assert not shims, f"modules that only re-export names: {', '.join(shims)}: import from the owners, delete these"


def test_no_names_imported_only_to_be_passed_on():
    """A name a module (not a package's ``__init__``) imports from mixq must be read there: one never read is dead or
    a pass-through for other modules (``from a import X`` where ``a`` took X from ``b``); import it from its owner."""
    unused = {name: u for name, path in modules().items() if path.name != "__init__.py"
              and (u := _unused_imports(ast.parse(path.read_text(), filename=str(path))))}
    assert not unused, "names imported and never used (import them from their owning module, or drop them): " + \
        "; ".join(f"{m}: {', '.join(u)}" for m, u in sorted(unused.items()))
