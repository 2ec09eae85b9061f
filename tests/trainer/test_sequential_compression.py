"""Compression of the sequential recommender, in process on tiny models (no DeepSpeed):
the student taken from the teacher's layers or built narrower, the teacher's masked
scores and the distillation losses on them, each pruning method (shapes shrink, the
model still runs and reloads exactly), hidden-state matching."""

from __future__ import annotations

import copy
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from recjob_operator.api.v1alpha1.spec_training import StudentSpec
from recjob_trainer.compression import sequential as seq
from recjob_trainer.compression.distill import distillation_loss, hidden_state_loss
from recjob_trainer.compression.pruning import enforce
from recjob_trainer.models import ModelInfo, base_model_path, load_model, save_model
from recjob_trainer.objective import loss_fn
from recjob_trainer.sequential import SequenceShape, SequentialRecommender

ITEMS = 24
UNSEEN = [3, 7, 20]  # catalog positions (0-based) training never saw


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(base_model_path("all-MiniLM-L6-v2"))


def teacher_model(tokenizer, layers: int = 3, hidden: int = 64) -> SequentialRecommender:
    """A tiny teacher (a 1-layer BERT of width 8 as text encoder, frozen, as the trainer
    freezes it), its weights randomised so that no two layers are alike."""
    torch.manual_seed(0)
    encoder = BertModel(
        BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=16,
        )
    )
    shape = SequenceShape(
        items=ITEMS, text_dim=8, hidden=hidden, layers=layers, heads=2, dropout=0.1,
        max_history=6, temperature=0.07,
    )  # fmt: skip
    info = ModelInfo(
        "sequential",
        "listwise",
        max_length=16,
        history_encoding="sequence",
        extra={"sequential": asdict(shape), "item_ids": [f"i{n}" for n in range(ITEMS)]},
    )
    model = SequentialRecommender(encoder, info)
    with torch.no_grad():
        for p in model.transformer.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    seen = torch.ones(ITEMS)
    seen[UNSEEN] = 0
    model.set_catalog_text(torch.randn(ITEMS, 8), seen)
    model.encoder.requires_grad_(False)
    return model.eval()


def batch(rows: int = 6) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A catalog-wide batch (every item a candidate) and each row's true item position."""
    generator = torch.Generator().manual_seed(1)
    history = torch.randint(1, ITEMS + 1, (rows, 5), generator=generator)
    history[0, :3] = 0  # left padding
    targets = torch.tensor([1, 5, 9, 12, 15, 22])[:rows]  # seen items (positions 0-based)
    return {"history": history, "candidates": torch.arange(1, ITEMS + 1)}, targets


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.float(), labels)


def roundtrip(model, tokenizer, directory: Path):
    save_model(model, model.state_dict(), tokenizer, directory)
    return load_model(directory)[0]


def same_scores(a, b) -> bool:
    inputs, _ = batch()
    with torch.no_grad():
        return torch.equal(a.eval()(**inputs), b.eval()(**inputs))


# --------------------------------------------------------------------------- student
def test_student_takes_the_selected_layers_and_the_item_side(tokenizer, tmp_path) -> None:
    teacher = teacher_model(tokenizer)
    student, mapping = seq.build_student(teacher, StudentSpec(numLayers=2), seed=0)
    assert mapping == [1, 2]  # uniform keeps the last layer
    assert len(student.transformer.layers) == 2 == student.shape.layers
    assert len(teacher.transformer.layers) == 3  # the teacher is untouched
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for m, t in enumerate(mapping):
        for part in ("self_attn.in_proj_weight", "linear1.weight", "linear2.bias", "norm2.weight"):
            s_param = s_state[f"transformer.layers.{m}.{part}"]
            assert torch.equal(s_param, t_state[f"transformer.layers.{t}.{part}"])
    item_side = ["text_projection.weight", "item_embedding.weight", "position.weight"]
    item_side += ["input_norm.weight", "output_norm.bias", "item_text", "text_mean", "seen"]
    for name in item_side:
        assert torch.equal(s_state[name], t_state[name]), name
    first, _ = seq.build_student(teacher, StudentSpec(numLayers=1, layerSelection="first"))
    assert torch.equal(
        first.state_dict()["transformer.layers.0.linear1.weight"],
        t_state["transformer.layers.0.linear1.weight"],
    )
    assert student.info.extra["sequential"]["layers"] == 2
    assert student.info.extra["teacher_layers"] == [1, 2]
    assert same_scores(roundtrip(student, tokenizer, tmp_path / "student"), student)
    full, _ = seq.build_student(teacher, StudentSpec(numLayers=3))
    assert same_scores(full, teacher)  # every layer: the teacher itself


