"""dcm4chee-arc as its three documented containers: LDAP, PostgreSQL and the archive.

Only as containers, on the host network, so its ports are the images' own: DICOM 11112,
HTTP 8080 (DICOMweb under /dcm4chee-arc/aets/<AE>/rs), LDAP 389, PostgreSQL 5432; one
dcm4chee node per machine at a time. The images come from a registry (or `docker load`);
where they are absent, starting the node is an environment error (exit 3) that says so.
"""

from __future__ import annotations

import shutil

import requests

from harness.errors import EnvironmentProblem
from harness.launch.docker import ContainerHandle, docker_client, image_present, run_container
from harness.nodes.base import Node, Peer
from harness.nodes.capabilities import Capabilities

LDAP_IMAGE = "dcm4che/slapd-dcm4chee:2.6.7-33.0"
DB_IMAGE = "dcm4che/postgres-dcm4chee:16.4-33"
ARCHIVE_IMAGE = "dcm4che/dcm4chee-arc-psql:5.33.0"
DICOM_PORT = 11112
HTTP_PORT = 8080
DB_ENV = {"POSTGRES_DB": "pacsdb", "POSTGRES_USER": "pacs", "POSTGRES_PASSWORD": "pacs"}


class Dcm4cheeNode(Node):
    kind = "dcm4chee"
    has_process = True
    capabilities = Capabilities(
        query_levels=("PATIENT", "STUDY", "SERIES", "IMAGE"),
        retrieve_methods=("C-MOVE", "C-GET", "WADO-RS"),
        dicomweb=("QIDO-RS", "WADO-RS", "STOW-RS"),  # under /dcm4chee-arc/aets/<AE>/rs
        keeps_stored_syntax=True,
        reports_sop_classes_in_study=True,
        launches=("docker",),  # only as its documented containers
    )

    def __init__(self, spec, workdir=None) -> None:
        super().__init__(spec, workdir)
        # the images listen on fixed ports; a topology that names others is overridden
        self.dicom_port = DICOM_PORT
        self.http_port = HTTP_PORT

    def image(self) -> str:
        return self.spec.image or ARCHIVE_IMAGE

    def images(self) -> list[str]:
        return [LDAP_IMAGE, DB_IMAGE, self.image()]

    @property
    def dicomweb_path(self) -> str:
        return f"/dcm4chee-arc/aets/{self.ae_title}/rs"

    def dicomweb(self):
        from harness.dicom.dicomweb import DicomwebClient

        return DicomwebClient(f"{self.http_url}{self.dicomweb_path}")

    def prepare(self, peers: list[Peer]) -> None:
        super().prepare(peers)
        for sub in ("ldap", "slapd.d", "db", "wildfly", "storage"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)

    def start(self, *, detached: bool = False, run_id: str = "harness") -> None:
        client = docker_client()
        missing = [image for image in self.images() if not image_present(client, image)]
        if missing:
            raise EnvironmentProblem(
                f"node {self.name}: dcm4chee images not present: {', '.join(missing)}; no "
                "registry is reachable here (docker pull them elsewhere, then docker load)"
            )
        common = {"run_id": run_id, "node_name": self.name, "detached": detached}
        self.sidecars["ldap"] = run_container(
            image=LDAP_IMAGE,
            command=None,
            name=f"pacs-harness-{run_id}-{self.name}-ldap",
            mounts={
                self.workdir / "ldap": "/var/lib/openldap/openldap-data",
                self.workdir / "slapd.d": "/etc/openldap/slapd.d",
            },
            environment={"STORAGE_DIR": "/storage/fs1", "AE_TITLE": self.ae_title},
            **common,
        )
        self.sidecars["db"] = run_container(
            image=DB_IMAGE,
            command=None,
            name=f"pacs-harness-{run_id}-{self.name}-db",
            mounts={self.workdir / "db": "/var/lib/postgresql/data"},
            environment=DB_ENV,
            **common,
        )
        self.handle = run_container(
            image=self.image(),
            command=None,
            name=f"pacs-harness-{run_id}-{self.name}",
            mounts={
                self.workdir / "wildfly": "/opt/wildfly/standalone",
                self.workdir / "storage": "/storage",
            },
            environment={
                **DB_ENV,
                "LDAP_URL": "ldap://127.0.0.1:389",
                "POSTGRES_HOST": "127.0.0.1",
                "WILDFLY_CHOWN": "/opt/wildfly/standalone /storage",
                "WILDFLY_WAIT_FOR": "127.0.0.1:389 127.0.0.1:5432",
            },
            **common,
        )

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        # WildFly deploys the archive in one to three minutes
        super().wait_ready(max(timeout_s, 300.0))

    def ready(self) -> bool:
        try:
            rsp = requests.get(f"{self.http_url}/dcm4chee-arc/ui2/", timeout=5)
        except requests.RequestException:
            return False
        return rsp.status_code < 500 and super().ready()

    def version(self) -> str:
        return f"dcm4chee-arc ({self.image()})"

    def _wipe(self) -> None:
        """No bulk delete over DICOM: restart the containers on empty data directories."""
        run_id = "wipe"
        handles = [self.handle, *self.sidecars.values()]
        for handle in handles:
            if isinstance(handle, ContainerHandle):
                run_id = handle._container().labels.get("pacs-harness.run", run_id)
        self.stop()
        self.sidecars = {}
        for sub in ("ldap", "slapd.d", "db", "wildfly", "storage"):
            shutil.rmtree(self.workdir / sub, ignore_errors=True)
        self.prepare(self.peers)
        self.start(run_id=run_id)
        self.wait_ready()
