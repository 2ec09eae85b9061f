"""The `recjob` command line and the repository's promises (console scripts, imports)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from recjob_operator.cli import cli
from recjob_operator.crd import render_crd_yaml
from tests.conftest import EXAMPLES, REPO, load_yaml

BIN = Path(sys.executable).parent


def run_cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_validate_valid_files_prints_one_summary_line_each() -> None:
    code, out, err = run_cli("validate", *map(str, EXAMPLES))
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == len(EXAMPLES)
    assert all(": valid RecJob " in line for line in lines)
    search = next(line for line in lines if "recjob-search.yaml" in line)
    assert "search-ranking" in search and "ZeRO-2" in search and "10→50→100%" in search


def test_validate_prints_every_problem_and_fails(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        (REPO / "examples" / "recjob-search.yaml")
        .read_text()
        .replace("steps: [10, 50, 100]", "steps: [50, 10]")
        .replace("maxReplicas: 2", "maxReplicas: 0")
    )
    code, out, err = run_cli("validate", str(bad))
    assert code == 1
    assert f"{bad}: " in err
    assert "spec.rollout.steps[1]: steps must increase strictly" in err
    assert "spec.serving.maxReplicas:" in err
    assert out == ""


def test_validate_multi_document_file_mixes_valid_and_invalid(tmp_path: Path) -> None:
    good = (REPO / "examples" / "recjob-search.yaml").read_text()
    path = tmp_path / "two.yaml"
    path.write_text(good + "\n---\n" + good.replace("task: search-ranking", "task: nope"))
    code, out, err = run_cli("validate", str(path))
    assert code == 1
    assert f"{path}: valid RecJob" in out
    assert f"{path}#2: 1 problem(s)" in err and "spec.data.task" in err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("spec: [unclosed", "invalid YAML at line 1"),
        ("a: 1\na: 2\n", "duplicate key 'a' (first at line 1)"),
        ("", "no YAML document found"),
        ("- just\n- a list\n", "expected a RecJob object (a mapping), got a list"),
    ],
)
def test_validate_reports_unreadable_yaml(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "x.yaml"
    path.write_text(text)
    code, _, err = run_cli("validate", str(path))
    assert code == 1 and expected in err


def test_validate_missing_file(tmp_path: Path) -> None:
    code, _, err = run_cli("validate", str(tmp_path / "nope.yaml"))
    assert code == 1 and "cannot read file" in err


def test_crd_command_prints_and_writes_the_crd(tmp_path: Path) -> None:
    code, out, _ = run_cli("crd")
    assert code == 0 and out == render_crd_yaml()
    target = tmp_path / "crd.yaml"
    code, _, _ = run_cli("crd", "-o", str(target))
    assert code == 0 and target.read_text() == render_crd_yaml()
    assert not list(tmp_path.glob("*.tmp"))


def test_run_refuses_an_invalid_recjob_before_starting_anything(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    document = load_yaml(EXAMPLES[0])
    document["spec"]["rollout"]["steps"] = [50, 10]
    bad.write_text(yaml.safe_dump(document))
    code, _, err = run_cli("run", str(bad), "--workdir", str(tmp_path / "work"))
    assert code == 1 and "spec.rollout.steps[1]" in err
    assert not (tmp_path / "work").exists()


def test_status_names_the_known_recjobs(tmp_path: Path) -> None:
    (tmp_path / "work" / "known").mkdir(parents=True)
    (tmp_path / "work" / "known" / "status.yaml").write_text("kind: RecJob\n")
    code, _, err = run_cli("status", "other", "--workdir", str(tmp_path / "work"))
    assert code == 1 and "no RecJob 'other'" in err and "known: known" in err
    code, out, _ = run_cli("status", "known", "--workdir", str(tmp_path / "work"))
    assert code == 0 and out == "kind: RecJob\n"


@pytest.mark.parametrize("script", ["recjob", "recjob-train", "recjob-serve"])
def test_console_scripts_are_installed(script: str) -> None:
    result = subprocess.run([str(BIN / script), "--version"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "0.1.0" in result.stdout


def test_stdlib_operator_is_not_shadowed_from_the_repository_root() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import operator; print(operator.add(2, 3))"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "5"
    for folder in ("operator", "trainer", "serving"):
        assert not (REPO / folder / "__init__.py").exists()
