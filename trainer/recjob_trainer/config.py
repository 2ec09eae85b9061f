"""The trainer's configuration file: the RecJob sections it needs plus where to write.

The schema is an API type (``recjob_operator.api.v1alpha1.trainer``), shared with the
operator and local mode that write the file; `recjob-train --config FILE` reads it here.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from recjob_operator.api.v1alpha1.trainer import (
    EvaluationSettings,
    TrainerConfig,
    trainer_config,
)

#: The trainer config of a RecJob (what the operator and local mode write).
config_from_recjob = trainer_config

__all__ = ["EvaluationSettings", "TrainerConfig", "config_from_recjob", "load_config"]


def load_config(path: str | Path) -> TrainerConfig:
    """Read a trainer config (YAML or JSON)."""
    document = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    return TrainerConfig.model_validate(document)
