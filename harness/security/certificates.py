"""A private certificate authority per run, for DICOM TLS between launched nodes (PS3.15 B.1).

Why generate: a launched topology must run TLS end to end with no files from the user, and
a test of a misconfiguration (expired, wrong name, untrusted issuer) needs certificates made
to order. Keys are ECDSA P-256 (a BCP 195 / PS3.15 B.9 curve); key files are written 0600.
Built on `cryptography`'s X.509 builder; nothing here is hand-rolled ASN.1.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class TLSMaterial:
    """PEM files one side of a TLS association uses: its certificate and key, and the CA
    certificates it trusts to verify the other side."""

    certificate_file: Path
    key_file: Path
    ca_file: Path


def write_private(path: Path, data: str | bytes) -> None:
    """Write a file only its owner can read (keys, configurations holding a password)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data.encode() if isinstance(data, str) else data)
    os.chmod(path, 0o600)  # an existing file keeps its mode through O_CREAT


def _subject_alternative_names(names: tuple[str, ...]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class CertificateAuthority:
    """A CA kept in `directory` (ca.pem, ca.key); `issue` writes <name>.pem and <name>.key."""

    def __init__(self, directory: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate):
        self.directory = directory
        self.key = key
        self.certificate = cert

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.pem"

    @classmethod
    def create(
        cls, directory: Path, common_name: str = "pacs-harness test CA", valid_days: int = 30
    ) -> CertificateAuthority:
        """A new self-signed CA (a run's own: it signs only this run's certificates)."""
        directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        start = _now() - datetime.timedelta(minutes=5)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(days=valid_days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        write_private(directory / "ca.key", _key_pem(key))
        (directory / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(directory, key, cert)

    @classmethod
    def load(cls, directory: Path) -> CertificateAuthority:
        """The CA an earlier `create` wrote (a detached cluster's later commands)."""
        key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
        return cls(directory, key, cert)

    def issue(
        self,
        file_stem: str,
        common_name: str,
        names: tuple[str, ...] = ("127.0.0.1", "localhost"),
        valid_days: int = 30,
        not_before_days: int = 0,
    ) -> TLSMaterial:
        """A certificate for one side (server and client use: DICOM nodes are both, PS3.15
        B.1), signed by this CA; `not_before_days` < 0 back-dates it (to make expired ones)."""
        key = ec.generate_private_key(ec.SECP256R1())
        start = _now() + datetime.timedelta(days=not_before_days) - datetime.timedelta(minutes=5)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(days=valid_days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_subject_alternative_names(names), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
            .sign(self.key, hashes.SHA256())
        )
        cert_file = self.directory / f"{file_stem}.pem"
        key_file = self.directory / f"{file_stem}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        write_private(key_file, _key_pem(key))
        return TLSMaterial(cert_file, key_file, self.ca_file)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def certificate_summary(cert: x509.Certificate) -> dict[str, object]:
    """Subject, issuer, validity and names of a certificate, for a report (no key material)."""
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        alt = [str(n.value) for n in names]
    except x509.ExtensionNotFound:
        alt = []
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "names": alt,
    }
