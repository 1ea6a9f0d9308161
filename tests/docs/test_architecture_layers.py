"""The package's layering (docs/architecture.md), read from the source's import statements
(every import, at module level or inside a function): the representations never import the
engine, the engine never imports a representation, the per-layer maths import neither. Cheap:
the files are parsed, nothing is imported."""
import ast
import pathlib

import pytest

import nngeometry

PACKAGE = pathlib.Path(nngeometry.__file__).parent

#: imports that cross a layer only to keep an upstream import path working (the module marks
#: them as re-exports): ``(importing module, imported name)``
UPSTREAM_REEXPORTS = {
    ("nngeometry.object.pspace", "nngeometry.backend.dummy.DummyGenerator"),
    ("nngeometry.backend.torch_hooks.torch_hooks", "nngeometry.object.vector.FVector"),
    ("nngeometry.backend.torch_hooks.torch_hooks", "nngeometry.object.vector.PVector"),
}

#: (modules under, may not import) — prefixes of dotted names
RULES = [
    # the representations are built from the engine's statistics, never drive a pass
    ("nngeometry.object", ("nngeometry.backend", "nngeometry.curvature", "nngeometry.generator",
                           "nngeometry.metrics", "nngeometry._entry")),
    # the engine and the output transforms return plain tensors: no representation, no entry
    # point; the engine uses only curvature's public names (its package), not its modules
    ("nngeometry.backend", ("nngeometry.object.pspace", "nngeometry.object.map",
                            "nngeometry.object.fspace", "nngeometry.object.vector",
                            "nngeometry.metrics", "nngeometry._entry", "nngeometry.curvature.")),
    ("nngeometry.curvature", ("nngeometry.object", "nngeometry.metrics", "nngeometry._entry")),
    # the per-layer maths sit below both
    ("nngeometry.layer_types", ("nngeometry.object", "nngeometry.backend", "nngeometry.curvature")),
    ("nngeometry.maths", ("nngeometry.object", "nngeometry.backend", "nngeometry.curvature")),
    ("nngeometry._memory", ("nngeometry",)),
]


def _module_name(path):
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imported_names(path):
    """``[(line, dotted name)]`` for every import of ``path``, relative ones resolved."""
    module = _module_name(path)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module
            out += [(node.lineno, f"{origin}.{a.name}") for a in node.names]
    return out


def _all_imports():
    return {_module_name(p): _imported_names(p) for p in sorted(PACKAGE.rglob("*.py"))}


IMPORTS = _all_imports()


def _is_module(dotted):
    path = PACKAGE.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _under(name, prefix):
    """``name`` is ``prefix`` or inside it; a prefix ending in ``.`` means its modules only
    (``nngeometry.curvature.``: a module of the package, not a name its ``__init__`` exports)."""
    if prefix.endswith("."):
        parts = name[len(prefix):].split(".")
        return name.startswith(prefix) and _is_module(prefix + parts[0])
    return name == prefix or name.startswith(prefix + ".")


@pytest.mark.parametrize("source, forbidden", RULES, ids=[r[0] for r in RULES])
def test_layer_imports_only_from_below(source, forbidden):
    crossing = []
    for module, names in IMPORTS.items():
        if not _under(module, source):
            continue
        for line, name in names:
            if (module, name) in UPSTREAM_REEXPORTS:
                continue
            if any(_under(name, f) for f in forbidden):
                crossing.append(f"{module}:{line} imports {name}")
    assert not crossing, ("imports against the layering of docs/architecture.md (move the "
                          "shared code down a layer, or let the engine return plain data):\n"
                          + "\n".join(crossing))


def test_the_rules_see_the_package():
    # a parser that found no import would pass every rule: the engine's own imports are seen
    assert ("nngeometry.backend.consumers" in IMPORTS
            and any(n.startswith("nngeometry.maths.gram_accumulator")
                    for _, n in IMPORTS["nngeometry.backend.consumers"]))
    # and a crossing is caught: the upstream re-export of DummyGenerator is one
    assert any(n == "nngeometry.backend.dummy.DummyGenerator"
               for _, n in IMPORTS["nngeometry.object.pspace"])


def test_upstream_reexports_still_exist():
    # an allowance that no longer matches an import is stale: drop it from the list
    present = {(m, n) for m, names in IMPORTS.items() for _, n in names}
    assert UPSTREAM_REEXPORTS <= present, UPSTREAM_REEXPORTS - present


#: import cycles that the package keeps: base classes whose methods return one of their
#: subclasses, imported inside those methods (docs/architecture.md)
KNOWN_CYCLES = [
    {"nngeometry.object.pspace.blocks.base", "nngeometry.object.pspace.blocks.diag",
     "nngeometry.object.pspace.blocks.identity"},
    {"nngeometry.object.pspace._prior", "nngeometry.object.pspace.abstract",
     "nngeometry.object.pspace.diag", "nngeometry.object.pspace.eye"},
]


def _import_cycles():
    """The strongly connected components (more than one module) of the module import graph."""
    def module_of(name):
        parts = name.split(".")
        for k in range(len(parts), 0, -1):
            if ".".join(parts[:k]) in IMPORTS:
                return ".".join(parts[:k])
        return None

    graph = {m: {module_of(n) for _, n in names} - {None, m} for m, names in IMPORTS.items()}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(component)

    for v in graph:
        if v not in index:
            visit(v)
    return cycles


def test_no_new_import_cycle():
    # a cycle broken by an import at a module's end or inside a function is still a cycle
    new = [sorted(c) for c in _import_cycles() if c not in KNOWN_CYCLES]
    assert not new, ("modules that import each other (move what both need to a module below "
                     f"them): {new}")


def test_the_cycle_finder_sees_a_cycle():
    assert any("nngeometry.object.pspace.abstract" in c for c in _import_cycles())
