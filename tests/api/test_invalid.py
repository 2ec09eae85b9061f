"""Invalid RecJobs are each rejected with a message that names the offending field."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from recjob_operator.api.semantics import SemanticsByGeneration
from recjob_operator.api.validation import (
    Problem,
    RecJobInvalid,
    parse_recjob,
    validate_document,
)
from tests.conftest import MINIMAL, REPO, load_yaml

DELETE = object()
SEARCH = load_yaml(REPO / "examples" / "recjob-search.yaml")
RECOMMENDATION = load_yaml(REPO / "examples" / "recjob-recommendation.yaml")


def mutate(base: dict, changes: dict[str, Any]) -> dict:
    """A copy of ``base`` with dotted paths set (or deleted with DELETE); ``[i]`` indexes lists."""
    doc = copy.deepcopy(base)
    for dotted, value in changes.items():
        parts = dotted.replace("[", ".[").split(".")
        node: Any = doc
        for part in parts[:-1]:
            node = node[int(part[1:-1])] if part.startswith("[") else node.setdefault(part, {})
        last = parts[-1]
        key: Any = int(last[1:-1]) if last.startswith("[") else last
        if value is DELETE:
            del node[key]
        else:
            node[key] = value
    return doc


S, R, M = SEARCH, RECOMMENDATION, MINIMAL
#: A valid federated RecJob: two silos made from spec.data, LoRA adapters exchanged.
F = mutate(
    MINIMAL,
    {
        "spec.model.fineTuning": {"method": "lora", "lora": {}},
        "spec.training.federated": {"partition": {"count": 2}, "rounds": 3},
    },
)
#: Two silos with their own data.
SILOS = [
    {"name": "north", "data": {"train": "pvc://north-logs/train.csv"}},
    {"name": "south", "data": {"train": "pvc://south-logs/train.csv"}},
]

# (id, base document, changes, expected problem path, fragment of the message)
CASES: list[tuple[str, dict, dict, str, str]] = [
    # -- wrong types
    ("nodes-string", S, {"spec.training.nodes": "two"}, "spec.training.nodes", "integer"),
    ("nodes-numeric-string", S, {"spec.training.nodes": "2"}, "spec.training.nodes", "integer"),
    (
        "lr-string",
        S,
        {"spec.training.learningRate": "fast"},
        "spec.training.learningRate",
        "number",
    ),
    (
        "manual-approval-string",
        S,
        {"spec.rollout.manualApproval": "yes"},
        "spec.rollout.manualApproval",
        "boolean",
    ),
    ("steps-not-list", S, {"spec.rollout.steps": 50}, "spec.rollout.steps", "list"),
    ("step-float", S, {"spec.rollout.steps": [10.5, 100]}, "spec.rollout.steps[0]", "integer"),
    ("columns-not-mapping", S, {"spec.data.columns": "query"}, "spec.data.columns", "got"),
    ("spec-is-list", S, {"spec": []}, "spec", "got a list"),
    (
        "cpu-float",
        S,
        {"spec.training.resources.cpu": 1.5},
        "spec.training.resources.cpu",
        "as strings",
    ),
    (
        "metric-query-number",
        S,
        {"spec.rollout.metrics[0].query": 5},
        "spec.rollout.metrics[0].query",
        "string",
    ),
    # -- unknown fields
    ("unknown-spec-field", S, {"spec.trainig": {}}, "spec.trainig", "unknown field"),
    ("unknown-data-field", S, {"spec.data.labels": "x"}, "spec.data.labels", "expected one of"),
    (
        "unknown-deepspeed-field",
        S,
        {"spec.training.deepspeed.stage": 2},
        "spec.training.deepspeed.stage",
        "zeroStage",
    ),
    (
        "unknown-metric-field",
        S,
        {"spec.rollout.metrics[0].threshold": 1},
        "spec.rollout.metrics[0].threshold",
        "unknown field",
    ),
    (
        "snake-case-field",
        S,
        {"spec.training.micro_batch_size": 4},
        "spec.training.micro_batch_size",
        "microBatchSize",
    ),
    # -- out of range / bad enum / bad pattern
    (
        "zero-stage-4",
        S,
        {"spec.training.deepspeed.zeroStage": 4},
        "spec.training.deepspeed.zeroStage",
        "less than or equal to 3",
    ),
    ("nodes-zero", S, {"spec.training.nodes": 0}, "spec.training.nodes", "greater than"),
    (
        "step-over-100",
        S,
        {"spec.rollout.steps": [10, 101]},
        "spec.rollout.steps[1]",
        "less than or equal to 100",
    ),
    ("step-zero", S, {"spec.rollout.steps": [0, 100]}, "spec.rollout.steps[0]", "greater"),
    ("no-steps", S, {"spec.rollout.steps": []}, "spec.rollout.steps", "at least 1"),
    (
        "lr-negative",
        S,
        {"spec.training.learningRate": -1e-4},
        "spec.training.learningRate",
        "greater than 0",
    ),
    (
        "pruning-amount-1",
        S,
        {"spec.compression": {"pruning": {"amount": 1.0}}},
        "spec.compression.pruning.amount",
        "less than 1",
    ),
    ("bad-task", S, {"spec.data.task": "classification"}, "spec.data.task", "search-ranking"),
    ("bad-precision", S, {"spec.training.precision": "int8"}, "spec.training.precision", "bf16"),
    ("bad-target", S, {"spec.export.target": "tflite"}, "spec.export.target", "onnxruntime-int8"),
    (
        "bad-deployment-mode",
        S,
        {"spec.serving.deploymentMode": "Knative"},
        "spec.serving.deploymentMode",
        "Serverless",
    ),
    (
        "bad-interval",
        S,
        {"spec.rollout.interval": "5 minutes"},
        "spec.rollout.interval",
        "duration",
    ),
    (
        "bad-memory",
        S,
        {"spec.training.resources.memory": "8GB"},
        "spec.training.resources.memory",
        "quantity",
    ),
    (
        "bad-metric-name",
        S,
        {"spec.export.qualityBudget.metric": "ndcg"},
        "spec.export.qualityBudget.metric",
        "ndcg|hr",
    ),
    (
        "bad-service-name",
        S,
        {"spec.serving.name": "Product_Search"},
        "spec.serving.name",
        "DNS label",
    ),
    ("name-too-long", S, {"metadata.name": "a" * 41}, "metadata.name", "at most 40"),
    (
        "bad-uri",
        S,
        {"spec.data.train": "http://example.com/x.csv"},
        "spec.data.train",
        "storage URI",
    ),
    (
        "budget-over-1",
        S,
        {"spec.export.qualityBudget.maxRelativeDrop": 1.5},
        "spec.export.qualityBudget.maxRelativeDrop",
        "less than or equal to 1",
    ),
    ("bad-api-version", S, {"apiVersion": "recjob.dev/v1"}, "apiVersion", "recjob.dev/v1alpha1"),
    ("bad-kind", S, {"kind": "PyTorchJob"}, "kind", "RecJob"),
    # -- missing required fields
    ("no-spec", S, {"spec": DELETE}, "spec", "required"),
    ("no-data", S, {"spec.data": DELETE}, "spec.data", "required"),
    ("no-task", S, {"spec.data.task": DELETE}, "spec.data.task", "required"),
    ("no-train", S, {"spec.data.train": DELETE}, "spec.data.train", "required"),
    ("no-name", S, {"metadata.name": DELETE}, "metadata.name", "required"),
    (
        "no-metric-query",
        S,
        {"spec.rollout.metrics[0].query": DELETE},
        "spec.rollout.metrics[0].query",
        "required",
    ),
    (
        "no-search-columns",
        M,
        {"spec.data.columns": DELETE},
        "spec.data.columns.query",
        "search-ranking",
    ),
    (
        "no-user-column",
        R,
        {"spec.data.format": "csv", "spec.data.columns": {"itemId": "i", "itemText": "t"}},
        "spec.data.columns.userId",
        "recommendation",
    ),
    ("atomic-without-catalog", R, {"spec.data.catalog": DELETE}, "spec.data.catalog", ".text"),
    # -- inconsistent cross-field settings
    (
        "steps-decrease",
        S,
        {"spec.rollout.steps": [50, 25, 100]},
        "spec.rollout.steps[1]",
        "increase strictly",
    ),
    (
        "steps-repeat",
        S,
        {"spec.rollout.steps": [50, 50, 100]},
        "spec.rollout.steps[1]",
        "increase strictly",
    ),
    (
        "steps-not-ending-100",
        S,
        {"spec.rollout.steps": [10, 50]},
        "spec.rollout.steps[1]",
        "must be 100",
    ),
    (
        "threshold-min-over-max",
        S,
        {"spec.rollout.metrics[0].min": 0.5, "spec.rollout.metrics[0].max": 0.1},
        "spec.rollout.metrics[0].min",
        "must not exceed max",
    ),
    (
        "threshold-missing",
        S,
        {"spec.rollout.metrics[0].max": DELETE},
        "spec.rollout.metrics[0]",
        "min and/or max",
    ),
    (
        "query-without-revision",
        S,
        {"spec.rollout.metrics[0].query": "up"},
        "spec.rollout.metrics[0].query",
        "{{revision}}",
    ),
    (
        "query-unknown-placeholder",
        S,
        {"spec.rollout.metrics[0].query": 'x{revision="{{revision}}",pod="{{pod}}"}'},
        "spec.rollout.metrics[0].query",
        "unknown placeholder(s) pod",
    ),
    (
        "duplicate-metric-names",
        S,
        {"spec.rollout.metrics[1].name": "error-rate"},
        "spec.rollout.metrics[1].name",
        "duplicate",
    ),
    (
        "deadline-below-interval",
        S,
        {"spec.rollout.noData.deadline": "10s"},
        "spec.rollout.noData.deadline",
        "at least the analysis interval",
    ),
    (
        "offload-zero-0",
        S,
        {"spec.training.deepspeed": {"zeroStage": 0, "offloadOptimizer": "cpu"}},
        "spec.training.deepspeed.offloadOptimizer",
        "zeroStage 1, 2 or 3",
    ),
    (
        "param-offload-zero-2",
        S,
        {"spec.training.deepspeed": {"zeroStage": 2, "offloadParameters": "cpu"}},
        "spec.training.deepspeed.offloadParameters",
        "zeroStage 3",
    ),
    (
        "nvme-without-path",
        S,
        {"spec.training.deepspeed": {"zeroStage": 3, "offloadParameters": "nvme"}},
        "spec.training.deepspeed.nvmePath",
        "required",
    ),
    (
        "override-owned-key",
        S,
        {"spec.training.deepspeed.configOverrides": {"bf16": {}}},
        "spec.training.deepspeed.configOverrides.bf16",
        "precision",
    ),
    (
        "override-writes-files",
        S,
        {"spec.training.deepspeed.configOverrides": {"tensorboard": {"output_path": "/etc"}}},
        "spec.training.deepspeed.configOverrides.tensorboard",
        "not an allowed DeepSpeed override",
    ),
    (
        "override-profiler-file",
        S,
        {"spec.training.deepspeed.configOverrides": {"flops_profiler": {"output_file": "/x"}}},
        "spec.training.deepspeed.configOverrides.flops_profiler.output_file",
        "not an allowed option of flops_profiler",
    ),
    (
        "override-nvme-path",
        S,
        {
            "spec.training.deepspeed.configOverrides": {
                "zero_optimization": {"offload_param": {"device": "nvme", "nvme_path": "/var/lib"}}
            }
        },
        "spec.training.deepspeed.configOverrides.zero_optimization.offload_param.nvme_path",
        "not an allowed offload option",
    ),
    (
        "override-zero-stage",
        S,
        {"spec.training.deepspeed.configOverrides": {"zero_optimization": {"stage": 3}}},
        "spec.training.deepspeed.configOverrides.zero_optimization.stage",
        "zeroStage",
    ),
    (
        "fp16-on-cpu",
        S,
        {"spec.training.precision": "fp16"},
        "spec.training.precision",
        "needs GPUs",
    ),
    (
        "more-processes-than-gpus",
        S,
        {"spec.training.resources.gpu": 1, "spec.training.processesPerNode": 4},
        "spec.training.processesPerNode",
        "one process per GPU",
    ),
    (
        "warmup-both",
        S,
        {"spec.training.schedule": {"warmupSteps": 10, "warmupRatio": 0.1}},
        "spec.training.schedule.warmupRatio",
        "not both",
    ),
    (
        "warmup-past-max-steps",
        S,
        {"spec.training.schedule": {"warmupSteps": 300}},
        "spec.training.schedule.warmupSteps",
        "below maxSteps",
    ),
    (
        "checkpoint-never",
        S,
        {"spec.training.checkpoint.intervalSteps": 1000},
        "spec.training.checkpoint.intervalSteps",
        "no checkpoint",
    ),
    (
        "lora-without-settings",
        S,
        {"spec.model.fineTuning": {"method": "lora"}},
        "spec.model.fineTuning.lora",
        "required when method is lora",
    ),
    (
        "lora-settings-with-full",
        S,
        {"spec.model.fineTuning": {"method": "full", "lora": {}}},
        "spec.model.fineTuning.method",
        "method: lora",
    ),
    (
        "lora-settings-with-frozen",
        R,
        {"spec.model.fineTuning": {"method": "frozen", "lora": {}}},
        "spec.model.fineTuning.method",
        "method: lora",
    ),
    (
        "sequential-heads-do-not-divide",
        R,
        {"spec.model.sequential": {"hiddenSize": 100, "heads": 3}},
        "spec.model.sequential.heads",
        "divide hiddenSize",
    ),
    (
        "sequential-for-search",
        S,
        {"spec.model.architecture": "sequential"},
        "spec.model.architecture",
        "data.task must be recommendation",
    ),
    (
        "sequential-catalog-softmax-with-lora",
        R,
        {"spec.model.fineTuning": {"method": "lora", "lora": {}}},
        "spec.model.sequential.negatives",
        "fineTuning.method frozen",
    ),
    (
        "sequential-pruning-attention-heads",
        R,
        {"spec.compression": {"pruning": {"method": "attention-heads", "amount": 0.25}}},
        "spec.compression.pruning.method",
        "use ffn-channels, layers or magnitude",
    ),
    (
        "sequential-student-more-layers-than-teacher",
        R,
        {"spec.compression": {"distillation": {"student": {"numLayers": 3}}}},
        "spec.compression.distillation.student.numLayers",
        "model.sequential.layers",
    ),
    (
        "sequential-student-as-big-as-teacher",
        R,
        {"spec.compression": {"distillation": {"student": {"numLayers": 2}}}},
        "spec.compression.distillation.student.numLayers",
        "smaller than the teacher",
    ),
    (
        "sequential-student-wider-than-teacher",
        R,
        {"spec.compression": {"distillation": {"student": {"numLayers": 1, "hiddenSize": 256}}}},
        "spec.compression.distillation.student.hiddenSize",
        "model.sequential.hiddenSize",
    ),
    (
        "sequential-student-hidden-not-multiple-of-heads",
        R,
        {
            "spec.model.sequential.heads": 4,
            "spec.compression": {"distillation": {"student": {"numLayers": 1, "hiddenSize": 98}}},
        },
        "spec.compression.distillation.student.hiddenSize",
        "model.sequential.heads",
    ),
    (
        "unknown-base-model",
        S,
        {"spec.model.baseModel": "bert-large"},
        "spec.model.baseModel",
        "all-MiniLM-L6-v2",
    ),
    (
        "regression-for-recommendation",
        R,
        {"spec.model.head.objective": "regression"},
        "spec.model.head.objective",
        "graded labels",
    ),
    (
        "listwise-for-search",
        S,
        {"spec.model.head.objective": "listwise"},
        "spec.model.head.objective",
        "recommendation",
    ),
    (
        "positive-events-without-event-column",
        S,
        {"spec.data.preprocessing.positiveEvents": ["click"]},
        "spec.data.preprocessing.positiveEvents",
        "eventType",
    ),
    (
        "atomic-for-search",
        S,
        {"spec.data.format": "atomic", "spec.data.catalog": "c.text"},
        "spec.data.format",
        "task: recommendation",
    ),
    (
        "atomic-without-held-out-files",
        R,
        {"spec.data.validation": DELETE, "spec.data.test": DELETE},
        "spec.data.test",
        "held-out .inter files",
    ),
    (
        "atomic-by-time",
        R,
        {
            "spec.data.preprocessing.split.strategy": "by-time",
            "spec.data.validation": DELETE,
            "spec.data.columns": {"timestamp": "ts"},
        },
        "spec.data.preprocessing.split.strategy",
        "without times",
    ),
    (
        "history-column-outside-atomic",
        S,
        {"spec.data.columns.history": "items"},
        "spec.data.columns.history",
        "only the atomic format",
    ),
    (
        "item-index-outside-atomic",
        S,
        {"spec.data.itemIndex": "items.item2index"},
        "spec.data.itemIndex",
        "only the atomic format",
    ),
    (
        "candidates-for-search",
        S,
        {"spec.data.candidates": "candidates.csv"},
        "spec.data.candidates",
        "task recommendation",
    ),
    (
        "candidates-column-without-file",
        R,
        {"spec.data.columns.candidates": "cands"},
        "spec.data.columns.candidates",
        "spec.data.candidates names no file",
    ),
    (
        "by-query-for-recommendation",
        R,
        {"spec.data.preprocessing.split.strategy": "by-query", "spec.data.validation": DELETE},
        "spec.data.preprocessing.split.strategy",
        "leave-one-out",
    ),
    (
        "leave-one-out-for-search",
        S,
        {"spec.data.preprocessing.split.strategy": "leave-one-out"},
        "spec.data.preprocessing.split.strategy",
        "by-query",
    ),
    (
        "by-time-without-timestamp",
        R,
        {"spec.data.preprocessing.split.strategy": "by-time", "spec.data.validation": DELETE},
        "spec.data.preprocessing.split.strategy",
        "timestamp",
    ),
    (
        "predefined-without-validation",
        S,
        {"spec.data.preprocessing.split.strategy": "predefined"},
        "spec.data.validation",
        "predefined",
    ),
    (
        "validation-uri-with-carving-split",
        S,
        {"spec.data.validation": "v.csv"},
        "spec.data.preprocessing.split.strategy",
        "predefined",
    ),
    (
        "validation-without-test",
        S,
        {"spec.data.validation": "v.csv", "spec.data.preprocessing.split.strategy": "predefined"},
        "spec.data.test",
        "nothing would be left to evaluate",
    ),
    (
        "fractions-too-large",
        S,
        {
            "spec.data.preprocessing.split.validationFraction": 0.45,
            "spec.data.preprocessing.split.testFraction": 0.45,
        },
        "spec.data.preprocessing.split.testFraction",
        "below 0.9",
    ),
    (
        "rmse-for-recommendation",
        R,
        {"spec.export.qualityBudget.metric": "rmse"},
        "spec.export.qualityBudget.metric",
        "graded relevance",
    ),
    (
        "hr-early-stopping-for-search",
        S,
        {"spec.training.earlyStopping.metric": "hr@10"},
        "spec.training.earlyStopping.metric",
        "next-item",
    ),
    (
        "tensorrt-without-gpu",
        S,
        {"spec.export.target": "tensorrt-fp16"},
        "spec.export.resources.gpu",
        "TensorRT",
    ),
    (
        "teacher-budget-without-compression",
        S,
        {"spec.export.qualityBudget.maxRelativeDropVsTeacher": 0.03},
        "spec.export.qualityBudget.maxRelativeDropVsTeacher",
        "compression",
    ),
    (
        "empty-compression",
        S,
        {"spec.compression": {}},
        "spec.compression",
        "distillation and/or pruning",
    ),
    (
        "student-as-big-as-teacher",
        S,
        {"spec.compression": {"distillation": {"student": {"numLayers": 6}}}},
        "spec.compression.distillation.student.numLayers",
        "smaller than the teacher",
    ),
    (
        "student-hidden-not-multiple-of-heads",
        S,
        {"spec.compression": {"distillation": {"student": {"numLayers": 3, "hiddenSize": 100}}}},
        "spec.compression.distillation.student.hiddenSize",
        "attention heads",
    ),
    (
        "all-loss-weights-zero",
        S,
        {"spec.compression": {"distillation": {"taskWeight": 0, "distillationWeight": 0}}},
        "spec.compression.distillation.distillationWeight",
        "all 0",
    ),
    (
        "min-over-max-replicas",
        S,
        {"spec.serving.minReplicas": 5, "spec.serving.maxReplicas": 2},
        "spec.serving.minReplicas",
        "maxReplicas",
    ),
    (
        "raw-deployment-scale-to-zero",
        S,
        {
            "spec.serving.deploymentMode": "RawDeployment",
            "spec.serving.minReplicas": 0,
            "spec.serving.gateway": {"name": "shop"},
        },
        "spec.serving.minReplicas",
        "scale to zero",
    ),
    (
        "raw-deployment-without-gateway",
        S,
        {"spec.serving.deploymentMode": "Standard"},
        "spec.serving.gateway",
        "KServe splits canary traffic only in Serverless mode",
    ),
    (
        "gateway-hostname-not-a-hostname",
        S,
        {
            "spec.serving.deploymentMode": "RawDeployment",
            "spec.serving.gateway": {"name": "shop", "hostname": "Shop_Front"},
        },
        "spec.serving.gateway.hostname",
        "expected text matching",
    ),
    # -- training.federated
    (
        "federated-without-silos",
        F,
        {"spec.training.federated.partition": DELETE},
        "spec.training.federated.silos",
        "list the silos",
    ),
    (
        "federated-silos-and-partition",
        F,
        {"spec.training.federated.silos": SILOS},
        "spec.training.federated.partition",
        "not both",
    ),
    (
        "federated-one-silo",
        F,
        {"spec.training.federated.partition": DELETE, "spec.training.federated.silos": SILOS[:1]},
        "spec.training.federated.silos",
        "at least 2",
    ),
    (
        "federated-duplicate-silo",
        F,
        {
            "spec.training.federated.partition": DELETE,
            "spec.training.federated.silos": [SILOS[0], SILOS[0]],
        },
        "spec.training.federated.silos",
        "unique",
    ),
    (
        "federated-silo-name-not-dns",
        F,
        {
            "spec.training.federated.partition": DELETE,
            "spec.training.federated.silos": [SILOS[0], {**SILOS[1], "name": "South_Shop"}],
        },
        "spec.training.federated.silos[1].name",
        "expected text matching",
    ),
    (
        "federated-silo-namespace-not-dns",
        F,
        {
            "spec.training.federated.partition": DELETE,
            "spec.training.federated.silos": [SILOS[0], {**SILOS[1], "namespace": "South.Team"}],
        },
        "spec.training.federated.silos[1].namespace",
        "expected text matching",
    ),
    (
        "federated-silo-without-data",
        F,
        {
            "spec.training.federated.partition": DELETE,
            "spec.training.federated.silos": [SILOS[0], {"name": "south"}],
        },
        "spec.training.federated.silos[1].data",
        "required",
    ),
    (
        "federated-min-silos-over-silos",
        F,
        {"spec.training.federated.participation": {"minSilos": 3}},
        "spec.training.federated.participation.minSilos",
        "no round could ever complete",
    ),
    (
        "federated-min-silos-over-listed-silos",
        F,
        {
            "spec.training.federated.partition": DELETE,
            "spec.training.federated.silos": SILOS,
            "spec.training.federated.participation": {"minSilos": 4},
        },
        "spec.training.federated.participation.minSilos",
        "no round could ever complete",
    ),
    (
        "federated-partition-column-without-column",
        F,
        {"spec.training.federated.partition": {"by": "column", "count": 4}},
        "spec.training.federated.partition.column",
        "required when by is column",
    ),
    (
        "federated-partition-hash-with-column",
        F,
        {"spec.training.federated.partition": {"column": "region", "count": 4}},
        "spec.training.federated.partition.column",
        "by is hash",
    ),
    (
        "federated-partition-one-silo",
        F,
        {"spec.training.federated.partition": {"count": 1}},
        "spec.training.federated.partition.count",
        "greater than or equal to 2",
    ),
    (
        "federated-fedprox-without-mu",
        F,
        {"spec.training.federated.strategy": {"type": "FedProx"}},
        "spec.training.federated.strategy.mu",
        "required by FedProx",
    ),
    (
        "federated-mu-without-fedprox",
        F,
        {"spec.training.federated.strategy": {"type": "FedAvg", "mu": 0.1}},
        "spec.training.federated.strategy.mu",
        "FedProx's",
    ),
    (
        "federated-server-lr-without-fedadam",
        F,
        {
            "spec.training.federated.strategy": {
                "type": "FedProx",
                "mu": 0.1,
                "serverLearningRate": 0.1,
            }
        },
        "spec.training.federated.strategy.serverLearningRate",
        "a server optimizer's (FedAdam, FedAvgM)",
    ),
    (
        "federated-atomic-silo-without-catalog",
        R,
        {
            "spec.model.architecture": "auto",
            "spec.model.sequential": DELETE,
            "spec.model.fineTuning": {"method": "lora", "lora": {}},
            "spec.training.nodes": 1,
            "spec.training.federated": {
                "silos": [
                    {
                        "name": name,
                        "data": {
                            "train": f"pvc://{name}/t.inter",
                            "test": f"pvc://{name}/e.inter",
                            **({"catalog": "pvc://south/c.text"} if name == "south" else {}),
                        },
                    }
                    for name in ("north", "south")
                ],
            },
        },
        "spec.training.federated.silos[0].data.catalog",
        "item texts in every silo",
    ),
    (
        "federated-server-momentum-without-fedavgm",
        F,
        {"spec.training.federated.strategy": {"type": "FedAdam", "serverMomentum": 0.9}},
        "spec.training.federated.strategy.serverMomentum",
        "FedAvgM's",
    ),
    (
        "federated-unknown-strategy",
        F,
        {"spec.training.federated.strategy": {"type": "FedSGD"}},
        "spec.training.federated.strategy.type",
        "FedAvg",
    ),
    (
        "federated-zero-rounds",
        F,
        {"spec.training.federated.rounds": 0},
        "spec.training.federated.rounds",
        "greater than or equal to 1",
    ),
    (
        "federated-fraction-zero",
        F,
        {"spec.training.federated.participation": {"fraction": 0}},
        "spec.training.federated.participation.fraction",
        "greater than 0",
    ),
    (
        "federated-dp-without-clipping",
        F,
        {"spec.training.federated.differentialPrivacy": {"noiseMultiplier": 1.0}},
        "spec.training.federated.differentialPrivacy.clippingNorm",
        "required",
    ),
    (
        "federated-secure-aggregation-one-silo",
        F,
        {
            "spec.training.federated.secureAggregation": True,
            "spec.training.federated.participation": {"minSilos": 1},
        },
        "spec.training.federated.participation.minSilos",
        "at least 2 with secureAggregation",
    ),
    (
        "federated-lora-exchange-full-fine-tuning",
        F,
        {"spec.model.fineTuning": {"method": "full"}},
        "spec.training.federated.exchange",
        "model.fineTuning.method is not lora",
    ),
    (
        "federated-several-processes",
        F,
        {"spec.training.processesPerNode": 2},
        "spec.training.processesPerNode",
        "one process per silo",
    ),
    (
        "federated-several-nodes",
        F,
        {"spec.training.nodes": 2},
        "spec.training.nodes",
        "one process per silo",
    ),
    (
        "federated-compressed",
        F,
        {"spec.compression": {"pruning": {}}},
        "spec.compression",
        "not supported yet with training.federated",
    ),
    (
        "federated-sequential",
        R,
        {
            "spec.training.processesPerNode": 1,
            "spec.model.architecture": "sequential",
            "spec.model.fineTuning": {"method": "frozen"},
            "spec.training.federated": {"partition": {"count": 2}, "exchange": "full"},
        },
        "spec.model.architecture",
        "not supported yet with training.federated",
    ),
]


def test_enough_distinct_invalid_cases() -> None:
    assert len({case[0] for case in CASES}) == len(CASES) >= 40


@pytest.mark.parametrize(
    ("case_id", "base", "changes", "path", "fragment"), CASES, ids=[c[0] for c in CASES]
)
def test_invalid_recjob_is_rejected_naming_the_field(case_id, base, changes, path, fragment):
    document = mutate(base, changes)
    _, problems = validate_document(document)
    assert problems, f"{case_id}: accepted"
    matching = [p for p in problems if p.path == path]
    assert matching, f"{case_id}: no problem at {path}; got {[str(p) for p in problems]}"
    assert any(fragment in p.message for p in matching), (
        f"{case_id}: {fragment!r} not in {[p.message for p in matching]}"
    )
    with pytest.raises(RecJobInvalid) as raised:
        parse_recjob(document)
    assert path in str(raised.value)


def test_a_federated_recjob_is_valid() -> None:
    """The base of the federated cases is itself valid, with listed silos or a partition."""
    for document in (F, mutate(F, {"spec.training.federated.partition": DELETE,
                                   "spec.training.federated.silos": SILOS})):  # fmt: skip
        job, problems = validate_document(document)
        assert problems == [], problems
        assert job is not None and job.spec.training.federated is not None
    job = parse_recjob(F)
    fed = job.spec.training.federated
    assert (fed.rounds, fed.local_steps, fed.exchange) == (3, 50, "lora")
    assert fed.strategy.type == "FedAvg"
    assert (fed.participation.min_silos, fed.participation.fraction) == (2, 1.0)


def test_every_problem_is_reported_not_just_the_first() -> None:
    document = mutate(
        SEARCH,
        {"spec.training.nodes": 0, "spec.rollout.interval": "soon", "spec.export.target": "tflite"},
    )
    _, problems = validate_document(document)
    assert {p.path for p in problems} >= {
        "spec.training.nodes",
        "spec.rollout.interval",
        "spec.export.target",
    }
    document = mutate(SEARCH, {"spec.rollout.steps": [50, 10], "spec.serving.minReplicas": 9})
    _, problems = validate_document(document)
    assert {p.path for p in problems} >= {"spec.rollout.steps[1]", "spec.serving.minReplicas"}


@pytest.mark.parametrize("document", [None, "RecJob", 42, [1, 2], True])
def test_non_mapping_documents(document) -> None:
    job, problems = validate_document(document)
    assert job is None and problems == [Problem("", problems[0].message)]
    assert "expected a RecJob object" in problems[0].message


def test_only_the_atomic_silo_lacking_its_own_catalog_is_named() -> None:
    """A silo reads only its own files: north (no catalog) is named, south (its own) is not."""
    case = next(c for c in CASES if c[0] == "federated-atomic-silo-without-catalog")
    _, problems = validate_document(mutate(case[1], case[2]))
    silo_paths = {p.path for p in problems if ".silos[" in p.path}
    assert silo_paths == {"spec.training.federated.silos[0].data.catalog"}


def test_semantic_problems_are_remembered_per_generation() -> None:
    """The operator's daemon checks a spec once per metadata.generation: the same
    generation re-read (a status write) is not checked again; a new one (a spec edit) is."""
    semantics = SemanticsByGeneration()
    bad = mutate(SEARCH, {"metadata.generation": 1, "spec.rollout.steps": [50, 10]})
    _, problems = validate_document(bad, semantics)
    assert {p.path for p in problems} == {"spec.rollout.steps[1]"}
    # the same generation: the remembered problems, whatever the object now says
    fixed = mutate(bad, {"spec.rollout.steps": SEARCH["spec"]["rollout"]["steps"]})
    assert {p.path for p in validate_document(fixed, semantics)[1]} == {"spec.rollout.steps[1]"}
    # the edit's new generation is checked
    fixed["metadata"]["generation"] = 2
    assert validate_document(fixed, semantics)[1] == []
    bad["metadata"]["generation"] = 3
    assert {p.path for p in validate_document(bad, semantics)[1]} == {"spec.rollout.steps[1]"}
    # a document never stored (no generation) is always checked
    del fixed["metadata"]["generation"]
    assert validate_document(fixed, semantics)[1] == []
    assert validate_document(bad | {"metadata": {"name": "x"}}, semantics)[1] != []
