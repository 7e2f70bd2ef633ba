"""Orthanc launched as a process from the installed Debian package.

The configuration is generated per node into its work directory: AE title, ports, storage,
the DICOMweb plugin, and the DICOM modalities table filled with every other node of the
topology (and the harness itself), so C-MOVE between any two nodes works without hand edits.

Exposure (a harness pointed at a hospital network must not open a door into it):
- DICOM: only the modalities table may associate (every `DicomAlwaysAllow*` off), from the
  host it is declared on (`DicomCheckModalityHost`), to this node's AE title
  (`DicomCheckCalledAet`); anything else gets an A-ASSOCIATE-RJ (PS3.8 9.3.4).
- HTTP: `RemoteAccessAllowed: false` (non-loopback clients get 403) and HTTP Basic
  authentication with a login generated per launch, kept on the node (and in a detached
  cluster's state file), never printed.
- Binding: Debian's Orthanc 1.10.1 has no option for the listening address, neither DICOM
  nor HTTP (none in the configuration `Orthanc --config=FILE` writes), so both ports listen
  on 0.0.0.0. The two checks above are what keeps other hosts out.

DICOM TLS (PS3.15 B.1), `tls: {generate: true}`: `DicomTlsEnabled` with the node's generated
certificate, the run's CA (and the `tls.ca` of external TLS peers) as
`DicomTlsTrustedCertificates` (for clients and for the peers it calls), and
`DicomTlsRemoteCertificateRequired` from `tls.client_certificate` ("required": true;
"optional" and "none": false, where Orthanc still asks for a certificate and checks one that
is presented). Orthanc has one DICOM port: with TLS on it speaks TLS only, a plaintext
A-ASSOCIATE-RQ gets no answer but a closed connection. Peers that take TLS get
`"UseDicomTls": true` in `DicomModalities`, so its C-MOVEs to them are TLS too.
Orthanc 1.10.1 (Debian, DCMTK 3.6.7) has no setting for the DICOM TLS protocol versions or
ciphers (only the HTTP server's `SslMinimumProtocolVersion`); what it takes matches DCMTK's
non-downgrading BCP 195 profile. Measured with `openssl s_client`: TLS 1.0 and 1.1
get a handshake-failure alert; TLS 1.3 is accepted (TLS_AES_128_GCM_SHA256,
TLS_AES_256_GCM_SHA384, TLS_CHACHA20_POLY1305_SHA256); TLS 1.2 only with an RSA certificate
(ECDHE-RSA- and DHE-RSA-AES128/256-GCM), so with the run's ECDSA P-256 certificates
(harness/security/certificates.py) Orthanc speaks TLS 1.3 only. Either way min_version "1.2"
and "1.3" hold (nothing older is taken); "1.0" or "1.1" cannot be honoured and are refused at
prepare (ConfigError) rather than launched with a setting Orthanc does not have.

HTTPS (`https: true`, RFC 9110 4.2.2): Orthanc's own `SslEnabled` cannot be used with the
Debian build. Its HTTP server is Debian's libcivetweb 1.15, which loads OpenSSL at run time
by the 1.1 names; OpenSSL 3 has no `SSL_get_peer_certificate` (a macro now), so the first
HTTPS connection calls a null pointer: Orthanc 1.10.1 segfaults (measured with curl and gdb,
with and without `SslCiphersAccepted` and `SslMinimumProtocolVersion`). So, as for
dcmqrscp's DICOM TLS, HAProxy terminates TLS on the node's HTTP port (127.0.0.1) with the
node's certificate from the run's CA (key and certificate in one 0600 PEM in the workdir),
TLS 1.2 with BCP 195 suites or TLS 1.3, and passes the bytes to Orthanc's plain HTTP on a
loopback port of its own (bound to 0.0.0.0 by civetweb all the same, where
`RemoteAccessAllowed: false` answers other hosts 403). A plain http:// request to the node's
port gets no HTTP answer (the terminator expects a TLS ClientHello and closes).

Storage commitment (PS3.4 J): Orthanc is an SCP since 1.6 (Debian's 1.10.1 included). It
takes an N-ACTION from a modality of `DicomModalities` (per-modality `AllowStorageCommitment`,
default true), answers the N-ACTION-RSP at once, then a job checks each instance in its index
(0x0112 when absent, 0x0119 when stored under another SOP class) and sends the N-EVENT-REPORT
always on a new association, to the requester's `DicomModalities` entry found by AE title,
proposing itself as SCP (SCP/SCU role selection). The harness's entry is Cluster.harness_peer
(PACSHARNESS at 127.0.0.1, the run's harness port), where harness/dicom/commitment.py listens
(measured: the report arrives there while the N-ACTION's association is still open).
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import socket

import requests

from harness.dicom.dicomweb import http_session, request_failed
from harness.errors import ConfigError, EnvironmentProblem
from harness.launch.postgres import PostgresServer
from harness.launch.tls_terminator import (
    haproxy_binary,
    https_config,
    start_node_terminator,
    write_certificate_bundle,
)
from harness.nodes.base import Node, NodeStatistics, Peer, rest_statistics
from harness.nodes.capabilities import Capabilities, ImageRecipe
from harness.security.certificates import write_private  # orthanc.json holds a password

DEBIAN_PLUGIN_DIR = "/usr/share/orthanc/plugins"
DICOMWEB_PLUGIN = "libOrthancDicomWeb.so"
POSTGRESQL_INDEX_PLUGIN = "libOrthancPostgreSQLIndex.so"
#: Orthanc's Modality Worklist plugin (in Debian's `orthanc` package): a C-FIND SCP on the
#: worklist model over the .wl files of its Database folder (harness/workflow/orders.py)
WORKLIST_PLUGIN = "libModalityWorklists.so"


#: the login name of the generated HTTP account (the password is random per launch)
HARNESS_HTTP_USER = "pacs-harness"


def generate_credentials() -> tuple[str, str]:
    """A fresh login for one launched Orthanc (256 bits of randomness)."""
    return HARNESS_HTTP_USER, secrets.token_urlsafe(32)


def peer_ip(host: str) -> str:
    """The IP address Orthanc compares a caller's address with (`DicomCheckModalityHost`
    matches the text of `Host` against the peer's IP, so a name would never match)."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        return socket.gethostbyname(host)
    except OSError:
        return host


