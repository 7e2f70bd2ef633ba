"""The TLS checks of a node: what a DICOM TLS port must refuse, what it negotiates, and the
certificate it presents (PS3.15 B.1, B.9-B.11; docs/security.md).

Why probe from outside: a site's configuration says what it means to do; only a handshake
shows what the port does. Each attempt is a fresh TCP connection with a deadline (a watchdog
shuts the socket down when it passes, so a peer that drips bytes cannot hold the probe); a
refusal is an observed outcome, never an exception. "Refused" means no DICOM answer (no
A-ASSOCIATE-AC or -RJ) came back over the TLS session; an -RJ still means the server talked
DICOM to the client it should have refused. The plaintext attempt goes through pynetdicom
(harness/dicom/peer.py), the TLS ones through Python's ssl (OpenSSL) and the harness's PDU
encoder; certificates are read with `cryptography`.
"""

from __future__ import annotations

import datetime
import math
import re
import socket
import ssl
import tempfile
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from pynetdicom.presentation import build_context

from harness.dicom import pdu
from harness.dicom.peer import HARNESS_AE_TITLE, DimseConnectionError, DimsePeer, TLSConfig
from harness.errors import ConfigError
from harness.security.certificates import CertificateAuthority, certificate_summary
from harness.security.checks import Check

if TYPE_CHECKING:
    from harness.nodes.base import Node

AREA = "tls"
VERIFICATION = ("1.2.840.10008.1.1", "1.2.840.10008.1.2")  # Verification, implicit VR LE
LARGEST_ANSWER = 1 << 16  # an A-ASSOCIATE-AC for one context is a few hundred bytes
OLD_VERSIONS = {"1.0": ssl.TLSVersion.TLSv1, "1.1": ssl.TLSVersion.TLSv1_1}
NO_CHECK_TIME = 0x200000  # X509_V_FLAG_NO_CHECK_TIME: judge the chain, not the dates
HOSTNAME_MISMATCH = (62, 64)  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
AEAD = ("GCM", "CHACHA20-POLY1305", "CCM")

REF_TRANSPORT = "PS3.15 B.1"
REF_BOTH_SIDES = "PS3.15 B.1: both sides authenticate"
REF_OLD = "RFC 8996; PS3.15 B.10 (non-downgrading BCP 195)"
REF_PROFILE = "PS3.15 B.9, B.10, B.11 (BCP 195: RFC 9325)"
REF_VALIDITY = "PS3.15 B.1; RFC 5280 4.1.2.5"
REF_NAME = "PS3.15 B.9; RFC 9525 (server identity)"
REF_CHAIN = "PS3.15 B.1; RFC 5280 6.1"

# check names (stable: rows of the compliance matrix)
PLAINTEXT = "plaintext refused"
NO_CERTIFICATE = "client without certificate refused"
UNTRUSTED = "untrusted client certificate refused"
PROFILE = "protocol and cipher (BCP 195)"
VALID_NOW = "certificate valid now"
EXPIRY = "certificate expiry"
NAME = "certificate name"
CHAIN = "certificate chain"


def old_version_check(version: str) -> str:
    return f"TLS {version} refused"


@dataclass
class Attempt:
    """One connection: how far it got and what the server showed."""

    stage: str  # connect | handshake | session (TLS up) | answered (a DICOM PDU came back)
    error: str = ""
    answer: str = ""  # "A-ASSOCIATE-AC", "A-ASSOCIATE-RJ (...)", "A-ABORT (...)"
    version: str = ""
    cipher: str = ""
    certificate: bytes | None = None
    verify_code: int | None = None

    @property
    def connected(self) -> bool:
        return self.stage != "connect"

    @property
    def tls_up(self) -> bool:
        return self.stage in ("session", "answered")

    @property
    def accepted(self) -> bool:
        return self.answer == "A-ASSOCIATE-AC"

    def outcome(self) -> str:
        """What happened, in words."""
        if self.stage == "answered":
            return f"{self.version} session, answered {self.answer}"
        if self.stage == "session":
            return f"{self.version} session, then {self.error or 'closed'} (no DICOM answer)"
        return self.error


