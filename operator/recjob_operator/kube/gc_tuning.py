"""Python's cyclic garbage collector tuned for a long-running operator.

CPython starts a young collection every 700 net allocations and a full one whenever the
objects that survived grow by a quarter. The operator keeps a few hundred objects per
RecJob (kopf's per-object state, the parsed RecJob, its children's cached bodies), so while
1,000 RecJobs came at once the collector was 17% of its CPU, two thirds of that in full
collections walking every module, class and cached object loaded at startup again and
again (measured with ``gc.callbacks`` during ``bench/operator_scale.py``).

Two standard remedies, both reversible with the environment: a larger young-generation
threshold (fewer, still short, young collections; cyclic garbage lives a little longer),
and ``gc.freeze()`` once startup is over, which moves everything alive then into the
permanent generation that collections no longer walk. Reference counting, which frees
almost all of the operator's garbage, is unaffected.
"""

from __future__ import annotations

import gc
import os

#: Net allocations between two young collections (CPython's default: 700).
#: ``RECJOB_GC_THRESHOLD=700`` restores CPython's behaviour.
YOUNG_THRESHOLD = int(os.environ.get("RECJOB_GC_THRESHOLD", "50000"))


def tune_thresholds() -> None:
    """Raise the young generation's threshold, keeping CPython's other two."""
    _, middle, old = gc.get_threshold()
    gc.set_threshold(max(1, YOUNG_THRESHOLD), middle, old)


def freeze_startup_objects() -> None:
    """Collect once, then exempt every object alive now (modules, classes, clients, the
    settings built at startup) from later collections. Call once, after startup."""
    if os.environ.get("RECJOB_GC_FREEZE", "1") == "0":
        return
    gc.collect()
    gc.freeze()
