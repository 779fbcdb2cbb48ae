"""The import rules of the house, checked on the source (every import, also the lazy ones
inside functions): packages only import downwards (recovery -> agent -> ckpt), inside ckpt a
module imports only its own layer or the layers below it, and no package has an import cycle."""

from __future__ import annotations

import ast
from fnmatch import fnmatch
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("ckpt", "agent", "recovery")

# ckpt, top to bottom. A module may import modules of its own layer (without cycles) or of a
# lower one, never of a higher one. Patterns match module names (a package and its modules).
CKPT_LAYERS: list[tuple[str, ...]] = [
    ("ckpt", "ckpt.cli", "ckpt.cli.*", "ckpt.demo", "ckpt.testing", "ckpt.testing.*", "ckpt.integrations",
     "ckpt.integrations.*", "ckpt.dcp", "ckpt.dcp.*", "ckpt.hf", "ckpt.hf.*"),  # entry points, suites, bridges
    ("ckpt.api", "ckpt.reshard", "ckpt.export", "ckpt.ingest", "ckpt.verify", "ckpt.verify.*", "ckpt.verify_metadata", "ckpt.verify_report"),
    ("ckpt.checkpointer",),
    ("ckpt.capture", "ckpt.config", "ckpt.handles", "ckpt.staging", "ckpt.stateful", "ckpt.retention",
     "ckpt.consolidate", "ckpt.telemetry"),
    ("ckpt.sink", "ckpt.replicated"),
    ("ckpt.commit",),
    ("ckpt.waits",),
    ("ckpt.coverage",),
    ("ckpt.direct",),
    ("ckpt.io", "ckpt.reading", "ckpt.regions"),
    ("ckpt.plan",),
    ("ckpt.planning",),
    ("ckpt.restore",),
    ("ckpt.layouts",),
    ("ckpt.format", "ckpt.chunks"),
    ("ckpt.state", "ckpt.layout", "ckpt.manifest", "ckpt.jsondocs", "ckpt.dtypes", "ckpt.hostpool", "ckpt.pinning",
     "ckpt.dist", "ckpt.signals", "ckpt.version", "ckpt.zarr_compat"),
    ("ckpt.jsonfields", "ckpt.chunktable"),
    ("ckpt.readahead",),
    ("ckpt.storage", "ckpt.storage.*"),
    ("ckpt.errors", "ckpt.gcpause"),
]


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, module: str) -> set[str]:
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    type_checking: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_checking |= {id(n) for n in ast.walk(node)}
    for node in ast.walk(tree):
        if id(node) in type_checking:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                if node.module is None:
                    out |= {f"{target}.{a.name}" for a in node.names}
                else:
                    out.add(target)
            elif node.module:
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {m for m in out if m.split(".")[0] in PACKAGES}


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            if "_proto" in path.parts:
                continue
            name = _module_name(path)
            graph[name] = _imports(path, name)
    known = set(graph)
    # "from . import x" names a module when x is one; otherwise it named an attribute of the package.
    return {m: {d if d in known else d.rsplit(".", 1)[0] for d in deps} - {m} for m, deps in graph.items()}


def _layer(module: str) -> int:
    for i, patterns in enumerate(CKPT_LAYERS):
        if any(fnmatch(module, p) for p in patterns):
            return i
    raise AssertionError(f"{module} is in no layer of CKPT_LAYERS: add it where it belongs")


def test_packages_import_only_downwards():
    order = {"recovery": 0, "agent": 1, "ckpt": 2}
    bad = [f"{m} -> {d}" for m, deps in _graph().items() for d in deps
           if order[d.split(".")[0]] < order[m.split(".")[0]]]
    assert not bad, bad


def test_ckpt_modules_import_only_their_layer_or_below():
    graph = _graph()
    bad = [f"{m} (layer {_layer(m)}) -> {d} (layer {_layer(d)})" for m, deps in graph.items() if m.startswith("ckpt")
           for d in deps if d.startswith("ckpt") and _layer(d) < _layer(m)]
    assert not bad, bad


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if d == m.split(".")[0] or m == d.split(".")[0]:
                continue  # a package's __init__ re-exporting its modules is not a cycle
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d in graph and not state.get(d):
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if not state.get(m):
            visit(m)
    assert not cycles, cycles


def test_no_handwritten_module_over_400_lines():
    long = {str(p.relative_to(REPO)): n for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")
            if "_proto" not in p.parts and (n := len(p.read_text().splitlines())) > 400}
    assert not long, long
