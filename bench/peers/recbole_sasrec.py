"""RecBole's reference SASRec, trained on a pre-split atomic dataset, as a benchmark peer.

Runs INSIDE the separate virtualenv ``.venv-recbole`` (``make peer-recbole``; pins in
``bench/peers/requirements-recbole.txt``) and imports no RecJob package: the benchmark
(``bench/rec_quality.py``) reads what this writes and scores it with the project's own
metrics code (``recjob_trainer.metrics.rank_of_target`` / ``target_rank_report``).

Input (``--data DIR --prefix P``): the atomic files ``P.train.inter``, ``P.valid.inter``,
``P.test.inter`` (header ``user_id:token  item_id_list:token_seq  item_id:token``; every
row is one next-item example: a history of integer item indices and the target index) and
``P.item2index`` (``ASIN<TAB>index``, indices 0..N-1, which defines the catalog; without
it, the row count of ``P.text`` is N). The three files are given to RecBole unchanged as
its benchmark files (``benchmark_filename: [train, valid, test]``), except that a history
longer than ``MAX_ITEM_LIST_LENGTH`` keeps its most recent items, as RecBole's own
sequence augmentation does.

Outputs in ``--out DIR``:

``scores.npy``
    float32 matrix of shape ``(T, N)``. Row ``i`` is the ``i``-th data row of
    ``P.test.inter`` in file order (header excluded, blank lines skipped). Column ``j``
    is the catalog item with integer index ``j`` (the indices used by the ``.inter``
    files, i.e. ``P.item2index`` order), for ``j`` in ``0..N-1``. The value is SASRec's
    score (dot product of the sequence representation with the item embedding; higher is
    better) of that item as the next item after the row's history. Items that appear in
    none of the three ``.inter`` files were never given an id by RecBole, so SASRec
    cannot rank them: their column is ``-inf`` in every row. No history item is masked
    (RecBole does not mask history in full-sort evaluation of sequential models either).
    The target of row ``i`` is the row's ``item_id`` column; its 0-based rank is
    ``recjob_trainer.metrics.rank_of_target(scores[i], target)`` (ties count against the
    target).

``peer.json``
    Wall seconds (total, training, scoring), epochs run, best epoch, best valid NDCG@10,
    RecBole's own full-sort test metrics (for reference), the same metrics recomputed
    from ``scores.npy`` (the mapping check: NDCG@10 and HR@10 must agree with RecBole's
    within ``CHECK_TOLERANCE``, otherwise the run exits 1), versions, the RecBole config
    used and the sha256 of the input files.

RecBole also writes its log (``log/``), TensorBoard events (``log_tensorboard/``), the
best checkpoint (``saved/``) and its copy of the dataset (``recbole_data/``) under
``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

SPLITS = ("train", "valid", "test")
HEADER = ("user_id:token", "item_id_list:token_seq", "item_id:token")
MAX_ITEM_LIST_LENGTH = 50
#: SASRec's hyper-parameters (RecBole's defaults for SASRec, stated explicitly).
SASREC = {
    "hidden_size": 64,
    "inner_size": 256,
    "n_layers": 2,
    "n_heads": 2,
    "hidden_dropout_prob": 0.5,
    "attn_dropout_prob": 0.5,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
    "initializer_range": 0.02,
    "loss_type": "CE",
}
KS = (1, 5, 10, 20)
#: |NDCG@10 and HR@10 from scores.npy - RecBole's own| allowed by the mapping check
#: (both rank the same float32 scores; only exact ties may be ordered differently).
CHECK_TOLERANCE = 1e-3


# ---------------------------------------------------------------- data (no RecBole here)


def read_inter(path: Path) -> list[tuple[str, list[str], str]]:
    """Rows ``(user, history, target)`` of an atomic ``.inter`` file, in file order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or tuple(lines[0].split("\t")) != HEADER:
        raise ValueError(f"{path}: header must be {chr(9).join(HEADER)!r}")
    rows = []
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            raise ValueError(f"{path}:{n}: expected 3 tab-separated columns")
        user, history, target = parts
        rows.append((user, history.split(), target))
    return rows


