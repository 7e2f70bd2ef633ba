"""Locust users for DICOM operations, for load beyond what one machine's Python can make.

This file is a locustfile: `pacs-harness load --locust` runs it in a Locust master and its
workers. Each group of the workload becomes one User class (`fixed_count` = the group's
users) whose task is one operation of `harness.performance.runner` (the same code as the
threaded engine),
reported to Locust through its `request` event, so Locust's statistics, CSV and web UI show
DIMSE and DICOMweb operations like HTTP requests.

What to run comes from the environment variable PACS_HARNESS_LOCUST_TARGET (JSON written by
`pacs-harness load --locust`): the node's address, the workload, and the studies stored for
the reading groups. Workers on other machines need the same variable (the command prints it).

Locust is a closed model: a group with `rate: R` becomes max_in_flight users that together
aim at R operations/s (constant_throughput); under a slow PACS it falls below R rather than
queueing, so open-model latencies belong to the threaded engine.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from locust import User, constant, constant_throughput, task

from harness.dicom.client import DimseClient
from harness.dicom.dicomweb import DicomwebClient
from harness.dicom.peer import HARNESS_AE_TITLE, TLSConfig
from harness.performance.runner import LoadRun, Study
from harness.performance.workload import Group, workload_from_data

TARGET_ENV = "PACS_HARNESS_LOCUST_TARGET"


class RemoteNode:
    """Just enough of a Node for `LoadRun.operation`: protocol clients from an address."""

    def __init__(self, target: dict[str, Any]) -> None:
        self.name = target["name"]
        self.host = target["host"]
        self.dicom_port = target["dicom_port"]
        self.ae_title = target["ae_title"]
        self.dicomweb_url = target.get("dicomweb_url")
        self.tls = TLSConfig(**target["tls"]) if target.get("tls") else None  # PS3.15 B.1
        # the CA file the node's HTTPS certificate is checked against (True: the system's)
        self.http_verify: str | bool = target.get("http_verify", True)
        self.http_server_name: str | None = target.get("http_server_name")

    def dimse(self, calling_ae: str = HARNESS_AE_TITLE, timeout_s: float = 30.0) -> DimseClient:
        return DimseClient(self.host, self.dicom_port, self.ae_title, calling_ae,
                           timeout_s=timeout_s, tls=self.tls)

    def dicomweb(self) -> DicomwebClient | None:
        if not self.dicomweb_url:
            return None
        user = os.environ.get("PACS_HARNESS_LOCUST_HTTP_USER")
        password = os.environ.get("PACS_HARNESS_LOCUST_HTTP_PASSWORD")
        return DicomwebClient(self.dicomweb_url, (user, password) if user and password else None,
                              verify=self.http_verify, server_name=self.http_server_name)


def runner_from_target(target: dict[str, Any]) -> LoadRun:
    """A LoadRun able to do single operations, with the studies the master stored."""
    workload = workload_from_data(target["workload"], {}, TARGET_ENV)
    runner = LoadRun(workload, RemoteNode(target["node"]), seed=os.getpid())
    runner.studies = [Study(**s) for s in target["studies"]]
    runner.dataset_stored = bool(target.get("dataset_stored", True))
    from synthetic_data.templates import encode_part10, template_instance

    runner.template = template_instance(workload.dataset.scale, workload.dataset.modality)
    runner.template_bytes = len(encode_part10(runner.template))
    return runner


class DicomUser(User):
    """One simulated modality, workstation or query client doing one operation in a loop."""

    abstract = True
    wait_time = constant(0)
    group: Group
    runner: LoadRun | None = None  # shared by the users of one process

    def on_start(self) -> None:
        if DicomUser.runner is None:
            DicomUser.runner = runner_from_target(json.loads(os.environ[TARGET_ENV]))

    @task
    def operate(self) -> None:
        group = self.group
        name = f"{group.operation} {group.level}" if group.operation == "c-find" else (
            group.operation)
        start = time.perf_counter()
        exception: BaseException | None = None
        length = 0
        try:
            outcome = DicomUser.runner.operation(group)
            length = outcome.nbytes
            if not outcome.ok:
                exception = RuntimeError(outcome.status)
        except Exception as exc:  # noqa: BLE001 - reported to Locust as a failure
            exception = exc
        self.environment.events.request.fire(
            request_type="DIMSE" if group.operation.startswith("c-") else "DICOMweb",
            name=f"{group.name}: {name}",
            response_time=(time.perf_counter() - start) * 1000.0,
            response_length=length,
            exception=exception,
            context={"group": group.name},
        )


def _user_classes() -> dict[str, type]:
    raw = os.environ.get(TARGET_ENV)
    if not raw:
        return {}
    target = json.loads(raw)
    workload = workload_from_data(target["workload"], {}, TARGET_ENV)
    classes: dict[str, type] = {}
    for group in workload.groups:
        attrs: dict[str, Any] = {"group": group, "abstract": False}
        if group.model == "closed":
            attrs["fixed_count"] = group.users
        else:
            users = min(group.max_in_flight, max(1, int(group.rate * 2)))
            attrs["fixed_count"] = users
            attrs["wait_time"] = constant_throughput(group.rate / users)
        class_name = "".join(c if c.isalnum() else "_" for c in group.name) + "User"
        classes[class_name] = type(class_name, (DicomUser,), attrs)
    return classes


globals().update(_user_classes())