#: check(name, outcome, observed, remedy="", reference="") -> Check of this node
MakeCheck = Callable[..., Check]
#: tried(context, associate=True) -> Attempt on this node's port
Try = Callable[..., Attempt]


@dataclass
class Client:
    """The client side of the probes, from the node's TLS settings."""

    tls: TLSConfig
    timeout_s: float = 10.0
    contexts: dict[str, ssl.SSLContext] = field(default_factory=dict)

    def context(
        self, *, verify: bool, certificate: bool = True, cafile: str | None = None,
        cadata: str | None = None, check_hostname: bool = False,
        flags: int = 0,
    ) -> ssl.SSLContext:
        """A client context: TLS 1.2+ and OpenSSL's default suites, like the harness's own."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.check_hostname = check_hostname
        if verify:
            context.verify_mode = ssl.CERT_REQUIRED
            _load(context.load_verify_locations, f"tls.ca {cafile or 'certificate'}",
                  cafile=cafile, cadata=cadata)
            if cafile is None and cadata is None:
                context.load_default_certs()
            context.verify_flags |= flags
        else:
            context.verify_mode = ssl.CERT_NONE
        if certificate and self.tls.cert_file:
            _load(context.load_cert_chain, f"tls.certificate {self.tls.cert_file}",
                  self.tls.cert_file, self.tls.key_file)
        return context


def _load(method: Callable[..., None], what: str, *args: Any, **kwargs: Any) -> None:
    """Call an ssl loader; a file it cannot read is the user's to fix (exit 2)."""
    try:
        method(*args, **kwargs)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{what}: cannot load: {_ssl_text(exc)}") from None


def _ssl_text(exc: BaseException) -> str:
    """An OpenSSL error as a person reads it, without the C source location."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLEOFError | ConnectionResetError | BrokenPipeError):
        return "connection closed by the server"
    if isinstance(exc, TimeoutError | socket.timeout):
        return "no answer before the deadline"
    text = str(exc.args[1]) if isinstance(exc, ssl.SSLError) and len(exc.args) > 1 else str(exc)
    text = re.sub(r"^\[SSL: [A-Z0-9_]+\]\s*|\s*\(_ssl\.c:\d+\)", "", text)
    return text or type(exc).__name__


def _recv_exact(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionResetError("closed")
        data += chunk
    return data


def _dicom_answer(sock: socket.socket) -> str:
    """The PDU the server answers an A-ASSOCIATE-RQ with (PS3.8 9.3.3-9.3.4, 9.3.8)."""
    pdu_type, length = pdu.decode_pdu_header(_recv_exact(sock, pdu.PDU_HEADER_LENGTH))
    if length > LARGEST_ANSWER:
        raise pdu.PduError(f"{pdu.PDU_NAMES[pdu_type]} of {length} bytes")
    answer = pdu.decode_pdu_body(pdu_type, _recv_exact(sock, length))
    if isinstance(answer, pdu.AAssociateRJ | pdu.AAbort):
        return f"{pdu.pdu_name(answer)} ({answer.describe()})"
    return pdu.pdu_name(answer)


def attempt(
    host: str, port: int, context: ssl.SSLContext, server_name: str | None, called_ae: str,
    timeout_s: float, associate: bool = True,
) -> Attempt:
    """Connect, handshake and (if `associate`) send an A-ASSOCIATE-RQ for Verification;
    the whole attempt ends by `timeout_s` whatever the server does."""
    try:
        raw = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as exc:
        return Attempt("connect", error=f"cannot connect: {exc.strerror or exc}")
    watchdog = threading.Timer(timeout_s, _shut_down, [raw])
    watchdog.daemon = True
    watchdog.start()
    try:
        try:
            tls = context.wrap_socket(raw, server_hostname=server_name)
        except ssl.SSLCertVerificationError as exc:
            return Attempt("handshake", error=_ssl_text(exc), verify_code=exc.verify_code)
        except (OSError, ssl.SSLError) as exc:
            return Attempt("handshake", error=f"TLS handshake failed: {_ssl_text(exc)}")
        with tls:
            cipher = tls.cipher()
            result = Attempt("session", version=tls.version() or "",
                             cipher=cipher[0] if cipher else "",
                             certificate=tls.getpeercert(binary_form=True))
            if not associate:
                return result
            try:
                tls.sendall(pdu.associate_rq(called_ae, HARNESS_AE_TITLE, [VERIFICATION],
                                             LARGEST_ANSWER))
                result.answer = _dicom_answer(tls)
                result.stage = "answered"
                tls.sendall(pdu.AAbort().encode())
            except (OSError, ssl.SSLError, pdu.PduError) as exc:
                if not result.answer:
                    result.error = _ssl_text(exc)
            return result
    finally:
        watchdog.cancel()
        raw.close()


def _shut_down(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _old_version_context(version: ssl.TLSVersion, tls: TLSConfig | None) -> ssl.SSLContext:
    """A client that offers only `version`, with every cipher OpenSSL still has
    (@SECLEVEL=0): if the handshake fails, the server refused, not us."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.minimum_version = version
        context.maximum_version = version
    context.set_ciphers("ALL:@SECLEVEL=0")
    if tls is not None and tls.cert_file:
        _load(context.load_cert_chain, f"tls.certificate {tls.cert_file}", tls.cert_file,
              tls.key_file)
    return context


