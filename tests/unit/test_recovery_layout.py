"""The shape of ``recovery``: every import points down its layers (so there is no cycle), it
never imports the examples, experiments or tests, and no handwritten module grows past 400
lines. The layers are docs/recovery.md's module map."""

from __future__ import annotations

import ast
from pathlib import Path

import recovery

ROOT = Path(recovery.__file__).parent

# Lowest first: a module imports only modules of lower layers (a package's __init__ also its
# own submodules). "" is the package itself, the public facade.
LAYERS = [
    {"errors", "events", "config", "restore", "registry", "checkfree.rule", "checkfree.plan", "stragglers", "live",
     "spares", "node_agent", "warmup"},
    {"detect", "worker", "placement", "fleet", "pipeline.spec", "pipeline.schedule", "metrics"},
    {"policy", "coordinator", "pipeline.stage", "worker_process"},
    {"checkfree.policy", "result", "heal"},
    {"checkfree", "inplace"},
    {"policies", "job", "pipeline.runtime"},
    {"launcher", "pipeline"},
    {"", "demo", "testing"},
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and (node.module == "recovery" or node.module.startswith("recovery.")):
                target = node.module.removeprefix("recovery").lstrip(".")
            else:
                found.add("<outside>:" + (node.module or ""))
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}" if target else alias.name
                found.add(sub if sub in modules else target)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "recovery" or alias.name.startswith("recovery."):
                    found.add(alias.name.removeprefix("recovery").lstrip("."))
                else:
                    found.add("<outside>:" + alias.name)
    found.discard(name)
    return found


def test_every_module_has_a_layer():
    assert set(_modules()) == set(LAYER), "add the module to LAYERS here and to the map in docs/recovery.md"


def test_imports_point_down_the_layers():
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        for dep in _imports(name, path, modules):
            if dep.startswith("<outside>:"):
                top = dep.removeprefix("<outside>:").split(".")[0]
                if top in ("examples", "experiments", "tests"):
                    wrong.append(f"{name} imports {top}")
                continue
            own_submodule = name == "" or dep.startswith(name + ".")
            if not own_submodule and LAYER[dep] >= LAYER[name]:
                wrong.append(f"{name or 'recovery'} (layer {LAYER[name]}) imports {dep} (layer {LAYER[dep]})")
    assert not wrong, "\n".join(wrong)


def test_no_module_over_400_lines():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > 400}
    assert not long, long
