"""Orthanc's REST API, for administration only (counting, wiping, version, uploads).

Scenarios talk DIMSE and DICOMweb to every kind; this client is what the Orthanc adapter
uses for things the standard protocols do not offer (deleting, statistics).
"""

from __future__ import annotations

from typing import Any

import requests

from harness.dicom.dicomweb import (
    AUTH_STATUSES,
    authentication_failed,
    http_session,
    request_failed,
)
from harness.errors import EnvironmentProblem


class OrthancRest:
    """A thin client over one Orthanc's REST API."""

    def __init__(
        self,
        base_url: str,
        auth: tuple[str, str] | None = None,
        *,
        verify: bool | str = True,
        server_name: str | None = None,
        timeout_s: float = 30.0,
        node_name: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.node_label = node_name or self.base_url
        self.session = http_session(auth, verify, server_name)
        self.timeout_s = timeout_s

    def __repr__(self) -> str:
        return f"OrthancRest({self.base_url})"

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        try:
            # per request: a session's own `verify` loses to REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE
            rsp = self.session.request(
                method, f"{self.base_url}{path}", timeout=self.timeout_s,
                verify=self.session.verify, **kwargs
            )
        except requests.RequestException as exc:
            raise request_failed(self.node_label, f"Orthanc at {self.base_url}", exc) from None
        if rsp.status_code in AUTH_STATUSES:
            raise authentication_failed(self.node_label, rsp.status_code)
        if rsp.status_code >= 400:
            raise EnvironmentProblem(
                f"Orthanc at {self.base_url}: {method} {path} answered HTTP {rsp.status_code}"
            )
        return rsp

    def get_json(self, path: str, **params: Any) -> Any:
        return self._request("GET", path, params=params or None).json()

    def post_json(self, path: str, body: Any) -> Any:
        rsp = self._request("POST", path, json=body)
        return rsp.json() if rsp.content else None

    def delete(self, path: str) -> None:
        self._request("DELETE", path)

    def system(self) -> dict[str, Any]:
        return self.get_json("/system")

    def statistics(self) -> dict[str, Any]:
        return self.get_json("/statistics")

    def patients(self) -> list[str]:
        return self.get_json("/patients")

    def delete_all(self) -> int:
        """Delete every patient (and so every study, series, instance); returns how many."""
        ids = self.patients()
        for orthanc_id in ids:
            self.delete(f"/patients/{orthanc_id}")
        return len(ids)

    def upload(self, dicom_bytes: bytes) -> dict[str, Any]:
        rsp = self._request(
            "POST", "/instances", data=dicom_bytes, headers={"Content-Type": "application/dicom"}
        )
        return rsp.json()

    def lookup(self, uid: str) -> list[dict[str, Any]]:
        """Orthanc ids of the resources whose DICOM UID is `uid`."""
        rsp = self._request("POST", "/tools/lookup", data=uid)
        return rsp.json()
