"""Reading RecJob YAML files: several documents per file, syntax errors and duplicate keys
reported with line numbers instead of raised."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .validation import Problem


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (the API server would reject them too)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, list | dict):
            raise yaml.constructor.ConstructorError(
                None, None, "mapping keys must be scalars", key_node.start_mark
            )
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (first at line {seen[key] + 1})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


@dataclass
class Document:
    """One YAML document of a file: its content, or why it could not be read."""

    source: str
    index: int
    content: Any = None
    problems: list[Problem] = field(default_factory=list)

    @property
    def label(self) -> str:
        """``file`` or ``file#N`` for the N-th document (1-based) of a multi-document file."""
        return self.source if self.index == 0 else f"{self.source}#{self.index + 1}"


def load_documents(path: str | Path) -> list[Document]:
    """Every non-empty YAML document in ``path``; unreadable files give one problem document."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        return [Document(source, 0, problems=[Problem("", f"cannot read file: {error}")])]
    return parse_documents(text, source)


def parse_documents(text: str, source: str = "<string>") -> list[Document]:
    """Parse YAML text into documents (see :func:`load_documents`)."""
    documents: list[Document] = []
    try:
        for content in yaml.load_all(text, Loader=_StrictLoader):
            if content is not None:
                documents.append(Document(source, len(documents), content))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = getattr(error, "problem", None) or str(error)
        documents.append(
            Document(
                source, len(documents), problems=[Problem("", f"invalid YAML at {where}{what}")]
            )
        )
    if not documents:
        documents.append(Document(source, 0, problems=[Problem("", "no YAML document found")]))
    return documents
