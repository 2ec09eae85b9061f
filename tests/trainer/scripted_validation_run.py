"""Run under torchrun by test_best_model.py: the trainer's own CLI, with the validation
metric replaced by a scripted value per step (so "validation gets worse after the best
step" is certain and cheap) and, with RECJOB_TEST_DIE_AFTER=N, every rank dying right
after the checkpoint of step N is complete (like a pod killed there).

Usage: scripted_validation_run.py --config FILE  (RECJOB_TEST_SCRIPT='{"2": 0.1, ...}')
"""

from __future__ import annotations

import json
import os

from recjob_trainer import train
from recjob_trainer.cli import main

SCRIPT = {int(k): v for k, v in json.loads(os.environ["RECJOB_TEST_SCRIPT"]).items()}
DIE_AFTER = int(os.environ.get("RECJOB_TEST_DIE_AFTER") or -1)
real_save = train.save_checkpoint
steps: list[int] = []


def scripted_metric(model, batcher, prepared, config):
    return "ndcg@10", SCRIPT[steps[-1]]


def save_then_maybe_die(engine, root, step, *args, **kwargs):
    real_save(engine, root, step, *args, **kwargs)
    if step == DIE_AFTER:
        os._exit(3)


real_record = train.Progress.record


def record(self, kind, **fields):  # every rank records each step's batch before evaluating
    if kind == "batch":
        steps.append(fields["step"])
    return real_record(self, kind, **fields)


train.validation_metric = scripted_metric
train.save_checkpoint = save_then_maybe_die
train.Progress.record = record

if __name__ == "__main__":
    main()
