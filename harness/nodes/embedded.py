"""The embedded pure-Python PACS (pynetdicom), run in a subprocess: the zero-install default.

It takes HL7 v2 ADT^A08/A40 over MLLP on `hl7_port` (the cluster picks it).

With `tls: {generate: true}` it takes DICOM over TLS only (PS3.15 B.1) with the node's
generated certificate, `tls.min_version` and `tls.client_certificate` as declared (Python's
ssl), and calls the peers that take TLS over TLS for C-MOVE (peers.json "tls": true).
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator

import pydicom
import pynetdicom

from harness.errors import ConfigError, EnvironmentProblem
from harness.launch.ports import free_port
from harness.nodes.base import HeldStatistics, Node, NodeStatistics, Peer
from harness.nodes.capabilities import Capabilities, ImageRecipe
from harness.sqlite_db import SchemaVersionError

AUDIT_PORT_FILE = "audit-port"


class EmbeddedNode(Node):
    kind = "embedded"
    has_process = True
    capabilities = Capabilities(
        query_levels=("PATIENT", "STUDY", "SERIES", "IMAGE"),
        retrieve_methods=("C-MOVE", "C-GET"),
        keeps_stored_syntax=True,
        reports_sop_classes_in_study=True,
        max_associations=128,  # embedded_pacs.connection.MAX_ASSOCIATIONS
        tls=True,
        index_backends=("sqlite",),
        audit_trail=True,  # --audit-syslog: IHE ATNA messages (embedded_pacs/audit.py)
        hl7=True,  # --hl7-port: ADT^A08/A40 over MLLP (embedded_pacs/hl7.py)
        storage_commitment=True,  # N-ACTION/N-EVENT-REPORT SCP (embedded_pacs/commitment.py)
        worklist=True,  # .wl files of storage/worklist/ (embedded_pacs/worklist.py)
        mpps=True,  # N-CREATE / N-SET kept in storage/mpps.sqlite (embedded_pacs/mpps.py)
        image_recipe=ImageRecipe(
            ("python3",), ("pydicom", "pynetdicom"), ("embedded_pacs", "sqlite_db.py")
        ),
    )

    #: the MLLP port of its HL7 listener, picked by the cluster with its other ports
    #: (harness/cluster.py); None: no listener
    hl7_port: int | None = None

    @property
    def storage_dir(self):
        return self.workdir / "storage"

    @property
    def worklist_dir(self):
        """The folder of .wl entries its worklist SCP reads (harness/workflow/orders.py)."""
        return self.storage_dir / "worklist" if self.workdir else None

    def data_directories(self) -> tuple[str, ...]:
        return ("storage",)  # files and the SQLite index (relative paths)

    def prepare(self, peers: list[Peer]) -> None:
        """The peers file is both the C-MOVE destination table and the list of calling AE
        titles the node accepts (every node of the topology and the harness itself)."""
        super().prepare(peers)
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        table = {
            p.ae_title: {"host": p.host, "port": p.port, **({"tls": True} if p.tls else {})}
            for p in self.peers
        }
        (self.workdir / "peers.json").write_text(json.dumps(table, indent=2))
        if self.spec.audit is not None:
            if self.spec.audit.transport == "tls" and self.spec.tls is None:
                raise ConfigError(
                    f"node {self.name}: audit: {{transport: tls}} needs tls: {{generate: true}} "
                    "(its certificate authenticates it to the syslog receiver, RFC 5425)"
                )
            port = self.spec.audit.port or free_port(self.host)
            (self.workdir / AUDIT_PORT_FILE).write_text(f"{port}\n")

    @property
    def audit_port(self) -> int | None:
        """Where the node sends its audit messages (the harness's syslog receiver listens
        there); kept in the work directory so an attached cluster knows it too."""
        if self.spec.audit is None:
            return None
        if self.spec.audit.port:
            return self.spec.audit.port
        saved = self.workdir / AUDIT_PORT_FILE if self.workdir else None
        if saved is None or not saved.is_file():
            return None
        return int(saved.read_text().strip())

    # the image carries the package under /opt/pacs-harness/harness (harness/launch/images.py)
    image_program = ("python3", "-m", "harness.embedded_pacs")

    def program(self) -> list[str]:
        return [sys.executable, "-m", "harness.embedded_pacs"]

    def arguments(self) -> list[str]:
        audit = []
        if self.audit_port:
            scheme = self.spec.audit.transport  # udp (RFC 5426) or tls (RFC 5425)
            audit = ["--audit-syslog", f"{scheme}://{self.host}:{self.audit_port}"]
        return [
            "--ae-title",
            self.ae_title,
            "--port",
            str(self.dicom_port),
            "--host",
            self.host,
            "--storage",
            str(self.storage_dir),
            "--peers",
            str(self.workdir / "peers.json"),
            *audit,
            *(["--hl7-port", str(self.hl7_port)] if self.hl7_port else []),
            *self.tls_arguments(),
        ]

    def tls_arguments(self) -> list[str]:
        """`--tls-*` of harness/embedded_pacs/__main__.py for a node declaring `tls:`."""
        tls, material = self.spec.tls, self.tls_material
        if tls is None:
            return []
        if material is None:
            raise EnvironmentProblem(f"node {self.name}: its TLS certificates were not generated")
        return [
            "--tls-certificate", str(material.certificate_file),
            "--tls-key", str(material.key_file),
            "--tls-ca", self.trusted_ca_file(),
            "--tls-min-version", tls.min_version,
            "--tls-client-certificate", tls.client_certificate,
        ]

    def container_environment(self) -> dict[str, str]:
        return {"PYTHONPATH": "/opt/pacs-harness"}

    def version(self) -> str:
        return f"embedded PACS (pynetdicom {pynetdicom.__version__}, pydicom {pydicom.__version__})"

    def _wipe(self) -> None:
        from harness import embedded_pacs

        with _index_version_is_config_error():
            embedded_pacs.wipe_storage(self.storage_dir)

    def statistics(self) -> NodeStatistics:
        from harness import embedded_pacs

        with _index_version_is_config_error():
            return NodeStatistics(**embedded_pacs.statistics(self.storage_dir))

    def held_statistics(self) -> HeldStatistics:
        return HeldStatistics(
            self.statistics(), f"the embedded PACS's SQLite index in {self.storage_dir}", []
        )


@contextlib.contextmanager
def _index_version_is_config_error() -> Iterator[None]:
    """A storage directory whose index a newer harness wrote: exit 2 with its one-line message."""
    try:
        yield
    except SchemaVersionError as exc:
        raise ConfigError(str(exc)) from None
