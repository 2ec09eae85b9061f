"""Certificates and keys of the test cluster (openssl), and kubeconfigs built from them.

One CA signs the API server's serving certificate, every client certificate (the
identity is the subject: CN = user, O = groups) and each node agent's kubelet API
certificate; an RSA key pair signs ServiceAccount tokens.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

CLIENTS = {
    # name: (CN, O)
    "admin": ("kubernetes-admin", "system:masters"),
    "controller-manager": ("system:kube-controller-manager", None),
    "scheduler": ("system:kube-scheduler", None),
    "kube-proxy": ("system:kube-proxy", None),
    "apiserver-kubelet-client": ("kube-apiserver-kubelet-client", "system:masters"),
    "dns": ("system:recjob-dns", None),
    "netpol": ("system:recjob-netpol", None),
}


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _sign(pki: Path, name: str, subject: str, extensions: str) -> None:
    key, csr, crt, ext = (pki / f"{name}.{s}" for s in ("key", "csr", "crt", "ext"))
    if crt.exists():
        return
    _openssl("genrsa", "-out", str(key), "2048")
    _openssl("req", "-new", "-key", str(key), "-subj", subject, "-out", str(csr))
    ext.write_text(extensions)
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(pki / "ca.crt"), "-CAkey",
        str(pki / "ca.key"), "-CAcreateserial", "-days", "3650", "-sha256",
        "-extfile", str(ext), "-out", str(crt),
    )  # fmt: skip


def _subject(cn: str, org: str | None) -> str:
    return f"/CN={cn}" + (f"/O={org}" if org else "")


def ensure(pki: Path, host_ip: str, service_ip: str, nodes: list[str]) -> None:
    """Create whatever is missing under ``pki``."""
    pki.mkdir(parents=True, exist_ok=True)
    if not (pki / "ca.crt").exists():
        _openssl("genrsa", "-out", str(pki / "ca.key"), "2048")
        _openssl(
            "req", "-x509", "-new", "-key", str(pki / "ca.key"), "-subj",
            "/CN=recjob-test-cluster-ca", "-days", "3650", "-out", str(pki / "ca.crt"),
        )  # fmt: skip
    if not (pki / "sa.key").exists():
        _openssl("genrsa", "-out", str(pki / "sa.key"), "2048")
        _openssl("rsa", "-in", str(pki / "sa.key"), "-pubout", "-out", str(pki / "sa.pub"))
    names = [
        "kubernetes", "kubernetes.default", "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local", "localhost",
    ]  # fmt: skip
    sans = ",".join(
        [f"DNS:{n}" for n in names] + [f"IP:{ip}" for ip in (host_ip, service_ip, "127.0.0.1")]
    )
    usage = "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
    server = f"{usage}extendedKeyUsage=serverAuth\nsubjectAltName={sans}\n"
    client = f"{usage}extendedKeyUsage=clientAuth\n"
    _sign(pki, "apiserver", "/CN=kube-apiserver", server)
    for name, (cn, org) in CLIENTS.items():
        _sign(pki, name, _subject(cn, org), client)
    for node in nodes:
        _sign(pki, f"node-{node}", _subject(f"system:node:{node}", "system:nodes"), client)
        _sign(
            pki, f"kubelet-{node}", f"/CN={node}",
            server.replace(f"subjectAltName={sans}", f"subjectAltName=DNS:{node},IP:{host_ip}"),
        )  # fmt: skip


def serving_cert(pki: Path, name: str, dns_names: list[str]) -> tuple[Path, Path]:
    """A serving certificate signed by the cluster CA (e.g. a webhook's); (crt, key)."""
    usage = "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
    sans = ",".join(f"DNS:{n}" for n in dns_names)
    _sign(pki, name, f"/CN={dns_names[0]}",
          f"{usage}extendedKeyUsage=serverAuth\nsubjectAltName={sans}\n")  # fmt: skip
    return pki / f"{name}.crt", pki / f"{name}.key"


def kubeconfig(path: Path, server: str, ca: Path, cert: Path | None, key: Path | None,
               token: str | None = None, user: str = "user") -> None:  # fmt: skip
    """Write a kubeconfig with a client certificate or a bearer token."""
    credentials = (
        f"    token: {token}\n"
        if token
        else f"    client-certificate: {cert}\n    client-key: {key}\n"
    )
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters:\n- name: recjob\n  cluster:\n    server: {server}\n"
        f"    certificate-authority: {ca}\n"
        f"users:\n- name: {user}\n  user:\n{credentials}"
        f"contexts:\n- name: recjob\n  context:\n    cluster: recjob\n    user: {user}\n"
        "current-context: recjob\n"
    )
    path.chmod(0o600)
