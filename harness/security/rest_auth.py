"""Access control over HTTP: a node's Orthanc REST API and DICOMweb must demand a login.

Each HTTP service a node declares (Orthanc REST: GET /system; DICOMweb: QIDO-RS GET
/studies, PS3.18 10.6) is asked four times, each request with a timeout and no redirect
followed, and every answer becomes a `Check` (area "rest"):

- anonymous: refused with 401 or 403 (RFC 9110 15.5.2, 15.5.4);
- Orthanc's well-known default login (orthanc/orthanc): refused;
- the configured user with a wrong password: refused;
- the configured login (generated at launch, or the topology's from the environment): works.

Then the transport: plain HTTP is a finding unless the node declares `https: true` or is one
the harness launched on loopback (the traffic never leaves the machine). A node declaring
https gets two more: "HTTPS certificate verifies" (the harness's verifying request, against
Node.http_verify, gets an answer; a chain or name failure is the finding, with OpenSSL's
reason) and "plain HTTP refused" (http:// to the same port gets no HTTP answer). No secret
is ever put in a Check: the configured login is named as such, never by its values.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import requests

from harness.config.topology import is_loopback
from harness.dicom.dicomweb import http_session, request_failed
from harness.errors import ConfigError, EnvironmentProblem
from harness.nodes.base import Node
from harness.security.checks import Check

AREA = "rest"
TIMEOUT_S = 15.0
#: Orthanc's sample configuration ships this pair (the Docker images' documentation too)
DEFAULT_LOGIN = ("orthanc", "orthanc")
AUTH_REF = "RFC 9110 11.6, 15.5.2 (401), 15.5.4 (403)"
HTTPS_REF = "RFC 9110 4.2.2 (https); BCP 195 (TLS)"
REFUSED = (401, 403)


@dataclass(frozen=True)
class Service:
    """One HTTP service of a node: a label for the report and the URL probed."""

    label: str  # "Orthanc REST GET /system"
    url: str


def _services(node: Node) -> list[Service]:
    base = node.http_url or ""
    services = []
    if node.spec.orthanc_rest:
        services.append(Service("Orthanc REST GET /system", f"{base}/system"))
    if node.spec.dicomweb_root:
        root = base + node.spec.dicomweb_root.rstrip("/")
        services.append(Service("DICOMweb GET /studies", f"{root}/studies?limit=1"))
    return services


def _get(node: Node, url: str, auth: tuple[str, str] | None) -> int | str:
    """The HTTP status code, or the name of the error that prevented an answer (the
    certificate checked as every client of the node checks it: Node.http_verify)."""
    session = http_session(auth, node.http_verify(), node.http_server_name())
    try:
        with session.get(url, timeout=TIMEOUT_S, allow_redirects=False,
                         verify=session.verify, stream=True) as rsp:
            return rsp.status_code
    except requests.RequestException as exc:
        return exc.__class__.__name__


def _answered(code: int | str) -> str:
    return f"HTTP {code}" if isinstance(code, int) else f"no answer ({code})"


def _is_orthanc(node: Node) -> bool:
    return node.kind == "orthanc" or bool(node.spec.orthanc_rest)


def _must_refuse(node: Node, service: Service, what: str, code: int | str,
                 remedy: str) -> Check:
    """A request that must get 401/403: pass on those (or a redirect, to a login page),
    fail on a success, skip when nothing useful came back."""
    name = f"{service.label}: {what}"
    observed = f"{what} answered {_answered(code)}"
    if isinstance(code, int) and (code in REFUSED or 300 <= code < 400):
        return Check(node.name, AREA, name, "pass", observed, reference=AUTH_REF)
    if isinstance(code, int) and 200 <= code < 300:
        return Check(node.name, AREA, name, "fail", observed, remedy, AUTH_REF)
    return Check(node.name, AREA, name, "skip", f"{observed}: cannot tell", reference=AUTH_REF)


def _login(node: Node) -> tuple[tuple[str, str] | None, str]:
    """The configured login and where it comes from (never its values)."""
    if node.generated_credentials:
        return node.generated_credentials, "the login generated at launch"
    try:
        return node.spec.credentials.resolve(), "the topology's login (environment)"
    except ConfigError as exc:
        return None, str(exc)


def _service_checks(node: Node, service: Service) -> list[Check]:
    orthanc = _is_orthanc(node)
    checks = [
        _must_refuse(node, service, "anonymous request", _get(node, service.url, None),
                     "Orthanc: set AuthenticationEnabled true with RegisteredUsers"
                     if orthanc else "require authentication for every request"),
        _must_refuse(node, service, "default login orthanc/orthanc",
                     _get(node, service.url, DEFAULT_LOGIN),
                     "remove the default login (orthanc/orthanc) from RegisteredUsers; "
                     "use a long random password" if orthanc
                     else "remove or change the default login"),
    ]
    if checks[1].failed:
        checks[1] = Check(node.name, AREA, checks[1].name, "fail",
                          f"default credentials accepted ({checks[1].observed})",
                          checks[1].remedy, AUTH_REF)
    login, source = _login(node)
    if login is None:
        note = f"no configured login ({source})"
        return [*checks,
                Check(node.name, AREA, f"{service.label}: wrong password", "skip", note),
                Check(node.name, AREA, f"{service.label}: configured login", "skip", note)]
    wrong = (login[0], "wrong-" + secrets.token_urlsafe(12))
    checks.append(_must_refuse(node, service, "wrong password",
                               _get(node, service.url, wrong),
                               "make the server check passwords (a wrong one must give 401)"))
    code = _get(node, service.url, login)
    name = f"{service.label}: configured login"
    observed = f"{source} answered {_answered(code)}"
    if isinstance(code, int) and 200 <= code < 300:
        checks.append(Check(node.name, AREA, name, "pass", observed, reference=AUTH_REF))
    else:
        checks.append(Check(node.name, AREA, name, "fail", f"{observed}: the configured login "
                            "does not work", "give the node's credentials (environment "
                            "variables named in the topology) a login the node accepts",
                            AUTH_REF))
    return checks


def _transport_check(node: Node) -> Check:
    if node.spec.https:
        return Check(node.name, AREA, "plain HTTP", "pass", "the node declares https: its "
                     "REST API and DICOMweb are reached over TLS only", reference=HTTPS_REF)
    launched = node.spec.launched
    if launched and is_loopback(node.host):
        return Check(node.name, AREA, "plain HTTP", "pass", f"plain HTTP on loopback "
                     f"({node.host}), node launched by the harness: never leaves this machine",
                     reference=HTTPS_REF)
    where = "on loopback but not launched by the harness" if is_loopback(node.host) else (
        f"at {node.host}, over the network")
    return Check(node.name, AREA, "plain HTTP", "fail",
                 f"logins and patient data travel in clear: plain HTTP {where}",
                 "serve it over HTTPS and declare https: true", HTTPS_REF)


def _https_checks(node: Node, service: Service) -> list[Check]:
    """A node declaring `https: true`: the harness's verifying request gets an HTTP answer
    (chain to the CA it is checked against, and the host's name, RFC 9110 4.3.4), and the
    same port does not answer plain HTTP (nothing served in clear)."""
    try:
        verify = node.http_verify()
    except EnvironmentProblem as exc:
        return [Check(node.name, AREA, "HTTPS certificate verifies", "skip", str(exc))]
    against = f"checked against {verify}" if isinstance(verify, str) else (
        "checked against the system's CA certificates")
    name = node.http_server_name() or node.host
    try:
        with http_session(None, verify, node.http_server_name()).get(
            service.url, timeout=TIMEOUT_S, allow_redirects=False, verify=verify, stream=True
        ) as rsp:
            verified = Check(node.name, AREA, "HTTPS certificate verifies", "pass",
                             f"{service.label}: TLS handshake with its certificate {against} "
                             f"and the name {name}; answered HTTP {rsp.status_code}",
                             reference=HTTPS_REF)
    except requests.RequestException as exc:
        problem = request_failed(node.name, service.url, exc)
        outcome = "fail" if isinstance(exc, requests.exceptions.SSLError) else "skip"
        verified = Check(node.name, AREA, "HTTPS certificate verifies", outcome,
                         f"{problem} ({against})",
                         "give the node a certificate that chains to tls.ca (or fix tls.ca) "
                         f"and names {name}" if outcome == "fail" else "",
                         HTTPS_REF)
    plain_url = "http://" + service.url.removeprefix("https://")
    code = _get_plain(plain_url)
    answered = isinstance(code, int) and code != 400
    refused = Check(node.name, AREA, "plain HTTP refused", "fail" if answered else "pass",
                    f"http:// to the HTTPS port ({plain_url.split('/', 3)[2]}) "
                    f"{_answered(code)}" + ("" if answered else ": nothing served in clear"),
                    "serve the port over TLS only" if answered else "", HTTPS_REF)
    return [verified, refused]


def _get_plain(url: str) -> int | str:
    """An anonymous plain-HTTP request: the status, or why none came (HTTP 400 is how
    nginx or Apache refuse plain HTTP on a TLS port, still nothing served)."""
    try:
        with requests.get(url, timeout=TIMEOUT_S, allow_redirects=False, stream=True) as rsp:
            return rsp.status_code
    except requests.RequestException as exc:
        return exc.__class__.__name__


def rest_checks(node: Node) -> list[Check]:
    """The REST/DICOMweb row of `node`: per service, anonymous, default login, wrong
    password and configured login; then the transport (plain HTTP, and for a node declaring
    https: its certificate verifies, plain HTTP refused on its port)."""
    services = _services(node) if node.http_url else []
    if not services:
        return [Check(node.name, AREA, "REST/DICOMweb authentication", "skip",
                      "the node declares no HTTP service (Orthanc REST or DICOMweb)")]
    checks = []
    for service in services:
        checks.extend(_service_checks(node, service))
    checks.append(_transport_check(node))
    if node.spec.https:
        checks.extend(_https_checks(node, services[0]))
    return checks
