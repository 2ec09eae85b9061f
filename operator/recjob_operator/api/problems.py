"""What is wrong with a RecJob: problems that name a field path and what was expected."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a RecJob: where (a field path) and what was expected."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class Problems(list[Problem]):
    """A list of problems with a short way to add one."""

    def add(self, path: str, message: str) -> None:
        self.append(Problem(path, message))


class RecJobInvalid(ValueError):
    """Raised by :func:`parse_recjob` with every problem found."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("; ".join(str(p) for p in problems))
