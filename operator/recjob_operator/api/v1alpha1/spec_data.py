"""The RecJob spec's ``data`` section: the user's logs, their columns, and how they are
cleaned, split and sampled. Field docstrings become the CRD's descriptions."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from . import cel
from .common import MAX_INTEGER, SEED_MAX, StorageUri
from .spec_base import MAX_TEXT_LENGTH, SpecModel, with_rules

Task = Literal["search-ranking", "recommendation"]
DataFormat = Literal["csv", "parquet", "jsonl", "atomic"]
SplitStrategy = Literal["by-query", "leave-one-out", "by-time", "predefined"]


#: The atomic (RecBole/UniSRec) format's column names, used for the roles the RecJob's
#: spec.data.columns leaves unset: .inter files (userId, history, itemId), the catalog's
#: .text file (itemId, itemText) and the candidates file (userId, candidates[, itemId]).
ATOMIC_COLUMNS = {
    "userId": "user_id:token",
    "history": "item_id_list:token_seq",
    "itemId": "item_id:token",
    "itemText": "text:token_seq",
    "candidates": "item_id_list:token_seq",
}


class ColumnMapping(SpecModel):
    """Which column of the user's logs holds what. Unset columns are not used; the atomic
    format reads userId, history and itemId from its .inter files and itemId and itemText
    from its catalog, by default as RecBole names them (user_id:token,
    item_id_list:token_seq, item_id:token, text:token_seq)."""

    query: str | None = Field(default=None, min_length=1, max_length=MAX_TEXT_LENGTH)
    """Search query text (search-ranking)."""
    item_id: str | None = Field(default=None, min_length=1, max_length=MAX_TEXT_LENGTH)
    """Item (product) identifier."""
    item_text: str | None = Field(default=None, min_length=1, max_length=MAX_TEXT_LENGTH)
    """Item text: title, and optionally category/brand (search-ranking, catalog). Several
    columns may be named, separated by commas; their values are joined with spaces."""
    label: str | None = Field(default=None, min_length=1, max_length=MAX_TEXT_LENGTH)
    """Graded relevance (search-ranking) or click label (recommendation impression logs:
    then every row is a labelled impression and no negatives are sampled)."""
    user_id: str | None = Field(default=None, min_length=1, max_length=MAX_TEXT_LENGTH)
    """User identifier (recommendation); several comma-separated columns form one key."""
    timestamp: str | None = Field(default=None, min_length=1, max_length=MAX_TEXT_LENGTH)
    """Event time (recommendation; needed by the by-time split)."""
    event_type: str | None = Field(default=None, min_length=1, max_length=MAX_TEXT_LENGTH)
    """Event type such as view / click / purchase (recommendation); see
    preprocessing.positiveEvents."""
    history: str | None = Field(default=None, min_length=1, max_length=MAX_TEXT_LENGTH)
    """The user's earlier items as one space-separated list of item ids, oldest first
    (atomic format only: its .inter files hold pre-built histories; default
    item_id_list:token_seq). Other formats build histories from the interactions."""
    candidates: str | None = Field(default=None, min_length=1, max_length=MAX_TEXT_LENGTH)
    """The candidate-list column of the spec.data.candidates file: item ids separated by
    spaces (or a list, in parquet / jsonl). Default: item_id_list:token_seq for the atomic
    format, candidates otherwise."""


class Deduplication(SpecModel):
    """Duplicate removal; removed rows are counted in the data report."""

    exact: bool = True
    """Drop rows identical after text normalisation."""
    near: bool = False
    """Also drop near-duplicate item texts (shingle Jaccard similarity)."""
    near_threshold: float = Field(default=0.9, gt=0.0, le=1.0)
    """Jaccard similarity at or above which two texts count as near duplicates."""


class MissingValues(SpecModel):
    """What to do with rows that lack a required value."""

    policy: Literal["drop", "fill", "quarantine"] = "quarantine"
    """drop: remove and count; fill: replace with fillText / fillNumber; quarantine: write
    the rows aside with the reason (never silently lost)."""
    fill_text: str = Field(default="", max_length=MAX_TEXT_LENGTH)
    """Replacement for missing text when policy is fill."""
    fill_number: float = 0.0
    """Replacement for missing numbers when policy is fill."""


class TextNormalization(SpecModel):
    """Text clean-up applied to queries and item texts."""

    lowercase: bool = True
    unicode_form: Literal["NFC", "NFKC", "none"] = "NFKC"
    strip_html: bool = True
    collapse_whitespace: bool = True


class Split(SpecModel):
    """How held-out data is carved out without leakage."""

    model_config = with_rules(cel.SPLIT_RULES)

    strategy: SplitStrategy | None = None
    """by-query (search: all pairs of a query on one side), leave-one-out or by-time
    (recommendation), predefined (use the validation/test URIs). Default: by-query for
    search-ranking, leave-one-out for recommendation, predefined when validation is given.
    With a test URI but no validation URI the test set is that file and this strategy
    carves only the validation set from the training data (testFraction is unused)."""
    validation_fraction: float = Field(default=0.1, gt=0.0, lt=0.5)
    test_fraction: float = Field(default=0.1, gt=0.0, lt=0.5)
    seed: int = Field(default=42, ge=0, le=SEED_MAX)


class NegativeSampling(SpecModel):
    """Negatives for implicit feedback (recommendation)."""

    strategy: Literal["none", "uniform", "popularity"] = "popularity"
    per_positive: int = Field(default=4, ge=1, le=1000)
    seed: int = Field(default=42, ge=0, le=SEED_MAX)


class Preprocessing(SpecModel):
    """Cleaning, filtering, splitting and sampling, with a count reported for each step."""

    deduplicate: Deduplication = Field(default_factory=Deduplication)
    missing_values: MissingValues = Field(default_factory=MissingValues)
    text_normalization: TextNormalization = Field(default_factory=TextNormalization)
    min_user_interactions: int = Field(default=0, ge=0, le=1000)
    """k-core filter: drop users with fewer interactions (0 disables)."""
    min_item_interactions: int = Field(default=0, ge=0, le=1000)
    """k-core filter: drop items with fewer interactions (0 disables)."""
    split: Split = Field(default_factory=Split)
    negative_sampling: NegativeSampling = Field(default_factory=NegativeSampling)
    positive_events: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(
        default=None, min_length=1, max_length=100
    )
    """With columns.eventType: the event types that count as interactions (others are
    dropped and counted); unset keeps every event."""
    max_rows: int | None = Field(default=None, ge=1, le=MAX_INTEGER)
    """Read at most this many rows of training data (smoke runs)."""


class DataSpec(SpecModel):
    """The user's logs: where they are, their shape, and how to prepare them."""

    model_config = with_rules(cel.DATA_RULES)

    task: Task
    """search-ranking: query-item relevance; recommendation: next-item / click prediction."""
    format: DataFormat = "csv"
    """File format; atomic is the RecBole/UniSRec format (.inter + .text files)."""
    train: StorageUri
    """Training logs."""
    validation: StorageUri | None = None
    """Optional held-out logs, same columns as train; required by the predefined split,
    and needs test."""
    test: StorageUri | None = None
    """Optional test logs, same columns as train: the test set is this file. Without
    validation, validation is carved from train by preprocessing.split (by-query, or for
    recommendation each user's last training item / the latest training times); each
    held-out interaction's history is the user's earlier interactions, training ones first.
    The atomic format needs test or validation."""
    catalog: StorageUri | None = None
    """Item catalog with item texts (recommendation)."""
    item_index: StorageUri | None = None
    """Atomic format: the mapping from the catalog's item codes to the item ids of the
    .inter files, one "code<TAB>id" line each (UniSRec's .item2index). Default: the
    .item2index file beside the catalog (Data.text -> Data.item2index) when there is one,
    else the catalog's ids are the .inter ids. Catalog items without an id are dropped
    and counted in the data report."""
    candidates: StorageUri | None = None
    """Recommendation: given candidate lists for the test rows (the protocol of many
    papers: the true next item ranked among N retrieved candidates), reported as
    candidates/... metrics beside the full-catalog and sampled ones. A table in this
    format (atomic: tab-separated with a header) holding the user id (columns.userId) and
    the list (columns.candidates); a row applies to every test row of its user, or, when
    the file also has the item column (columns.itemId), to the test row of that user and
    true item. Item ids are those of the test file; an id the prepared catalog lacks is
    an error; a list without its row's true item counts as a miss for every metric
    (candidates/target_in_list says how often); test rows without a list are left out of
    the candidates/... metrics (candidates/users counts those evaluated)."""
    columns: ColumnMapping = Field(default_factory=ColumnMapping)
    preprocessing: Preprocessing = Field(default_factory=Preprocessing)
