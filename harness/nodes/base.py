"""The one interface every PACS node offers, whatever runs behind it.

Scenarios only see `Node`: its address (host, DICOM port, AE title, HTTP port), protocol
clients, and the vendor-specific chores (start, stop, wipe, statistics, logs) that each
adapter implements for its kind. Destructive chores check `disposable` here, once.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.dicom.client import DimseClient
from harness.dicom.dicomweb import DicomwebClient
from harness.dicom.orthanc_rest import OrthancRest
from harness.dicom.peer import HARNESS_AE_TITLE, DimseConnectionError, TLSConfig
from harness.errors import (
    ConfigError,
    EnvironmentProblem,
    NotDisposableError,
    NotWritableError,
)
from harness.launch.docker import ContainerHandle
from harness.launch.process import ProcessHandle, log_tail, spawn
from harness.launch.tools import require_binary
from harness.nodes import catalog
from harness.nodes.capabilities import Capabilities
from harness.security.certificates import TLSMaterial

if TYPE_CHECKING:
    from harness.config import NodeSpec


@dataclass(frozen=True)
class Peer:
    """Another DICOM application entity a node must know (C-MOVE destinations)."""

    name: str
    ae_title: str
    host: str
    port: int
    tls: bool = False  # it takes DICOM over TLS only (PS3.15 B.1): callers must speak TLS
    ca_file: str | None = None  # a TLS peer's CA certificates (its certificate's signer)


@dataclass
class NodeStatistics:
    patients: int
    studies: int
    series: int
    instances: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class HeldStatistics:
    """What a node holds, counted without its query service (to hold C-FIND against)."""

    statistics: NodeStatistics
    means: str  # how it was counted, for the report
    unreadable: list[str]  # stored files that did not parse

    def as_dict(self) -> dict[str, Any]:
        return {**self.statistics.as_dict(), "means": self.means, "unreadable": self.unreadable}

    def disagreements(self, name: str, answered: dict[str, int]) -> list[str]:
        """One line per level where this count and the query service's answers (`answered`:
        studies, series, instances) differ, and one per stored file that could not be read:
        what the assessment reports before anything is migrated."""
        findings = [
            f"{level}: {name} holds {getattr(self.statistics, level)} ({self.means}) "
            f"but its query service answers for {answered[level]}"
            for level in ("studies", "series", "instances")
            if getattr(self.statistics, level) != answered[level]
        ]
        return findings + [f"{name}: unreadable stored file {entry}" for entry in self.unreadable]


#: what files_statistics reads of each stored file
_UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


def files_statistics(paths: list[Path], means: str, *, force: bool = False) -> HeldStatistics:
    """Counts of the stored files a kind keeps in a folder of its own, each read with
    pydicom: for kinds whose index is the very thing their C-FIND answers from (dcmqrscp's
    index.dat, PixelMed's HSQLDB, CTN's MariaDB), so the count is held against C-FIND. A
    file without PatientID counts under an empty one, as a C-FIND answers it. `force`: read
    data sets without a Part 10 header (CTN writes them)."""
    from pydicom import dcmread

    patients, studies, series, instances = set(), set(), set(), set()
    unreadable = []
    for path in sorted(paths):
        try:
            ds = dcmread(path, force=force, stop_before_pixels=True,
                         specific_tags=["PatientID", *_UID_KEYWORDS])
            patient = str(ds.get("PatientID", ""))
            study, one_series, instance = (str(ds[k].value) for k in _UID_KEYWORDS)
        except Exception as exc:  # noqa: BLE001 - a damaged file is reported, not fatal
            unreadable.append(f"{path.name}: {exc.__class__.__name__}")
            continue
        patients.add(patient)
        studies.add(study)
        series.add((study, one_series))
        instances.add(instance)
    counts = NodeStatistics(len(patients), len(studies), len(series), len(instances))
    return HeldStatistics(counts, means, unreadable)


class Node:
    """Base class: an addressable PACS with protocol clients and lifecycle chores.

    A subclass that sets `kind` is a node kind: it declares `capabilities` and is found by
    harness.nodes.catalog (docs/architecture.md, Adding a PACS kind).
    """

    kind = "abstract"
    has_process = False
    capabilities = Capabilities()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            catalog.register(cls)

    def __init__(self, spec: NodeSpec, workdir: Path | None = None) -> None:
        self.spec = spec
        self.name = spec.name
        self.ae_title = spec.ae_title
        self.host = spec.host
        self.dicom_port: int | None = spec.dicom_port
        self.http_port: int | None = spec.http_port
        # where the harness's own DIMSE traffic goes: a fault proxy's port when the topology
        # declares a link harness->node, else the node's port
        self.access_port: int | None = None
        self.workdir = workdir
        self.peers: list[Peer] = []
        self.handle: ProcessHandle | ContainerHandle | None = None
        self.sidecars: dict[str, ProcessHandle] = {}  # e.g. PostgreSQL under an Orthanc
        # sidecar children of this process, waited for after `stop` (no zombie keeps the pid)
        self.reap_on_stop: list[subprocess.Popen] = []
        # a login the harness generated for a node it launched (never printed nor logged)
        self.generated_credentials: tuple[str, str] | None = None
        # a launched TLS node's certificate, key and the run's CA (harness/security/
        # certificates.py), set by the cluster before `prepare`; used as server and as client
        self.tls_material: TLSMaterial | None = None
        # the harness's own certificate from the same CA, for its associations to this node
        self.harness_tls_material: TLSMaterial | None = None
        # set by `ready` when a TLS node is up but not as declared (see there)
        self.tls_warning: str | None = None
        self._popen = None

    def __repr__(self) -> str:
        return f"<{self.kind} node {self.name} {self.ae_title}@{self.host}:{self.dicom_port}>"

    # -- identity ----------------------------------------------------------------------
    @property
    def disposable(self) -> bool:
        return self.spec.disposable

    @property
    def writable(self) -> bool:
        """Write permission: the harness may store synthetic data here (disposable or
        declared `writable: true`)."""
        return self.spec.may_write

    @property
    def log_path(self) -> Path | None:
        return self.workdir / "node.log" if self.workdir else None

    def describe(self) -> dict[str, Any]:
        """The fields `status --json` prints for a node."""
        return {
            "name": self.name,
            "kind": self.kind,
            "ae_title": self.ae_title,
            "host": self.host,
            "dicom_port": self.dicom_port,
            "http_port": self.http_port,
            "disposable": self.disposable,
            "writable": self.writable,
            "tls": self.spec.tls is not None,
            "https": self.spec.https,
        }

    # -- protocol clients ----------------------------------------------------------------
    def dimse(self, calling_ae: str = HARNESS_AE_TITLE, timeout_s: float = 30.0) -> DimseClient:
        """A DIMSE client for this node (through its harness link when one is declared)."""
        return self._dimse(calling_ae, timeout_s, self.tls_client())

    def _dimse(self, calling_ae: str, timeout_s: float, tls: TLSConfig | None) -> DimseClient:
        """`dimse` with other TLS settings (`ready` tries unverified and plain)."""
        return DimseClient(
            self.host,
            self.access_port or self.dicom_port,
            self.ae_title,
            calling_ae,
            timeout_s=timeout_s,
            max_store_associations=self.capabilities.store_associations,
            tls=tls,
        )

    def tls_client(self) -> TLSConfig | None:
        """How the harness speaks TLS to this node (None: plain TCP): the run's CA and the
        harness's certificate for a launched node, the topology's files for an external
        one; the server's certificate must name `tls.server_name` (default: the host)."""
        tls = self.spec.tls
        if tls is None:
            return None
        server_name = tls.server_name or self.host
        if tls.generate:
            material = self.harness_tls_material
            if material is None:
                raise EnvironmentProblem(
                    f"node {self.name}: its TLS certificates were not generated (it is "
                    "launched with the topology: pacs-harness up, run or pytest)"
                )
            return TLSConfig(
                str(material.ca_file), str(material.certificate_file), str(material.key_file),
                server_name,
            )
        return TLSConfig(tls.ca_file, tls.certificate_file, tls.key_file, server_name)

    def tls_signer(self) -> str | None:
        """The CA certificates that sign this node's certificate: the run's CA for a launched
        node, the topology's `tls.ca` for an external one; None without TLS."""
        if self.tls_material is not None:
            return str(self.tls_material.ca_file)
        return self.spec.tls.ca_file if self.spec.tls else None

    def trusted_ca_file(self) -> str:
        """What a launched TLS node trusts, as server and as client (PS3.15 B.1): the run's
        CA, plus the CA of every TLS peer signed by another (a site PACS in the topology),
        gathered into <workdir>/trusted-ca.pem; so C-MOVE works both ways with it."""
        assert self.tls_material is not None and self.workdir is not None
        own = str(self.tls_material.ca_file)
        others = sorted({p.ca_file for p in self.peers if p.tls and p.ca_file} - {own})
        if not others:
            return own
        bundle = []
        for path in (own, *others):
            try:
                bundle.append(Path(path).read_text())
            except (OSError, UnicodeDecodeError) as exc:
                name = next(p.name for p in self.peers if p.ca_file == path)
                raise ConfigError(
                    f"node {name}: tls.ca {path} unreadable ({exc.__class__.__name__})"
                ) from None
        trusted = self.workdir / "trusted-ca.pem"
        trusted.write_text("".join(text if text.endswith("\n") else text + "\n"
                                   for text in bundle))
        return str(trusted)

    @property
    def http_url(self) -> str | None:
        """Where its REST API and DICOMweb are: https:// when the node declares `https: true`."""
        if not self.http_port:
            return None
        scheme = "https" if self.spec.https else "http"
        return f"{scheme}://{self.host}:{self.http_port}"

    def http_verify(self) -> str | bool:
        """What every HTTPS request to this node checks its certificate against (the one
        place that decides; never unverified): the run's CA for a launched node, the
        topology's `https_ca` or `tls.ca` for an external one, else the system's store."""
        if self.spec.https_ca:
            return self.spec.https_ca
        if self.tls_material is not None:
            return str(self.tls_material.ca_file)
        if self.spec.https and self.spec.launched:
            raise EnvironmentProblem(
                f"node {self.name}: its HTTPS certificate was not generated (it is launched "
                "with the topology: pacs-harness up, run or pytest)"
            )
        if self.spec.tls is not None and self.spec.tls.ca_file:
            return self.spec.tls.ca_file
        return True

    def http_server_name(self) -> str | None:
        """The name its HTTPS certificate must carry when it is not the host in the URL:
        the topology's `tls.server_name` (as for DICOM TLS), else None (the host)."""
        tls = self.spec.tls
        return tls.server_name if tls and tls.server_name != self.host else None

    def dicomweb(self) -> DicomwebClient | None:
        """A DICOMweb client when the node serves DICOMweb, else None."""
        if not self.http_url or not self.spec.dicomweb_root:
            return None
        return DicomwebClient(
            self.http_url + self.spec.dicomweb_root, self._http_auth(),
            verify=self.http_verify(), server_name=self.http_server_name(), node_name=self.name,
        )

    def rest(self) -> OrthancRest | None:
        """Orthanc REST client when the node is an Orthanc, else None."""
        if not self.http_url or not self.spec.orthanc_rest:
            return None
        return OrthancRest(self.http_url, self._http_auth(), verify=self.http_verify(),
                           server_name=self.http_server_name(), node_name=self.name)

    def _http_auth(self) -> tuple[str, str] | None:
        """The generated login of a launched node, else the topology's (from the environment)."""
        return self.generated_credentials or self.spec.credentials.resolve()

    # -- lifecycle -----------------------------------------------------------------------
    def prepare(self, peers: list[Peer]) -> None:
        """Write configuration into the work directory (launched kinds)."""
        self.peers = [p for p in peers if p.ae_title != self.ae_title]

    def program(self) -> list[str]:
        """How to invoke the server on this machine (checked to be installed)."""
        raise NotImplementedError

    def require_binary(self, program: str) -> str:
        """The installed program's path, or an EnvironmentProblem with the kind's hint."""
        return require_binary(program, self.capabilities.install_hint(program))

    def arguments(self) -> list[str]:
        """The server's arguments, the same for a process and a container."""
        return []

    def command(self) -> list[str]:
        """argv of the server as a local process."""
        return [*self.program(), *self.arguments()]

    # -- containers (launch: docker) -------------------------------------------------------
    #: how to invoke the server inside the harness's own image
    image_program: tuple[str, ...] = ()

    def image(self) -> str:
        """The image to run: the topology's `image:`, else the harness's locally built one."""
        from harness.launch.images import default_tag

        return self.spec.image or default_tag(self.kind)

    @property
    def local_image(self) -> bool:
        return self.image().startswith("pacs-harness/")

    def container_command(self) -> list[str] | None:
        """argv inside the container (None: the image's own entrypoint)."""
        if not self.local_image:
            return None
        return [*self.image_program, *self.arguments()]

    def container_mounts(self) -> dict[Path, str]:
        """The work directory appears at the same path inside, so generated configs hold;
        so do the node's own TLS files (its certificate, key and the CA certificate; not the
        rest of <root>/tls, which holds the CA's key)."""
        mounts = {self.workdir: str(self.workdir)}
        if self.tls_material is not None:
            material = self.tls_material
            for path in (material.certificate_file, material.key_file, material.ca_file):
                mounts[Path(path)] = str(path)
        return mounts

    def container_environment(self) -> dict[str, str]:
        return {}

    #: DCMTK-based servers (Orthanc, dcmqrscp) keep Nagle's algorithm on unless TCP_NODELAY=1
    #: is in their environment, so each response waits up to 40 ms for the peer's delayed ACK
    #: (a proxy such as HAProxy, or another PACS; see harness/dicom/tcp.py). Nodes the harness
    #: launches get it, as Orthanc's own static builds have it at compile time; a TCP_NODELAY
    #: in the harness's environment wins (0 reproduces a Debian-packaged server).
    dcmtk_network = False

    def network_environment(self) -> dict[str, str]:
        if not self.dcmtk_network:
            return {}
        return {"TCP_NODELAY": os.environ.get("TCP_NODELAY", "1")}

    # -- lifecycle -----------------------------------------------------------------------
    def start_sidecars(self, *, detached: bool) -> None:
        """Start servers the node needs first (PostgreSQL for an Orthanc index) into
        `self.sidecars`."""

    def start(self, *, detached: bool = False, run_id: str = "harness") -> None:
        """Launch the node (process or container); `wait_ready` then tells when it answers."""
        if not self.has_process:
            return
        assert self.workdir is not None
        self.start_sidecars(detached=detached)
        if self.spec.launch == "docker":
            from harness.launch.docker import run_container

            self.handle = run_container(
                image=self.image(),
                command=self.container_command(),
                name=f"pacs-harness-{run_id}-{self.name}",
                run_id=run_id,
                node_name=self.name,
                mounts=self.container_mounts(),
                environment={**self.container_environment(), **self.network_environment()},
                detached=detached,
            )
        else:
            self._popen, self.handle = spawn(
                self.command(),
                log_path=self.log_path,
                cwd=self.workdir,
                detached=detached,
                env={**os.environ, **self.network_environment()},
            )

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Poll C-ECHO (and HTTP where the node has it) until it answers or time is up."""
        deadline = time.monotonic() + timeout_s
        last_error = "no answer"
        while time.monotonic() < deadline:
            if self.handle is not None and not self.handle.alive():
                raise EnvironmentProblem(
                    f"node {self.name} ({self.kind}) exited during start-up; "
                    f"log tail:\n{self.log_tail()}"
                )
            try:
                if self.ready():
                    return
            except (DimseConnectionError, EnvironmentProblem, OSError) as exc:
                last_error = str(exc)
            time.sleep(0.2)
        raise EnvironmentProblem(
            f"node {self.name} ({self.kind}) at {self.host}:{self.dicom_port} not ready after "
            f"{timeout_s:.0f} s ({last_error}); log tail:\n{self.log_tail()}"
        )

    def ready(self) -> bool:
        """One readiness probe: C-ECHO succeeds.

        A TLS node that answers only when the harness does not verify its certificate, or
        only without TLS, is up all the same (`tls_warning` says how): that misconfiguration
        is the security scenario's finding to report, by name (harness/security/tls_probe.py),
        and every other operation fails on it with the TLS error.
        """
        try:
            return self.dimse(timeout_s=5).echo().status.ok
        except DimseConnectionError:
            client = self.tls_client()
            if client is None:
                raise
            fallbacks = (
                (replace(client, verify=False), "its certificate is not accepted by the harness"),
                (None, "it answers without TLS"),
            )
            for tls, warning in fallbacks:
                with contextlib.suppress(DimseConnectionError, OSError):
                    if self._dimse(HARNESS_AE_TITLE, 5, tls).echo().status.ok:
                        self.tls_warning = warning
                        return True
            raise

    def alive(self) -> bool:
        """True when the process (if any) runs and the node answers C-ECHO."""
        if self.handle is not None and not self.handle.alive():
            return False
        try:
            return self.dimse(timeout_s=5).echo().status.ok
        except (DimseConnectionError, OSError):
            return False

    def stop(self) -> None:
        """Stop the server (keeping a container's log in node.log), then its sidecars."""
        if self.handle is not None and hasattr(self.handle, "logs") and self.log_path:
            try:
                self.log_path.write_text(self.handle.logs(tail=2000))
            except OSError:
                pass
        if self.handle is not None:
            self.handle.stop()
        if self._popen is not None:
            try:
                self._popen.wait(timeout=5)
            except Exception:  # noqa: BLE001 - already SIGKILLed above; nothing more to do
                pass
        for sidecar in self.sidecars.values():
            sidecar.stop()
        for child in self.reap_on_stop:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=5)  # already SIGKILLed by its handle when it came to that
        self.reap_on_stop.clear()

    def log_tail(self, lines: int = 30) -> str:
        if self.handle is not None and hasattr(self.handle, "logs"):
            try:
                return "\n".join(self.handle.logs(tail=lines).splitlines()[-lines:])
            except Exception:  # noqa: BLE001 - container gone: fall back to the saved log
                pass
        return log_tail(self.log_path, lines) if self.log_path else ""

    def version(self) -> str:
        return "unknown"

    # -- chores ------------------------------------------------------------------------
    # Permissions (docs/safety.md): read (echo, query, retrieve) always; write (store
    # synthetic data) when disposable or writable; destroy (wipe, delete, kill, DR) when
    # disposable. Callers check before acting, so a refused command has changed nothing.
    def require_disposable(self, action: str) -> None:
        """Destroy permission: raise NotDisposableError (exit 2) unless disposable."""
        if not self.disposable:
            raise NotDisposableError(
                f"node {self.name}: refusing to {action} (needs destroy permission): it is "
                "not declared 'disposable: true' in the topology"
            )

    def require_writable(self, action: str) -> None:
        """Write permission: raise NotWritableError (exit 2) unless disposable or writable."""
        if not self.writable:
            raise NotWritableError(
                f"node {self.name}: refusing to {action} (needs write permission): it is "
                "not declared 'writable: true' or 'disposable: true' in the topology"
            )

    def data_directories(self) -> tuple[str, ...]:
        """Directories under `workdir` that hold the node's data (what a cold backup
        copies); empty for a node the harness cannot back up (external, dcm4chee)."""
        return ()

    def wipe(self) -> None:
        """Delete every study on the node (only when disposable)."""
        self.require_disposable("wipe it")
        self._wipe()

    def _wipe(self) -> None:
        raise NotDisposableError(f"node {self.name} ({self.kind}) offers no way to delete studies")

    def statistics(self) -> NodeStatistics:
        """Counts by walking the hierarchy with C-FIND; adapters override with faster ways."""
        return dimse_statistics(self.dimse())

    def held_statistics(self) -> HeldStatistics | None:
        """Counts by a means other than C-FIND (the kind's own index or files), or None
        where the kind has none: counting with C-FIND would check the query service
        against itself."""
        rest = self.rest()
        if rest is None:
            return None
        return HeldStatistics(rest_statistics(rest), "Orthanc REST API: GET /statistics", [])