def catalog_size(data_dir: Path, prefix: str) -> int:
    """N, the number of catalog items: indices 0..N-1 (``P.item2index``, else ``P.text``)."""
    item2index = data_dir / f"{prefix}.item2index"
    if item2index.exists():
        indices = sorted(
            int(line.split("\t")[1])
            for line in item2index.read_text(encoding="utf-8").splitlines()
            if line.strip()
        )
        if indices != list(range(len(indices))):
            raise ValueError(f"{item2index}: indices are not exactly 0..N-1")
        return len(indices)
    text = data_dir / f"{prefix}.text"
    if text.exists():
        return sum(1 for line in text.read_text(encoding="utf-8").splitlines()[1:] if line.strip())
    raise FileNotFoundError(f"neither {item2index} nor {text} exists: the catalog size is unknown")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prepare_dataset(data_dir: Path, prefix: str, dest: Path, max_len: int) -> dict:
    """RecBole's dataset folder ``dest/prefix/`` with the three benchmark ``.inter`` files.

    A split whose histories all fit in ``max_len`` is symlinked; otherwise it is rewritten
    with each history cut to its last ``max_len`` items (RecBole keeps the most recent
    items when it builds sequences itself; given pre-split lists it would not cut them,
    and SASRec's position table has only ``max_len`` rows). Returns per-split facts.
    """
    folder = dest / prefix
    folder.mkdir(parents=True, exist_ok=True)
    info = {}
    for split in SPLITS:
        src = (data_dir / f"{prefix}.{split}.inter").resolve()
        rows = read_inter(src)
        target = folder / f"{prefix}.{split}.inter"
        if target.is_symlink() or target.exists():
            target.unlink()
        long_rows = sum(1 for _, history, _ in rows if len(history) > max_len)
        if long_rows:
            lines = ["\t".join(HEADER)]
            lines += [f"{u}\t{' '.join(h[-max_len:])}\t{t}" for u, h, t in rows]
            target.write_text("\n".join(lines) + "\n", encoding="utf-8")
        else:
            target.symlink_to(src)
        info[split] = {
            "file": str(src),
            "sha256": _sha256(src),
            "rows": len(rows),
            "histories_cut": long_rows,
            "empty_histories": sum(1 for _, history, _ in rows if not history),
        }
    return info


def column_index(id_tokens: Sequence[str], n_items: int) -> np.ndarray:
    """Catalog column of each RecBole internal item id (``dataset.field2id_token``).

    Internal id 0 is RecBole's ``[PAD]`` and maps to -1; every other token must be an
    integer index in 0..N-1, each used once.
    """
    cols = np.full(len(id_tokens), -1, dtype=np.int64)
    for internal, token in enumerate(id_tokens):
        if internal == 0:
            continue
        col = int(token)
        if not 0 <= col < n_items:
            raise ValueError(f"item token {token!r} is outside the catalog 0..{n_items - 1}")
        cols[internal] = col
    used = cols[1:]
    if len(np.unique(used)) != len(used):
        raise ValueError("two RecBole item ids map to the same catalog index")
    return cols


def to_catalog(internal_scores: np.ndarray, cols: np.ndarray, n_items: int) -> np.ndarray:
    """Scores over RecBole's internal ids -> float32 ``(B, N)`` in catalog order, -inf where
    RecBole has no id (and for the ``[PAD]`` column, which is dropped)."""
    out = np.full((internal_scores.shape[0], n_items), -np.inf, dtype=np.float32)
    out[:, cols[1:]] = internal_scores[:, 1:]
    return out


def target_ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """0-based rank of each row's target; ties count against the target (as in
    ``recjob_trainer.metrics.rank_of_target``)."""
    target_scores = scores[np.arange(len(targets)), targets][:, None]
    return (scores >= target_scores).sum(axis=1) - 1


