"""Data flows one way (docs/design.md §2): no module imports from a layer above its own, or from a sibling
package of its layer, and no import runs in a circle. Every import counts, also those inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "rankscope"

# The layer order of docs/design.md §2, lowest first: a component may import its own modules and lower layers.
LAYERS = [
    ("errors", "vocab"),
    ("spectra", "rundir"),
    ("attention_forms", "store", "representations", "data"),
    ("probes", "nn"),
    ("analysis",),
    ("train",),
    ("study", "report"),
    ("commands",),
    ("cli", "__init__"),
]
LAYER = {component: i for i, names in enumerate(LAYERS) for component in names}


def _module(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(p): p for p in SRC.rglob("*.py")}


def component(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def imports(module: str) -> set[str]:
    """The rankscope modules ``module`` imports (``from package import submodule`` counts as the submodule)."""
    tree = ast.parse(MODULES[module].read_text())
    is_package = MODULES[module].name == "__init__.py"
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("rankscope")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            if not base.startswith("rankscope"):
                continue
            for alias in node.names:
                name = f"{base}.{alias.name}"
                out.add(name if name in MODULES else base)
    return out - {module}


def test_every_component_has_a_layer():
    assert {component(m) for m in MODULES} <= set(LAYER), sorted({component(m) for m in MODULES} - set(LAYER))


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_runs_upward_or_sideways(module):
    mine = component(module)
    for target in imports(module):
        theirs = component(target)
        assert theirs == mine or LAYER[theirs] < LAYER[mine], (
            f"{module} (layer {LAYER[mine]}, {mine}) imports {target} (layer {LAYER[theirs]}, {theirs})")


def test_no_import_runs_in_a_circle():
    graph = {m: {t for t in imports(m) if t in MODULES} for m in MODULES}
    # a package's own __init__ may import its submodules, and they may name the package for a sibling submodule
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in graph[m]:
            if state.get(t) == 1:
                cycle = [*path[path.index(t):], t]
                raise AssertionError("import cycle: " + " → ".join(cycle))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_check_sees_a_planted_upward_import(tmp_path, monkeypatch):
    # negative control: the parser finds an import inside a function, and the rule rejects spectra → nn
    fake = tmp_path / "rankscope" / "spectra" / "fake.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("def f():\n    from rankscope.nn import GPT\n    return GPT\n")
    monkeypatch.setitem(MODULES, "rankscope.spectra.fake", fake)
    monkeypatch.setattr("test_layers.SRC", tmp_path / "rankscope")
    assert "rankscope.nn" in imports("rankscope.spectra.fake")
    with pytest.raises(AssertionError, match=r"imports rankscope\.nn"):
        test_no_import_runs_upward_or_sideways("rankscope.spectra.fake")