@cache
def local_support(version: str) -> str:
    """'' when this machine's OpenSSL can complete a TLS `version` handshake with itself,
    else why not; tried once per process on a loopback socket with a throwaway certificate."""
    with tempfile.TemporaryDirectory(prefix="tls-self-test-") as directory:
        material = CertificateAuthority.create(Path(directory)).issue("self", "self-test")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                server.minimum_version = server.maximum_version = OLD_VERSIONS[version]
            server.set_ciphers("ALL:@SECLEVEL=0")
            server.load_cert_chain(material.certificate_file, material.key_file)
            client = _old_version_context(OLD_VERSIONS[version], None)
        except (ValueError, ssl.SSLError) as exc:
            return f"this machine's OpenSSL cannot offer TLS {version}: {_ssl_text(exc)}"
        listener = socket.create_server(("127.0.0.1", 0))
        listener.settimeout(10.0)

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                conn.settimeout(10.0)
                server.wrap_socket(conn, server_side=True).close()
            except (OSError, ssl.SSLError):
                pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            tried = attempt("127.0.0.1", listener.getsockname()[1], client, None, "",
                            10.0, associate=False)
        finally:
            thread.join(15.0)
            listener.close()
    if tried.tls_up:
        return ""
    return f"this machine's OpenSSL cannot offer TLS {version} ({tried.error})"


def bcp195(version: str, cipher: str) -> bool:
    """TLS 1.3, or TLS 1.2 with an ECDHE key exchange and an AEAD cipher (PS3.15 B.9-B.11,
    RFC 9325 4.2)."""
    if version == "TLSv1.3":
        return True
    return version == "TLSv1.2" and cipher.startswith("ECDHE-") and any(
        aead in cipher for aead in AEAD)


def _names(certificate: x509.Certificate) -> list[str]:
    summary = certificate_summary(certificate)
    names = list(summary["names"])  # type: ignore[arg-type]
    return names or [certificate.subject.rfc4514_string()]


