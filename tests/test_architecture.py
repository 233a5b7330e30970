"""Module boundaries, checked on the source: models know no parallelism, the MCMC core imports nothing from
parallel/, and data code never imports the models (imports inside functions count too)."""

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "ebwm_scale"


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


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


@pytest.mark.parametrize(
    "files, forbidden",
    [
        (sorted((PACKAGE / "models").glob("*.py")), ("torch.distributed", "ebwm_scale.parallel", "ebwm_scale.train")),
        (
            [PACKAGE / "mcmc.py", PACKAGE / "states.py", PACKAGE / "vocab_state.py"],
            ("torch.distributed", "ebwm_scale.parallel"),
        ),
        (sorted((PACKAGE / "data").glob("*.py")) + sorted((REPO / "data_prep").glob("*.py")), ("ebwm_scale.models",)),
    ],
    ids=["models", "mcmc-core", "data"],
)
def test_module_boundaries(files, forbidden):
    assert _offending(files, forbidden) == []