def orthanc_configuration(node: Node, peers: list[Peer], plugins: list[str]) -> dict:
    """The JSON configuration Orthanc reads, as a process or in a container."""
    assert node.workdir is not None
    if node.generated_credentials is None:
        node.generated_credentials = generate_credentials()
    user, password = node.generated_credentials
    return {
        "Name": node.name,
        "StorageDirectory": str(node.workdir / "storage"),
        "IndexDirectory": str(node.workdir / "index"),
        "DicomAet": node.ae_title,
        "DicomPort": node.dicom_port,
        "HttpPort": node.http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {user: password},
        "DicomServerEnabled": True,
        "HttpServerEnabled": True,
        "DicomCheckCalledAet": True,
        "DicomCheckModalityHost": True,
        "DicomAlwaysAllowEcho": False,
        "DicomAlwaysAllowStore": False,
        "DicomAlwaysAllowFind": False,
        "DicomAlwaysAllowFindWorklist": False,
        "DicomAlwaysAllowGet": False,
        "DicomAlwaysAllowMove": False,
        "UnknownSopClassAccepted": True,
        "DicomModalities": {peer.name: modality(peer) for peer in peers},
        "DicomModalitiesInDatabase": False,
        "OrthancPeers": {},
        "OverwriteInstances": True,
        "StableAge": 2,
        "SaveJobs": False,
        "ConcurrentJobs": 2,
        "LimitFindResults": 0,
        "LimitFindInstances": 0,
        "DicomScuTimeout": 30,
        "HttpTimeout": 60,
        "DeidentifyLogs": True,
        "LogExportedResources": False,
        "Plugins": plugins,
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True},
        "Worklists": {"Enable": True, "Database": str(node.workdir / "worklists")},
        **tls_configuration(node),
    }


def modality(peer: Peer) -> dict:
    """One `DicomModalities` entry; a TLS peer is called over TLS (UseDicomTls, Orthanc 1.9)."""
    entry: dict = {"AET": peer.ae_title, "Host": peer_ip(peer.host), "Port": peer.port}
    if peer.tls:
        entry["UseDicomTls"] = True
    return entry


