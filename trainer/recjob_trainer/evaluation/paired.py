"""Per-unit NDCG@10 in reports, for paired comparisons of a model with its baselines."""

from __future__ import annotations

from .. import metrics as m

#: Key of the per-query / per-user NDCG@10 values in a report (for paired comparisons;
#: removed before metrics are written).
PER_UNIT = "_ndcg@10_per_unit"


def compare_to_baselines(model: dict, baselines: dict) -> dict[str, dict[str, float]]:
    """Paired bootstrap of the model's NDCG@10 against each baseline on the same queries
    or users; strips the per-unit values from every report."""
    out = {}
    ours = model.pop(PER_UNIT, None)
    for name, report in baselines.items():
        theirs = report.pop(PER_UNIT, None)
        if ours is not None and theirs is not None and len(ours) == len(theirs):
            out[name] = m.paired_bootstrap(ours, theirs)
    return out
