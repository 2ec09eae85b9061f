"""Build a second catalog in the atomic (RecBole/UniSRec) format from one sub-category of
the Amazon "Industrial & Scientific" data, to run the recommendation example on another
catalog by changing only its data paths.

An item belongs to the slice when its category path (the part of its text that starts
with ``Industrial & Scientific``) continues with one of the given sub-categories, as whole
words: ``--category "Industrial Electrical"`` takes "Industrial & Scientific Industrial
Electrical Wiring & Connecting ..." and not "... Industrial Hardware ...". Each user's
whole ordered sequence is rebuilt from the source splits (the first item, the training
targets in order, the validation target, the test target; checked against the test row,
whose history the source caps at 50 items), restricted to the slice's items; users left
with fewer than ``--min-length`` items are dropped. Items (in order of first appearance)
and users (in source order) get new indices, and the splits are written as the source's:

- ``PREFIX.train.inter``: every prefix of the sequence up to the third-last item, each
  user's rows longest first (prefix-augmented);
- ``PREFIX.valid.inter``: the second-last item with everything before it as history;
- ``PREFIX.test.inter``: the last item with everything before it as history (leave-one-out;
  the test history is the validation history plus the validation target);
- ``PREFIX.text``, ``PREFIX.item2index``, ``PREFIX.user2index``: the slice's catalog rows
  unchanged (ASIN codes), and the new code -> index maps.

Histories keep the source's cap (the last 50 items). Deterministic: the same source and
arguments give byte-identical files.

    .venv/bin/python examples/data/category_slice.py --category "Industrial Electrical" \\
        --out runs/data/electrical --prefix Electrical

(``--shared`` defaults to ../shared beside the checkout, or $RECJOB_SHARED.) Then point
spec.data.train / validation / test / catalog of examples/recjob-recommendation.yaml at
the four files.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections import defaultdict
from pathlib import Path

SOURCE = Path("data") / "amazon-scientific"
SOURCE_PREFIX = "Scientific"
ROOT = "Industrial & Scientific"
INTER_HEADER = "user_id:token\titem_id_list:token_seq\titem_id:token"
TEXT_HEADER = "item_id:token\ttext:token_seq"
MAX_HISTORY = 50
"""The source's history cap (its longest test history has 50 items)."""


def default_shared() -> Path:
    if "RECJOB_SHARED" in os.environ:
        return Path(os.environ["RECJOB_SHARED"])
    return Path(__file__).resolve().parents[3] / "shared"


def category_pattern(categories: list[str]) -> re.Pattern[str]:
    """Matches an item text whose category path starts with one of ``categories``."""
    names = "|".join(re.escape(name.strip()) for name in categories)
    return re.compile(rf"(?:^|\. ){re.escape(ROOT)} (?:{names})(?=[ .]|$)")


def _read_lines(path: Path, header: str | None) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    if header is not None:
        if not lines or lines[0] != header:
            raise SystemExit(f"{path}: expected the header {header!r}, found {lines[:1]!r}")
        lines = lines[1:]
    return lines


def _inter_rows(path: Path) -> list[tuple[str, list[str], str]]:
    rows = []
    for number, line in enumerate(_read_lines(path, INTER_HEADER), start=2):
        fields = line.split("\t")
        if len(fields) != 3:
            raise SystemExit(f"{path}:{number}: expected 3 tab-separated fields")
        rows.append((fields[0], fields[1].split(), fields[2]))
    return rows


def full_sequences(source: Path, prefix: str = SOURCE_PREFIX) -> dict[str, list[str]]:
    """user index -> the user's whole ordered item sequence (item indices), in source order.

    The training file lists each user's prefixes longest first, so the sequence is the
    history of its last (shortest) row, then its targets read backwards, then the
    validation and test targets. The test row's history is capped, so it alone cannot give
    long sequences; it must be the tail of the rebuilt one."""
    train: dict[str, list[tuple[list[str], str]]] = defaultdict(list)
    for user, history, target in _inter_rows(source / f"{prefix}.train.inter"):
        train[user].append((history, target))
    valid = {
        user: (history, target)
        for user, history, target in _inter_rows(source / f"{prefix}.valid.inter")
    }
    sequences = {}
    for user, history, target in _inter_rows(source / f"{prefix}.test.inter"):
        valid_history, valid_target = valid[user]
        rows = train.get(user)
        start = rows[-1][0] + [t for _, t in reversed(rows)] if rows else valid_history
        sequence = [*start, valid_target, target]
        tail = [*history, target]
        if sequence[-len(tail) :] != tail or sequence[-2 - len(valid_history) : -2] != (
            valid_history
        ):
            raise SystemExit(
                f"{source}: user {user}: the training, validation and test rows do not form "
                "one sequence (expected prefix-augmented leave-one-out splits)"
            )
        sequences[user] = sequence
    return sequences


