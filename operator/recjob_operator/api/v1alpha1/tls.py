"""A federation's TLS material: a certificate authority and the SuperLink's certificate
signed by it, made with ``cryptography`` (ECDSA P-256).

The contract between the operator and the federation's pods: the operator stores them in
the ``kubernetes.io/tls`` Secret of a federated RecJob under :data:`CA_KEY`,
:data:`CERT_KEY` and :data:`KEY_KEY`; the SuperLink serves the certificate, SuperNodes and
the ``flwr`` CLI trust the CA. Local mode writes the same material to files."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass

#: The Secret's keys (cert-manager's and ``kubectl create secret tls``'s names).
CA_KEY, CERT_KEY, KEY_KEY = "ca.crt", "tls.crt", "tls.key"


@dataclass(frozen=True)
class TlsMaterial:
    """PEM bytes."""

    ca_cert: bytes
    server_cert: bytes
    server_key: bytes

    def secret_data(self) -> dict[str, bytes]:
        """The Secret's data, by key."""
        return {CA_KEY: self.ca_cert, CERT_KEY: self.server_cert, KEY_KEY: self.server_key}


def make_tls_material(
    dns_names: list[str], ip_addresses: list[str] = (), days: int = 365
) -> TlsMaterial:
    """A new CA and a server certificate for ``dns_names`` and ``ip_addresses`` (subject
    alternative names), valid from five minutes ago for ``days`` days."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    until = now + dt.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    usage = dict.fromkeys(
        ("content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
         "encipher_only", "decipher_only"),
        False,
    )  # fmt: skip
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name("recjob federation CA"))
        .issuer_name(name("recjob federation CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, **usage),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("recjob superlink"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return TlsMaterial(
        ca_cert=ca_cert.public_bytes(pem),
        server_cert=cert.public_bytes(pem),
        server_key=key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
