"""Real object-store servers on loopback for the storage tests.

- S3: moto's server (``ThreadedMotoServer``) with authentication ON: an IAM user with an
  access key is created first, then every request must be signed with that key, so a
  test passes only if the credentials really travel through the environment variables
  (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL_S3), as the credentials
  Secret gives them to the trainer and conversion containers.
- GCS: gcp-storage-emulator (the JSON API gcsfs speaks), reached through gcsfs's
  ``STORAGE_EMULATOR_HOST``; it does not check credentials.

Import the fixtures into a test module with ``from tests.object_stores import ...``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

S3_BUCKETS = ("recjob-data", "recjob-artifacts")
GCS_BUCKET = "recjob-gcs"

#: Keep the SDKs from looking anywhere but the environment (no ~/.aws, no IMDS probes).
_ISOLATE_AWS = {
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/credentials",
    "AWS_CONFIG_FILE": "/nonexistent/config",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@dataclass
class S3Server:
    """A running moto S3 server and the credentials of its one IAM user."""

    endpoint: str
    access_key: str
    secret_key: str
    env: dict[str, str] = field(default_factory=dict)
    """What a credentials Secret would put in the container's environment."""


def _clear_fs_caches() -> None:
    """Forget cached filesystem instances (they keep the credentials they started with)."""
    import fsspec

    for protocol in ("s3", "gs", "gcs"):
        with contextlib.suppress(ImportError, ValueError):
            fsspec.get_filesystem_class(protocol).clear_instance_cache()


def _reset_auth(endpoint: str, allowed_unsigned_requests: bytes) -> None:
    """Set how many more requests moto serves without checking their signature."""
    request = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth",
        data=allowed_unsigned_requests,
        method="POST",
        headers={"Content-Type": "text/plain"},
    )
    urllib.request.urlopen(request).read()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto in server mode on 127.0.0.1 with IAM authentication enforced."""
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    admin = {
        "endpoint_url": endpoint,
        "aws_access_key_id": "bootstrap",
        "aws_secret_access_key": "bootstrap",
        "region_name": "us-east-1",
    }
    iam = boto3.client("iam", **admin)
    iam.create_user(UserName="recjob")
    key = iam.create_access_key(UserName="recjob")["AccessKey"]
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
    }
    iam.put_user_policy(UserName="recjob", PolicyName="s3", PolicyDocument=json.dumps(policy))
    s3 = boto3.client("s3", **admin)
    for bucket in S3_BUCKETS:
        s3.create_bucket(Bucket=bucket)
    # from here on every request must be signed by the IAM user's key
    _reset_auth(endpoint, b"0")
    env = {
        "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
        "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_REGION": "us-east-1",
    }
    try:
        yield S3Server(endpoint, key["AccessKeyId"], key["SecretAccessKey"], env)
    finally:
        _reset_auth(endpoint, b"inf")
        server.stop()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """This test's environment holds the S3 credentials (and nothing else AWS)."""
    for name in ("AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {**_ISOLATE_AWS, **s3_server.env}.items():
        monkeypatch.setenv(name, value)
    _clear_fs_caches()
    yield s3_server
    _clear_fs_caches()


@pytest.fixture
def gcs_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A GCS emulator on 127.0.0.1 with bucket GCS_BUCKET; yields its URL."""
    emulator = pytest.importorskip("gcp_storage_emulator.server")
    import fsspec
    import gcsfs.core

    # gcsfs's default class first asks a gRPC control API for the bucket type, which the
    # emulator does not have (60 s timeouts): use the plain JSON-API class here
    default = fsspec.get_filesystem_class("gs")
    fsspec.register_implementation("gs", gcsfs.core.GCSFileSystem, clobber=True)
    server = emulator.create_server("127.0.0.1", 0, in_memory=True, default_bucket=GCS_BUCKET)
    server.start()
    url = f"http://127.0.0.1:{server._api._httpd.server_address[1]}"
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
    monkeypatch.setenv("NO_GCE_CHECK", "true")  # no metadata-server probe
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    _clear_fs_caches()
    try:
        yield url
    finally:
        server.stop()
        _clear_fs_caches()
        fsspec.register_implementation("gs", default, clobber=True)