def build_slice(
    shared: Path,
    categories: list[str],
    out: Path,
    prefix: str,
    min_length: int = 3,
    max_history: int = MAX_HISTORY,
) -> dict[str, int]:
    """Write the slice's six files to ``out`` and return its counts."""
    if min_length < 3:
        raise SystemExit("--min-length must be at least 3 (train, validation and test items)")
    source = shared / SOURCE
    pattern = category_pattern(categories)
    text_lines = _read_lines(source / f"{SOURCE_PREFIX}.text", TEXT_HEADER)
    code_to_index = dict(
        line.split("\t") for line in _read_lines(source / f"{SOURCE_PREFIX}.item2index", None)
    )
    index_to_code = {index: code for code, index in code_to_index.items()}
    user_codes = {
        index: code
        for code, index in (
            line.split("\t") for line in _read_lines(source / f"{SOURCE_PREFIX}.user2index", None)
        )
    }
    in_slice = {
        code_to_index[line.split("\t", 1)[0]]
        for line in text_lines
        if pattern.search(line.split("\t", 1)[1]) and line.split("\t", 1)[0] in code_to_index
    }
    if not in_slice:
        raise SystemExit(f"no item of {source} is in the category {categories!r}")

    sequences = full_sequences(source)
    item_ids: dict[str, int] = {}  # source item index -> new index
    user_ids: dict[str, int] = {}  # source user index -> new index
    kept: list[list[int]] = []
    for user in sorted(sequences, key=int):
        sequence = [item for item in sequences[user] if item in in_slice]
        if len(sequence) < min_length:
            continue
        user_ids[user] = len(user_ids)
        for item in sequence:
            item_ids.setdefault(item, len(item_ids))
        kept.append([item_ids[item] for item in sequence])
    if not kept:
        raise SystemExit(f"no user has {min_length} or more items of {categories!r}")

    def row(user: int, history: list[int], target: int) -> str:
        return f"{user}\t{' '.join(map(str, history[-max_history:]))}\t{target}"

    train, valid, test = [INTER_HEADER], [INTER_HEADER], [INTER_HEADER]
    for user, sequence in enumerate(kept):
        n = len(sequence)
        train += [row(user, sequence[:k], sequence[k]) for k in range(n - 3, 0, -1)]
        valid.append(row(user, sequence[: n - 2], sequence[n - 2]))
        test.append(row(user, sequence[: n - 1], sequence[n - 1]))
    codes = {index_to_code[item] for item in item_ids}
    text = [TEXT_HEADER] + [line for line in text_lines if line.split("\t", 1)[0] in codes]

    out.mkdir(parents=True, exist_ok=True)
    files = {
        "train.inter": train,
        "valid.inter": valid,
        "test.inter": test,
        "text": text,
        "item2index": [f"{index_to_code[item]}\t{new}" for item, new in item_ids.items()],
        "user2index": [f"{user_codes[user]}\t{new}" for user, new in user_ids.items()],
    }
    for suffix, lines in files.items():
        path = out / f"{prefix}.{suffix}"
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text("\n".join(lines) + "\n", encoding="utf-8")
        temporary.replace(path)
    return {
        "category_items": len(in_slice),
        "items": len(item_ids),
        "users": len(kept),
        "dropped_users": len(sequences) - len(kept),
        "interactions": sum(map(len, kept)),
        "train_rows": len(train) - 1,
        "valid_rows": len(valid) - 1,
        "test_rows": len(test) - 1,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shared",
        type=Path,
        default=default_shared(),
        help="the shared folder holding data/amazon-scientific (default: ../shared beside "
        "the checkout, or $RECJOB_SHARED)",
    )
    parser.add_argument(
        "--category",
        action="append",
        required=True,
        help=f"a sub-category path after {ROOT!r}, e.g. 'Industrial Electrical' or "
        "'Lab & Scientific Products'; repeat to take several",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder to write into")
    parser.add_argument("--prefix", default="Slice", help="file name prefix (default Slice)")
    parser.add_argument(
        "--min-length", type=int, default=3, help="drop users with fewer items (default 3)"
    )
    args = parser.parse_args(argv)
    counts = build_slice(args.shared, args.category, args.out, args.prefix, args.min_length)
    print(
        f"{' + '.join(args.category)}: {counts['items']} items (of {counts['category_items']} "
        f"in the category), {counts['users']} users with >= {args.min_length} of them "
        f"({counts['dropped_users']} dropped), {counts['interactions']} interactions; "
        f"rows: train {counts['train_rows']}, valid {counts['valid_rows']}, "
        f"test {counts['test_rows']}"
    )
    for suffix in ("train.inter", "valid.inter", "test.inter", "text", "item2index", "user2index"):
        print(f"  {args.out / f'{args.prefix}.{suffix}'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
