"""recjob.dev/v1alpha1: the RecJob API types (spec, status) and constants."""

from .common import (
    API_VERSION,
    APPROVE_ANNOTATION,
    GROUP,
    KIND,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    parse_duration,
    parse_quantity,
)
from .recjob import MAX_NAME_LENGTH, ObjectMeta, RecJob
from .spec import RecJobSpec
from .spec_data import DataSpec
from .spec_delivery import ExportSpec, MetricCheck, RolloutSpec, ServingSpec
from .spec_training import CompressionSpec, ModelSpec, TrainingSpec
from .status import CONDITION_TYPES, MAX_HISTORY, TERMINAL_PHASES, Condition, RecJobStatus

__all__ = [
    "API_VERSION",
    "APPROVE_ANNOTATION",
    "CONDITION_TYPES",
    "GROUP",
    "KIND",
    "MAX_HISTORY",
    "MAX_NAME_LENGTH",
    "PLURAL",
    "SHORT_NAMES",
    "SINGULAR",
    "TERMINAL_PHASES",
    "VERSION",
    "CompressionSpec",
    "Condition",
    "DataSpec",
    "ExportSpec",
    "MetricCheck",
    "ModelSpec",
    "ObjectMeta",
    "RecJob",
    "RecJobSpec",
    "RecJobStatus",
    "RolloutSpec",
    "ServingSpec",
    "TrainingSpec",
    "parse_duration",
    "parse_quantity",
]
