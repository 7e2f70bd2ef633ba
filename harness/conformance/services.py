"""Services offered: asked of the node itself, never read from its declared capabilities.

DIMSE services are offered when the node accepts their SOP class in a presentation context
(PS3.8 9.3.3.2); Verification is proposed beside each so the association is established
either way and a refusal of the class is told apart from a node that does not answer.
HTTP services are tried where the node has an HTTP address: DICOMweb at its declared root
(else the conventional /dicom-web), Orthanc's REST API at /system. A service not offered is
"not supported", which is no defect.
"""

from __future__ import annotations

import secrets
import uuid
from io import BytesIO
from typing import Any

import requests
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom.sop_class import Verification

from harness.conformance.model import (
    Observation,
    ProbeContext,
    conforms,
    differs,
    not_supported,
    not_tested,
    probe,
)
from harness.conformance.retrieve import TIMEOUT_S, Refused, harness_peer, store_objects
from harness.dicom.commitment import COMMITTED, NO_ANSWER, request_commitment
from harness.dicom.dicomweb import http_session, parse_multipart
from harness.errors import EnvironmentProblem
from synthetic_data.samples import sample_study

STORAGE_COMMITMENT_PUSH = "1.2.840.10008.1.20.1"
MODALITY_WORKLIST_FIND = "1.2.840.10008.5.1.4.31"
MPPS = "1.2.840.10008.3.1.2.3.3"
DEFAULT_DICOMWEB_ROOT = "/dicom-web"
HTTP_TIMEOUT_S = 30.0
#: for the N-ACTION-RSP and the N-EVENT-REPORT of the one made-up instance (an SCP that
#: does the service answers in well under a second here; CTN never does)
COMMITMENT_TIMEOUT_S = 20.0
#: HTTP answers that say "no such service here" (RFC 9110 15.5.5, 15.5.6, 15.6.2)
ABSENT = (404, 405, 501)


def _offered(ctx: ProbeContext, sop_class: str, name: str) -> Observation:
    pairs = [(Verification, ImplicitVRLittleEndian),
             (sop_class, ExplicitVRLittleEndian), (sop_class, ImplicitVRLittleEndian)]
    accepted = ctx.node.dimse(timeout_s=TIMEOUT_S).negotiate(pairs)
    syntaxes = [ts for (sop, ts), ok in accepted.items() if ok and sop == sop_class]
    ctx.record(f"A-ASSOCIATE-RQ: {name} ({sop_class}) in Explicit and Implicit VR Little "
               "Endian, with Verification",
               f"{name} accepted in {', '.join(syntaxes)}" if syntaxes
               else f"{name} refused (Verification accepted: "
                    f"{accepted[(Verification, ImplicitVRLittleEndian)]})")
    if syntaxes:
        return conforms(f"{name} offered", offered=True, syntaxes=syntaxes)
    return not_supported(f"{name} not offered (presentation context refused)", offered=False)


@probe(
    "services.storage-commitment",
    title="Storage commitment (push model)",
    expected="offered when the node accepts the Storage Commitment Push Model SOP class; "
    "optional",
    reference="PS3.4 J.3; PS3.8 9.3.3.2",
)
def storage_commitment(ctx: ProbeContext) -> Observation:
    """Accepting the SOP class is not doing it (CTN 3.2 accepts it and never answers the
    N-ACTION, measured): an offered service is asked to commit one made-up instance, which
    writes nothing, and must report it failed (PS3.4 J.3.3.1.1: 0x0112 no such object)."""
    offered = _offered(ctx, STORAGE_COMMITMENT_PUSH, "Storage Commitment Push Model")
    if offered.outcome != "conforms":
        return offered
    harness = harness_peer(ctx.node)
    address = ("127.0.0.1", harness.port) if harness is not None else None
    made_up = generate_uid()
    try:
        result = request_commitment(ctx.node.dimse(timeout_s=COMMITMENT_TIMEOUT_S),
                                    [(CTImageStorage, made_up)], report_address=address,
                                    timeout_s=COMMITMENT_TIMEOUT_S, node_name=ctx.node.name)
    except OSError as exc:  # the harness's report address is taken by another listener
        return not_tested(f"the report listener could not start: {exc}", offered=True)
    outcome = result.outcomes[0] if result.outcomes else None
    via = result.transactions[0].report_via if result.transactions else ""
    how = f"reported {via}" if via else "no report"
    ctx.record(f"N-ACTION-RQ (Request Storage Commitment) of one made-up CT instance "
               f"{made_up}" + ("" if address else " (no harness address known to the node: "
                               "a report on a new association cannot arrive)"),
               f"{outcome.line() if outcome else 'no outcome'}; {how}")
    if outcome is None or outcome.state == NO_ANSWER:
        why = outcome.reason if outcome else "no outcome"
        return differs(f"accepts the SOP class but did not answer the request ({why})",
                       offered=True, answered=False)
    if outcome.state == COMMITTED:
        return differs("reported an instance it does not hold as committed", offered=True,
                       answered=True)
    return conforms(f"offered; a made-up instance reported failed ({outcome.reason})",
                    offered=True, answered=True)


