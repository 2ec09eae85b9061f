"""Reading RecJob YAML files: several documents per file, syntax errors and duplicate keys
reported with line numbers instead of raised.

Hostile input is refused before it costs anything: files over :data:`MAX_FILE_BYTES`
(before reading), YAML aliases and anchors (an alias bomb of a few hundred bytes expands to
gigabytes; a RecJob has no use for them), nesting deeper than :data:`MAX_DEPTH`, integers
longer than :data:`MAX_INT_DIGITS` digits and mapping keys that are not scalars, each with a
line and column, never a traceback. So are characters YAML refuses (NUL, control
characters) and values their type cannot hold (``2024-13-01`` as a timestamp, ``!!bool x``)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .problems import Problem

#: What PyYAML's reader counts as a line break.
_LINE_BREAK = re.compile("\r\n|[\n\r\x85\u2028\u2029]")

#: Largest RecJob file (or text) read: the API server keeps no object over ~1.5 MiB, and no
#: RecJob comes near this.
MAX_FILE_BYTES = 1024 * 1024
#: Deepest nesting of mappings and sequences (a RecJob needs fewer than 10 levels).
MAX_DEPTH = 64
#: Longest integer accepted, in digits (the API's largest bound has 20).
MAX_INT_DIGITS = 40


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (the API server would reject them too),
    aliases and anchors, deep nesting, huge integers and non-scalar keys."""

    def __init__(self, stream) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            sign = "*" if isinstance(event, yaml.AliasEvent) else "&"
            raise yaml.composer.ComposerError(
                None, None,
                f"YAML anchors and aliases ({sign}{event.anchor}) are not accepted in a "
                "RecJob: write the value out", event.start_mark,
            )  # fmt: skip
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested deeper than {MAX_DEPTH} levels", event.start_mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        digits = len(str(node.value).replace("_", "").lstrip("+-"))
        if isinstance(node, yaml.ScalarNode) and digits > MAX_INT_DIGITS:
            raise yaml.constructor.ConstructorError(
                None, None, f"an integer of {digits} digits (at most {MAX_INT_DIGITS})",
                node.start_mark,
            )  # fmt: skip
        return super().construct_yaml_int(node)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        """As SafeLoader's, but a scalar its type cannot hold (``2024-13-01`` read as a
        timestamp, ``!!bool maybe``, ``!!int x``) is a ConstructorError with its place:
        PyYAML's constructors raise ValueError, KeyError, TypeError or AttributeError."""
        try:
            return super().construct_object(node, deep=deep)
        except yaml.YAMLError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as error:
            kind = node.tag.rsplit(":", 1)[-1]
            text = repr(node.value) if isinstance(node, yaml.ScalarNode) else f"a {node.id}"
            text = text if len(text) <= 60 else text[:57] + "..."
            why = f": {error}" if isinstance(error, ValueError) and str(error) else ""
            raise yaml.constructor.ConstructorError(
                None, None, f"{text} is not a valid {kind}{why}", node.start_mark
            ) from None


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _StrictLoader.construct_yaml_int)


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key is not None and not isinstance(key, str | int | float | bool):
            raise yaml.constructor.ConstructorError(
                None, None, "mapping keys must be strings or numbers", key_node.start_mark
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
        size = Path(path).stat().st_size
        if size > MAX_FILE_BYTES:
            return [Document(source, 0, problems=[Problem("", _too_large(size))])]
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        return [Document(source, 0, problems=[Problem("", f"cannot read file: {error}")])]
    return parse_documents(text, source)


def _too_large(size: int) -> str:
    return f"the file is {size:,} bytes; a RecJob file may have at most {MAX_FILE_BYTES:,}"


def parse_documents(text: str, source: str = "<string>") -> list[Document]:
    """Parse YAML text into documents (see :func:`load_documents`)."""
    documents: list[Document] = []
    size = len(text.encode("utf-8", "replace"))  # files were measured before reading
    if size > MAX_FILE_BYTES:
        return [Document(source, 0, problems=[Problem("", _too_large(size))])]
    try:
        for content in yaml.load_all(text, Loader=_StrictLoader):
            if content is not None:
                documents.append(Document(source, len(documents), content))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = getattr(error, "problem", None) or str(error)
        if isinstance(error, yaml.reader.ReaderError):
            # a character YAML refuses anywhere in the text (NUL, most control characters):
            # the reader gives its offset only
            where = _line_and_column(text, error.position)
            what = f"unacceptable character {_character(error.character)}: {error.reason}"
        documents.append(
            Document(
                source, len(documents), problems=[Problem("", f"invalid YAML at {where}{what}")]
            )
        )
    if not documents:
        documents.append(Document(source, 0, problems=[Problem("", "no YAML document found")]))
    return documents


def _line_and_column(text: str, offset: int) -> str:
    """``line L, column C: `` of character ``offset`` of ``text`` (1-based, with YAML's
    line breaks, as its marks are printed)."""
    lines = _LINE_BREAK.split(text[:offset])
    return f"line {len(lines)}, column {len(lines[-1]) + 1}: "


def _character(character: str | int) -> str:
    code = character if isinstance(character, int) else ord(character)
    return f"#x{code:04x}"
