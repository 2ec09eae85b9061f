"""Which DeepSpeed options ``spec.training.deepspeed.configOverrides`` may set.

An allow-list, not a deny-list: options that tune memory, communication and logging to
stdout. Refused: whatever the spec owns (batch sizes, precision, clipping, ZeRO stage,
NVMe offload and its path) and every option that writes files or reaches out
(``tensorboard``, ``wandb``, ``csv_monitor``, ``comet``, ``flops_profiler.output_file``,
``autotuning``, ``nebula``, ``nvme_path``, ...): a RecJob must not choose paths in the
trainer's file system.
"""

from __future__ import annotations

from typing import Any

#: Top-level options taking any value.
_ANY_VALUE = frozenset({
    "steps_per_print", "wall_clock_breakdown", "memory_breakdown", "prescale_gradients",
    "gradient_predivide_factor", "communication_data_type", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "seq_parallel_communication_data_type", "dump_state",
})  # fmt: skip
#: Options that are objects, with the keys each may hold.
_OBJECTS: dict[str, frozenset[str]] = {
    "zero_optimization": frozenset({
        "contiguous_gradients", "reduce_scatter", "reduce_bucket_size", "allgather_partitions",
        "allgather_bucket_size", "overlap_comm", "load_from_fp32_weights", "elastic_checkpoint",
        "offload_param", "offload_optimizer", "sub_group_size", "stage3_max_live_parameters",
        "stage3_max_reuse_distance", "stage3_prefetch_bucket_size",
        "stage3_param_persistence_threshold", "stage3_gather_16bit_weights_on_model_save",
        "round_robin_gradients", "ignore_unused_parameters", "memory_efficient_linear",
        "zero_hpz_partition_size", "zero_quantized_weights", "zero_quantized_gradients",
        "mics_shard_size", "mics_hierarchical_params_gather", "use_multi_rank_bucket_allreduce",
        "stage3_module_granularity_threshold", "log_trace_cache_warnings",
    }),
    "activation_checkpointing": frozenset({
        "partition_activations", "contiguous_memory_optimization", "cpu_checkpointing",
        "number_checkpoints", "synchronize_checkpoint_boundary", "profile",
    }),
    "comms_logger": frozenset({"enabled", "verbose", "prof_all", "debug", "prof_ops"}),
    "flops_profiler": frozenset({"enabled", "profile_step", "module_depth", "top_modules",
                                 "detailed"}),
    "data_types": frozenset({"grad_accum_dtype"}),
}  # fmt: skip
#: What ZeRO offload (``offload_param`` / ``offload_optimizer``) may hold: CPU offload
#: tuning; the device ``nvme`` and ``nvme_path`` belong to spec.training.deepspeed.offload.
_OFFLOAD = frozenset({"device", "pin_memory", "buffer_count", "buffer_size", "max_in_cpu",
                      "ratio", "fast_init"})  # fmt: skip
_OFFLOAD_DEVICES = ("cpu", "none")


def override_problems(overrides: dict[str, Any]) -> list[tuple[str, str]]:
    """(path below configOverrides, message) for each option the allow-list refuses."""
    out: list[tuple[str, str]] = []
    for key, value in overrides.items():
        if key in _ANY_VALUE:
            continue
        allowed = _OBJECTS.get(key)
        if allowed is None:
            out.append((key, "not an allowed DeepSpeed override (allowed: "
                        f"{', '.join(sorted(_ANY_VALUE | set(_OBJECTS)))}; options that "
                        "write files or that the spec owns are refused)"))  # fmt: skip
            continue
        if not isinstance(value, dict):
            out.append((key, "expected an object"))
            continue
        for sub, subvalue in value.items():
            if key == "zero_optimization" and sub == "stage":
                continue  # owned by zeroStage: reported by the caller with its own words
            if sub not in allowed:
                out.append((f"{key}.{sub}", f"not an allowed option of {key} (allowed: "
                            f"{', '.join(sorted(allowed))})"))  # fmt: skip
            elif sub in ("offload_param", "offload_optimizer"):
                out += [(f"{key}.{sub}.{p}", m) for p, m in _offload_problems(subvalue)]
    return out


def _offload_problems(value: Any) -> list[tuple[str, str]]:
    if not isinstance(value, dict):
        return [("", "expected an object")]
    refused = ("not an allowed offload option (NVMe offload and its path are set by "
               "spec.training.deepspeed.offload and nvmePath)")  # fmt: skip
    out = [(k, refused) for k in value if k not in _OFFLOAD]
    if "device" in value and value["device"] not in _OFFLOAD_DEVICES:
        out.append(("device", f"expected one of {', '.join(_OFFLOAD_DEVICES)} (NVMe offload "
                    "is spec.training.deepspeed.offload)"))  # fmt: skip
    return out
