"""Run under torchrun by test_checkpoint_safety.py: for every DeepSpeed configuration the
trainer supports on CPU (ZeRO 0-3, fp32/bf16, LoRA, optimizer offload) save a real
checkpoint the way the trainer does, resume it in a fresh engine whose checkpoint engine
is hardened (weights only), check the resumed engine continues exactly like the original,
consolidate it through the guarded zero_to_fp32 (rank 0) and list each file's globals.

Usage: checkpoint_roundtrip.py OUT_DIR  (writes OUT_DIR/result-w<world>.json)
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed
import torch
import torch.distributed as dist
from torch import nn
from torch.serialization import get_unsafe_globals_in_checkpoint

from recjob_trainer.safe_load import (
    SafeTorchCheckpointEngine,
    harden_checkpoint_loading,
    safe_zero_to_fp32,
)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.query = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 1)
        self.register_buffer("scale", torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.head(self.norm(self.query(self.emb(x)))) * self.scale).pow(2).mean()


def engine_for(seed: int, stage: int, precision: str, lora: bool, offload: bool, world: int):
    torch.manual_seed(seed)
    model: nn.Module = Tiny()
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["query"]))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    zero: dict = {"stage": stage}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    config = {  # as optimisation.deepspeed_config writes it
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "train_batch_size": 2 * world,
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config
    )
    harden_checkpoint_loading(engine)  # what train.fit does
    return engine


def step(engine, batch: torch.Tensor) -> float:
    loss = engine(batch)
    engine.backward(loss)
    engine.step()
    return float(loss.detach().float())


def main() -> None:
    out = sys.argv[1]
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    matrix = [
        (stage, precision, lora, offload)
        for stage, precision, lora, offload in itertools.product(
            [0, 1, 2, 3], ["fp32", "bf16"], [False, True], [False, True]
        )
        if not (offload and (stage == 0 or lora))
    ]
    for stage, precision, lora, offload in matrix:
        name = f"z{stage}-{precision}{'-lora' if lora else ''}{'-offload' if offload else ''}"
        root = os.path.join(out, f"w{world}", name)
        batches = torch.Generator().manual_seed(rank)
        data = [torch.randint(0, 50, (2, 5), generator=batches) for _ in range(4)]
        original = engine_for(0, stage, precision, lora, offload, world)
        assert isinstance(original.checkpoint_engine, SafeTorchCheckpointEngine)
        for batch in data[:2]:
            step(original, batch)
        state = {"config_digest": "d/train", "step": 2, "best": 0.25, "wall_time": 1.5}
        original.save_checkpoint(root, tag="step-00000002", client_state=state)
        dist.barrier()
        resumed = engine_for(1, stage, precision, lora, offload, world)
        _, client = resumed.load_checkpoint(root, tag="step-00000002")
        # the same losses on the next batches: weights, optimizer and schedule restored
        expected = [step(original, batch) for batch in data[2:]]
        again = [step(resumed, batch) for batch in data[2:]]
        record = {
            "client_state": {k: client.get(k) for k in state} == state,
            "same_continuation": expected == again,
            "losses": [expected, again],
        }
        dist.barrier()
        if rank == 0:
            tag_dir = os.path.join(root, "step-00000002")
            record["globals"] = {
                os.path.basename(f): sorted(get_unsafe_globals_in_checkpoint(f))
                for f in sorted(glob.glob(os.path.join(tag_dir, "*.pt")))
            }
            # what checkpoints.consolidated_state_dict does for ZeRO 1-3 (ZeRO 0 in bf16
            # writes no param_shapes: DeepSpeed's own zero_to_fp32 fails on it, guarded or not)
            if stage > 0:
                with safe_zero_to_fp32() as zero_to_fp32:
                    sd = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(
                        root, tag="step-00000002"
                    )
                # the same state_dict as DeepSpeed's own (unguarded) consolidation
                from deepspeed.utils.zero_to_fp32 import (
                    get_fp32_state_dict_from_zero_checkpoint as stock,
                )

                assert zero_to_fp32.torch is torch  # the guard is gone after the block
                reference = stock(root, tag="step-00000002")
                record["consolidated"] = sd.keys() == reference.keys() and all(
                    torch.equal(sd[k], reference[k]) for k in sd
                )
        results[name] = record
        dist.barrier()
    if rank == 0:
        with open(os.path.join(out, f"result-w{world}.json"), "w") as file:
            json.dump(results, file, indent=1)


if __name__ == "__main__":
    main()
