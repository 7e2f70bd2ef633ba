"""Where a crawl's facts come from: C-FIND and C-GET over DIMSE, which every PACS offers,
or QIDO-RS and WADO-RS where the node serves DICOMweb (one HTTP request per page instead of
one association per query). Each crawl worker holds its own source (inventory.py), so a
source is used by one thread at a time: its associations and HTTP session are its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from email.message import Message
from io import BytesIO
from typing import Any

import requests
from pydicom import Dataset, dcmread
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.errors import InvalidDicomError

from harness.dicom.client import DimseClient
from harness.dicom.dicomweb import DicomwebClient, request_failed
from harness.dicom.status import NO_STATUS, RetrievedInstance
from harness.errors import ConfigError, EnvironmentProblem
from harness.migration.discovery import OUT_OF_RESOURCES
from harness.migration.normalise import (
    IMAGE_QUERY_KEYS,
    SERIES_QUERY_KEYS,
    STUDY_QUERY_KEYS,
    normalise,
)
from harness.migration.partitions import RangeAnswer
from harness.nodes.base import Node

VIA = ("auto", "dimse", "dicomweb")
QIDO_PAGE = 1000
WADO_CHUNK = 1 << 20




def _query(level: str, keys: dict[str, Any]) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        tag = tag_for_keyword(keyword)
        ds.add(DataElement(tag, dictionary_VR(tag), value))
    return ds


def keys_of(ds: Dataset, wanted: tuple[str, ...]) -> dict[str, Any]:
    attrs = normalise(ds)
    return {k: attrs.get(k) for k in wanted}


class DimseSource:
    """C-FIND for listings, C-GET for retrieval: what every PACS offers."""

    name = "dimse"

    def __init__(self, node: Node) -> None:
        self.client: DimseClient = node.dimse()

    def _find(self, assoc: Any, identifier: Dataset) -> Iterator[Dataset]:
        result = self.client.find_over(assoc, identifier.QueryRetrieveLevel, identifier)
        if not result.ok:
            raise EnvironmentProblem(
                result.error
                or f"peer {self.client}: {identifier.QueryRetrieveLevel}-level C-FIND "
                f"answered {result.status}"
            )
        yield from result.matches

    def _assoc(self) -> Any:
        return self.client.find_association()

    def list_range(self, query: dict[str, str], limit: int | None) -> RangeAnswer:
        """One study-level C-FIND of a partition, cancelled past `limit` matches (PS3.7
        9.1.2.1.6): more means the partition is split, so the rest is not worth reading."""
        keys = {**dict.fromkeys(STUDY_QUERY_KEYS), **query}
        assoc = self._assoc()
        try:
            result = self.client.find_over(assoc, "STUDY", _query("STUDY", keys),
                                           cancel_after=None if limit is None else limit + 1)
        finally:
            assoc.release()
        if result.status == NO_STATUS:
            raise EnvironmentProblem(result.error or f"peer {self.client}: C-FIND unanswered")
        category = result.status.category
        if category == "failure" and not result.matches \
                and result.status.code != OUT_OF_RESOURCES:
            return RangeAnswer([], refused=f"answered {result.status}")
        cut = category != "success" or (limit is not None and len(result.matches) > limit)
        return RangeAnswer(result.matches, cut=cut)

    def instances(self, study_uid: str) -> Iterator[dict[str, Any]]:
        assoc = self._assoc()
        try:
            series_keys = {"StudyInstanceUID": study_uid, **dict.fromkeys(SERIES_QUERY_KEYS)}
            for series in list(self._find(assoc, _query("SERIES", series_keys))):
                series_attrs = keys_of(series, SERIES_QUERY_KEYS)
                image_keys = {"StudyInstanceUID": study_uid,
                              "SeriesInstanceUID": series.SeriesInstanceUID,
                              **dict.fromkeys(IMAGE_QUERY_KEYS)}
                for image in self._find(assoc, _query("IMAGE", image_keys)):
                    yield {**series_attrs, **keys_of(image, IMAGE_QUERY_KEYS)}
        finally:
            assoc.release()

    def retrieve(self, study_uid: str, on_dataset: Callable[[Dataset, str], None]
                 ) -> list[tuple[str, str]]:
        def on_instance(instance: RetrievedInstance) -> None:
            on_dataset(instance.dataset, instance.transfer_syntax_uid)

        result = self.client.get("STUDY", {"StudyInstanceUID": study_uid},
                                 on_instance=on_instance, keep=False)
        problems = [(uid, f"C-GET failed for this instance ({result.status})")
                    for uid in result.failed_sop_instance_uids]
        if not problems and (not result.ok or result.failed):  # failures without their UIDs
            problems.append(("", f"C-GET answered {result.status} "
                                 f"({result.failed} failed sub-operations)"))
        return problems


def _from_json(obj: dict[str, Any]) -> Dataset:
    obj = {tag: value for tag, value in obj.items() if value.get("vr") != "UR"}
    return Dataset.from_json(obj)


def _multipart(rsp: requests.Response) -> Iterator[bytes]:
    """The parts of a multipart/related response, read as a stream (one part in memory)."""
    header = Message()  # RFC 2045 parameter parsing (quotes, case) by the standard library
    header["Content-Type"] = rsp.headers.get("Content-Type", "")
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise EnvironmentProblem(f"{rsp.url}: multipart answer without boundary")
    delimiter = b"\r\n--" + boundary.encode()
    buffer = bytearray(b"\r\n")
    scan_from = 0
    for chunk in rsp.iter_content(WADO_CHUNK):
        buffer += chunk
        while True:
            first = buffer.find(delimiter)
            if first < 0:
                break
            start = first + len(delimiter)
            end = buffer.find(delimiter, max(start, scan_from))
            if end < 0:
                scan_from = max(start, len(buffer) - len(delimiter))
                break
            part = bytes(buffer[start:end])
            del buffer[:end]
            scan_from = 0
            _, sep, payload = part.partition(b"\r\n\r\n")
            if sep:
                yield payload


class DicomwebSource:
    """QIDO-RS for listings, WADO-RS for retrieval (as stored: transfer-syntax=*)."""

    name = "dicomweb"

    def __init__(self, node: Node) -> None:
        web = node.dicomweb()
        assert web is not None
        self.web: DicomwebClient = web

    def _search(self, path: str, fields: tuple[str, ...], **params: str) -> Iterator[Dataset]:
        include = [f"{tag_for_keyword(k):08X}" for k in fields]
        offset = 0
        while True:
            page = self.web.search(path, includefield=include, limit=QIDO_PAGE, offset=offset,
                                   **params)
            for obj in page:
                yield _from_json(obj)
            if len(page) < QIDO_PAGE:
                return
            offset += len(page)

    def list_range(self, query: dict[str, str], limit: int | None) -> RangeAnswer:
        """A partition's studies by QIDO-RS (PS3.18 10.6: range matching on StudyDate,
        StudyTime); with `limit`, one request for limit + 1 answers shows a cut."""
        params = {k: v for k, v in query.items() if v}
        if limit is None:
            return RangeAnswer(list(self._search("/studies", STUDY_QUERY_KEYS, **params)))
        include = [f"{tag_for_keyword(k):08X}" for k in STUDY_QUERY_KEYS]
        page = self.web.search("/studies", includefield=include, limit=limit + 1, **params)
        return RangeAnswer([_from_json(obj) for obj in page], cut=len(page) > limit)

    def instances(self, study_uid: str) -> Iterator[dict[str, Any]]:
        for ds in self._search(f"/studies/{study_uid}/instances",
                               SERIES_QUERY_KEYS + IMAGE_QUERY_KEYS):
            yield keys_of(ds, SERIES_QUERY_KEYS + IMAGE_QUERY_KEYS)

    def retrieve(self, study_uid: str, on_dataset: Callable[[Dataset, str], None]
                 ) -> list[tuple[str, str]]:
        url = f"{self.web.root_url}/studies/{study_uid}"
        accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
        try:
            rsp = self.web.session.get(url, headers={"Accept": accept}, stream=True,
                                       timeout=self.web.timeout_s, verify=self.web.session.verify)
        except requests.RequestException as exc:
            raise request_failed(self.web.node_label, f"DICOMweb at {self.web.root_url}",
                                 exc) from None
        with rsp:
            if rsp.status_code >= 400:
                return [("", f"WADO-RS answered HTTP {rsp.status_code}")]
            problems = []
            try:
                for payload in _multipart(rsp):
                    try:
                        ds = dcmread(BytesIO(payload))
                    except (InvalidDicomError, EOFError, ValueError, OSError) as exc:
                        problems.append(("", f"WADO-RS part is not DICOM ({exc})"))
                        continue
                    on_dataset(ds, str(ds.file_meta.get("TransferSyntaxUID", "")) or None)
            except requests.RequestException as exc:
                problems.append(("", f"WADO-RS response broke off ({exc.__class__.__name__})"))
        return problems


def reports_stored_syntax(node: Node, source: Any) -> bool:
    """WADO-RS, or a C-GET from a kind that sends each instance in its stored syntax when
    offered (dcmqrscp converts to the first context it accepted, so its ledgers cannot tell
    a stored syntax)."""
    return source.name == "dicomweb" or node.capabilities.keeps_stored_syntax


def source_for(node: Node, via: str) -> DimseSource | DicomwebSource:
    if via not in VIA:
        raise ConfigError(f"via: unknown {via!r} (allowed: {', '.join(VIA)})")
    if via == "dicomweb" and node.dicomweb() is None:
        raise ConfigError(f"via: node {node.name} ({node.kind}) serves no DICOMweb")
    if via == "dicomweb" or (via == "auto" and node.dicomweb() is not None):
        return DicomwebSource(node)
    return DimseSource(node)
