"""Storage URIs: pvc:// / file:// rules, the .item2index sibling, atomic writes, and
s3:// / gs:// through real servers on loopback (moto with IAM auth, a GCS emulator)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import fsspec
import pytest

from recjob_operator.api.v1alpha1.spec_data import DataSpec
from recjob_operator.api.v1alpha1.spec_training import ModelSpec
from recjob_trainer.data.prepare import prepare
from recjob_trainer.data.readers import DataError, read_atomic_catalog, read_table
from recjob_trainer.remote import (
    MANIFEST,
    IncompleteDirectory,
    WorkingCopy,
    pull_directory,
    push_directory,
)
from recjob_trainer.storage import (
    StorageError,
    StorageNotFound,
    exists_uri,
    open_uri,
    resolve,
    write_bytes_atomic,
)
from tests.object_stores import GCS_BUCKET

CATALOG = "item_id:token\ttext:token_seq\nB001\tcordless drill\nB002\tsafety glasses\n"
INDEX = "B001\t1\nB002\t2\n"


# --------------------------------------------------------------------------- pvc://, file://
@pytest.fixture
def pvc_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "pvc"
    (root / "data").mkdir(parents=True)
    (root / "other").mkdir()
    monkeypatch.setenv("RECJOB_PVC_ROOT", str(root))
    return root


def test_pvc_uri_resolves_inside_its_claim(pvc_root: Path) -> None:
    assert resolve("pvc://data/a/x.csv") == str(pvc_root / "data" / "a" / "x.csv")
    assert resolve("pvc://data/a/../x.csv") == str(pvc_root / "data" / "x.csv")
    assert resolve("pvc://data") == str(pvc_root / "data")


@pytest.mark.parametrize(
    "uri", ["pvc://data/../other/x.csv", "pvc://data/../../etc/passwd", "pvc://data/a/../../b"]
)
def test_pvc_uri_cannot_leave_its_claim(pvc_root: Path, uri: str) -> None:
    (pvc_root / "other" / "x.csv").write_text("secret\n")
    with pytest.raises(StorageError, match="leaves the claim"):
        resolve(uri)
    with pytest.raises(DataError, match="leaves the claim"):
        read_table(uri, "csv")


def test_pvc_symlink_out_of_the_claim_is_refused(pvc_root: Path) -> None:
    (pvc_root / "other" / "x.csv").write_text("a\n1\n")
    (pvc_root / "data" / "link").symlink_to(pvc_root / "other")
    with pytest.raises(StorageError, match="outside the claim's mount"):
        resolve("pvc://data/link/x.csv")


def test_pvc_uri_needs_a_claim_name(pvc_root: Path) -> None:
    for uri in ("pvc://", "pvc:///x.csv", "pvc://Data/x.csv"):
        with pytest.raises(StorageError):
            resolve(uri)


def test_relative_file_uri_is_refused_absolute_is_taken(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="must be absolute"):
        resolve("file://data.csv")
    with pytest.raises(StorageError, match="must be absolute"):
        resolve("file://localhost/etc/hosts")
    assert resolve(f"file://{tmp_path}/a/../b.csv") == str(tmp_path / "b.csv")


# --------------------------------------------------------------------------- .item2index
def _write_catalog(directory: Path, index: bool = True) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "Tiny.text").write_text(CATALOG)
    if index:
        (directory / "Tiny.item2index").write_text(INDEX)


@pytest.mark.parametrize("form", ["pvc", "file", "path", "relative"])
def test_item2index_is_found_beside_a_mounted_catalog(
    form: str, pvc_root: Path, tmp_path: Path
) -> None:
    _write_catalog(pvc_root / "data" / "amazon")
    uri = {
        "pvc": "pvc://data/amazon/Tiny.text",
        "file": f"file://{pvc_root}/data/amazon/Tiny.text",
        "path": str(pvc_root / "data" / "amazon" / "Tiny.text"),
        "relative": "amazon/Tiny.text",
    }[form]
    frame = read_atomic_catalog(uri, base_dir=pvc_root / "data")
    assert sorted(frame["item_id"].to_list()) == ["1", "2"]  # codes mapped to indices


def test_catalog_without_index_keeps_its_ids(pvc_root: Path) -> None:
    _write_catalog(pvc_root / "data", index=False)
    frame = read_atomic_catalog("pvc://data/Tiny.text")
    assert sorted(frame["item_id"].to_list()) == ["B001", "B002"]


def test_unreadable_index_is_an_error_not_a_silent_fallback(pvc_root: Path) -> None:
    _write_catalog(pvc_root / "data", index=False)
    (pvc_root / "data" / "Tiny.item2index").mkdir()  # there, but not a file
    with pytest.raises(DataError, match="item2index"):
        read_atomic_catalog("pvc://data/Tiny.text")


def test_item2index_is_found_beside_an_s3_catalog(s3_env) -> None:
    write_bytes_atomic("s3://recjob-data/amazon/Tiny.text", CATALOG.encode())
    write_bytes_atomic("s3://recjob-data/amazon/Tiny.item2index", INDEX.encode())
    frame = read_atomic_catalog("s3://recjob-data/amazon/Tiny.text")
    assert sorted(frame["item_id"].to_list()) == ["1", "2"]


# --------------------------------------------------------------------------- atomic writes
def test_failed_local_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "out" / "metrics.json"
    write_bytes_atomic(str(target), b'{"v": 1}')
    with pytest.raises(RuntimeError), open_uri(str(target), "wb") as handle:
        handle.write(b'{"v": 2, "half')
        raise RuntimeError("died mid-write")
    assert target.read_bytes() == b'{"v": 1}'
    assert sorted(p.name for p in target.parent.iterdir()) == ["metrics.json"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_failed_s3_write_publishes_nothing(s3_env) -> None:
    uri = "s3://recjob-artifacts/atomic/model.bin"
    with pytest.raises(RuntimeError), open_uri(uri, "wb") as handle:
        handle.write(b"x" * 1000)
        raise RuntimeError("died mid-upload")
    assert not exists_uri(uri)
    write_bytes_atomic(uri, b"old")
    with pytest.raises(RuntimeError), open_uri(uri, "wb") as handle:
        handle.write(b"new but half")
        raise RuntimeError("died mid-upload")
    with open_uri(uri) as handle:
        assert handle.read() == b"old"


# --------------------------------------------------------------------------- credentials
def _read(uri: str) -> bytes:
    with open_uri(uri) as handle:
        return handle.read()


def test_s3_uses_the_credentials_in_the_environment_only(s3_env, monkeypatch) -> None:
    uri = "s3://recjob-data/creds/a.csv"
    write_bytes_atomic(uri, b"q,title,relevance\ndrill,cordless drill,3\n")
    assert read_table(uri, "csv").height == 1
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    fsspec.get_filesystem_class("s3").clear_instance_cache()
    with pytest.raises(StorageError, match=r"s3://recjob-data/creds/a\.csv") as refused:
        _read(uri)
    assert not isinstance(refused.value, StorageNotFound)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    fsspec.get_filesystem_class("s3").clear_instance_cache()
    with pytest.raises(StorageError, match="credentials"):
        _read(uri)


def test_s3_missing_object_is_not_found(s3_env) -> None:
    with pytest.raises(StorageNotFound, match="no such file"):
        _read("s3://recjob-data/nothing/here.csv")
    assert not exists_uri("s3://recjob-data/nothing/here.csv")


def test_gcs_key_file_from_the_environment_is_used(tmp_path: Path, monkeypatch) -> None:
    """What GOOGLE_APPLICATION_CREDENTIALS (the mounted key of gcsKeyFile) gives gcsfs.
    The emulator checks no tokens, so this stops short of a signed request."""
    gcsfs = pytest.importorskip("gcsfs")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    info = {
        "type": "service_account",
        "project_id": "shop",
        "private_key_id": "k1",
        "private_key": pem,
        "client_email": "recjob-trainer@shop.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": "https://oauth2.googleapis.com/token",
    }
    (tmp_path / "key.json").write_text(json.dumps(info))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "key.json"))
    monkeypatch.setenv("NO_GCE_CHECK", "true")
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    fs = gcsfs.core.GCSFileSystem(skip_instance_cache=True)
    credentials = fs.credentials.credentials
    assert credentials.service_account_email == info["client_email"]
    assert fs.credentials.method == "google_default"


# --------------------------------------------------------------------------- data from s3
def test_prepare_reads_a_dataset_from_s3(s3_env) -> None:
    rows = ["search_term,product_uid,product_title,relevance"]
    for q in range(12):
        rows += [f"query {q},{q}{i},product {q} {i},{1 + (q + i) % 3}" for i in range(5)]
    write_bytes_atomic("s3://recjob-data/search/q.csv", ("\n".join(rows) + "\n").encode())
    spec = DataSpec.model_validate(
        {
            "task": "search-ranking",
            "train": "s3://recjob-data/search/q.csv",
            "columns": {
                "query": "search_term",
                "itemId": "product_uid",
                "itemText": "product_title",
                "label": "relevance",
            },
            "preprocessing": {"split": {"validationFraction": 0.2, "testFraction": 0.2}},
        }
    )
    prepared = prepare(spec, ModelSpec(), None)
    assert sum(frame.height for frame in prepared.splits.values()) == 60


# --------------------------------------------------------------------------- folders
def _folder(root: Path, version: str) -> Path:
    (root / "tokenizer").mkdir(parents=True)
    (root / "model.safetensors").write_bytes(version.encode() * 1000)
    (root / "tokenizer" / "vocab.txt").write_text(f"vocab {version}\n")
    (root / "empty-version").mkdir()
    (root / f"only-in-{version}.txt").write_text(version)
    (root / ".model.abc.partial").mkdir()  # a leftover of an atomic write: never sent
    return root


@pytest.fixture(params=["s3", "gs"])
def store(request) -> str:
    """Base URL of a folder on a real server: moto S3 or the GCS emulator."""
    if request.param == "s3":
        request.getfixturevalue("s3_env")
        return "s3://recjob-artifacts/folders"
    request.getfixturevalue("gcs_env")
    return f"gs://{GCS_BUCKET}/folders"


def test_folder_round_trip(store: str, tmp_path: Path) -> None:
    manifest = push_directory(_folder(tmp_path / "v1", "v1"), f"{store}/model")
    assert set(manifest["files"]) == {
        "model.safetensors",
        "tokenizer/vocab.txt",
        "only-in-v1.txt",
    }
    pulled = pull_directory(f"{store}/model", tmp_path / "copy")
    assert (pulled / "model.safetensors").read_bytes() == b"v1" * 1000
    assert (pulled / "empty-version").is_dir() and not any((pulled / "empty-version").iterdir())
    assert not (pulled / ".model.abc.partial").exists()
    # republishing replaces the folder: files of the old one are gone
    push_directory(_folder(tmp_path / "v2", "v2"), f"{store}/model")
    again = pull_directory(f"{store}/model", tmp_path / "copy2")
    assert sorted(p.name for p in again.iterdir()) == [
        "empty-version",
        "model.safetensors",
        "only-in-v2.txt",
        "tokenizer",
    ]


def test_interrupted_publish_is_never_read_as_complete(
    store: str, tmp_path: Path, monkeypatch
) -> None:
    url = f"{store}/interrupted"
    push_directory(_folder(tmp_path / "v1", "v1"), url)
    fs_class = type(fsspec.core.url_to_fs(url)[0])
    upload = fs_class._put_file
    uploaded: list[str] = []

    async def dies_after_one_file(self, lpath, rpath, *args, **kwargs):
        if uploaded:
            raise ConnectionError("pod killed mid-upload")
        uploaded.append(rpath)
        return await upload(self, lpath, rpath, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(fs_class, "_put_file", dies_after_one_file)
        with pytest.raises(StorageError, match="publishing"):
            push_directory(_folder(tmp_path / "v2", "v2"), url)
    assert len(uploaded) == 1  # half of v2 is up, over v1
    with pytest.raises(IncompleteDirectory, match="incomplete"):
        pull_directory(url, tmp_path / "reader")
    assert not (tmp_path / "reader").exists()
    push_directory(tmp_path / "v2", url)  # the retry completes it
    assert (pull_directory(url, tmp_path / "reader") / "only-in-v2.txt").exists()


def test_a_file_changed_after_the_manifest_is_refused(s3_env, tmp_path: Path) -> None:
    url = "s3://recjob-artifacts/tampered"
    push_directory(_folder(tmp_path / "v1", "v1"), url)
    write_bytes_atomic(f"{url}/model.safetensors", b"something else")
    with pytest.raises(IncompleteDirectory, match="does not match the manifest"):
        pull_directory(url, tmp_path / "reader")


def test_working_copy_of_mounted_and_object_store_uris(s3_env, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("RECJOB_WORK_DIR", str(tmp_path / "work"))
    mounted = WorkingCopy(f"file://{tmp_path}/run")
    assert not mounted.is_remote and mounted.local == tmp_path / "run"
    assert mounted.publish(["model"]) == []
    remote = WorkingCopy("s3://recjob-artifacts/job/g1/train")
    assert remote.is_remote and remote.local.parent == tmp_path / "work"
    _folder(remote.path("model"), "v1")
    remote.path("metrics.json").write_text('{"ndcg@10": 0.5}')
    written = remote.publish(["model", "missing", "metrics.json"])
    assert written == [
        "s3://recjob-artifacts/job/g1/train/model",
        "s3://recjob-artifacts/job/g1/train/metrics.json",
    ]
    assert exists_uri(f"s3://recjob-artifacts/job/g1/train/model/{MANIFEST}")
    monkeypatch.setenv("RECJOB_WORK_DIR", str(tmp_path / "other-pod"))
    fresh = WorkingCopy("s3://recjob-artifacts/job/g1/train")
    assert fresh.pull("model") == fresh.path("model")
    assert fresh.pull("teacher", required=False) is None
    assert json.loads(fresh.pull_file("metrics.json").read_text()) == {"ndcg@10": 0.5}
    with pytest.raises(StorageNotFound):
        fresh.pull("teacher")


# --------------------------------------------------------------------------- shared run dir
def _check_rank(rank: int, world: int, port: int, dirs: list[str], out: str) -> None:
    import torch.distributed as dist

    from recjob_trainer.outputs import check_shared

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        check_shared(Path(dirs[rank]), rank, world)
        Path(out, f"rank{rank}").write_text("ok")
    except RuntimeError as error:
        Path(out, f"rank{rank}").write_text(str(error))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("shared", [True, False])
def test_ranks_that_do_not_share_the_run_directory_stop(tmp_path: Path, shared: bool) -> None:
    """What several nodes with per-pod working copies (an s3:// output) would look like."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dirs = [tmp_path / "node0", tmp_path / ("node0" if shared else "node1")]
    for directory in dirs:
        directory.mkdir(exist_ok=True)
    mp.spawn(_check_rank, args=(2, port, [str(d) for d in dirs], str(tmp_path)), nprocs=2)
    answers = [(tmp_path / f"rank{r}").read_text() for r in range(2)]
    if shared:
        assert answers == ["ok", "ok"]
    else:  # every rank stops, naming the one that is blind
        assert all("rank(s) [1] do not see rank 0's run directory" in a for a in answers)
    assert not list(dirs[0].glob(".shared-*"))


def test_leftovers_of_a_killed_run_are_cleaned(tmp_path) -> None:
    """SIGKILL between creating and renaming leaves .partial/.old folders and .tmp files;
    the next start removes them and nothing else."""
    from recjob_trainer.storage import clean_leftovers

    (tmp_path / "data" / ".shards-4.0a1b.partial").mkdir(parents=True)
    (tmp_path / "data" / ".shards-4.0a1b.partial" / "train-0.parquet").write_bytes(b"x")
    (tmp_path / "ckpt" / ".step-00000010.9f.old").mkdir(parents=True)
    (tmp_path / ".deepspeed.json.77.tmp").write_text("{")
    kept = [tmp_path / "data" / "report.json", tmp_path / ".hidden", tmp_path / "model.partial"]
    for path in kept:
        path.write_text("keep")
    removed = clean_leftovers(tmp_path)
    assert sorted(p.name for p in removed) == [
        ".deepspeed.json.77.tmp",
        ".shards-4.0a1b.partial",
        ".step-00000010.9f.old",
    ]
    assert all(path.exists() for path in kept)
    assert not any(p.name.endswith((".partial", ".old", ".tmp")) and p.name.startswith(".")
                   for p in tmp_path.rglob("*"))  # fmt: skip
