"""Text from logs, child processes, Prometheus or users made safe to show: one printable
line for Kubernetes Events, status messages and what ``recjob run`` prints.

A log line can hold terminal escape sequences (colours from DeepSpeed or uvicorn, cursor
moves and carriage returns of progress bars, window titles) and a user's data any control
character; printed as they are they repaint or garble a terminal, and in ``kubectl
describe`` they show as raw codes. :func:`one_line` removes escape sequences, keeps what a
terminal would show of a line rewritten with carriage returns, joins lines with `` | ``
and shows every other control character (and the bidirectional-text overrides that can
make text read differently from what it is) escaped, e.g. ``\\x07`` or ``\\u202e``.
"""

from __future__ import annotations

import re

#: Escape sequences (ECMA-48): CSI (colours, cursor, erase), OSC (titles, hyperlinks; ends
#: at BEL or ST), DCS / SOS / PM / APC strings, other two-character escapes, 8-bit CSI.
_ESCAPES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"
    r"|\x1b[PX^_][^\x1b]*(?:\x1b\\)?"
    r"|\x1b[ -/]*[0-~]"
    r"|\x9b[0-?]*[ -/]*[@-~]"
)
_LINE_BREAKS = re.compile(r"\r?\n|[\v\f\x1c-\x1e\x85\u2028\u2029]")
#: C0 and C1 controls, DEL, and the bidirectional formatting characters.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escaped(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def one_line(text: object, limit: int | None = None) -> str:
    """``text`` as one printable line (see the module's docstring), at most ``limit``
    characters (cut with ``...``)."""
    lines = []
    for line in _LINE_BREAKS.split(_ESCAPES.sub("", str(text))):
        shown = [part for part in line.split("\r") if part.strip()]  # a bar's last state
        if shown:
            lines.append(" ".join(shown[-1].replace("\t", " ").split()))
    flat = _UNSAFE.sub(_escaped, " | ".join(lines))
    if limit is not None and len(flat) > limit:
        return flat[: max(limit - 3, 0)] + "..."
    return flat
