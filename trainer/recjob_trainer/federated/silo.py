"""A silo's side of a round: the project's own model, loss and batches on the silo's own
data only (the data section of the silo's private trainer config).

Runs inside the silo's ClientApp (a process its SuperNode starts). The data are prepared
once into the silo's work folder and reused by later rounds; the model is rebuilt from the
global weights the server sends each round, so a silo keeps no state the server must trust.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

from ..config import TrainerConfig, load_config
from ..data.prepare import ensure_prepared
from ..data.prepared import PreparedData, read_prepared

if TYPE_CHECKING:  # torch, transformers and peft load only for a training round: the
    # ClientApp is a fresh process per message, and the summary query needs none of them
    from ..models import ModelInfo, RankingModel

#: What a silo tells the server about its data before training: counts and the label
#: range (what ModelInfo needs), never a row.
SUMMARY_KEYS = ("rows", "labelled", "label_min", "label_max", "label_distinct")


def merged_info(config: TrainerConfig, summaries: list[dict]) -> ModelInfo:
    """The one ModelInfo every silo trains: the task's architecture and objective from the
    silos' merged summaries (label range of all silos, graded if any silo is)."""
    labelled = [s for s in summaries if s.get("labelled")]
    merged: dict = {"rows": sum(int(s["rows"]) for s in summaries), "labelled": bool(labelled)}
    if labelled:
        merged.update(
            label_min=min(float(s["label_min"]) for s in labelled),
            label_max=max(float(s["label_max"]) for s in labelled),
            label_distinct=max(int(s["label_distinct"]) for s in labelled),
        )
    from ..objective import model_info

    return model_info(config, SimpleNamespace(train_summary=merged))


@dataclass
class RoundResult:
    """A silo's reply: its updated weights and what it measured."""

    arrays: object  # flwr ArrayRecord
    examples: int
    mean_loss: float
    seconds: float