def rest_statistics(rest: OrthancRest) -> NodeStatistics:
    """Orthanc's own counts (GET /statistics)."""
    stats = rest.statistics()
    return NodeStatistics(
        patients=int(stats["CountPatients"]),
        studies=int(stats["CountStudies"]),
        series=int(stats["CountSeries"]),
        instances=int(stats["CountInstances"]),
    )


def dimse_statistics(client: DimseClient) -> NodeStatistics:
    """Patient, study, series and instance counts using only C-FIND (works on any PACS)."""
    studies = client.find("STUDY", {"StudyInstanceUID": None, "PatientID": None})
    if not studies.ok:
        raise EnvironmentProblem(f"peer {client}: study-level C-FIND answered {studies.status}")
    patients = {str(s.get("PatientID", "")) for s in studies.matches}
    series_count = instance_count = 0
    for study in studies.matches:
        series = client.find(
            "SERIES", {"StudyInstanceUID": study.StudyInstanceUID, "SeriesInstanceUID": None}
        )
        series_count += len(series.matches)
        for one in series.matches:
            images = client.find(
                "IMAGE",
                {
                    "StudyInstanceUID": study.StudyInstanceUID,
                    "SeriesInstanceUID": one.SeriesInstanceUID,
                    "SOPInstanceUID": None,
                },
            )
            instance_count += len(images.matches)
    return NodeStatistics(len(patients), len(studies.matches), series_count, instance_count)
