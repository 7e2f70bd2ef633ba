"""A node's `tls:` and `audit:` fields: how the harness reaches it securely and hears its
audit trail (docs/security.md).

    tls:                      # a launched node: the harness makes a CA and certificates
      generate: true
      min_version: "1.2"      # what the launched server accepts (reproduces a site's setting)
      client_certificate: required   # required | optional | none (the server's policy)
    tls:                      # an external node: the site's files
      ca: /etc/pacs/ca.pem           # verifies the node's certificate
      certificate: /etc/pacs/harness.pem   # the harness's client certificate (if required)
      key: /etc/pacs/harness.key
      server_name: pacs.example.org  # the name its certificate must carry (default: host)
    audit: true               # a launched kind that emits IHE ATNA messages sends them to the
                              # harness's syslog receiver
    audit: {port: 6514, transport: udp}   # an external node: the harness listens there
    audit: {transport: tls}   # RFC 5425, mutual TLS: a launched node needs tls: {generate:
                              # true}; an external one tls: {ca, certificate, key}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

from pydantic import BeforeValidator, Field, StrictBool, StrictStr, model_validator

from harness.config.errors import ConfigModel, choice, fail
from harness.config.numbers import Number, Port

TLS_VERSIONS = ("1.0", "1.1", "1.2", "1.3")
CLIENT_CERTIFICATE_POLICIES = ("required", "optional", "none")
AUDIT_TRANSPORTS = ("udp", "tls")


@dataclass(frozen=True)
class TLSSpec:
    """DICOM over TLS (PS3.15 B.1) for one node, as declared."""

    generate: bool = False
    ca_file: str | None = None
    certificate_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None  # None: the node's host
    min_version: str = "1.2"
    client_certificate: str = "required"
    valid_days: int = 365  # lifetime of a generated server certificate
    #: names a generated server certificate carries (default: the host and localhost)
    certificate_names: tuple[str, ...] = ()
    expiry_warning_days: int = 30  # the security scenario flags certificates expiring sooner


@dataclass(frozen=True)
class AuditSpec:
    """Where the node's IHE ATNA audit messages (PS3.15 A.5) reach the harness."""

    transport: str = "udp"
    port: int | None = None  # None: picked free at launch (launched nodes only)


def _version(value: Any) -> str:
    text = str(value) if isinstance(value, int | float | str) else value
    if text not in TLS_VERSIONS:
        raise fail(f"unknown TLS version {value!r} (allowed: {', '.join(TLS_VERSIONS)})")
    return text


def _path(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise fail("must be the path of a PEM file")
    return value


Version = Annotated[str, BeforeValidator(_version)]
PemPath = Annotated[str, BeforeValidator(_path)]


class TLSModel(ConfigModel):
    shape: ClassVar[str] = "{generate: true} or {ca: FILE, certificate: FILE, key: FILE}"

    generate: StrictBool = Field(False, description="launched nodes: a private CA per run")
    ca: PemPath | None = Field(None, description="CA certificates (PEM) that sign the node's")
    certificate: PemPath | None = Field(None, description="the harness's client certificate")
    key: PemPath | None = Field(None, description="the key of that certificate")
    server_name: StrictStr | None = Field(None, description="name the node's certificate holds")
    min_version: Version = Field("1.2", description="oldest TLS version a launched server takes")
    client_certificate: choice("client_certificate", CLIENT_CERTIFICATE_POLICIES) = Field(
        "required", description="a launched server's policy for client certificates"
    )
    valid_days: Number(1, 3650, whole=True) = 365
    certificate_names: list[StrictStr] = Field(
        [], description="names in a generated server certificate (default: host, localhost)"
    )
    expiry_warning_days: Number(0, 3650, whole=True) = 30

    @model_validator(mode="after")
    def _files_together(self) -> TLSModel:
        if (self.certificate is None) != (self.key is None):
            raise fail("certificate and key go together", "key" if self.key is None else
                       "certificate")
        if self.generate and (self.ca or self.certificate):
            raise fail("generate: true makes its own files; leave out ca, certificate, key",
                       "generate")
        return self

    def spec(self) -> TLSSpec:
        return TLSSpec(
            generate=self.generate,
            ca_file=self.ca,
            certificate_file=self.certificate,
            key_file=self.key,
            server_name=self.server_name,
            min_version=self.min_version,
            client_certificate=self.client_certificate,
            valid_days=int(self.valid_days),
            certificate_names=tuple(self.certificate_names),
            expiry_warning_days=int(self.expiry_warning_days),
        )


class AuditModel(ConfigModel):
    shape: ClassVar[str] = "true, or {port: N, transport: udp|tls}"

    transport: choice("transport", AUDIT_TRANSPORTS) = "udp"
    port: Port | None = None

    def spec(self) -> AuditSpec:
        return AuditSpec(transport=self.transport, port=self.port)


def audit_field(value: Any) -> Any:
    """`audit: true` is shorthand for `audit: {}`; `false` leaves it out."""
    if value is True:
        return {}
    if value is False:
        return None
    return value
