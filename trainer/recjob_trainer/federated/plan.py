"""The silos of a federated run and what each one is given.

Every silo gets a private folder (mode 0700) holding its own trainer config: the RecJob's
data section with the silo's own URIs (``silos[].data``), or, with ``partition``, its own
part of spec.data written there by the data owner's side before the federation starts.
Only that silo's SuperNode is told the folder's path; the server gets
:class:`ServerSettings`, which has no data URI at all."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import polars as pl
import yaml

from recjob_operator.api.v1alpha1.spec_federated import silo_data_section
from recjob_operator.api.v1alpha1.uris import with_suffix

from ..config import TrainerConfig
from ..data.readers import atomic_columns, read_table
from ..storage import StorageNotFound, open_uri, resolve

#: Written by the ServerApp when it ends (in federated/ of the output), completed or failed.
SERVER_STATUS = "server-status.json"


@dataclass(frozen=True)
class Silo:
    """One data owner as the federation's launcher sees it."""

    name: str
    directory: Path
    """Private to the silo: its config, its data (partition mode) and its work files."""

    @property
    def config_path(self) -> Path:
        return self.directory / "trainer.yaml"


@dataclass(frozen=True)
class ServerSettings:
    """What the ServerApp is told: the model and training settings, never a data URI."""

    name: str
    output_dir: str
    task: str
    model: dict
    training: dict
    base_dir: str | None = None
    silo_names: list[str] | None = None

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def read(cls, path: str | Path) -> ServerSettings:
        return cls(**json.loads(Path(path).read_text()))


def server_settings(config: TrainerConfig, output_dir: Path) -> ServerSettings:
    """The server's view of ``config``: model and training sections with the silos' data
    (and the partition of spec.data) left out; no data section. It knows silos by name."""
    fed = config.training.federated
    names = (
        [s.name for s in fed.silos]
        if fed.silos
        else [f"part-{i}" for i in range(fed.partition.count)]
    )
    training = config.training.model_copy(
        update={"federated": fed.model_copy(update={"silos": None, "partition": None})}
    )
    return ServerSettings(
        name=config.name,
        output_dir=str(output_dir),
        task=config.data.task,
        model=config.model.model_dump(mode="json", by_alias=True),
        training=training.model_dump(mode="json", by_alias=True),
        base_dir=config.base_dir,
        silo_names=names,
    )


def silo_key(value: str, count: int) -> int:
    """The silo (0..count-1) a partition key goes to: a stable hash, not Python's."""
    digest = hashlib.blake2b(value.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


def prepare_silos(config: TrainerConfig, root: Path) -> list[Silo]:
    """Make every silo's private folder and trainer config under ``root/silos``."""
    fed = config.training.federated
    if fed is None:
        raise ValueError("spec.training.federated is not set")
    silos_root = root / "silos"
    silos_root.mkdir(parents=True, exist_ok=True)
    out = []
    if fed.silos is not None:
        for spec in fed.silos:
            silo = _private(silos_root / spec.name, spec.name)
            _write_config(config, silo, spec.data.uris())
            out.append(silo)
        return out
    names = [f"part-{i}" for i in range(fed.partition.count)]
    silos = [_private(silos_root / name, name) for name in names]
    parts = _partition(config, silos)
    for silo in silos:
        _write_config(config, silo, parts[silo.name])
    return silos


def _private(directory: Path, name: str) -> Silo:
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    return Silo(name, directory)


def _write_config(config: TrainerConfig, silo: Silo, uris: dict[str, str]) -> None:
    data = silo_data_section(config.data, uris)  # the silo's files only
    doc = config.model_copy(
        update={
            "name": f"{config.name}-{silo.name}",
            "data": data,
            "output_uri": str(silo.directory / "work"),
        }
    ).model_dump(mode="json", by_alias=True, exclude_none=True)
    silo.config_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    os.chmod(silo.config_path, 0o600)


def _partition_column(config: TrainerConfig) -> str:
    fed, data = config.training.federated, config.data
    if fed.partition.by == "column":
        return fed.partition.column
    if data.format == "atomic":
        return atomic_columns(data.columns)["userId"][0]
    key = data.columns.query if data.task == "search-ranking" else data.columns.user_id
    if key is None:
        role = "query" if data.task == "search-ranking" else "userId"
        raise ValueError(f"partition by hash needs spec.data.columns.{role} (the key hashed)")
    return key


def _partition(config: TrainerConfig, silos: list[Silo]) -> dict[str, dict[str, str]]:
    """Split spec.data's train / validation / test files by the partition key into the
    silos' folders (the catalog, item texts shared by all, is copied to each)."""
    data, base = config.data, config.base_dir
    key = _partition_column(config)
    parts: dict[str, dict[str, str]] = {s.name: {} for s in silos}
    for role in ("train", "validation", "test"):
        uri = getattr(data, role)
        if uri is None:
            continue
        name = Path(resolve(uri, base)).name
        if data.format == "atomic":
            frame = read_table(uri, "csv", base, tabs=True)
            # "user_id:token" (RecBole's typed header) or "user_id"
            named = key.split(":")[0]
            column = next((c for c in frame.columns if c.split(":")[0] == named), None)
        else:
            frame = read_table(uri, data.format, base)
            column = key if key in frame.columns else None
        if column is None:
            raise ValueError(f"{uri}: no column {key!r} to partition by")
        bucket = pl.Series(
            [silo_key(str(v), len(silos)) for v in frame[column].cast(pl.String).to_list()]
        )
        for index, silo in enumerate(silos):
            part = frame.filter(bucket == index)
            if part.height == 0:
                raise ValueError(
                    f"partition: silo {silo.name} got no rows of {role} ({uri}); use fewer "
                    "silos or another column"
                )
            path = silo.directory / "data" / name
            path.parent.mkdir(exist_ok=True)
            _write_like(part, path, data.format)
            parts[silo.name][role] = str(path)
    shared = {"catalog": data.catalog, "item_index": data.item_index}
    if data.format == "atomic" and data.catalog and not data.item_index:
        # the reader's default index is the catalog's .item2index sibling: it must be
        # beside each silo's copy of the catalog too (else no item id maps: no rows)
        sibling = with_suffix(data.catalog, ".item2index")
        try:
            with open_uri(sibling, "rb", base):
                shared["item_index"] = sibling
        except StorageNotFound:
            pass
    for role, uri in shared.items():
        if uri is None:
            continue
        with open_uri(uri, "rb", base) as handle:
            raw = handle.read()
        for silo in silos:
            path = silo.directory / "data" / Path(resolve(uri, base)).name
            path.write_bytes(raw)
            parts[silo.name][role] = str(path)
    return parts


def _write_like(frame: pl.DataFrame, path: Path, fmt: str) -> None:
    if fmt == "parquet":
        frame.write_parquet(path)
    elif fmt == "jsonl":
        frame.write_ndjson(path)
    else:
        tabs = fmt == "atomic" or path.suffix in (".tsv", ".inter", ".text")
        frame.write_csv(path, separator="\t" if tabs else ",", quote_style="necessary")