def rank_metrics(ranks: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    """HR@k, NDCG@k (0-based rank r: 1/log2(r+2) if r < k) and MRR from target ranks."""
    r = np.asarray(ranks, dtype=np.float64)
    report = {"mrr": float(np.mean(1.0 / (r + 1)))}
    for k in ks:
        hit = r < k
        report[f"hr@{k}"] = float(np.mean(hit))
        report[f"ndcg@{k}"] = float(np.mean(np.where(hit, 1.0 / np.log2(r + 2), 0.0)))
    return report


# ---------------------------------------------------------------- RecBole


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="folder with the atomic files")
    p.add_argument("--prefix", required=True, help="file prefix, e.g. Scientific")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--epochs", type=int, default=300, help="most epochs (RecBole's default)")
    p.add_argument("--stopping-step", type=int, default=10, help="early-stopping patience")
    p.add_argument("--seed", type=int, default=2020, help="RecBole's seed (its default)")
    p.add_argument("--threads", type=int, default=1, help="torch / BLAS threads")
    p.add_argument("--train-batch-size", type=int, default=2048)
    p.add_argument("--eval-batch-size", type=int, default=4096)
    p.add_argument(
        "--checkpoint",
        type=Path,
        help="no training: score this RecBole SASRec checkpoint (saved/*.pth of a run of "
        "this script on the same data and settings)",
    )
    return p.parse_args(argv)


def recbole_config(args: argparse.Namespace, dataset_root: Path, out: Path) -> dict:
    """The config_dict handed to RecBole (SASRec, pre-split benchmark files, CPU)."""
    return {
        "data_path": str(dataset_root),
        "checkpoint_dir": str(out / "saved"),
        "USER_ID_FIELD": "user_id",
        "ITEM_ID_FIELD": "item_id",
        "load_col": {"inter": ["user_id", "item_id_list", "item_id"]},
        "alias_of_item_id": ["item_id_list"],
        "benchmark_filename": list(SPLITS),
        "MAX_ITEM_LIST_LENGTH": MAX_ITEM_LIST_LENGTH,
        **SASREC,
        "train_neg_sample_args": None,
        "epochs": args.epochs,
        "train_batch_size": args.train_batch_size,
        "eval_batch_size": args.eval_batch_size,
        "learner": "adam",
        "learning_rate": 0.001,
        "stopping_step": args.stopping_step,
        "eval_step": 1,
        # benchmark files are used as given: RecBole neither reorders nor re-splits them
        # (it requires order TO for sequential models; split is unused with benchmark files)
        "eval_args": {"order": "TO", "split": {"LS": "valid_and_test"}, "mode": "full"},
        "metrics": ["Hit", "NDCG", "MRR"],
        "topk": list(KS),
        "valid_metric": "NDCG@10",
        "metric_decimal_place": 6,
        "seed": args.seed,
        "reproducibility": True,
        "use_gpu": False,
        "show_progress": False,
        "log_wandb": False,
        "worker": 0,
        "save_dataset": False,
        "save_dataloaders": False,
    }


def _histories_to_batch(rows, token2id: dict, max_len: int):
    """Right-padded internal-id histories and their lengths (RecBole's layout)."""
    import torch

    seqs = [[token2id[t] for t in history[-max_len:]] for _, history, _ in rows]
    width = max(1, max(len(s) for s in seqs))
    item_seq = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        item_seq[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    return item_seq, lengths


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    t_start = time.perf_counter()
    data_dir = args.data.resolve()
    out = args.out.resolve()
    checkpoint_file = args.checkpoint.resolve() if args.checkpoint else None
    out.mkdir(parents=True, exist_ok=True)
    n_items = catalog_size(data_dir, args.prefix)
    dataset_root = out / "recbole_data"
    split_info = prepare_dataset(data_dir, args.prefix, dataset_root, MAX_ITEM_LIST_LENGTH)
    test_rows = read_inter(data_dir / f"{args.prefix}.test.inter")
    if any(not history for _, history, _ in test_rows):
        raise SystemExit("a test row has an empty history: SASRec cannot score it")

    import recbole
    import torch
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.data.interaction import Interaction
    from recbole.utils import get_model, get_trainer, init_logger, init_seed

    torch.set_num_threads(args.threads)
    sys.argv = sys.argv[:1]  # RecBole's Config would read --key=value arguments as overrides
    os.chdir(out)  # RecBole writes ./log and ./log_tensorboard under the working directory
    config_dict = recbole_config(args, dataset_root, out)
    config = Config(model="SASRec", dataset=args.prefix, config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    for split, data in zip(SPLITS, (train_data, valid_data, test_data), strict=True):
        if len(data.dataset) != split_info[split]["rows"]:
            raise SystemExit(
                f"RecBole kept {len(data.dataset)} of {split_info[split]['rows']} {split} rows"
            )
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)

    t_train = time.perf_counter()
    if checkpoint_file is None:
        best_valid_score, best_valid_result = trainer.fit(
            train_data, valid_data, saved=True, show_progress=False
        )
        epochs_run = len(trainer.train_loss_dict)
        checkpoint_file = Path(trainer.saved_model_file)
    train_seconds = time.perf_counter() - t_train

    # the best checkpoint is RecBole's own pickle (config object inside): weights_only=False
    checkpoint = torch.load(checkpoint_file, map_location="cpu", weights_only=False)
    model.load_state_dict(checkpoint["state_dict"])
    model.load_other_parameter(checkpoint.get("other_parameter"))
    best_epoch = int(checkpoint["epoch"])
    if args.checkpoint is not None:  # scored, not trained, here
        epochs_run = None
        best_valid_result = trainer.evaluate(valid_data, load_best_model=False)
        best_valid_score = best_valid_result["ndcg@10"]
    recbole_test = {
        k: float(v) for k, v in trainer.evaluate(test_data, load_best_model=False).items()
    }

    # scores.npy: every test row in file order, every catalog item in index order
    t_score = time.perf_counter()
    item_field = config["ITEM_ID_FIELD"]
    token2id = dataset.field2token_id[item_field]
    cols = column_index(list(dataset.field2id_token[item_field]), n_items)
    scores = np.empty((len(test_rows), n_items), dtype=np.float32)
    model.eval()
    batch = args.eval_batch_size
    with torch.no_grad():
        for start in range(0, len(test_rows), batch):
            chunk = test_rows[start : start + batch]
            item_seq, lengths = _histories_to_batch(chunk, token2id, MAX_ITEM_LIST_LENGTH)
            inter = Interaction({model.ITEM_SEQ: item_seq, model.ITEM_SEQ_LEN: lengths})
            internal = model.full_sort_predict(inter).cpu().numpy()
            scores[start : start + len(chunk)] = to_catalog(internal, cols, n_items)
    np.save(out / "scores.npy", scores)
    score_seconds = time.perf_counter() - t_score

    # mapping check: the ranks of scores.npy against RecBole's own evaluation
    targets = np.array([int(t) for _, _, t in test_rows], dtype=np.int64)
    from_scores = rank_metrics(target_ranks(scores, targets))
    diffs = {
        name: abs(from_scores[ours] - recbole_test[theirs])
        for name, ours, theirs in (("ndcg@10", "ndcg@10", "ndcg@10"), ("hr@10", "hr@10", "hit@10"))
    }
    check_ok = all(d <= CHECK_TOLERANCE for d in diffs.values())
    unseen = int(np.sum(np.all(np.isneginf(scores), axis=0)))
    report = {
        "peer": "recbole-sasrec",
        "ok": check_ok,
        "wall_seconds": round(time.perf_counter() - t_start, 1),
        "train_seconds": round(train_seconds, 1),
        "score_seconds": round(score_seconds, 1),
        "epochs_run": epochs_run,
        "best_epoch": best_epoch + 1,
        "best_valid_ndcg@10": float(best_valid_score),
        "best_valid_result": {k: float(v) for k, v in best_valid_result.items()},
        "recbole_test_result": recbole_test,
        "scores_npy": {
            "shape": list(scores.shape),
            "rows": f"{args.prefix}.test.inter data rows in file order",
            "columns": f"catalog item indices 0..{n_items - 1} ({args.prefix}.item2index order)",
            "unseen_items_neg_inf": unseen,
            "history_masked": False,
        },
        "check": {
            "from_scores_npy": from_scores,
            "abs_diff_vs_recbole": diffs,
            "tolerance": CHECK_TOLERANCE,
            "recbole_masks_history": not test_data.is_sequential,
            "note": "RecBole's MRR@k is cut at k; mrr from scores.npy is not",
        },
        "data": {
            "dir": str(data_dir),
            "prefix": args.prefix,
            "catalog_items": n_items,
            "splits": split_info,
        },
        "versions": {
            "recbole": recbole.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "recbole_config": {
            k: (str(config[k]) if k == "device" else config[k])
            for k in (*config_dict, "device", "MODEL_TYPE", "model", "dataset")
        },
        "checkpoint": str(checkpoint_file),
        "trained_here": args.checkpoint is None,
    }
    (out / "peer.json").write_text(
        json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8"
    )
    print(
        json.dumps(
            {k: report[k] for k in ("ok", "wall_seconds", "epochs_run", "best_valid_ndcg@10")}
        )
    )
    print("recbole test:", json.dumps(recbole_test))
    print("from scores.npy:", json.dumps(from_scores))
    if not check_ok:
        print(f"mapping check FAILED: {diffs} > {CHECK_TOLERANCE}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
