"""Events and messages a person reads are one printable line: terminal escape codes from
logs removed, line breaks joined, other control characters and bidirectional overrides
shown escaped — in the reconcile core's Events and status, in Kubernetes Events, in what
``recjob run`` prints and in the log line local mode picks as a failure's reason."""

from __future__ import annotations

import copy
import io
from datetime import UTC, datetime

from rich.console import Console

from recjob_operator.api.text import one_line
from recjob_operator.api.validation import parse_recjob
from recjob_operator.controller.reconcile import ChildObservation, EmitEvent, Observed, reconcile
from recjob_operator.kube.backend import KubeBackend
from recjob_operator.local.backend import _last_error
from recjob_operator.local.view import LiveView
from tests.conftest import MINIMAL

T0 = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
#: A log tail as a dying trainer leaves it: DeepSpeed's coloured warning, a progress bar
#: redrawn with carriage returns, a window title, a bell, a user's product title with a
#: right-to-left override, and the error.
LOG = (
    "\x1b[93m [WARNING] \x1b[0m async_io requires the dev libaio .so object\n"
    "Loading weights:   0%|   | 0/103\rLoading weights: 100%|###| 103/103\n"
    "\x1b]0;rank0\x07step 40/300\tloss 0.41\x07\n"
    "bad title \u202egnp.exe\n"
    "RuntimeError: CUDA out of memory\n"
)


def printable(text: str) -> bool:
    return (
        "\n" not in text
        and "\r" not in text
        and not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or c == "\u202e" for c in text)
    )


def test_one_line_keeps_what_a_person_should_read() -> None:
    line = one_line(LOG)
    assert line == (
        "[WARNING] async_io requires the dev libaio .so object | "
        "Loading weights: 100%|###| 103/103 | step 40/300 loss 0.41\\x07 | "
        "bad title \\u202egnp.exe | RuntimeError: CUDA out of memory"
    )
    assert printable(line)
    assert one_line("\x1bca\x00b\x9b31mc\x1b", 100) == "a\\x00bc\\x1b"  # ESC c: reset
    assert one_line("x" * 50, 10) == "x" * 7 + "..."
    assert one_line(one_line(LOG)) == one_line(LOG)  # stable: status is not rewritten
    assert one_line("Ünïcödé tïtle ✓") == "Ünïcödé tïtle ✓"


def job():
    document = copy.deepcopy(MINIMAL)
    document["metadata"]["generation"] = 1
    return parse_recjob(document)


def test_reconcile_events_and_status_are_one_printable_line() -> None:
    recjob = job()
    recjob.status = reconcile(recjob, Observed(), None, T0).status
    failed = ChildObservation("minimal-g1-train", "Failed", message=LOG)
    decision = reconcile(recjob, Observed(training=failed), None, T0)
    events = [a for a in decision.actions if isinstance(a, EmitEvent)]
    assert events and all(printable(e.message) for e in events)
    assert "RuntimeError: CUDA out of memory" in events[0].message
    status = decision.status
    texts = [status.message, status.training.message, *(c.message for c in status.conditions)]
    assert all(printable(t) for t in texts if t)
    assert "CUDA out of memory" in status.message


def test_kubernetes_events_carry_a_printable_message() -> None:
    sent = []

    class Core:
        def create_namespaced_event(self, namespace, body):
            sent.append(body)

    backend = KubeBackend.__new__(KubeBackend)
    backend.core = Core()
    backend.emit_event(job(), EmitEvent("Warning", "TrainingFailed", LOG * 20))
    message = sent[0]["message"]
    assert printable(message) and len(message) <= 1024 and message.endswith("...")


def test_recjob_run_prints_events_as_plain_lines() -> None:
    output = io.StringIO()
    view = LiveView(Console(file=output, force_terminal=False, width=4000))

    class Backend:
        events = [EmitEvent("Warning", "TrainingRestarted", LOG)]

    with view:
        view(job(), Backend(), None)
    printed = [line for line in output.getvalue().splitlines() if "TrainingRestarted" in line]
    assert printed == ["[TrainingRestarted] " + one_line(LOG)]
    assert "\x1b" not in output.getvalue()


def test_a_failed_process_reason_has_no_escape_codes() -> None:
    assert _last_error(LOG) == "RuntimeError: CUDA out of memory"
    coloured = "ok\n\x1b[31mValueError: bad \x1b[1mrow\x1b[0m\r\n\x1b[2K"
    assert _last_error(coloured) == "ValueError: bad row"
