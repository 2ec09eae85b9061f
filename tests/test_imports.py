"""Dependencies point one way: the API types (``recjob_operator.api``) are the ground every
component stands on; the trainer and serving import nothing else of the operator, and the
operator imports neither of them (checked in every module's source, imports inside
functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {
    "recjob_operator": REPO / "operator" / "recjob_operator",
    "recjob_trainer": REPO / "trainer" / "recjob_trainer",
    "recjob_serving": REPO / "serving" / "recjob_serving",
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every absolute import in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return sorted(found)


def forbidden(package: str, module: str) -> bool:
    """Whether ``package``'s code may not import ``module``."""
    if package == "recjob_operator":
        return module.split(".")[0] in ("recjob_trainer", "recjob_serving")
    if module.split(".")[0] != "recjob_operator":
        return False
    return not (module + ".").startswith("recjob_operator.api.")


def violations(package: str) -> list[str]:
    """Every import of ``package`` that crosses the line, as ``file:line module``."""
    root = PACKAGES[package]
    return [
        f"{path.relative_to(REPO)}:{line} {module}"
        for path in sorted(root.rglob("*.py"))
        for line, module in imported_modules(path)
        if forbidden(package, module)
    ]


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_imports_point_one_way(package: str) -> None:
    assert violations(package) == []


def test_the_check_sees_a_crossing(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "from recjob_operator.api.validation import parse_recjob\n"
        "def f():\n    from recjob_operator.kube import backend\n"
        "import recjob_operator.controller.plan\n"
    )
    lines = [(n, m) for n, m in imported_modules(module) if forbidden("recjob_trainer", m)]
    assert lines == [(3, "recjob_operator.kube.backend"), (4, "recjob_operator.controller.plan")]
    assert forbidden("recjob_operator", "recjob_trainer.batches.history_text")
    assert not forbidden("recjob_serving", "recjob_trainer.models.load_model")