def probe_tls(
    host: str,
    port: int,
    called_ae: str,
    client: TLSConfig,
    server_name: str | None,
    expiry_warning_days: int = 30,
    *,
    node: str = "",
    client_certificate: str = "required",
    timeout_s: float = 10.0,
) -> list[Check]:
    """The TLS checks of the DICOM port `host:port`, as the harness's `client` sees it.

    `client_certificate` is the server's declared policy (required | optional | none; an
    external node's is unknown and taken as required: PS3.15 B.1 wants both sides
    authenticated)."""
    name = node or f"{host}:{port}"
    server_name = server_name or host
    probes = Client(client, timeout_s)

    def check(check_name: str, outcome: str, observed: str, remedy: str = "",
              reference: str = "") -> Check:
        return Check(name, AREA, check_name, outcome, observed,  # type: ignore[arg-type]
                     remedy if outcome == "fail" else "", reference)

    def tried(context: ssl.SSLContext, associate: bool = True,
              sni: str | None = server_name) -> Attempt:
        return attempt(host, port, context, sni, called_ae, timeout_s, associate)

    baseline = tried(probes.context(verify=False))
    if not baseline.connected:
        return [check("TLS port reachable", "fail", baseline.error,
                      f"start the node or correct its host and port ({host}:{port})",
                      REF_TRANSPORT)]
    checks = [_plaintext(host, port, called_ae, timeout_s, check)]
    no_tls = ("" if baseline.tls_up else
              f"could not run: no TLS handshake completes, even with the harness's "
              f"certificate and no verification ({baseline.error})")
    # a refusal means something only if the harness's own client is answered
    control = no_tls or ("" if baseline.answer else "could not run: the harness's own "
                         f"client gets no DICOM answer either ({baseline.outcome()})")

    # refusals: clients the server must not accept
    no_certificate = tried(probes.context(verify=False, certificate=False))
    checks.append(_refusal(NO_CERTIFICATE, no_certificate, control,
                           client_certificate == "required", client_certificate, check))
    with tempfile.TemporaryDirectory(prefix="untrusted-ca-") as directory:
        stranger = CertificateAuthority.create(Path(directory), "untrusted test CA").issue(
            "stranger", "not-a-trusted-client")
        context = probes.context(verify=False, certificate=False)
        context.load_cert_chain(stranger.certificate_file, stranger.key_file)
        untrusted = tried(context)
    checks.append(_refusal(UNTRUSTED, untrusted, control,
                           client_certificate in ("required", "optional"), client_certificate,
                           check))

    for version in OLD_VERSIONS:
        checks.append(_old_version(version, tried, client, no_tls, check))

    normal = tried(probes.context(verify=True, cafile=client.ca_file, check_hostname=True))
    weak = None
    if not baseline.tls_up:  # what the server offers that the harness's client would not
        permissive = probes.context(verify=False)
        permissive.set_ciphers("ALL:@SECLEVEL=0")
        weak = tried(permissive, associate=False)
    checks.append(_profile(normal, baseline, weak, check))
    checks += _certificate(baseline, normal, probes, tried, server_name, expiry_warning_days,
                           no_tls, client, check)
    return checks


def _plaintext(host: str, port: int, called_ae: str, timeout_s: float,
               check: MakeCheck) -> Check:
    """A plain A-ASSOCIATE-RQ (pynetdicom, no TLS) to the TLS port."""
    peer = DimsePeer(host, port, called_ae, timeout_s=timeout_s)
    try:
        association = peer.associate([build_context(VERIFICATION[0])])
    except DimseConnectionError as exc:
        return check(PLAINTEXT, "pass", f"plain A-ASSOCIATE-RQ not accepted ({exc})",
                     reference=REF_TRANSPORT)
    association.release()
    return check(PLAINTEXT, "fail", "a plain A-ASSOCIATE-RQ was accepted (A-ASSOCIATE-AC "
                 "without TLS): patient data may cross the network unencrypted",
                 "serve only DICOM over TLS on this port (Orthanc DicomTlsEnabled; a TLS "
                 "terminator in front of an archive without TLS); move any plaintext listener "
                 "off it", REF_TRANSPORT)


