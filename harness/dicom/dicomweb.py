"""DICOMweb client: QIDO-RS (search), WADO-RS (retrieve), STOW-RS (store), over requests.

Kept to the few calls scenarios need. Multipart bodies are built and parsed here so that
retrieved instances come back as the exact bytes the server sent.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from harness.errors import EnvironmentProblem

#: WADO-RS Accept header for instances exactly as stored (no transcoding).
STORED_SYNTAX_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def parse_multipart(body: bytes, content_type: str) -> list[bytes]:
    """Split a multipart/related body into its parts' payloads."""
    boundary = None
    for param in content_type.split(";"):
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip('"')
    if not boundary:
        raise ValueError(f"multipart response without boundary: {content_type!r}")
    delimiter = b"--" + boundary.encode()
    parts = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        head, sep, payload = chunk.partition(b"\r\n\r\n")
        if not sep:
            continue
        if payload.endswith(b"\r\n"):
            payload = payload[:-2]
        parts.append(payload)
    return parts


class AuthenticationFailed(EnvironmentProblem):
    """A node refused the harness's login (HTTP 401/403, RFC 9110 15.5.2/15.5.4): exit 3.

    Retrying cannot help, so migrate, load and sla stop at the first one."""


AUTH_STATUSES = (401, 403)


def authentication_failed(node_label: str, status_code: int) -> AuthenticationFailed:
    """One line naming the node, never the secret that was sent."""
    return AuthenticationFailed(
        f"node {node_label}: authentication failed (HTTP {status_code}): check its credentials"
    )


def request_failed(node_label: str, url: str, exc: requests.RequestException
                   ) -> EnvironmentProblem:
    """One line for a request that got no HTTP answer. A certificate the harness refuses
    names the node and OpenSSL's reason (RFC 9110 4.3.4: an https URI's server must prove
    its identity), so a wrong `tls.ca` or host name is told apart from a dead server."""
    text = str(exc)
    if isinstance(exc, requests.exceptions.SSLError):
        reason = re.search(r"certificate verify failed: ([^(]*)", text)
        if reason or "CERTIFICATE_VERIFY_FAILED" in text:
            detail = reason.group(1).strip() if reason else "see its certificate"
            return EnvironmentProblem(
                f"node {node_label}: HTTPS certificate verify failed ({detail}) at {url}"
            )
        ssl_reason = re.search(r"\[SSL: [A-Z_]+\] ([^(]*)", text)
        detail = ssl_reason.group(1).strip() if ssl_reason else "handshake failed"
        return EnvironmentProblem(f"node {node_label}: TLS to {url} failed ({detail})")
    return EnvironmentProblem(f"node {node_label}: {url}: {exc.__class__.__name__}")


class _ServerNameAdapter(HTTPAdapter):
    """Checks the certificate for `server_name` (and sends it as SNI) instead of the URL's
    host: a site's server reached by address whose certificate carries its DNS name
    (`tls.server_name`)."""

    def __init__(self, server_name: str) -> None:
        self.server_name = server_name
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["server_hostname"] = self.server_name
        kwargs["assert_hostname"] = self.server_name
        super().init_poolmanager(*args, **kwargs)


def http_session(auth: tuple[str, str] | None, verify: bool | str,
                 server_name: str | None = None) -> requests.Session:
    """The session every HTTP client of a node uses: its login, the CA its certificate is
    verified with (Node.http_verify) and, when given, the name it must carry."""
    session = requests.Session()
    session.auth = auth
    session.verify = verify
    if server_name:
        session.mount("https://", _ServerNameAdapter(server_name))
    return session


class DicomwebClient:
    """QIDO-RS, WADO-RS and STOW-RS against one service root (e.g. .../dicom-web)."""

    def __init__(
        self,
        root_url: str,
        auth: tuple[str, str] | None = None,
        *,
        verify: bool | str = True,
        server_name: str | None = None,
        timeout_s: float = 60.0,
        node_name: str | None = None,
    ) -> None:
        self.root_url = root_url.rstrip("/")
        self.node_label = node_name or self.root_url
        self.session = http_session(auth, verify, server_name)
        self.timeout_s = timeout_s

    def __repr__(self) -> str:
        return f"DicomwebClient({self.root_url})"

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        try:
            # per request: a session's own `verify` loses to REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE
            rsp = self.session.request(
                method, f"{self.root_url}{path}", timeout=self.timeout_s,
                verify=self.session.verify, **kwargs
            )
        except requests.RequestException as exc:
            raise request_failed(self.node_label, f"DICOMweb at {self.root_url}", exc) from None
        if rsp.status_code in AUTH_STATUSES:
            raise authentication_failed(self.node_label, rsp.status_code)
        if rsp.status_code >= 400:
            raise EnvironmentProblem(
                f"DICOMweb at {self.root_url}: {method} {path} answered HTTP {rsp.status_code}"
            )
        return rsp

    # QIDO-RS -------------------------------------------------------------------------
    def search(self, path: str = "/studies", **params: Any) -> list[dict[str, Any]]:
        """QIDO-RS search; returns DICOM JSON objects (empty list on 204)."""
        rsp = self._request(
            "GET", path, params=params or None, headers={"Accept": "application/dicom+json"}
        )
        return rsp.json() if rsp.content else []

    def search_studies(self, **params: Any) -> list[dict[str, Any]]:
        return self.search("/studies", **params)

    def search_instances(self, study_uid: str, **params: Any) -> list[dict[str, Any]]:
        return self.search(f"/studies/{study_uid}/instances", **params)

    # WADO-RS -------------------------------------------------------------------------
    def retrieve(self, path: str) -> list[bytes]:
        """WADO-RS retrieve of a study, series or instance: the Part 10 files as bytes.

        Asks for each instance in the syntax it is stored in (transfer-syntax=*, PS3.18
        8.7.3.5.2): without it the server transcodes to Explicit VR Little Endian, so the
        bytes compared against an original would not be the ones the archive holds."""
        rsp = self._request("GET", path, headers={"Accept": STORED_SYNTAX_ACCEPT})
        return parse_multipart(rsp.content, rsp.headers.get("Content-Type", ""))

    def retrieve_instance(self, study: str, series: str, instance: str) -> bytes:
        parts = self.retrieve(f"/studies/{study}/series/{series}/instances/{instance}")
        if len(parts) != 1:
            raise EnvironmentProblem(
                f"DICOMweb at {self.root_url}: expected 1 instance, got {len(parts)}"
            )
        return parts[0]

    def retrieve_study(self, study: str) -> list[bytes]:
        return self.retrieve(f"/studies/{study}")

    # STOW-RS -------------------------------------------------------------------------
    def store(self, files: Iterable[bytes | str | Path]) -> dict[str, Any]:
        """STOW-RS: send Part 10 files in one multipart request; returns the response JSON."""
        boundary = uuid.uuid4().hex
        body = bytearray()
        for item in files:
            data = item if isinstance(item, bytes) else Path(item).read_bytes()
            body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            body += data + b"\r\n"
        body += f"--{boundary}--\r\n".encode()
        rsp = self._request(
            "POST",
            "/studies",
            data=bytes(body),
            headers={
                "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                "Accept": "application/dicom+json",
            },
        )
        return rsp.json() if rsp.content else {}
