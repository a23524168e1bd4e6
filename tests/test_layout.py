"""The package's layout (README "Layout"): subpackages that import downhill only, no import circle, a
small top, no module over 800 lines, and the public names of ``dino_hf``."""

from __future__ import annotations

import ast
from pathlib import Path

import dino_hf

PACKAGE = Path(dino_hf.__file__).resolve().parent

#: Each layer may import the layers after it (and itself), never one before it.
LAYERS = (("cli",), ("train",), ("eval",), ("hub",), ("models",), ("losses", "data"), ("base",))
MAX_MODULE_LINES = 800
MAX_TOP_MODULES = 4


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The dino_hf modules ``path`` imports (at any depth of the file: lazy imports count too)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            candidates = [f"{module}.{alias.name}" for alias in node.names] + [module]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        for candidate in candidates:
            if candidate.startswith("dino_hf.") and candidate in MODULES:
                found.add(candidate)
                break
    found.discard(name)
    return found


MODULES = {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _layer(module: str) -> int:
    top = module.split(".")[1]
    return next(index for index, names in enumerate(LAYERS) if top in names)


def test_every_module_belongs_to_a_layer_and_imports_downhill_only():
    uphill = []
    for name, path in MODULES.items():
        if name == "dino_hf":
            continue  # the package's front door re-exports from every layer
        for imported in _imports(path):
            if imported != "dino_hf" and _layer(imported) < _layer(name):
                uphill.append(f"{name} -> {imported}")
    assert not uphill


def test_there_is_no_import_circle():
    graph = {name: _imports(path) - {"dino_hf"} for name, path in MODULES.items() if name != "dino_hf"}
    visiting: list[str] = []
    done: set[str] = set()

    def visit(module: str) -> None:
        if module in done:
            return
        assert module not in visiting, " -> ".join([*visiting[visiting.index(module):], module])
        visiting.append(module)
        for imported in sorted(graph.get(module, ())):
            visit(imported)
        visiting.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_a_small_top_and_no_module_over_800_lines():
    top_modules = sorted(path.name for path in PACKAGE.glob("*.py"))
    assert len(top_modules) <= MAX_TOP_MODULES, top_modules
    long = {name: lines for name, path in MODULES.items()
            if (lines := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert not long
    assert not [name for name in MODULES if name.rsplit(".", 1)[-1] in ("utils", "helpers", "misc")]


def test_dir_shows_the_public_names_only():
    names = dir(dino_hf)
    assert set(dino_hf.__all__) <= set(names)
    assert not {"Any", "TYPE_CHECKING", "annotations", "importlib"} & set(names)
    for name in dino_hf.__all__:
        assert getattr(dino_hf, name).__name__ == name
