"""Self-signed TLS material for a local federation: a CA and one server certificate for
the SuperLink on loopback (``127.0.0.1`` / ``localhost``), from the same maker as the
operator's Secret of a federated RecJob on Kubernetes
(:func:`recjob_operator.api.v1alpha1.tls.make_tls_material`).

SuperNodes and the ``flwr`` CLI trust the CA (``--root-certificates`` / the connection's
``root-certificates``); the SuperLink serves the certificate it signed. Nothing leaves the
machine and nothing is fetched."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from recjob_operator.api.v1alpha1.tls import make_tls_material


@dataclass(frozen=True)
class TlsFiles:
    """Where the PEM files are."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def make_tls(directory: Path, days: int = 7) -> TlsFiles:
    """Write ``ca.crt``, ``server.pem`` and ``server.key`` (mode 0600) into ``directory``.

    The server certificate names 127.0.0.1, ::1 and localhost, which is where a local
    federation's SuperLink listens."""
    directory.mkdir(parents=True, exist_ok=True)
    material = make_tls_material(["localhost"], ["127.0.0.1", "::1"], days=days)
    files = TlsFiles(directory / "ca.crt", directory / "server.pem", directory / "server.key")
    files.ca_cert.write_bytes(material.ca_cert)
    files.server_cert.write_bytes(material.server_cert)
    files.server_key.touch(mode=0o600)
    files.server_key.write_bytes(material.server_key)
    return files