def _refusal(check_name: str, outcome: Attempt, control: str, applies: bool, policy: str,
             check: MakeCheck) -> Check:
    refused = not outcome.answer
    if refused and control:
        return check(check_name, "skip", control, reference=REF_BOTH_SIDES)
    seen = ("refused: " if refused else "accepted: ") + outcome.outcome()
    if not applies:
        return check(check_name, "skip", f"{seen}; the node's declared client-certificate "
                     f"policy is {policy!r}", reference=REF_BOTH_SIDES)
    if refused:
        return check(check_name, "pass", seen, reference=REF_BOTH_SIDES)
    remedy = ("require a client certificate (Orthanc DicomTlsRemoteCertificateRequired: true; "
              "DCMTK --require-peer-cert; HAProxy verify required)" if check_name ==
              NO_CERTIFICATE else "trust only the site's CA for client certificates and verify "
              "them (Orthanc DicomTlsTrustedCertificates; DCMTK +cf; HAProxy ca-file with "
              "verify required)")
    return check(check_name, "fail", seen, remedy, REF_BOTH_SIDES)


def _old_version(version: str, tried: Try, client: TLSConfig, no_tls: str,
                 check: MakeCheck) -> Check:
    check_name = old_version_check(version)
    unable = local_support(version)
    if unable:
        return check(check_name, "skip", f"could not run: {unable}", reference=REF_OLD)
    outcome = tried(_old_version_context(OLD_VERSIONS[version], client), associate=False)
    if outcome.tls_up:
        return check(check_name, "fail", f"accepted a TLS {version} handshake ({outcome.cipher})",
                     f"set the server's minimum TLS version to 1.2 (PS3.15 B.10); TLS "
                     f"{version} is deprecated by RFC 8996", REF_OLD)
    if no_tls:
        return check(check_name, "skip", no_tls, reference=REF_OLD)
    return check(check_name, "pass", f"refused: {outcome.error}", reference=REF_OLD)


def _profile(normal: Attempt, baseline: Attempt, weak: Attempt | None,
             check: MakeCheck) -> Check:
    """What the harness's client negotiates, against BCP 195."""
    seen = normal if normal.tls_up else baseline
    if not seen.tls_up and weak is not None and weak.tls_up:
        return check(PROFILE, "fail", f"{weak.version}, {weak.cipher} only: not a BCP 195 "
                     "suite (the harness's client does not offer it)", "enable TLS 1.3, or TLS "
                     "1.2 with ECDHE and AES-GCM or ChaCha20-Poly1305 suites", REF_PROFILE)
    if not seen.tls_up:
        return check(PROFILE, "fail", f"no TLS 1.2 or newer handshake completed "
                     f"({baseline.error})", "offer TLS 1.2 or 1.3 on the DICOM port with the "
                     "harness's certificate accepted", REF_PROFILE)
    observed = f"{seen.version}, {seen.cipher}"
    if seen is baseline:
        observed += f" (negotiated without verification; the harness's client: {normal.error})"
    elif normal.answer:
        observed += f"; association: {normal.answer}"
    if not (normal.answer or baseline.answer):
        return check(PROFILE, "fail", f"{observed}; then no DICOM answer ({seen.error or 'closed'})"
                     ": the server refuses the harness's client", "give the harness a client "
                     "certificate the node trusts (tls.certificate and tls.key)", REF_PROFILE)
    if bcp195(seen.version, seen.cipher):
        return check(PROFILE, "pass", observed, reference=REF_PROFILE)
    return check(PROFILE, "fail", observed + ": not a BCP 195 suite", "enable TLS 1.3, or TLS "
                 "1.2 with ECDHE and AES-GCM or ChaCha20-Poly1305 suites only", REF_PROFILE)


