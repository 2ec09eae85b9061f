"""CEL rules of ``spec.training.federated`` and the cross-field rules that tie a
federation to the rest of the spec (``api/semantics_federated.py`` keeps the same rules in
Python and shares these messages)."""

from __future__ import annotations

from .cel_syntax import (
    FORBIDDEN,
    REQUIRED,
    Rules,
    rule,
    schema_rules,
)

# --------------------------------------------------------------------------- federated
#: Messages shared with ``api/semantics.py`` (the Python side adds the values it saw).
FEDERATED_SILOS_REQUIRED = (
    "required: list the silos (each with its own data) or set partition (silos made from spec.data)"
)
FEDERATED_SILOS_AND_PARTITION = "set silos or partition, not both"
FEDERATED_DUPLICATE_SILO = "silo names must be unique"
FEDERATED_TOO_FEW_SILOS = "exceeds the number of silos: no round could ever complete"
FEDERATED_MU_REQUIRED = "required by FedProx (the weight of its proximal term)"
FEDERATED_MU_FORBIDDEN = "mu is FedProx's; set type: FedProx or remove mu"
FEDERATED_SERVER_LR_FORBIDDEN = (
    "serverLearningRate is a server optimizer's (FedAdam, FedAvgM); set one of those types "
    "or remove serverLearningRate"
)
FEDERATED_SERVER_MOMENTUM_FORBIDDEN = (
    "serverMomentum is FedAvgM's; set type: FedAvgM or remove serverMomentum"
)
#: The strategies that keep optimizer state on the server (with differential privacy the
#: trainer puts them outside the DP wrapper: they step from the private release only).
SERVER_OPTIMIZERS = ("FedAdam", "FedAvgM")
_SERVER_OPTIMIZERS = "[" + ", ".join(f"'{t}'" for t in SERVER_OPTIMIZERS) + "]"
FEDERATED_COLUMN_REQUIRED = "required when by is column"
FEDERATED_COLUMN_FORBIDDEN = "set, but by is hash; set by: column or remove column"
FEDERATED_SECURE_AGGREGATION_SILOS = (
    "must be at least 2 with secureAggregation: SecAgg+ hides one silo's update only in a "
    "sum of several, and rebuilds a dropped silo's masks from minSilos shares"
)
FEDERATED_ONE_PROCESS = (
    "federated training runs one process per silo (a Flower SuperNode each); must be 1"
)
FEDERATED_LORA_EXCHANGE = (
    "exchange lora sends LoRA adapters, but model.fineTuning.method is not lora; set "
    "model.fineTuning.method lora, or exchange full"
)
FEDERATED_COMPRESSION = "not supported yet with training.federated; remove compression"
FEDERATED_SEQUENTIAL = (
    "not supported yet with training.federated: use architecture auto (cross-encoder for "
    "search-ranking, bi-encoder for recommendation)"
)

PARTITION_RULES = schema_rules(
    rule(
        "self.by != 'column' || has(self.column)",
        FEDERATED_COLUMN_REQUIRED,
        ".column",
        REQUIRED,
    ),
    rule(
        "self.by == 'column' || !has(self.column)",
        FEDERATED_COLUMN_FORBIDDEN,
        ".column",
        FORBIDDEN,
    ),
)

STRATEGY_RULES = schema_rules(
    rule("self.type != 'FedProx' || has(self.mu)", FEDERATED_MU_REQUIRED, ".mu", REQUIRED),
    rule("self.type == 'FedProx' || !has(self.mu)", FEDERATED_MU_FORBIDDEN, ".mu", FORBIDDEN),
    rule(
        f"self.type in {_SERVER_OPTIMIZERS} || !has(self.serverLearningRate)",
        FEDERATED_SERVER_LR_FORBIDDEN,
        ".serverLearningRate",
        FORBIDDEN,
    ),
    rule(
        "self.type == 'FedAvgM' || !has(self.serverMomentum)",
        FEDERATED_SERVER_MOMENTUM_FORBIDDEN,
        ".serverMomentum",
        FORBIDDEN,
    ),
)

FEDERATED_RULES = schema_rules(
    rule("has(self.silos) || has(self.partition)", FEDERATED_SILOS_REQUIRED, ".silos", REQUIRED),
    rule(
        "!has(self.silos) || !has(self.partition)",
        FEDERATED_SILOS_AND_PARTITION,
        ".partition",
        FORBIDDEN,
    ),
    rule(
        "!has(self.silos) || self.silos.all(s, self.silos.exists_one(t, t.name == s.name))",
        FEDERATED_DUPLICATE_SILO,
        ".silos",
    ),
    rule(
        "!has(self.silos) || self.participation.minSilos <= size(self.silos)",
        FEDERATED_TOO_FEW_SILOS,
        ".participation.minSilos",
    ),
    rule(
        "!has(self.partition) || self.participation.minSilos <= self.partition.count",
        FEDERATED_TOO_FEW_SILOS,
        ".participation.minSilos",
    ),
    rule(
        "!self.secureAggregation || self.participation.minSilos >= 2",
        FEDERATED_SECURE_AGGREGATION_SILOS,
        ".participation.minSilos",
    ),
)


#: The whole-spec rules of a federation (part of ``cel.SPEC_RULES``).
FEDERATED_SPEC_RULES: Rules = [
    rule(
        "!has(self.training.federated) || self.training.federated.exchange != 'lora'"
        " || self.model.fineTuning.method == 'lora'",
        FEDERATED_LORA_EXCHANGE,
        ".training.federated.exchange",
    ),
    rule(
        "!has(self.training.federated) || !has(self.compression)",
        FEDERATED_COMPRESSION,
        ".compression",
    ),
    rule(
        "!has(self.training.federated) || self.model.architecture != 'sequential'",
        FEDERATED_SEQUENTIAL,
        ".model.architecture",
    ),
]
