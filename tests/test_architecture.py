"""The layer rules of docs/design.md ("Layers"), checked on the source: every runtime import (inside functions too;
`if TYPE_CHECKING:` blocks aside) goes to the importer's own layer or a lower one, models know no parallelism, the
MCMC core imports nothing from parallel/, data code never imports the models, and no two modules import each other,
directly or around a cycle."""

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "ebwm_scale"

# docs/design.md "Layers", lowest first. A module belongs to the first entry that names it or a package above it.
LAYERS = [
    ("ebwm_scale.errors", "ebwm_scale.extras", "ebwm_scale.logs", "ebwm_scale.numerics", "ebwm_scale.schema"),
    ("ebwm_scale.models",),
    ("ebwm_scale.data",),
    ("ebwm_scale.core",),
    ("ebwm_scale.parallel",),
    ("ebwm_scale.train",),
    ("ebwm_scale.config",),
    ("ebwm_scale.inference",),
    ("ebwm_scale.cli", "ebwm_scale.pretrain", "data_prep"),
]
# Packages of one level below the cli that must not see each other although their order allows it.
INDEPENDENT = [("ebwm_scale.data", ("ebwm_scale.models", "ebwm_scale.core")), ("data_prep", ("ebwm_scale.models",))]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_modules() -> dict[str, Path]:
    paths = sorted(PACKAGE.rglob("*.py")) + sorted((REPO / "data_prep").glob("*.py"))
    return {module_name(path): path for path in paths}


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imported_modules(path: Path, runtime_only: bool = False) -> set[str]:
    """Every module name an import statement in `path` names (`from a import b` names a and a.b); runtime_only
    skips `if TYPE_CHECKING:` blocks."""
    modules: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if runtime_only and _is_type_checking(child):
                continue
            if isinstance(child, ast.Import):
                modules.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module:
                modules.add(child.module)
                modules.update(f"{child.module}.{alias.name}" for alias in child.names)
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return modules


def dependencies(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project modules it imports at run time (a name resolves to the longest module it names)."""
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in imported_modules(path, runtime_only=True):
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    done: set[str] = set()
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return None
        path.append(node)
        for target in sorted(graph.get(node, ())):
            cycle = walk(target)
            if cycle:
                return cycle
        path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = walk(start)
        if cycle:
            return cycle
    return None


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def layer_of(module: str) -> int:
    for index, names in enumerate(LAYERS):
        if any(_within(module, name) for name in names):
            return index
    raise AssertionError(f"{module} is in no layer of LAYERS (docs/design.md): add it there")


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for importer, targets in sorted(graph.items()):
        for target in sorted(targets):
            if layer_of(target) > layer_of(importer):
                problems.append(f"{importer} (layer {layer_of(importer)}) imports {target} (layer {layer_of(target)})")
            for package, forbidden in INDEPENDENT:
                if _within(importer, package) and any(_within(target, f) for f in forbidden):
                    problems.append(f"{importer} imports {target}")
    return problems


def _offending(files: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    assert files, "no files to check"
    return [
        f"{path.name} imports {module}"
        for path in files
        for module in sorted(imported_modules(path))
        if any(module == f or module.startswith(f + ".") for f in forbidden)
    ]


def test_the_walk_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from ebwm_scale.parallel import tensor\n    import torch.distributed as d\n")
    assert imported_modules(source) & {"ebwm_scale.parallel.tensor", "torch.distributed"} == {
        "ebwm_scale.parallel.tensor",
        "torch.distributed",
    }


def test_type_checking_imports_are_not_runtime_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ebwm_scale.config import X\n")
    assert "ebwm_scale.config" in imported_modules(source)
    assert "ebwm_scale.config" not in imported_modules(source, runtime_only=True)


@pytest.mark.parametrize(
    "files, forbidden",
    [
        (sorted((PACKAGE / "models").glob("*.py")), ("torch.distributed", "ebwm_scale.parallel", "ebwm_scale.train")),
        (sorted((PACKAGE / "core").glob("*.py")), ("torch.distributed", "ebwm_scale.parallel")),
        (sorted((PACKAGE / "data").glob("*.py")) + sorted((REPO / "data_prep").glob("*.py")), ("ebwm_scale.models",)),
    ],
    ids=["models", "mcmc-core", "data"],
)
def test_module_boundaries(files, forbidden):
    assert _offending(files, forbidden) == []


def test_the_cycle_finder_finds_a_cycle_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles():
    assert find_cycle(dependencies(source_modules())) is None


def test_every_import_goes_down_the_layers():
    assert layer_violations(dependencies(source_modules())) == []


def test_a_layer_violation_is_seen():
    assert layer_violations({"ebwm_scale.core.mcmc": {"ebwm_scale.parallel.tensor"}}) == [
        "ebwm_scale.core.mcmc (layer 3) imports ebwm_scale.parallel.tensor (layer 4)"
    ]
    assert layer_violations({"ebwm_scale.data.loader": {"ebwm_scale.models.ebt"}}) == [
        "ebwm_scale.data.loader imports ebwm_scale.models.ebt"
    ]


def test_no_test_file_imports_another():
    """What test files share lives in tests/helpers.py (and conftest.py, distributed.py, faults.py): a test module
    that another imports is loaded twice, under two module names, and ties the two files' refactors together."""
    files = sorted((REPO / "tests").rglob("*.py"))
    test_modules = {module_name(path) for path in files if path.name.startswith("test_")}
    offending = [
        f"{path.relative_to(REPO)} imports {module}"
        for path in files
        for module in sorted(imported_modules(path))
        if module != module_name(path) and (module in test_modules or module.split(".")[0].startswith("test_"))
    ]
    assert files
    assert offending == []