def _certificate(baseline: Attempt, normal: Attempt, probes: Client, tried: Try,
                 server_name: str | None, warning_days: int, no_tls: str, client: TLSConfig,
                 check: MakeCheck) -> list[Check]:
    der = baseline.certificate or normal.certificate
    if der is None:
        reason = no_tls or "could not run: the server presented no certificate"
        return [check(n, "skip", reason, reference=REF_VALIDITY)
                for n in (VALID_NOW, EXPIRY, NAME, CHAIN)]
    certificate = x509.load_der_x509_certificate(der)
    now = datetime.datetime.now(datetime.UTC)
    start, end = certificate.not_valid_before_utc, certificate.not_valid_after_utc
    dates = f"valid {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC"
    checks = [
        check(VALID_NOW, "pass", dates, reference=REF_VALIDITY) if start <= now <= end else
        check(VALID_NOW, "fail", dates + (": expired" if now > end else ": not yet valid"),
              "install a server certificate valid now", REF_VALIDITY)
    ]
    left = end - now
    days = max(0, math.ceil(left.total_seconds() / 86400))
    if left > datetime.timedelta(days=warning_days):
        checks.append(check(EXPIRY, "pass", f"expires in {days} days ({end:%Y-%m-%d}), more "
                            f"than the {warning_days} days warning", reference=REF_VALIDITY))
    else:
        checks.append(check(EXPIRY, "fail", f"expires in {days} days ({end:%Y-%m-%d}; warning "
                            f"at {warning_days})", "renew the server certificate before it "
                            "expires", REF_VALIDITY))
    names = ", ".join(_names(certificate))
    # the client's own hostname check (OpenSSL), with the certificate itself as the trust
    # anchor (partial chain) and no date check: only the name decides
    anchor = ssl.DER_cert_to_PEM_cert(der)
    by_name = tried(probes.context(verify=True, cadata=anchor, check_hostname=True,
                                   flags=ssl.VERIFY_X509_PARTIAL_CHAIN | NO_CHECK_TIME),
                    associate=False)
    if by_name.tls_up:
        checks.append(check(NAME, "pass", f"certificate names {names}; {server_name} matches",
                            reference=REF_NAME))
    elif by_name.verify_code in HOSTNAME_MISMATCH:
        checks.append(check(NAME, "fail", f"certificate names {names}, not {server_name}",
                            f"issue the server a certificate whose subjectAltName holds "
                            f"{server_name}, or set tls.server_name to a name it holds",
                            REF_NAME))
    else:
        checks.append(check(NAME, "skip", f"could not run: {by_name.error}", reference=REF_NAME))
    trusted = f"the CA in {client.ca_file}" if client.ca_file else "the system's CA store"
    by_chain = tried(probes.context(verify=True, cafile=client.ca_file, flags=NO_CHECK_TIME),
                     associate=False)
    issuer = certificate.issuer.rfc4514_string()
    if by_chain.tls_up:
        checks.append(check(CHAIN, "pass", f"issued by {issuer}; verifies against {trusted}",
                            reference=REF_CHAIN))
    elif by_chain.verify_code is not None:
        checks.append(check(CHAIN, "fail", f"issued by {issuer}; does not verify against "
                            f"{trusted}: {by_chain.error}", "give the harness the CA that "
                            "issued the node's certificate (tls.ca), and have the server send "
                            "its intermediate certificates", REF_CHAIN))
    else:
        checks.append(check(CHAIN, "skip", f"could not run: {by_chain.error}",
                            reference=REF_CHAIN))
    return checks


def tls_checks(node: Node, timeout_s: float = 10.0) -> list[Check]:
    """The TLS checks of a node that declares `tls:`; one skip for a node that does not."""
    spec = node.spec.tls
    if spec is None:
        return [Check(node.name, AREA, "TLS", "skip", "no TLS declared")]
    client = node.tls_client()
    assert client is not None
    policy = spec.client_certificate if node.spec.launched else "required"
    return probe_tls(node.host, int(node.dicom_port or 0), node.ae_title, client,
                     client.server_hostname, spec.expiry_warning_days, node=node.name,
                     client_certificate=policy, timeout_s=timeout_s)
