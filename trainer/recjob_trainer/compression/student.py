"""Build a distillation student from the fine-tuned teacher.

The student keeps ``numLayers`` of the teacher's transformer layers (DistilBERT's recipe:
initialising from the teacher's own layers beats a random start by far) and, with
``hiddenSize``, a narrower residual stream sliced from the teacher's weights. The
embeddings, the pooling and the ranking head are the teacher's, so the student starts
close to the teacher and distillation only has to close the gap.
"""

from __future__ import annotations

from dataclasses import replace

from recjob_operator.api.v1alpha1.spec_training import StudentSpec

from ..models import RankingModel
from .structure import bert_layers, clone, keep_layers, narrow_hidden, structure_of


def layer_indices(teacher_layers: int, keep: int, selection: str) -> list[int]:
    """Which teacher layers (0-based) a student of ``keep`` layers takes.

    ``uniform`` maps student layer m to teacher layer ceil((m + 1) * L / n) - 1, so the
    last teacher layer (the one the head was trained on) is always kept, as in TinyBERT's
    uniform mapping; ``first`` / ``last`` take a contiguous block."""
    if not 1 <= keep <= teacher_layers:
        raise ValueError(f"a student of {keep} layers from a teacher of {teacher_layers}")
    if selection == "first":
        return list(range(keep))
    if selection == "last":
        return list(range(teacher_layers - keep, teacher_layers))
    if selection != "uniform":
        raise ValueError(f"layer selection {selection!r}: expected uniform, first or last")
    return [-(-(m + 1) * teacher_layers // keep) - 1 for m in range(keep)]


def build_student(teacher: RankingModel, spec: StudentSpec) -> tuple[RankingModel, list[int]]:
    """A student initialised from ``teacher`` and, for each student layer, the teacher
    layer it came from (the map intermediate-layer matching uses)."""
    layers = len(bert_layers(teacher.encoder))
    mapping = layer_indices(layers, spec.num_layers, spec.layer_selection)
    student = clone(teacher)
    keep_layers(student.encoder, mapping)
    if spec.hidden_size is not None and spec.hidden_size != student.encoder.config.hidden_size:
        narrow_hidden(student, spec.hidden_size)
    student.info = replace(
        teacher.info,
        extra={
            **teacher.info.extra,
            "structure": structure_of(student.encoder),
            "teacher_layers": mapping,
        },
    )
    return student, mapping
