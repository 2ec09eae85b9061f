"""What a recommendation model is queried with: a user's recent items as one text.

Part of the API because three components must build it alike: the trainer (training
batches and evaluation), serving (TensorRT calibration) and local mode's traffic replay;
a request that differs from what the model was trained on silently ranks worse.
"""

from __future__ import annotations


def history_text(history: list[str], texts: dict[str, str]) -> str:
    """A user's recent items (``history``, oldest first, item ids) as text, most recent
    first; items without a text are left out."""
    return " ; ".join(texts[i] for i in reversed(history) if i in texts) or "(no history)"
