"""CEL rules of the delivery half of the spec: the export's quality budget, serving and
the canary rollout (steps, metric checks, analysis timing)."""

from __future__ import annotations

from .cel_syntax import (
    KNOWN_PLACEHOLDERS,
    MAX_STEPS,
    REVISION_PATTERN,
    UNKNOWN_PLACEHOLDER_PATTERN,
    cel_string,
    rule,
    schema_rules,
)

# --------------------------------------------------------------------------- export, serving
QUALITY_BUDGET_RULES = schema_rules(
    rule(
        "!has(self.maxRelativeDropVsTeacher)"
        " || self.maxRelativeDropVsTeacher >= self.maxRelativeDrop",
        "cannot be tighter than maxRelativeDrop (the teacher is upstream of the unquantized "
        "student)",
        ".maxRelativeDropVsTeacher",
    )
)

RAW_NEEDS_GATEWAY = (
    "RawDeployment/Standard mode needs a Gateway: KServe splits canary traffic only in "
    "Serverless mode, so RecJob splits it with a Gateway API HTTPRoute on this Gateway"
)
SERVING_RULES = schema_rules(
    rule("self.minReplicas <= self.maxReplicas", "must not exceed maxReplicas", ".minReplicas"),
    rule(
        "self.deploymentMode == 'Serverless' || self.minReplicas >= 1",
        "RawDeployment/Standard cannot scale to zero: at least 1",
        ".minReplicas",
    ),
    rule(
        "self.deploymentMode == 'Serverless' || has(self.gateway)",
        RAW_NEEDS_GATEWAY,
        ".gateway",
        "FieldValueRequired",
    ),
)


# --------------------------------------------------------------------------- rollout
_INDEXES = "[" + ", ".join(str(i) for i in range(MAX_STEPS - 1)) + "]"

STEPS_RULES = schema_rules(
    rule(
        f"{_INDEXES}.all(i, i + 1 >= size(self) || self[i] < self[i + 1])",
        "steps must increase strictly",
    ),
    rule(
        "size(self) == 0 || self[size(self) - 1] == 100",
        "the last step must be 100 (promotion)",
    ),
)

METRICS_RULES = schema_rules(
    rule(
        "self.all(m, self.exists_one(n, n.name == m.name))",
        "metric names must be unique",
    )
)

METRIC_CHECK_RULES = schema_rules(
    rule(
        "has(self.min) || has(self.max)",
        "set min and/or max (a check without a threshold cannot fail)",
    ),
    rule("!has(self.min) || !has(self.max) || self.min <= self.max", "must not exceed max", ".min"),
    rule(
        f"self.query.matches({cel_string(REVISION_PATTERN)})",
        "must contain {{revision}} so the canary and the stable revision are measured apart",
        ".query",
    ),
    rule(
        f"!self.query.matches({cel_string(UNKNOWN_PLACEHOLDER_PATTERN)})",
        f"unknown placeholder; expected {KNOWN_PLACEHOLDERS}",
        ".query",
    ),
)

ROLLOUT_RULES = schema_rules(
    rule("duration(self.interval) >= duration('1s')", "at least 1s", ".interval"),
    rule(
        "duration(self.noData.deadline) >= duration(self.interval)",
        "must be at least the analysis interval",
        ".noData.deadline",
    ),
)
