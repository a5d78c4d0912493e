"""The house rules: one installed top-level package, and layers that never import upward.

core (transresnet.*) <- transresnet.index <- transresnet.service <- transresnet.cli (entry points).
Every import statement counts, including those inside functions and ``TYPE_CHECKING`` blocks.
"""

from __future__ import annotations

import ast
from importlib import metadata
from pathlib import Path

import pytest

from tests.helpers import REPO

PACKAGE_DIRS = {"transresnet": REPO / "transresnet", "transresnet.index": REPO / "index",
                "transresnet.service": REPO / "service", "transresnet.configs": REPO / "configs"}
LAYERS = ("core", "transresnet.index", "transresnet.service", "transresnet.cli")


def layer_of(module: str) -> int | None:
    """0 core, 1 index, 2 service, 3 entry points; None for modules outside the project."""
    if module != "transresnet" and not module.startswith("transresnet."):
        return None
    if module in ("transresnet", "transresnet.__main__"):  # the public API facade and `python -m transresnet`
        return len(LAYERS) - 1
    for rank in range(len(LAYERS) - 1, 0, -1):
        if module == LAYERS[rank] or module.startswith(LAYERS[rank] + "."):
            return rank
    return 0


def module_files() -> dict[str, Path]:
    """Every project module by its import name (the folders index/ and service/ map into transresnet)."""
    modules: dict[str, Path] = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[0] in ("index", "service", "configs") and package == "transresnet":
                continue  # not inside the core folder; guards against a stray copy
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def imported_modules(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative imports resolved."""
    is_package = path.name == "__init__.py"
    base = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)]
                target = ".".join(anchor + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from transresnet import index` imports the subpackage transresnet.index.
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
            found.append((node.lineno, target))
    return found


def upward_imports(modules: dict[str, Path]) -> list[str]:
    problems = []
    for module, path in sorted(modules.items()):
        own = layer_of(module)
        for line, target in imported_modules(module, path):
            other = layer_of(target)
            if other is not None and own is not None and other > own and target in modules:
                problems.append(f"{path}:{line}: {LAYERS[own]} module {module} imports "
                                f"{target} ({LAYERS[other]})")
    return problems


def test_no_module_imports_a_higher_layer() -> None:
    modules = module_files()
    assert "transresnet.index.build" in modules and "transresnet.service.main" in modules
    assert "transresnet.cli" in modules and "transresnet.encode" in modules
    assert upward_imports(modules) == []


@pytest.mark.parametrize("statement", [
    "from transresnet.index import build_index",
    "import transresnet.service.main",
    "def late():\n    from transresnet.cli import main",
    "from transresnet import index",
])
def test_the_check_catches_a_core_module_importing_upward(tmp_path: Path, statement: str) -> None:
    modules = module_files()
    bad = tmp_path / "config.py"
    bad.write_text(modules["transresnet.config"].read_text() + "\n" + statement + "\n")
    modules["transresnet.config"] = bad
    problems = upward_imports(modules)
    assert problems and all("core module transresnet.config imports transresnet" in p for p in problems)


def test_index_may_not_import_the_service(tmp_path: Path) -> None:
    modules = module_files()
    bad = tmp_path / "store.py"
    bad.write_text(modules["transresnet.index.store"].read_text() + "\nfrom ..service import main\n")
    modules["transresnet.index.store"] = bad
    problems = upward_imports(modules)
    assert problems and all("transresnet.index module transresnet.index.store imports transresnet.service" in p
                            for p in problems)


def test_the_distribution_installs_one_top_level_package() -> None:
    top_level = metadata.distribution("transresnet").read_text("top_level.txt")
    assert top_level is not None and top_level.split() == ["transresnet"]
    import transresnet.index
    import transresnet.service

    assert Path(transresnet.index.__file__).parent == REPO / "index"
    assert Path(transresnet.service.__file__).parent == REPO / "service"
