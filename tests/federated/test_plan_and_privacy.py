"""The launcher's side of a federation, in process: silos' private folders, partitions of
one dataset, what the server is told, and the privacy accountant."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import flwr  # noqa: F401  (make install puts it in; missing, these tests fail, never skip)
import polars as pl
import pytest
import yaml

from recjob_operator.api.v1alpha1.spec_federated import FederatedSpec
from recjob_operator.api.v1alpha1.trainer import TrainerConfig
from recjob_trainer.federated.plan import prepare_silos, server_settings
from recjob_trainer.federated.server_app import privacy_spent


def logs(path: Path) -> Path:
    rows = ["q,title,relevance,region"]
    for i in range(60):
        rows.append(f"query {i},item {i},{i % 3 + 1},{['n', 's', 'e', 'w'][i % 4]}")
    path.write_text("\n".join(rows) + "\n")
    return path


def config(tmp: Path, federated: dict) -> TrainerConfig:
    return TrainerConfig.model_validate(
        {
            "name": "fed",
            "outputUri": str(tmp / "out"),
            "data": {
                "task": "search-ranking",
                "train": str(logs(tmp / "all.csv")),
                "columns": {"query": "q", "itemText": "title", "label": "relevance"},
            },
            "model": {"fineTuning": {"method": "lora", "lora": {}}},
            "training": {"federated": federated},
        }
    )


def silo_rows(silos) -> list[pl.DataFrame]:
    out = []
    for silo in silos:
        doc = yaml.safe_load(silo.config_path.read_text())
        out.append(pl.read_csv(doc["data"]["train"], infer_schema=False))
    return out


def test_a_hash_partition_puts_each_query_in_one_private_silo(tmp_path: Path) -> None:
    silos = prepare_silos(config(tmp_path, {"partition": {"count": 3}}), tmp_path / "work")
    assert [s.name for s in silos] == ["part-0", "part-1", "part-2"]
    parts = silo_rows(silos)
    assert all(p.height for p in parts) and sum(p.height for p in parts) == 60
    queries = [set(p["q"]) for p in parts]
    assert not (queries[0] & queries[1] or queries[0] & queries[2] or queries[1] & queries[2])
    for silo in silos:
        assert stat.S_IMODE(silo.directory.stat().st_mode) == 0o700
        assert stat.S_IMODE(silo.config_path.stat().st_mode) == 0o600
        doc = yaml.safe_load(silo.config_path.read_text())
        assert doc["data"]["train"].startswith(str(silo.directory))  # its own copy only
        assert doc["outputUri"] == str(silo.directory / "work")


def test_a_column_partition_keeps_each_value_in_one_silo(tmp_path: Path) -> None:
    fed = {"partition": {"by": "column", "column": "region", "count": 2}}
    parts = silo_rows(prepare_silos(config(tmp_path, fed), tmp_path / "work"))
    regions = [set(p["region"]) for p in parts]
    assert regions[0] | regions[1] == {"n", "s", "e", "w"} and not regions[0] & regions[1]


def test_listed_silos_keep_their_uris_and_the_server_learns_none(tmp_path: Path) -> None:
    north, south = logs(tmp_path / "north.csv"), logs(tmp_path / "south.csv")
    fed = {"silos": [{"name": "north", "data": {"train": str(north)}},
                     {"name": "south", "data": {"train": str(south)}}]}  # fmt: skip
    cfg = config(tmp_path, fed)
    silos = prepare_silos(cfg, tmp_path / "work")
    trains = [yaml.safe_load(s.config_path.read_text())["data"]["train"] for s in silos]
    assert trains == [str(north), str(south)]
    settings = server_settings(cfg, tmp_path / "out")
    text = json.dumps(settings.__dict__)
    assert str(north) not in text and str(south) not in text and "all.csv" not in text
    assert settings.silo_names == ["north", "south"]
    assert settings.training["federated"]["silos"] is None


def test_privacy_spent_follows_noise_and_rounds() -> None:
    def spent(noise: float, rounds: int, fraction: float = 1.0) -> float:
        fed = FederatedSpec.model_validate(
            {"partition": {"count": 10}, "participation": {"fraction": fraction},
             "differentialPrivacy": {"clippingNorm": 1.0, "noiseMultiplier": noise}}
        )  # fmt: skip
        return privacy_spent(fed, rounds, 10)["epsilon"]

    assert spent(1.0, 10) > spent(2.0, 10) > 0  # more noise, less spent
    assert spent(1.0, 20) > spent(1.0, 10)  # more rounds, more spent
    assert spent(1.0, 10, fraction=0.2) < spent(1.0, 10)  # sampling amplifies privacy
    assert privacy_spent(FederatedSpec.model_validate({"partition": {}}), 10, 2) is None


@pytest.mark.parametrize("named_index", [True, False])
def test_an_atomic_dataset_is_partitioned_by_user_across_its_splits(
    tmp_path: Path, named_index: bool
) -> None:
    """RecBole/UniSRec files (the bench's Amazon Scientific): a user's train, valid and test
    rows go to the same silo; the item texts and the item index are copied to each, the
    index also when it is only the catalog's default .item2index sibling (without it no
    item of a silo's rows would map: no training rows)."""
    header = "user_id:token\titem_id_list:token_seq\titem_id:token"
    for part in ("train", "valid", "test"):
        rows = [f"{u}\t{u + 1} {u + 2}\t{u + 3}" for u in range(12)]
        (tmp_path / f"d.{part}.inter").write_text("\n".join([header, *rows]) + "\n")
    (tmp_path / "d.text").write_text("item_id:token\ttext:token_seq\n1\tlamp\n")
    (tmp_path / "d.item2index").write_text("1\t1\n")
    cfg = TrainerConfig.model_validate(
        {
            "name": "fed",
            "outputUri": str(tmp_path / "out"),
            "data": {
                "task": "recommendation",
                "format": "atomic",
                "train": str(tmp_path / "d.train.inter"),
                "validation": str(tmp_path / "d.valid.inter"),
                "test": str(tmp_path / "d.test.inter"),
                "catalog": str(tmp_path / "d.text"),
                **({"itemIndex": str(tmp_path / "d.item2index")} if named_index else {}),
            },
            "model": {"fineTuning": {"method": "lora", "lora": {}}},
            "training": {"federated": {"partition": {"count": 2}}},
        }
    )
    users = []
    for silo in prepare_silos(cfg, tmp_path / "work"):
        data = yaml.safe_load(silo.config_path.read_text())["data"]
        per_split = [
            {line.split("\t")[0] for line in Path(data[role]).read_text().splitlines()[1:]}
            for role in ("train", "validation", "test")
        ]
        assert per_split[0] == per_split[1] == per_split[2] != set()
        assert Path(data["catalog"]).read_text() == (tmp_path / "d.text").read_text()
        assert Path(data["itemIndex"]).parent == silo.directory / "data"
        assert Path(data["itemIndex"]).read_text() == "1\t1\n"
        users.append(per_split[0])
    assert users[0] | users[1] == {str(u) for u in range(12)} and not users[0] & users[1]