@probe(
    "services.worklist",
    title="Modality worklist (C-FIND)",
    expected="offered when the node accepts the Modality Worklist Information Model - FIND "
    "SOP class; optional",
    reference="PS3.4 K.6.1; PS3.8 9.3.3.2",
)
def worklist(ctx: ProbeContext) -> Observation:
    return _offered(ctx, MODALITY_WORKLIST_FIND, "Modality Worklist FIND")


@probe(
    "services.mpps",
    title="Modality performed procedure step",
    expected="offered when the node accepts the Modality Performed Procedure Step SOP "
    "class; optional",
    reference="PS3.4 F.7; PS3.8 9.3.3.2",
)
def mpps(ctx: ProbeContext) -> Observation:
    return _offered(ctx, MPPS, "Modality Performed Procedure Step")


# -- HTTP ---------------------------------------------------------------------------------------


def _session(node: Any) -> requests.Session:
    """The node's login (generated at launch, else the topology's) and certificate check."""
    auth = node.generated_credentials or node.spec.credentials.resolve()
    return http_session(auth, node.http_verify(), node.http_server_name())


def _dicomweb_root(node: Any) -> str | None:
    if not node.http_url:
        return None
    return node.http_url + (node.spec.dicomweb_root or DEFAULT_DICOMWEB_ROOT)


def _request(ctx: ProbeContext, method: str, url: str, **kwargs: Any) -> requests.Response:
    """One HTTP request, recorded; no answer at all is an EnvironmentProblem (not tested)."""
    session = _session(ctx.node)
    try:
        rsp = session.request(method, url, timeout=HTTP_TIMEOUT_S, verify=session.verify,
                              **kwargs)
    except requests.RequestException as exc:
        ctx.record(f"{method} {url}", f"no answer: {exc.__class__.__name__}")
        raise EnvironmentProblem(f"node {ctx.node.name}: {url}: {exc.__class__.__name__}"
                                 ) from None
    ctx.record(f"{method} {url}", f"HTTP {rsp.status_code} "
               f"{rsp.headers.get('Content-Type', '')}; {len(rsp.content)} bytes")
    return rsp


def _http_refusal(rsp: requests.Response, what: str) -> Observation | None:
    """The outcome an HTTP status already decides: absent, or a login the harness lacks."""
    if rsp.status_code in ABSENT:
        return not_supported(f"{what}: HTTP {rsp.status_code}", offered=False,
                             http_status=rsp.status_code)
    if rsp.status_code in (401, 403):
        return not_tested(f"{what}: HTTP {rsp.status_code}, the harness's login was refused",
                          http_status=rsp.status_code)
    return None


@probe(
    "services.qido-rs",
    title="DICOMweb QIDO-RS",
    expected="GET {root}/studies answers 200 with a DICOM JSON array (or 204 when empty)",
    reference="PS3.18 10.6",
)
def qido(ctx: ProbeContext) -> Observation:
    root = _dicomweb_root(ctx.node)
    if root is None:
        return not_supported("the node has no HTTP address", offered=False)
    rsp = _request(ctx, "GET", f"{root}/studies", params={"limit": "1"},
                   headers={"Accept": "application/dicom+json"})
    refusal = _http_refusal(rsp, "QIDO-RS")
    if refusal is not None:
        return refusal
    if rsp.status_code == 204:
        return conforms("QIDO-RS answers 204 (no studies)", offered=True, http_status=204)
    try:
        body = rsp.json()
    except ValueError:
        body = None
    if rsp.status_code == 200 and isinstance(body, list):
        return conforms(f"QIDO-RS answers 200 with {len(body)} result(s)", offered=True,
                        http_status=200)
    return differs(f"GET /studies answered HTTP {rsp.status_code}, not a DICOM JSON array",
                   http_status=rsp.status_code)


