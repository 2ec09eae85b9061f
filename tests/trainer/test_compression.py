"""Students, distillation losses and pruning on the real MiniLM weights."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from recjob_operator.api.v1alpha1.spec_training import StudentSpec
from recjob_serving.export import export_onnx, quantize_int8, run_onnx
from recjob_trainer.compression import pruning
from recjob_trainer.compression.distill import distillation_loss, hidden_state_loss
from recjob_trainer.compression.structure import UnsupportedEncoder, bert_layers, structure_of
from recjob_trainer.compression.student import build_student, layer_indices
from recjob_trainer.models import ModelInfo, base_model_path, build_model, load_model, save_model

PAIRS = [
    ("cordless drill", "dewalt 20v max cordless drill driver kit"),
    ("pvc elbow", "charlotte pipe 1/2 in. pvc sch. 40 90-degree elbow"),
    ("led bulbs", "philips 60w equivalent soft white a19 led light bulb (4-pack)"),
    ("deck screws", "grip-rite #9 x 3 in. star bugle-head deck screws"),
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(base_model_path("all-MiniLM-L6-v2"))


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    info = ModelInfo("cross-encoder", "regression", max_length=32, label_min=1.0, label_max=3.0)
    return build_model(info, base_model_path("all-MiniLM-L6-v2")).eval()


@pytest.fixture(scope="module")
def batch(tokenizer) -> dict[str, torch.Tensor]:
    queries, items = zip(*PAIRS, strict=True)
    return dict(tokenizer(list(queries), list(items), padding=True, return_tensors="pt"))


def labelled(batch) -> list[tuple[dict, torch.Tensor]]:
    return [(batch, torch.tensor([0.9, 0.8, 0.2, 0.5]))]


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(torch.sigmoid(logits), labels)


def state(model: torch.nn.Module, name: str) -> torch.Tensor:
    return dict(model.named_parameters())[name]


def roundtrip(model, tokenizer, tmp: Path):
    save_model(model, model.state_dict(), tokenizer, tmp)
    return load_model(tmp)[0]


def test_layer_selection() -> None:
    assert layer_indices(6, 3, "uniform") == [1, 3, 5]  # the last layer is always kept
    assert layer_indices(6, 2, "uniform") == [2, 5]
    assert layer_indices(12, 4, "uniform") == [2, 5, 8, 11]
    assert layer_indices(6, 2, "first") == [0, 1]
    assert layer_indices(6, 2, "last") == [4, 5]
    assert layer_indices(6, 6, "uniform") == list(range(6))
    with pytest.raises(ValueError, match="a student of 7 layers from a teacher of 6"):
        layer_indices(6, 7, "uniform")


def test_student_takes_the_teachers_layers_and_weights(teacher, batch, tokenizer, tmp_path) -> None:
    student, mapping = build_student(teacher, StudentSpec(numLayers=3))
    assert mapping == [1, 3, 5]
    assert len(bert_layers(student.encoder)) == 3 == student.encoder.config.num_hidden_layers
    assert len(bert_layers(teacher.encoder)) == 6  # the teacher is untouched
    for m, t in enumerate(mapping):
        for part in (
            "attention.self.query.weight",
            "intermediate.dense.bias",
            "output.dense.weight",
        ):
            s_param = state(student, f"encoder.encoder.layer.{m}.{part}")
            t_param = state(teacher, f"encoder.encoder.layer.{t}.{part}")
            assert s_param.shape == t_param.shape and torch.equal(s_param, t_param)
            assert s_param.data_ptr() != t_param.data_ptr()  # a copy, trained apart
    for name in ("encoder.embeddings.word_embeddings.weight", "head.weight", "head.bias"):
        assert torch.equal(state(student, name), state(teacher, name))
    assert student.info.extra["teacher_layers"] == [1, 3, 5]
    params = sum(p.numel() for p in student.parameters())
    assert params < sum(p.numel() for p in teacher.parameters()) - 3 * 1_700_000
    again = roundtrip(student, tokenizer, tmp_path)  # the saved student loads strictly
    with torch.no_grad():
        assert torch.equal(again(**batch), student.eval()(**batch))


def test_narrow_student_slices_the_teachers_weights(teacher, batch, tokenizer, tmp_path) -> None:
    student, _ = build_student(teacher, StudentSpec(numLayers=2, hiddenSize=192))
    config = student.encoder.config
    assert (config.hidden_size, config.intermediate_size, config.num_attention_heads) == (
        192,
        768,
        12,
    )
    words = state(student, "encoder.embeddings.word_embeddings.weight")
    assert words.shape == (30522, 192)
    teacher_words = state(teacher, "encoder.embeddings.word_embeddings.weight")
    # every kept column is one of the teacher's columns, each used once, in order
    kept = [
        int(np.argmin(((teacher_words[:50] - words[:50, [i]]) ** 2).sum(0).detach().numpy()))
        for i in range(192)
    ]
    assert kept == sorted(set(kept)) and len(kept) == 192
    assert torch.equal(words, teacher_words[:, kept])
    layer = bert_layers(student.encoder)[0]
    assert layer.attention.self.query.weight.shape == (192, 192)
    assert layer.intermediate.dense.weight.shape == (768, 192)
    assert state(student, "head.weight").shape == (1, 192)
    assert torch.equal(state(student, "head.weight"), state(teacher, "head.weight")[:, kept])
    again = roundtrip(student, tokenizer, tmp_path)
    with torch.no_grad():
        assert torch.equal(again(**batch), student.eval()(**batch))


@pytest.mark.parametrize("kind", ["mse", "kl", "listwise-kl"])
def test_distillation_loss_is_zero_for_the_teacher_itself(kind: str) -> None:
    torch.manual_seed(0)
    for shape in ((8,), (4, 12)):  # cross-encoder scores, bi-encoder score matrix
        teacher = torch.randn(shape) * 3
        assert float(distillation_loss(kind, teacher.clone(), teacher, 2.0)) == pytest.approx(
            0.0, abs=1e-6
        )
        student = (teacher + torch.randn(shape)).requires_grad_(True)
        loss = distillation_loss(kind, student, teacher, 2.0)
        assert float(loss.detach()) > 1e-4
        loss.backward()  # gradients reach the student, never the teacher
        assert student.grad is not None and float(student.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="student logits"):
        distillation_loss(kind, torch.zeros(3), torch.zeros(4))


def test_listwise_loss_only_cares_about_the_order_within_a_list() -> None:
    teacher = torch.tensor([[3.0, 1.0, -2.0], [0.0, 2.0, 1.0]])
    shifted = teacher + torch.tensor([[5.0], [-3.0]])  # per-list constant: same softmax
    assert float(distillation_loss("listwise-kl", shifted, teacher)) == pytest.approx(0, abs=1e-6)
    assert float(distillation_loss("mse", shifted, teacher)) > 1


def test_a_full_depth_student_equals_its_teacher(teacher, batch) -> None:
    student, mapping = build_student(teacher, StudentSpec(numLayers=6))
    student.eval()
    with torch.no_grad():
        s_logits, (s_states, mask) = student(output_hidden_states=True, **batch)
        t_logits, (t_states, _) = teacher(output_hidden_states=True, **batch)
    assert torch.equal(s_logits, t_logits)
    assert float(distillation_loss("kl", s_logits, t_logits, 2.0)) == pytest.approx(0, abs=1e-6)
    assert float(hidden_state_loss(s_states, t_states, mask, mapping)) == 0.0
    smaller, small_map = build_student(teacher, StudentSpec(numLayers=3))
    with torch.no_grad():
        _, (states, _) = smaller.eval()(output_hidden_states=True, **batch)
    assert torch.equal(states[0], t_states[0])  # the same embeddings, different layers
    assert float(hidden_state_loss(states, t_states, mask, small_map)) > 0


def test_head_importance_finds_a_dead_head(teacher, batch) -> None:
    model = copy.deepcopy(teacher)
    layer = bert_layers(model.encoder)[2]
    with torch.no_grad():  # head 4 of layer 2 writes nothing: its gate has no gradient
        layer.attention.output.dense.weight[:, 4 * 32 : 5 * 32] = 0
    decision = pruning.choose(model, "attention-heads", 0.1, labelled(batch), task_loss)
    assert 4 not in decision["keep"][2]
    assert decision["importance"][2][4] == 0.0


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("attention-heads", None),
        ("ffn-channels", {"heads": [12] * 6, "ffn": [1088] * 6}),  # 1075 -> 17 x 64
        ("layers", {"heads": [12] * 4, "ffn": [1536] * 4}),
        ("magnitude", {"heads": [12] * 6, "ffn": [1536] * 6}),
    ],
)
def test_pruning_removes_what_it_says(teacher, batch, tokenizer, tmp_path, method, expected):
    model = copy.deepcopy(teacher)
    before = sum(p.numel() for p in model.parameters())
    decision = pruning.choose(model, method, 0.3, labelled(batch), task_loss)
    masks = pruning.apply(model, decision)
    structure = structure_of(model.encoder)
    after = sum(p.numel() for p in model.parameters())
    if method == "attention-heads":
        assert sum(structure["heads"]) == 72 - round(0.3 * 72) and min(structure["heads"]) >= 1
        assert structure["heads"] == [len(k) for k in decision["keep"]]
        assert before - after == (72 - sum(structure["heads"])) * 32 * (4 * 384 + 3)
    else:
        assert structure == expected
    if method == "magnitude":
        assert after == before and pruning.sparsity(model) == pytest.approx(0.3, abs=1e-3)
        weight = state(model, "encoder.encoder.layer.0.attention.self.query.weight")
        with torch.no_grad():
            weight += 1.0  # a training step would revive pruned weights ...
        pruning.enforce(model, masks)  # ... recovery puts them back to zero
        assert pruning.sparsity(model) == pytest.approx(0.3, abs=1e-3)
    else:
        assert after < before
    if method != "magnitude":  # a pruned model saves and loads with its new shapes
        model.info = ModelInfo(**{**teacher.info.__dict__, "extra": {"structure": structure}})
        again = roundtrip(model, tokenizer, tmp_path)
        with torch.no_grad():
            assert torch.equal(again(**batch), model.eval()(**batch))


def test_pruned_student_exports_to_onnx_with_parity(teacher, batch, tokenizer, tmp_path) -> None:
    student, _ = build_student(teacher, StudentSpec(numLayers=3))
    decision = pruning.choose(student, "attention-heads", 0.4, labelled(batch), task_loss)
    pruning.apply(student, decision)
    student.info.extra["structure"] = structure_of(student.encoder)
    assert len(set(student.info.extra["structure"]["heads"])) > 1  # layers differ
    save_model(student, student.state_dict(), tokenizer, tmp_path / "model")
    exported = export_onnx(tmp_path / "model", tmp_path / "model.onnx")  # raises on mismatch
    assert exported.parity_max_abs_diff < 1e-4
    int8 = quantize_int8(exported.path, tmp_path / "model.int8.onnx", 12, 384, fuse_attention=False)
    inputs = {k: v.numpy().astype(np.int64) for k, v in batch.items()}
    fp32_scores = run_onnx(exported.path, inputs)[1]
    int8_scores = run_onnx(int8, inputs)[1]
    with torch.no_grad():
        expected = student.eval()(**batch).numpy()
    assert np.abs(fp32_scores - expected).max() < 1e-4
    assert np.corrcoef(int8_scores, expected)[0, 1] > 0.95


def test_only_bert_style_encoders_are_compressed() -> None:
    with pytest.raises(UnsupportedEncoder, match="BERT-style encoders"):
        bert_layers(torch.nn.Linear(2, 2))


def test_kept_ffn_widths_are_hardware_friendly() -> None:
    assert pruning.channels_to_keep(1536, 0.3) == 1088
    assert pruning.channels_to_keep(1536, 0.5) == 768
    assert pruning.channels_to_keep(1536, 0.99) == 64  # never below one block
    assert pruning.channels_to_keep(10, 0.3) == 7  # narrow layers: plain rounding
