"""Fuzz target: what ``recjob validate FILE`` does with a file's bytes.

Run: ``python tests/fuzz/fuzz_recjob_yaml.py CORPUS_DIR -max_total_time=60`` (libFuzzer
flags; see tests/fuzz/README.md). Each input is written to a file and goes through the
command's own steps: ``load_documents`` (size limit, UTF-8, the strict YAML loader), then
per document ``validate_document`` and, for a valid RecJob, ``summarize``.

Expected: a valid RecJob, or :class:`~recjob_operator.api.validation.Problem` s that each name
a field path (or the file's place: line and column, size, encoding) and say what was
expected, in under :data:`MAX_MESSAGE` characters. Anything else (another exception type,
RecursionError, MemoryError, a hang past libFuzzer's ``-timeout``) is a crash.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path

import atheris

# Instrument the project (and PyYAML's pure-Python parser, for coverage of the syntax) only
# when run as the fuzzer: pytest imports this module for the regression cases and must not
# leave the whole suite instrumented.
_INSTRUMENT = ["recjob_operator", "yaml"]
with (
    atheris.instrument_imports(include=_INSTRUMENT)
    if __name__ == "__main__"
    else contextlib.nullcontext()
):
    from recjob_operator.api.documents import load_documents
    from recjob_operator.api.v1alpha1 import RecJob
    from recjob_operator.api.validation import Problem, validate_document
    from recjob_operator.cli import summarize

#: Longest acceptable problem message (one problem), in characters.
MAX_MESSAGE = 10_000
#: Messages of problems without a field path: they name the file's place or the document.
DOCUMENT_LEVEL = (
    "invalid YAML at line ",
    "no YAML document found",
    "cannot read file: ",
    "expected a RecJob object (a mapping)",
    "the file is ",
)

_DIR = tempfile.TemporaryDirectory(prefix="recjob-fuzz-yaml-")
_FILE = Path(_DIR.name) / "recjob.yaml"


class BadOutcome(AssertionError):
    """The validator answered, but not as it must (the fuzzer reports it as a crash)."""


def _check_problem(problem: object, data: bytes) -> None:
    if not isinstance(problem, Problem):
        raise BadOutcome(f"a problem of type {type(problem).__name__}: {problem!r}")
    text = str(problem)
    if not problem.message.strip():
        raise BadOutcome(f"a problem without a message at {problem.path!r}")
    if len(text) >= MAX_MESSAGE:
        raise BadOutcome(f"a problem message of {len(text)} characters: {text[:300]}...")
    if not problem.path and not problem.message.startswith(DOCUMENT_LEVEL):
        raise BadOutcome(f"a problem that names no field path nor place: {text[:300]}")


def check(data: bytes) -> list[str]:
    """Validate ``data`` as ``recjob validate`` would; the lines it would print."""
    _FILE.write_bytes(data)
    lines = []
    for doc in load_documents(_FILE):
        problems = list(doc.problems)
        job = None
        if not problems:
            job, problems = validate_document(doc.content)
        if problems:
            for problem in problems:
                _check_problem(problem, data)
            lines += [f"{doc.label}: {len(problems)} problem(s)", *(f"  {p}" for p in problems)]
        elif isinstance(job, RecJob):
            summary = summarize(job)
            if not isinstance(summary, str) or not summary.startswith("valid RecJob "):
                raise BadOutcome(f"summarize() gave {summary!r}")
            lines.append(f"{doc.label}: {summary}")
        else:
            raise BadOutcome(f"no problem and no RecJob for document {doc.label}: {job!r}")
    return lines


def TestOneInput(data: bytes) -> None:  # atheris' name
    """One fuzzer input: any exception is a crash."""
    check(data)


def main() -> None:
    """Run the fuzzer (libFuzzer flags in ``sys.argv``)."""
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