#: tls.min_version values Orthanc 1.10.1 honours: it takes nothing older (module docstring)
ORTHANC_TLS_MIN_VERSIONS = ("1.2", "1.3")


def tls_configuration(node: Node) -> dict:
    """The DICOM TLS settings of a node declaring `tls:` (module docstring), else none."""
    tls = node.spec.tls
    if tls is None:
        return {}
    if tls.min_version not in ORTHANC_TLS_MIN_VERSIONS:
        raise ConfigError(
            f"node {node.name}: tls.min_version {tls.min_version!r} cannot be honoured by "
            "Orthanc 1.10.1 (its DICOM TLS has no version setting and refuses TLS older than "
            "1.2); use min_version: \"1.2\""
        )
    material = node.tls_material
    if material is None:
        raise EnvironmentProblem(f"node {node.name}: its TLS certificates were not generated")
    return {
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": str(material.certificate_file),
        "DicomTlsPrivateKey": str(material.key_file),
        "DicomTlsTrustedCertificates": node.trusted_ca_file(),
        "DicomTlsRemoteCertificateRequired": tls.client_certificate == "required",
    }


class OrthancNode(Node):
    """Orthanc as a process or container; `index: postgresql` adds a PostgreSQL sidecar."""

    kind = "orthanc"
    has_process = True
    capabilities = Capabilities(
        query_levels=("PATIENT", "STUDY", "SERIES", "IMAGE"),
        retrieve_methods=("C-MOVE", "C-GET", "WADO-RS"),
        orthanc_rest=True,
        dicomweb=("QIDO-RS", "WADO-RS", "STOW-RS"),
        dicomweb_root="/dicom-web",  # the DicomWeb.Root the generated configuration sets
        keeps_stored_syntax=True,
        reports_sop_classes_in_study=True,
        index_backends=("sqlite", "postgresql"),
        own_fields=("orthanc_config",),
        binaries=(("Orthanc", "apt-get install orthanc orthanc-dicomweb"),),
        tls=True,
        https=True,  # behind a TLS terminator (module docstring)
        storage_commitment=True,  # SCP since 1.6 (module docstring)
        worklist=True,  # its worklist plugin (WORKLIST_PLUGIN); Orthanc has no MPPS SCP
        image_recipe=ImageRecipe(("orthanc", "orthanc-dicomweb", "orthanc-postgresql")),
    )
    image_program = ("/usr/sbin/Orthanc",)
    dcmtk_network = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.postgres_port: int | None = None
        # with `https: true`: Orthanc's own plain HTTP port, behind the TLS terminator
        self.http_server_port: int | None = None

    def prepare(self, peers: list[Peer]) -> None:
        super().prepare(peers)
        assert self.workdir is not None
        for sub in ("storage", "index", "worklists"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        plugins = [DICOMWEB_PLUGIN, WORKLIST_PLUGIN]
        if self.spec.index == "postgresql":
            from harness.launch.ports import free_port

            self.postgres_port = free_port()
            plugins.append(POSTGRESQL_INDEX_PLUGIN)
        if self.spec.launch == "docker":
            plugin_paths = [f"{DEBIAN_PLUGIN_DIR}/{p}" for p in plugins] if self.local_image else []
        else:
            plugin_paths = [f"{DEBIAN_PLUGIN_DIR}/{p}" for p in plugins]
            missing = [p for p in plugin_paths if not os.path.exists(p)]
            if missing:
                raise EnvironmentProblem(
                    f"node {self.name}: Orthanc plugin {missing[0]} not installed "
                    "(install: apt-get install orthanc orthanc-dicomweb orthanc-postgresql)"
                )
        config = orthanc_configuration(self, self.peers, plugin_paths)
        if self.spec.https:
            from harness.launch.ports import free_port

            haproxy_binary(f"node {self.name}", "HTTPS")  # missing: say so before starting
            self.http_server_port = self.http_server_port or free_port("127.0.0.1")
            config["HttpPort"] = self.http_server_port
            # the URLs the DICOMweb plugin writes in its answers (RetrieveURL, PS3.18 10.5.3)
            # say https: it cannot see the terminator
            config["DicomWeb"] = {**config["DicomWeb"], "Ssl": True}
        if self.postgres_port:
            config["PostgreSQL"] = {
                **PostgresServer(self.workdir / "pg", self.postgres_port).dsn(),
                "EnableIndex": True,
                "EnableStorage": False,
                "Lock": False,
            }
        config.update(self.spec.orthanc_config)  # the topology's own settings win
        write_private(self.workdir / "orthanc.json", json.dumps(config, indent=2))

    @property
    def worklist_dir(self):
        """The worklist plugin's folder of .wl entries (harness/workflow/orders.py)."""
        return self.workdir / "worklists" if self.workdir else None

    def data_directories(self) -> tuple[str, ...]:
        # with index: postgresql the index lives in PostgreSQL (the DR drill pg_dumps it)
        return ("storage",) if self.spec.index == "postgresql" else ("storage", "index")

    def program(self) -> list[str]:
        return [self.require_binary("Orthanc")]

    def arguments(self) -> list[str]:
        return [str(self.workdir / "orthanc.json")]

    def container_mounts(self) -> dict:
        mounts = super().container_mounts()
        if not self.local_image:  # the official image reads /etc/orthanc/*.json
            mounts[self.workdir / "orthanc.json"] = "/etc/orthanc/orthanc.json"
        return mounts

    def container_environment(self) -> dict[str, str]:
        if self.local_image:
            return {}
        env = {"DICOM_WEB_PLUGIN_ENABLED": "true", "WORKLISTS_PLUGIN_ENABLED": "true"}
        if self.postgres_port:
            env["POSTGRESQL_PLUGIN_ENABLED"] = "true"
        return env

    def start_sidecars(self, *, detached: bool) -> None:
        if self.postgres_port:
            postgres = PostgresServer(self.workdir / "pg", self.postgres_port)
            postgres.start(detached=detached)
            self.sidecars["postgres"] = postgres.handle
        if self.spec.https:
            self._start_https_terminator(detached=detached)

    def _start_https_terminator(self, *, detached: bool) -> None:
        """HAProxy with the node's certificate on its HTTP port (module docstring)."""
        assert self.workdir is not None and self.http_port is not None
        public = (self.host, self.http_port)

        def config() -> str:
            if self.tls_material is None:
                raise EnvironmentProblem(f"node {self.name}: its HTTPS certificate was not "
                                         "generated")
            bundle = write_certificate_bundle(self.tls_material,
                                              self.workdir / "https-certificate.pem")
            return https_config(public, self.http_server_port, bundle)

        attached = self.http_server_port is None  # from saved state (`up`): launch's files
        popen, self.sidecars["https-terminator"] = start_node_terminator(
            self.name, self.workdir, public, None if attached else config,
            detached=detached, what="HTTPS",
        )
        self.reap_on_stop.append(popen)

    def ready(self) -> bool:
        """GET /system answers 200, then C-ECHO. An HTTPS certificate the harness refuses
        (e.g. `tls.certificate_names` without the host) still proves the server up: it is
        up with `tls_warning`, for the rest check to name (never retried unverified)."""
        try:
            session = http_session(self._http_auth(), self.http_verify(),
                                   self.http_server_name())
            rsp = session.get(f"{self.http_url}/system", timeout=5, verify=session.verify)
        except requests.exceptions.SSLError as exc:
            problem = request_failed(self.name, f"HTTP {self.http_url}", exc)
            if "certificate verify failed" not in str(problem):
                raise problem from None
            up = super().ready()  # may set its own DICOM TLS warning: keep both
            http_warning, dicom_warning = str(problem), self.tls_warning
            if not dicom_warning:
                self.tls_warning = http_warning
            elif http_warning not in dicom_warning:
                self.tls_warning = f"{dicom_warning}; {http_warning}"
            return up
        except requests.RequestException as exc:
            raise request_failed(self.name, f"HTTP {self.http_url}", exc) from None
        return rsp.status_code == 200 and super().ready()

    def version(self) -> str:
        try:
            return f"Orthanc {self.rest().system()['Version']}"
        except (EnvironmentProblem, KeyError):
            return "Orthanc (version unknown)"

    def _wipe(self) -> None:
        self.rest().delete_all()

    def statistics(self) -> NodeStatistics:
        return rest_statistics(self.rest())