def test_narrower_student_is_fresh_at_its_width_and_keeps_the_text(tokenizer, tmp_path) -> None:
    teacher = teacher_model(tokenizer)
    student, mapping = seq.build_student(teacher, StudentSpec(numLayers=1, hiddenSize=32), 7)
    again, _ = seq.build_student(teacher, StudentSpec(numLayers=1, hiddenSize=32), 7)
    assert mapping == [2]
    assert (student.shape.hidden, student.shape.layers, student.shape.heads) == (32, 1, 2)
    assert student.text_projection.weight.shape == (32, 8)
    assert student.item_embedding.weight.shape == (ITEMS + 1, 32)
    assert student.transformer.layers[0].linear1.weight.shape == (128, 32)
    assert student.catalog_vectors().shape == (ITEMS + 1, 32)  # the served table: half
    for name in ("item_text", "text_mean", "seen"):
        assert torch.equal(getattr(student, name), getattr(teacher, name))
    assert same_scores(student, again)  # seeded: every rank builds the same student
    # it learns from the teacher: the distillation loss falls
    student.train()
    inputs, labels = batch()
    scores = seq.SequentialTeacherScores(teacher)
    teacher_logits, _ = scores([], inputs, False)
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=3e-3)
    seq.trainable(student)
    assert not any(p.requires_grad for p in student.encoder.parameters())  # frozen text
    losses = []
    for _ in range(30):
        logits = student(**inputs)
        loss = 0.5 * loss_fn(student.info, logits, labels) + 0.5 * distillation_loss(
            "listwise-kl", logits, teacher_logits, 2.0
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < 0.7 * losses[0]
    assert same_scores(roundtrip(student, tokenizer, tmp_path / "narrow"), student)


# --------------------------------------------------------------------------- distillation
@pytest.mark.parametrize("kind", ["mse", "kl", "listwise-kl"])
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_distillation_over_masked_unseen_items_is_finite(tokenizer, kind, temperature) -> None:
    teacher = teacher_model(tokenizer)
    student, _ = seq.build_student(teacher, StudentSpec(numLayers=1, hiddenSize=32), 0)
    student.train()  # training: the unseen items' scores are the dtype's minimum
    inputs, _ = batch()
    teacher_logits, _ = seq.SequentialTeacherScores(teacher)([], inputs, False)
    logits = student(**inputs)
    floor = torch.finfo(logits.dtype).min
    unseen = [n for n in range(ITEMS) if n in UNSEEN]
    # the teacher masks exactly what the student's training forward masks
    assert torch.equal(teacher_logits == floor, logits == floor)
    assert bool((logits[:, unseen] == floor).all()) and int((logits == floor).sum()) == 6 * 3
    loss = distillation_loss(kind, logits, teacher_logits, temperature)
    assert torch.isfinite(loss) and float(loss.detach()) > 0
    loss.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    # the masked entries take no part: the same loss as over the seen columns alone
    seen = [n for n in range(ITEMS) if n not in UNSEEN]
    alone = distillation_loss(kind, logits[:, seen], teacher_logits[:, seen], temperature)
    assert float(loss.detach()) == pytest.approx(float(alone.detach()), rel=1e-5)
    valid = torch.ones(ITEMS, dtype=torch.bool)
    valid[5] = False  # an explicit mask leaves out more
    fewer = [n for n in seen if n != 5]
    with torch.no_grad():
        masked = distillation_loss(kind, logits, teacher_logits, temperature, valid)
        fewer_only = distillation_loss(
            kind, logits[:, fewer], teacher_logits[:, fewer], temperature
        )
    assert float(masked) == pytest.approx(float(fewer_only), rel=1e-5)


def test_hidden_states_match_layer_by_layer(tokenizer) -> None:
    teacher = teacher_model(tokenizer)
    inputs, _ = batch()
    with torch.no_grad():
        t_logits, (t_states, mask) = teacher(output_hidden_states=True, **inputs)
        assert torch.equal(t_logits, teacher(**inputs))  # the same scores, layer by layer
        full, full_map = seq.build_student(teacher, StudentSpec(numLayers=3))
        s_logits, (s_states, _) = full.eval()(output_hidden_states=True, **inputs)
        assert torch.equal(s_logits, t_logits)
        assert len(t_states) == 4 and t_states[0].shape == (6, 5, 64)
        assert torch.equal(mask, inputs["history"] != 0)
        assert float(hidden_state_loss(s_states, t_states, mask, full_map)) == 0.0
        small, small_map = seq.build_student(teacher, StudentSpec(numLayers=1))
        _, (states, _) = small.eval()(output_hidden_states=True, **inputs)
    assert torch.equal(states[0], t_states[0])  # the same item side, fewer layers
    assert float(hidden_state_loss(states, t_states, mask, small_map)) > 0


# --------------------------------------------------------------------------- pruning
def test_ffn_channels_keep_the_important_ones_and_reload(tokenizer, tmp_path) -> None:
    model = teacher_model(tokenizer, layers=2, hidden=32)
    with torch.no_grad():  # channels 0-9 of layer 1 write nothing: no importance
        model.transformer.layers[1].linear2.weight[:, :10] = 0
    held_out = [batch()]
    before = sum(p.numel() for p in model.parameters())
    decision = seq.choose(model, "ffn-channels", 0.5, held_out, task_loss)
    assert [len(k) for k in decision["keep"]] == [64, 64]  # 128 -> 64 (a multiple of 64)
    assert not set(range(10)) & set(decision["keep"][1])
    assert decision["importance"][1][:10] == [0.0] * 10
    masks = seq.apply(model, decision)
    assert masks == {}
    assert seq.structure_of(model) == {"heads": [2, 2], "ffn": [64, 64]}
    assert model.shape.ffn == [64, 64] and model.info.extra["sequential"]["ffn"] == [64, 64]
    assert before - sum(p.numel() for p in model.parameters()) == 2 * 64 * (32 + 1 + 32)
    again = roundtrip(model, tokenizer, tmp_path)
    assert seq.structure_of(again) == seq.structure_of(model)
    assert same_scores(again, model)


def test_layers_drop_the_cheapest_and_reload(tokenizer, tmp_path) -> None:
    model = teacher_model(tokenizer, layers=3)
    with torch.no_grad():  # layer 1 adds nothing to the residual stream: free to drop
        for name in ("linear2", "self_attn.out_proj"):
            module = model.transformer.layers[1].get_submodule(name)
            module.weight.zero_()
            module.bias.zero_()
    decision = seq.choose(model, "layers", 0.3, [batch()], task_loss)
    assert decision["keep"] == [0, 2] and decision["importance"][1] == pytest.approx(0, abs=1e-6)
    kept = [copy.deepcopy(model.transformer.layers[i]) for i in (0, 2)]
    seq.apply(model, decision)
    assert len(model.transformer.layers) == 2 == model.shape.layers
    assert model.info.extra["sequential"]["layers"] == 2
    for layer, original in zip(model.transformer.layers, kept, strict=True):
        assert torch.equal(layer.linear1.weight, original.linear1.weight)
    again = roundtrip(model, tokenizer, tmp_path)
    assert len(again.transformer.layers) == 2 and same_scores(again, model)


def test_magnitude_zeroes_the_smallest_transformer_weights(tokenizer, tmp_path) -> None:
    model = teacher_model(tokenizer, layers=2)
    decision = seq.choose(model, "magnitude", 0.4, [batch()], task_loss)
    masks = seq.apply(model, decision)
    names = ["self_attn.in_proj_weight", "self_attn.out_proj.weight"]
    names += ["linear1.weight", "linear2.weight"]
    assert set(masks) == {f"transformer.layers.{i}.{name}" for i in range(2) for name in names}
    assert seq.sparsity(model) == pytest.approx(0.4, abs=1e-3)
    assert seq.structure_of(model) == {"heads": [2, 2], "ffn": [256, 256]}
    assert model.shape.ffn is None  # the shapes stay
    weight = model.transformer.layers[0].linear1.weight
    with torch.no_grad():
        weight += 1.0  # an optimizer step revives pruned weights ...
    enforce(model, masks)  # ... recovery zeroes them again
    assert seq.sparsity(model) == pytest.approx(0.4, abs=1e-3)
    again = roundtrip(model, tokenizer, tmp_path)
    assert seq.sparsity(again) == pytest.approx(0.4, abs=1e-3) and same_scores(again, model)


def test_attention_heads_are_refused_naming_what_works(tokenizer) -> None:
    model = teacher_model(tokenizer, layers=1)
    with pytest.raises(ValueError, match="ffn-channels, layers, magnitude"):
        seq.choose(model, "attention-heads", 0.3, [batch()], task_loss)
    with pytest.raises(ValueError, match="sequential architecture"):
        seq.apply(model, {"method": "attention-heads", "keep": [[0]]})


def test_the_report_describes_the_served_shape(tokenizer) -> None:
    teacher = teacher_model(tokenizer)
    student, _ = seq.build_student(teacher, StudentSpec(numLayers=1, hiddenSize=32))
    assert (
        seq.describe(teacher)["item_table_bytes"] == 2 * seq.describe(student)["item_table_bytes"]
    )
    described = seq.describe(student)
    assert {k: described[k] for k in ("layers", "hidden_size", "structure")} == {
        "layers": 1,
        "hidden_size": 32,
        "structure": {"heads": [2], "ffn": [128]},
    }
    own = sum(p.numel() for p in student.parameters()) - sum(
        p.numel() for p in student.encoder.parameters()
    )
    assert described["parameters_without_text_encoder"] == own
    assert own < seq.describe(teacher)["parameters_without_text_encoder"] / 3
    inputs, _ = batch()
    assert seq.latency_ms(student, inputs) > 0


def test_sampled_candidates_with_a_trained_text_side(tokenizer) -> None:
    """negatives sampled (the text side trains): the teacher scores the batch's own
    candidates from their tokenized texts, masked as the student's; the student's text
    encoder trains (fully), and the loss and its gradients stay finite."""
    teacher = teacher_model(tokenizer)
    shape = {**teacher.info.extra["sequential"], "text_frozen": False, "negatives": "sampled"}
    teacher.info.extra["sequential"] = shape
    teacher.shape = SequenceShape.from_dict(shape)
    student, _ = seq.build_student(teacher, StudentSpec(numLayers=1), seed=0)
    seq.trainable(student).train()
    assert all(p.requires_grad for p in student.encoder.parameters())
    candidates = torch.tensor([2, 4, 5, 8, 10, 13, 21])  # 4 and 8, 21: never seen
    tokens = tokenizer([f"item {n}" for n in candidates.tolist()], padding=True,
                       return_tensors="pt")  # fmt: skip
    inputs = {
        "history": torch.tensor([[0, 2, 5], [4, 8, 10]]),
        "candidates": candidates,
        "candidate_input_ids": tokens["input_ids"],
        "candidate_attention_mask": tokens["attention_mask"],
    }
    teacher_logits, _ = seq.SequentialTeacherScores(teacher)([], inputs, False)
    logits = student(**inputs)
    floor = torch.finfo(logits.dtype).min
    assert torch.equal(teacher_logits == floor, logits == floor)
    assert (logits[0] == floor).tolist() == [False, True, False, True, False, False, True]
    loss = loss_fn(student.info, logits, torch.tensor([5, 4])) + distillation_loss(
        "listwise-kl", logits, teacher_logits, 0.5
    )
    loss.backward()
    grads = [p.grad for p in student.encoder.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert torch.isfinite(loss.detach())
