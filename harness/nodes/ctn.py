"""CTN's archive_server (Debian package `ctn`), a classic Q/R archive on MariaDB.

archive_server keeps its configuration and its index in MySQL/MariaDB, so each node gets a
MariaDB of its own (harness/launch/mariadb.py), started as a sidecar: the control tables
and one DIM database are created from the scripts CTN ships (/usr/share/ctn/mysql), then
filled from the topology. archive_server finds the server through MYSQL_UNIX_PORT (it
connects to "localhost" with the compiled-in login ctn/ctn). What was measured is in
docs/research/node-kinds-2026-12.md section 2; the points that shape this adapter:

- `-r` (no FIS database) is required, and options taking a value other than `-f` print
  the usage (`-n`, `-l`, `-o`, `-g`), so the node name is always gethostname(): the node's
  own ApplicationEntity row carries that name.
- It exits 0 on a fatal start-up error: readiness is a C-ECHO, and a process that has
  exited is reported with its log tail (Node.wait_ready).
- Files are written as Implicit VR Little Endian data sets without a Part 10 header
  (`STORAGE/PART10FLAG 0` in the global /etc/ctn/runtime/ctn_cfg.txt); pydicom reads them
  with force=True. Only uncompressed transfer syntaxes are accepted.

Exposure: archive_server listens on 0.0.0.0 (no option for the address), so it runs in a
network namespace of its own with only loopback (harness/launch/netns.py): the harness and
the peers reach it on 127.0.0.1:<dicom_port> through HAProxy relays, and it reaches its
C-MOVE destinations at their loopback addresses through the same relays; its MariaDB socket
is a file, which crosses namespaces. Inside, every caller comes from 127.0.0.1 (the relay),
which CTN checks against the caller's ApplicationEntity row: peers at 127.0.0.1 (the
launched ones and the harness) pass, a peer at another address could not call in, though
it can be a C-MOVE destination. As a container (`launch: docker`, an image of Debian's ctn
and HAProxy) the namespace is the container's (Docker's network mode `none`), MariaDB stays
on the host, its socket directory mounted at the same path, and the container's host name is
this machine's, the name of the node's own ApplicationEntity row. Who may associate is its
SecurityMatrix: one row per topology peer (every node and the harness); a calling AE title
with no row is refused with an A-ASSOCIATE-RJ (CTN gives reason 7, "called AE title not
recognized", also when it is the calling title it refuses; PS3.8 9.3.4 has reason 3). No
TLS, so no C-MOVE to a peer that takes TLS only.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from pathlib import Path

from harness.errors import EnvironmentProblem
from harness.launch import netns
from harness.launch.mariadb import INSTALL_HINT, MariadbServer, socket_directory
from harness.nodes.base import HeldStatistics, Node, Peer, files_statistics
from harness.nodes.capabilities import Capabilities, ImageRecipe
from harness.nodes.orthanc import peer_ip

CTN_SCRIPTS = Path("/usr/share/ctn/mysql")
CONTROL_DATABASE = "CTNControl"  # archive_server's default (-f)
DIM_DATABASE = "CTNDIM"
#: the DIM tables, children first (what a wipe empties)
DIM_TABLES = ("InstanceTable", "ImageLevel", "SeriesLevel", "StudyLevel", "PatientLevel")
CONTROL_TABLES = ("ApplicationEntity", "StorageAccess", "StorageControl", "SecurityMatrix")
ORGANIZATION = "pacs-harness"
ACCESS_READ_WRITE = 3  # StorageAccess.Access, last digit: anyone (the matrix decides who)
ISOLATION_FILE = "netns.json"  # its namespace's port and peers, for a restart


def _quoted(value: object) -> str:
    """An SQL literal (AE titles, host names, paths: no quote or backslash expected)."""
    text = str(value).replace("\\", "\\\\").replace("'", "''")
    return f"'{text}'"


def _row(*values: object) -> str:
    return "(" + ", ".join(_quoted(v) if isinstance(v, str) else str(v) for v in values) + ")"


class CtnNode(Node):
    kind = "ctn"
    has_process = True
    capabilities = Capabilities(
        query_levels=("PATIENT", "STUDY", "SERIES", "IMAGE"),
        retrieve_methods=("C-MOVE", "C-GET"),
        # it stores everything as Implicit VR LE and its C-GET returns that, as held
        keeps_stored_syntax=True,
        reports_sop_classes_in_study=False,  # the DIM tables hold no SOP classes per study
        # parallel C-STOREs of one patient race in the DIM tables: 0xA700 for 12 of 32
        # studies stored over 4 associations (docs/research/node-kinds-2026-12.md)
        store_associations=1,
        launches=("process", "docker"),
        image_recipe=ImageRecipe(("ctn", "haproxy")),
        binaries=(
            ("archive_server", "apt-get install ctn"),
            ("mariadbd", INSTALL_HINT),
            ("mariadb", INSTALL_HINT),
        ),
    )

    @property
    def storage_dir(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "store"

    def mariadb(self) -> MariadbServer:
        assert self.workdir is not None
        return MariadbServer(self.workdir / "mariadb")

    def data_directories(self) -> tuple[str, ...]:
        # InstanceTable holds absolute file paths and the index lives in MariaDB: the DR
        # drill's copy of directories would not restore it
        return ()

    # -- configuration ---------------------------------------------------------------------
    def prepare(self, peers: list[Peer]) -> None:
        """The control rows, written as SQL that start_sidecars applies (on every start)."""
        super().prepare(peers)
        for program, _hint in self.capabilities.binaries:  # missing: exit 3 before any start
            if program != "archive_server" or self.spec.launch != "docker":
                self.require_binary(program)
        if self.spec.launch != "docker":  # a container is a namespace of its own
            netns.check_environment(f"node {self.name}")
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        titles: dict[str, Peer] = {}
        for peer in self.peers:
            titles.setdefault(peer.ae_title, peer)
        callers = list(titles.values())
        outbound = [(peer_ip(p.host), p.port) for p in callers]
        settings = {"inbound": [self.dicom_port], "outbound": outbound}
        self._isolation(settings)  # peers sharing an inside address: ConfigError now
        (self.workdir / ISOLATION_FILE).write_text(json.dumps(settings, indent=2))
        own = self.ae_title
        entities = [_row(own, socket.gethostname(), self.dicom_port, f"node {self.name}",
                         ORGANIZATION)]
        for peer, (host, port) in zip(callers, outbound, strict=True):
            inside_host, inside_port = netns.IsolatedServer.inside_address(host, port)
            entities.append(_row(peer.ae_title, inside_host, inside_port, peer.name[:80],
                                 ORGANIZATION))
        statements = [f"DELETE FROM {table};" for table in CONTROL_TABLES]
        statements.append("INSERT INTO ApplicationEntity VALUES " + ", ".join(entities) + ";")
        statements.append(
            "INSERT INTO StorageAccess VALUES "
            + _row(own, DIM_DATABASE, own, "", ACCESS_READ_WRITE, "") + ";"
        )
        if callers:
            statements.append(
                "INSERT INTO StorageControl VALUES "
                + ", ".join(_row(p.ae_title, own, "", str(self.storage_dir), "", "")
                            for p in callers) + ";"
            )
            statements.append(
                "INSERT INTO SecurityMatrix VALUES "
                + ", ".join(_row(p.ae_title, own) for p in callers) + ";"
            )
        (self.workdir / "control.sql").write_text("\n".join(statements) + "\n")

    def _isolation(self, settings: dict | None = None) -> netns.IsolatedServer:
        assert self.workdir is not None
        path = self.workdir / ISOLATION_FILE
        if settings is None:
            if not path.is_file():
                raise EnvironmentProblem(
                    f"node {self.name}: {path} missing (the node was never prepared)")
            settings = json.loads(path.read_text())
        return netns.IsolatedServer(self.name, self.workdir, settings["inbound"],
                                    [tuple(peer) for peer in settings["outbound"]])

    def start_sidecars(self, *, detached: bool) -> None:
        """MariaDB, its databases and tables (created once), the control rows (each start);
        then the relay into archive_server's network namespace."""
        if not (CTN_SCRIPTS / "CreateControlTables.script").exists():
            raise EnvironmentProblem(
                f"node {self.name}: {CTN_SCRIPTS}/CreateControlTables.script not found "
                "(install: apt-get install ctn)"
            )
        server = self.mariadb()
        server.start(detached=detached)
        self.sidecars["mariadb"] = server.handle
        self.reap_on_stop.append(server.popen)
        try:
            self._create_databases(server)
            control = self.workdir / "control.sql"
            if control.exists():
                server.sql(control.read_text(), CONTROL_DATABASE)
            popen, self.sidecars["netns-relay"] = self._isolation().start_relay(
                detached=detached)
            self.reap_on_stop.append(popen)
        except BaseException:
            server.stop()
            raise

    def _create_databases(self, server: MariadbServer) -> None:
        existing = set(server.sql("SHOW DATABASES").split())
        server.sql(
            "CREATE USER IF NOT EXISTS 'ctn'@'localhost' IDENTIFIED BY 'ctn';\n"
            + "".join(
                f"CREATE DATABASE IF NOT EXISTS {db};\nGRANT ALL ON {db}.* TO 'ctn'@'localhost';\n"
                for db in (CONTROL_DATABASE, DIM_DATABASE)
            )
        )
        for database, script in ((CONTROL_DATABASE, "CreateControlTables.script"),
                                 (DIM_DATABASE, "CreateDIMTables.script")):
            if database not in existing:
                server.sql((CTN_SCRIPTS / script).read_text(), database)

    def program(self) -> list[str]:
        return [self.require_binary("archive_server")]

    def arguments(self) -> list[str]:
        # -r: no FIS database (without it every association is dropped); -q: no data set
        # dumps on stdout
        return ["-r", "-q", str(self.dicom_port)]

    def command(self) -> list[str]:
        """archive_server in its own network namespace, behind the inside relay."""
        return self._isolation().command([*self.program(), *self.arguments()])

    image_program = ("/usr/bin/archive_server",)

    def start(self, *, detached: bool = False, run_id: str = "harness") -> None:
        """As a process: Node.start. As a container: MariaDB and the relay on the host,
        then the container with no network but `lo` and MariaDB's socket directory."""
        if self.spec.launch != "docker":
            super().start(detached=detached, run_id=run_id)
            return
        self.start_sidecars(detached=detached)
        database_sockets = self.mariadb().socket.parent
        self.handle = netns.run_isolated_container(
            self, self._isolation(), [*self.image_program, *self.arguments()],
            run_id=run_id, detached=detached,
            mounts={database_sockets: str(database_sockets)},
            environment=self.network_environment(), hostname=socket.gethostname(),
        )

    def network_environment(self) -> dict[str, str]:
        """Where archive_server's database is: libmariadb takes the socket from
        MYSQL_UNIX_PORT when CTN connects to "localhost" (port 0)."""
        assert self.workdir is not None
        return {
            "MYSQL_UNIX_PORT": str(self.mariadb().socket),
            "CTN_MYSQL_SERVER": "localhost",
            "CTN_MYSQL_SERVER_PORT": "0",
        }

    def stop(self) -> None:
        """archive_server (its process group: forked children, the inside relay), then
        MariaDB and the outside relay; their socket directories are removed."""
        super().stop()
        if self.workdir is not None:
            shutil.rmtree(socket_directory(self.workdir / "mariadb"), ignore_errors=True)
            if (self.workdir / ISOLATION_FILE).is_file():
                self._isolation().remove_socket_dir()

    def version(self) -> str:
        in_container = netns.container_package_version(self.handle, "ctn")
        if in_container:
            return f"CTN archive_server {in_container} (container)"
        try:
            out = subprocess.run(
                ["dpkg-query", "-W", "-f=${Version}", "ctn"],
                capture_output=True, text=True, timeout=30,
            )
        except (OSError, subprocess.TimeoutExpired):
            return "CTN archive_server"
        return f"CTN archive_server {out.stdout.strip()}" if out.returncode == 0 else (
            "CTN archive_server (not installed)"
        )

    # -- chores ------------------------------------------------------------------------------
    def held_statistics(self) -> HeldStatistics:
        """The storage folder, every file read with pydicom (force: CTN writes data sets
        without a Part 10 header); not the DIM tables its C-FIND answers from."""
        folder = self.storage_dir
        return files_statistics(
            [p for p in folder.rglob("*") if p.is_file()],
            f"files of CTN's storage folder {folder} read with pydicom", force=True,
        )

    def _wipe(self) -> None:
        """Empty the DIM tables (each association reads them afresh), then the folder."""
        self.mariadb().sql("".join(f"DELETE FROM {t};\n" for t in DIM_TABLES), DIM_DATABASE)
        for child in self.storage_dir.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()

