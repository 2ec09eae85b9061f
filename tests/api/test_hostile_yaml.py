"""Hostile RecJob files: refused before they cost anything, each with a line and column
(or the file's size), never a traceback (a hung `recjob validate` fails by its timeout)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from recjob_operator.api.documents import MAX_FILE_BYTES, load_documents, parse_documents

REPO = Path(__file__).resolve().parents[2]
SEARCH = (REPO / "examples" / "recjob-search.yaml").read_text()


def alias_bomb(depth: int = 9) -> str:
    """A billion-laughs document: each level a list of nine aliases of the one before."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, depth)]
    return "\n".join(lines) + "\n"


def inject(spec_line: str) -> str:
    """The search sample with one more line under ``spec:``."""
    return SEARCH.replace("spec:\n", f"spec:\n  {spec_line}\n", 1)


def only_problem(text: str) -> str:
    (document,) = parse_documents(text)
    assert document.content is None
    (problem,) = document.problems
    return problem.message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (alias_bomb(), "anchors and aliases (&a0) are not accepted"),
        (SEARCH.replace("metadata:\n", "metadata:\n  labels: *x\n", 1), "(*x) are not accepted"),
        (inject("? !!set {a: null}\n  : 1"), "mapping keys must be strings or numbers"),
        (inject("seed: " + "9" * 5001), "an integer of 5001 digits (at most 40)"),
        (inject("deep: " + "[" * 600 + "]" * 600), "nested deeper than 64 levels"),
        (inject("deep: " + "{a: " * 100 + "1" + "}" * 100), "nested deeper than 64 levels"),
    ],
    ids=["alias-bomb", "alias", "set-key", "huge-integer", "deep-lists", "deep-mappings"],
)
def test_hostile_yaml_is_refused_with_its_place(text: str, expected: str) -> None:
    message = only_problem(text)
    assert expected in message
    assert message.startswith("invalid YAML at line ")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # found by tests/fuzz (fuzz_recjob_yaml): each was a traceback or named no place
        ("kind: RecJob\nspec: {seed: 1\x00}", "line 2, column 15: unacceptable character #x0000"),
        ("a: 1\r\nb: x\x07", "line 2, column 5: unacceptable character #x0007"),
        ("a: 1\nb: [2001-14-14]", "line 2, column 5: '2001-14-14' is not a valid timestamp"),
        (inject("date: !!timestamp soon"), "'soon' is not a valid timestamp"),
        (inject("flag: !!bool maybe"), "'maybe' is not a valid bool"),
        (inject("seed: !!int x"), "'x' is not a valid int: invalid literal"),
        (inject("seed: !!int [1]"), "expected a scalar node, but found sequence"),
        (inject("x: !!map [1]"), "a sequence is not a valid map"),
    ],
    ids=["nul", "bell-crlf", "month-14", "timestamp", "bool", "int", "int-list", "map-list"],
)
def test_values_yaml_cannot_read_are_refused_with_their_place(text: str, expected: str) -> None:
    message = only_problem(text)
    assert expected in message
    assert message.startswith("invalid YAML at line ")


def test_what_a_recjob_needs_still_loads() -> None:
    (document,) = parse_documents(SEARCH)
    assert document.problems == [] and document.content["kind"] == "RecJob"
    (document,) = parse_documents(inject("seed: 18446744073709551615"))  # 20 digits: fine
    assert document.content["spec"]["seed"] == 2**64 - 1


def test_an_oversized_file_is_refused_before_it_is_read(tmp_path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text(SEARCH + "# " + "x" * MAX_FILE_BYTES + "\n")
    (document,) = load_documents(path)
    (problem,) = document.problems
    assert "a RecJob file may have at most 1,048,576" in problem.message
    assert "at most 1,048,576" in only_problem(SEARCH + "#" + "é" * (MAX_FILE_BYTES // 2))


@pytest.mark.parametrize("name", ["bomb", "huge-integer"])
def test_recjob_validate_answers_at_once(tmp_path, name: str) -> None:
    path = tmp_path / f"{name}.yaml"
    path.write_text(alias_bomb() if name == "bomb" else inject("seed: " + "9" * 5001))
    result = subprocess.run([sys.executable, "-m", "recjob_operator", "validate", str(path)],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr + result.stdout
    assert "invalid YAML at line" in result.stdout + result.stderr