class SiloTrainer:
    """The silo's data, prepared once, and one round of local training at a time."""

    def __init__(self, config_path: str | Path):
        self.config = load_config(config_path)
        self.run_dir = Path(self.config.output_uri)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        data_dir = self.run_dir / "data"  # prepared once, reused by later rounds / restarts
        ensure_prepared(self.config.data, self.config.model, self.config.base_dir, data_dir)
        self.prepared: PreparedData = read_prepared(data_dir)
        self._tokenizer = None

    def summary(self) -> dict:
        """Counts and label range of the silo's training split."""
        s = self.prepared.train_summary
        return {k: s[k] for k in SUMMARY_KEYS if k in s}

    def model(self, info: ModelInfo) -> RankingModel:
        """A fresh model of the federation's architecture (pretrained encoder + LoRA)."""
        from ..models import base_model_path, build_model
        from ..objective import apply_lora

        path = base_model_path(self.config.model.base_model, self.config.base_dir)
        return apply_lora(build_model(info, path), self.config)

    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            from ..models import base_model_path

            path = base_model_path(self.config.model.base_model, self.config.base_dir)
            self._tokenizer = AutoTokenizer.from_pretrained(path)
        return self._tokenizer

    def train_round(
        self,
        info: ModelInfo,
        global_arrays,
        *,
        exchange: str,
        round_number: int,
        local_steps: int,
        proximal_mu: float = 0.0,
    ) -> RoundResult:
        """``local_steps`` optimizer steps from the global weights on this silo's rows,
        continuing the silo's epoch order where the previous round stopped; FedProx adds
        mu/2 ||w - w_global||^2 over the exchanged weights."""
        import numpy as np
        import torch

        from ..batches import Batcher, Shard, micro_batches
        from ..objective import loss_fn
        from .weights import exchanged_names, load_record, record_tensors, to_record

        started = time.time()
        # several silos may share a machine (local mode): the launcher sets the threads
        torch.set_num_threads(int(os.environ.get("RECJOB_SILO_THREADS", torch.get_num_threads())))
        t = self.config.training
        torch.manual_seed(t.seed + round_number)
        model = self.model(info)
        names = exchanged_names(model, exchange)
        load_record(model, global_arrays, names)
        anchor = {k: v.detach().clone() for k, v in record_tensors(global_arrays).items()}
        params = dict(model.named_parameters())
        trained = [params[n] for n in names if n in params and params[n].requires_grad]
        optimizer = torch.optim.AdamW(trained, lr=t.learning_rate, weight_decay=t.weight_decay)
        batcher = Batcher.for_model(
            self.config.data.task, self.tokenizer(), info, self.prepared.catalog
        )
        shard = Shard(self.prepared.splits["train"], 0, 1)
        per_step = t.micro_batch_size * t.gradient_accumulation_steps
        steps_per_epoch = shard.rows.height // per_step
        if steps_per_epoch < 1:
            raise RuntimeError(
                f"too little training data in this silo: {shard.rows.height} row(s) for "
                f"microBatchSize {t.micro_batch_size} x gradient accumulation "
                f"{t.gradient_accumulation_steps}"
            )
        negatives = self.config.data.preprocessing.negative_sampling.per_positive
        uses_popularity = self.config.data.preprocessing.negative_sampling.strategy
        popularity = self.prepared.popularity if uses_popularity == "popularity" else None
        model.train()
        step = (round_number - 1) * local_steps  # this silo's steps before this round
        end, losses, examples = step + local_steps, [], 0
        while step < end:
            epoch = step // steps_per_epoch
            start = (step % steps_per_epoch) * t.gradient_accumulation_steps
            stream = micro_batches(
                shard, batcher, t.micro_batch_size, t.seed, epoch, start, negatives, popularity
            )
            for mb, (index, batch) in enumerate(stream, start=start):
                if mb >= steps_per_epoch * t.gradient_accumulation_steps:
                    break
                labels = batch.pop("labels")
                loss = loss_fn(info, model(**batch), labels)
                if proximal_mu > 0:
                    loss = loss + proximal_mu / 2 * sum(
                        (params[n] - anchor[n]).pow(2).sum() for n in names if n in params
                    )
                (loss / t.gradient_accumulation_steps).backward()
                losses.append(float(loss.detach()))
                examples += len(index)
                if (mb + 1) % t.gradient_accumulation_steps:
                    continue
                if t.gradient_clipping:
                    torch.nn.utils.clip_grad_norm_(trained, t.gradient_clipping)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if step >= end:
                    break
        return RoundResult(
            to_record(model, names), examples, float(np.mean(losses)), time.time() - started
        )

    def evaluate(self, info: ModelInfo, global_arrays, *, exchange: str) -> dict[str, float]:
        """The global model's metrics on this silo's test split, with the trainer's own
        evaluation (search: the queries' candidates; recommendation: full catalog and
        sampled). Only numbers leave the silo: the metrics and how many groups (queries or
        users) they average over."""
        import torch

        from ..batches import Batcher
        from ..evaluation import evaluate_recommendation, evaluate_search
        from .weights import exchanged_names, load_record

        torch.set_num_threads(int(os.environ.get("RECJOB_SILO_THREADS", torch.get_num_threads())))
        model = self.model(info)
        load_record(model, global_arrays, exchanged_names(model, exchange))
        model.eval()
        ev, test = self.config.evaluation, self.prepared.splits["test"]
        batcher = Batcher.for_model(
            self.config.data.task, self.tokenizer(), info, self.prepared.catalog
        )
        with torch.no_grad():
            if self.config.data.task == "search-ranking":
                report = evaluate_search(model, batcher, test, ev.ks, ev.batch_size, ev.max_groups)
                key = "query"
            else:
                report = evaluate_recommendation(
                    model, batcher, test, ev.ks, ev.batch_size, ev.sampled_negatives,
                    ev.max_groups,
                )  # fmt: skip
                key = "user_id"
        groups = test[key].n_unique() if key in test.columns else test.height
        if ev.max_groups is not None:
            groups = min(groups, ev.max_groups)
        numbers = {
            k: float(v)
            for k, v in report.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
        }
        return {**numbers, "groups": float(groups)}
