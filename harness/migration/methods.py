"""How the reference migrator copies a study, by name (`pacs-harness migrate --method`).

Why several: a site's PACS offers some of these and not others, and each is a baseline to
compare the site's own tool against. How the instances travel:

* ``move``     the source C-MOVEs the study to the target's AE title, a peer it must know
               (PS3.4 C.4.2);
* ``get``      C-GET from the source (PS3.4 C.4.3), each instance C-STOREd to the target as
               it arrives, in the transfer syntax it came in (one presentation context per
               SOP class and transfer syntax, nothing transcoded);
* ``dicomweb`` WADO-RS the study from the source (``transfer-syntax=*``: as stored), STOW-RS
               it to the target (PS3.18 10.4, 10.5);
* ``orthanc``  the source Orthanc pushes the study over its REST API
               (``POST /modalities/{target node name}/store``).

The command line lists METHODS without loading pydicom, pynetdicom or requests
(tests/test_cli_startup.py), so the protocol modules are imported in the functions that
use them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from harness.errors import ConfigError, EnvironmentProblem
from harness.migration.state import MigrationError, describe_error

if TYPE_CHECKING:
    from harness.dicom.client import DimseClient
    from harness.dicom.dicomweb import DicomwebClient
    from harness.dicom.status import RetrievedInstance
    from harness.dicom.wire import WireAssociation
    from harness.migration.discovery import StudyContent
    from harness.nodes.base import Node

METHODS = ("move", "get", "dicomweb", "orthanc")


def check_method(method: str, source: Node, target: Node) -> None:
    """Refuse, before anything is sent, a method one of the nodes cannot do."""
    service = {"move": "C-MOVE", "get": "C-GET"}.get(method)
    offered = source.capabilities.retrieve_methods
    if service and service not in offered:
        raise ConfigError(
            f"method {method}: source node {source.name} ({source.kind}) "
            f"offers no {service} (it offers {', '.join(offered)})"
        )
    if method == "dicomweb":
        for role, node in (("source", source), ("target", target)):
            if node.dicomweb() is None:
                raise ConfigError(
                    f"method dicomweb: {role} node {node.name} serves no DICOMweb "
                    "(declare http_port and dicomweb_root)"
                )
    if method == "orthanc" and source.rest() is None:
        raise ConfigError(
            f"method orthanc: source node {source.name} is not an Orthanc "
            "(or has no http_port / orthanc_rest: true)"
        )


def send_study(method: str, source: Node, target: Node, uid: str, content: StudyContent) -> int:
    """Send one study with the chosen method; returns how many instances went out."""
    return {
        "move": _send_move,
        "get": _send_get,
        "dicomweb": _send_dicomweb,
        "orthanc": _send_orthanc,
    }[method](source, target, uid, content)


def _send_move(source: Node, target: Node, uid: str, _content: StudyContent) -> int:
    # released in the background once the final response came: a peer slow to answer the
    # A-RELEASE-RQ must not hold the study (WireAssociation.release_in_background)
    result = source.dimse().move(target.ae_title, "STUDY", {"StudyInstanceUID": uid},
                                 release_in_background=True)
    if not result.ok:
        raise MigrationError(
            f"C-MOVE to {target.ae_title} answered {result.status} "
            f"(completed {result.completed}, failed {result.failed})"
        )
    return result.completed + result.warning


def _send_get(source: Node, target: Node, uid: str, content: StudyContent) -> int:
    stream = _StoreStream(target.dimse())
    stored = 0
    errors: list[str] = []

    def relay(instance) -> None:
        nonlocal stored
        try:
            stream.send(instance)
        except Exception as exc:
            errors.append(describe_error(exc))
            raise  # pynetdicom answers the source's C-STORE with a failure status
        stored += 1

    try:
        result = source.dimse().get(
            "STUDY",
            {"StudyInstanceUID": uid},
            # the study's own SOP classes, as listed (get() looks them up again only
            # when they do not fit one association)
            sop_classes=sorted(content.sop_classes) or None,
            on_instance=relay,
            keep=False,
        )
    finally:
        stream.close()
    if errors:
        raise MigrationError(f"C-STORE to {target.name}: {errors[0]}")
    if not result.ok:
        raise MigrationError(
            f"C-GET answered {result.status} (completed {result.completed}, "
            f"failed {result.failed})"
        )
    return stored


def _send_dicomweb(source: Node, target: Node, uid: str, _content: StudyContent) -> int:
    source_web, target_web = source.dicomweb(), target.dicomweb()
    assert source_web is not None and target_web is not None  # checked in check_method
    parts = _wado_study(source_web, uid)
    if not parts:
        raise MigrationError(f"WADO-RS of study {uid} from {source.name} was empty")
    response = target_web.store(parts)
    failed = response.get("00081198", {}).get("Value", [])  # FailedSOPSequence
    if failed:
        raise MigrationError(f"STOW-RS to {target.name}: {len(failed)} instances failed")
    return len(parts)


def _send_orthanc(source: Node, target: Node, uid: str, _content: StudyContent) -> int:
    from harness.dicom.dicomweb import AuthenticationFailed

    rest = source.rest()
    assert rest is not None  # checked in check_method
    ids = [r["ID"] for r in rest.lookup(uid) if r.get("Type") == "Study"]
    if not ids:
        raise MigrationError(f"Orthanc {source.name} has no study {uid}")
    try:
        answer = rest.post_json(
            f"/modalities/{target.name}/store",
            {"Resources": ids, "Synchronous": True},
        )
    except AuthenticationFailed:
        raise
    except EnvironmentProblem as exc:
        raise MigrationError(
            f"{exc} (is {target.name} in the DicomModalities of {source.name}?)"
        ) from None
    answer = answer or {}
    if int(answer.get("FailedInstancesCount", 0) or 0):
        raise MigrationError(
            f"Orthanc store to {target.name}: "
            f"{answer['FailedInstancesCount']} instances failed"
        )
    return int(answer.get("InstancesCount", 0) or 0)


class _StoreStream:
    """One association to the target, C-STOREing datasets as they come (for C-GET relay).

    The association is re-opened with one more presentation context whenever an instance
    arrives with a (SOP class, transfer syntax) pair not seen yet, so nothing is transcoded.
    """

    def __init__(self, client: DimseClient) -> None:
        self.client = client
        self.pairs: list[tuple[str, str]] = []
        self.assoc: WireAssociation | None = None

    def send(self, instance: RetrievedInstance) -> None:
        """Store one retrieved instance on the target, its bytes exactly as they came."""
        from harness.dicom.contexts import MAX_CONTEXTS
        from harness.dicom.status import Status
        from harness.dicom.wire import TransferFailed

        pair = (instance.sop_class_uid, instance.transfer_syntax_uid)
        if pair not in self.pairs:
            if len(self.pairs) >= MAX_CONTEXTS:
                self.pairs.pop(0)
            self.pairs.append(pair)
            self.close()
        if self.assoc is None or not self.assoc.is_open:
            self.assoc = self.client.wire_association(self.pairs)
        context_id = self.assoc.accepted.get(pair)
        if context_id is None:
            raise MigrationError(
                f"peer {self.client} does not accept SOP class {pair[0]} with transfer "
                f"syntax {pair[1]}"
            )
        uid = instance.sop_instance_uid
        try:
            answer = self.assoc.store(context_id, pair[0], uid, instance.encoded)
        except TransferFailed as exc:
            self.assoc.abort()
            raise MigrationError(f"peer {self.client}: no C-STORE response ({exc})") from None
        status = Status(answer.status)
        if not status.ok:
            raise MigrationError(
                f"peer {self.client} answered C-STORE of {uid} with {status}"
            )

    def close(self) -> None:
        if self.assoc is not None:
            self.assoc.release()
        self.assoc = None


def _wado_study(client: DicomwebClient, study: str) -> list[bytes]:
    """WADO-RS of a whole study as stored (`transfer-syntax=*`), Part 10 bytes per instance."""
    import requests

    from harness.dicom.dicomweb import (
        AUTH_STATUSES,
        authentication_failed,
        parse_multipart,
        request_failed,
    )

    accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
    url = f"{client.root_url}/studies/{study}"
    try:
        rsp = client.session.get(url, headers={"Accept": accept}, timeout=client.timeout_s,
                                 verify=client.session.verify)
    except requests.exceptions.SSLError as exc:  # a refused certificate: no retry helps
        raise request_failed(client.node_label, f"WADO-RS {url}", exc) from None
    except Exception as exc:  # requests' errors: connection refused, timeout
        raise MigrationError(f"WADO-RS {url}: {exc.__class__.__name__}") from None
    if rsp.status_code in AUTH_STATUSES:
        raise authentication_failed(client.node_label, rsp.status_code)
    if rsp.status_code >= 400:
        raise MigrationError(f"WADO-RS {url}: HTTP {rsp.status_code}")
    return parse_multipart(rsp.content, rsp.headers.get("Content-Type", ""))