def _part10(ds: Any) -> bytes:
    buffer = DicomBytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


@probe(
    "services.wado-rs",
    title="DICOMweb WADO-RS",
    expected="an instance stored over DIMSE is retrieved as multipart/related "
    "application/dicom, the same SOP instance",
    reference="PS3.18 10.4",
    writes=True,
)
def wado(ctx: ProbeContext) -> Observation:
    root = _dicomweb_root(ctx.node)
    if root is None:
        return not_supported("the node has no HTTP address", offered=False)
    ds = sample_study(seed=secrets.randbelow(2**31))[0]
    try:
        store_objects(ctx, [ds], "one synthetic instance")
    except Refused as exc:
        return not_tested(str(exc))
    path = (f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}")
    rsp = _request(ctx, "GET", root + path,
                   headers={"Accept": 'multipart/related; type="application/dicom"'})
    refusal = _http_refusal(rsp, "WADO-RS")
    if refusal is not None:
        return refusal
    try:
        parts = parse_multipart(rsp.content, rsp.headers.get("Content-Type", ""))
        uids = [str(dcmread(BytesIO(part)).SOPInstanceUID) for part in parts]
    except Exception as exc:  # noqa: BLE001 - whatever it sent, it is not what was asked
        return differs(f"HTTP {rsp.status_code}, not a readable multipart of DICOM "
                       f"({exc.__class__.__name__})", http_status=rsp.status_code)
    if rsp.status_code == 200 and uids == [str(ds.SOPInstanceUID)]:
        return conforms("WADO-RS returned the instance", offered=True, http_status=200)
    return differs(f"HTTP {rsp.status_code} with {len(uids)} instance(s)",
                   http_status=rsp.status_code)


@probe(
    "services.stow-rs",
    title="DICOMweb STOW-RS",
    expected="POST {root}/studies with one instance answers 200 and the instance is then "
    "found by the node's C-FIND",
    reference="PS3.18 10.5",
    writes=True,
)
def stow(ctx: ProbeContext) -> Observation:
    root = _dicomweb_root(ctx.node)
    if root is None:
        return not_supported("the node has no HTTP address", offered=False)
    ds = sample_study(seed=secrets.randbelow(2**31))[0]
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            + _part10(ds) + f"\r\n--{boundary}--\r\n".encode())
    rsp = _request(ctx, "POST", f"{root}/studies", data=body, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json"})
    refusal = _http_refusal(rsp, "STOW-RS")
    if refusal is not None:
        return refusal
    found = ctx.node.dimse(timeout_s=TIMEOUT_S).find(
        "IMAGE", {"StudyInstanceUID": ds.StudyInstanceUID,
                  "SeriesInstanceUID": ds.SeriesInstanceUID, "SOPInstanceUID": None})
    held = [str(m.SOPInstanceUID) for m in found.matches]
    ctx.record(f"C-FIND IMAGE {ds.SOPInstanceUID}", f"{len(held)} match(es)")
    if rsp.status_code == 200 and held == [str(ds.SOPInstanceUID)]:
        return conforms("STOW-RS stored the instance (found by C-FIND)", offered=True,
                        http_status=200)
    return differs(f"HTTP {rsp.status_code}; C-FIND finds {len(held)} instance(s)",
                   http_status=rsp.status_code)


@probe(
    "services.orthanc-rest",
    title="Orthanc REST API",
    expected="GET /system answers the server's name and version (an Orthanc-style REST "
    "API: statistics, deletion and jobs for the harness); optional",
    reference="Orthanc REST API (not DICOM)",
)
def orthanc_rest(ctx: ProbeContext) -> Observation:
    if not ctx.node.http_url:
        return not_supported("the node has no HTTP address", offered=False)
    rsp = _request(ctx, "GET", f"{ctx.node.http_url}/system")
    refusal = _http_refusal(rsp, "/system")
    if refusal is not None:
        return refusal
    try:
        system = rsp.json()
    except ValueError:
        system = None
    if rsp.status_code == 200 and isinstance(system, dict) and "Version" in system:
        return conforms(f"Orthanc REST: {system.get('Name', '')} version {system['Version']}",
                        offered=True, version=str(system["Version"]),
                        api_version=system.get("ApiVersion"))
    return not_supported(f"/system answered HTTP {rsp.status_code} without an Orthanc "
                         "version", offered=False, http_status=rsp.status_code)
