"""PixelMed's DicomAndWebStorageServer (Debian's libpixelmed-java), launched as a process.

An independent Java Q/R archive (docs/research/node-kinds-2026-12.md, section 1): the
generated server.properties names its port, AE title, HSQLDB index, image folder, web
server port and every peer of the topology as a C-MOVE destination (`Dicom.RemoteAEs`,
read at start-up; an unknown destination is refused with A801, PS3.4 C.4.2.1.5).

It binds its DICOM and HTTP ports on every address and announces itself over mDNS (UDP
5353), and no property turns that off, so it runs in a network namespace of its own with
only loopback (harness/launch/netns.py): the harness reaches 127.0.0.1:<dicom_port>
through an HAProxy relay, and the server reaches its peers at their real loopback
addresses through the same relays. As a container (`launch: docker`, an image of the
Debian packages and HAProxy) the namespace is the container's, with Docker's network mode
`none`; the relays and sockets are the same. The web server (WADO-URI, PS3.18 9, and HTML lists;
no DICOMweb RS) is relayed on `wado_uri_port`, which is not the node's `http_port`: the
harness's HTTP port means Orthanc REST or DICOMweb, which it has not.

Measured here and declared: C-FIND at PATIENT..IMAGE (patient and study root), SOP Classes
in Study returned, C-MOVE and C-GET, every uncompressed syntax stored as received (Implicit,
Explicit and Big Endian, Deflated) and no compressed one, a C-GET answered in the first
context it accepted, no association limit met, the calling AE title not checked, no TLS
(its peers that take TLS only cannot be C-MOVE destinations), no audit trail.

Parallel C-STOREs keep every file but not its index: 3 instances of a new study stored over
2 associations were listed by its C-FIND as 3 studies (9 series, 27 images in a walk of the
hierarchy); over 1 association, as 1 study. So the harness stores into it over one
association (`store_associations=1`), as into dcmqrscp.

A SIGTERM does not shut its HSQLDB index down (the JVM exited 0, the index's log not
checkpointed): with HSQLDB's default write delay, an instance stored just before the stop
had its file but no index row after a restart. So the index is opened with
`hsqldb.write_delay=false` (each commit on disk); a restart then lists it.

There is no delete over DICOM or HTTP, and the HSQLDB index is held open by the server, so
a wipe restarts it on empty folders (a process started by `up` and wiped from another
command then runs under a pid that state.json does not hold; a container is stopped and
started again, its id unchanged).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

from harness.errors import EnvironmentProblem
from harness.launch import netns
from harness.launch.ports import free_port
from harness.launch.process import spawn
from harness.nodes.base import HeldStatistics, Node, Peer, files_statistics
from harness.nodes.capabilities import Capabilities, ImageRecipe
from harness.nodes.orthanc import peer_ip

JAR = Path("/usr/share/java/pixelmed.jar")
SERVER_CLASS = "com.pixelmed.server.DicomAndWebStorageServer"
PACKAGE = "libpixelmed-java"
#: each index change written to disk at commit; HSQLDB's default (0.5 s later) lost what was
#: stored just before a SIGTERM, which PixelMed does not turn into a database shutdown
INDEX_DURABILITY = "hsqldb.write_delay=false"
ISOLATION_FILE = "netns.json"  # the ports and peers of its namespace, for a restart


def _property_name(number: int, name: str) -> str:
    """A peer's local name in Dicom.RemoteAEs (a space-separated list of names): its
    topology name in letters, digits and '_', numbered so two names never meet."""
    return f"p{number}_" + re.sub(r"[^A-Za-z0-9_]", "_", name)


def _property_value(value: str) -> str:
    """A java.util.Properties value: backslashes escaped, leading spaces kept."""
    escaped = value.replace("\\", "\\\\")
    return "\\" + escaped if escaped.startswith(" ") else escaped


class PixelmedNode(Node):
    kind = "pixelmed"
    has_process = True
    capabilities = Capabilities(
        query_levels=("PATIENT", "STUDY", "SERIES", "IMAGE"),
        retrieve_methods=("C-MOVE", "C-GET"),
        # files keep the syntax they came in, but its C-GET sends over the first context
        # it accepted (stored Implicit VR, offered Explicit first: Explicit came back)
        keeps_stored_syntax=False,
        reports_sop_classes_in_study=True,
        store_associations=1,  # parallel C-STOREs of a new study duplicate it (docstring)
        launches=("process", "docker"),
        binaries=(("java", "apt-get install openjdk-17-jre-headless libpixelmed-java"),),
        image_recipe=ImageRecipe(("openjdk-17-jre-headless", PACKAGE, "haproxy")),
    )
    image_program = ("/usr/bin/java",)

    @property
    def database_dir(self) -> Path:
        return self.workdir / "db"

    @property
    def images_dir(self) -> Path:
        return self.workdir / "images"

    @property
    def wado_uri_port(self) -> int | None:
        """Its web server's port on 127.0.0.1 (WADO-URI), relayed like the DICOM port."""
        saved = self._isolation_settings()
        return saved["web_port"] if saved else None

    def data_directories(self) -> tuple[str, ...]:
        return ("db", "images")  # the HSQLDB index and the Part 10 files it lists

    def prepare(self, peers: list[Peer]) -> None:
        """server.properties with every peer as a C-MOVE destination, at the address the
        server reaches it by from inside its namespace (its real loopback address)."""
        super().prepare(peers)
        who = f"node {self.name}"
        if self.spec.launch != "docker":  # a container has them, and is the namespace
            if not JAR.is_file():
                raise EnvironmentProblem(
                    f"{who}: {JAR} not found (install: apt-get install {PACKAGE})")
            self.require_binary("java")
            netns.check_environment(who)
        self.database_dir.mkdir(parents=True, exist_ok=True)
        self.images_dir.mkdir(parents=True, exist_ok=True)
        saved = self._isolation_settings()
        web_port = saved["web_port"] if saved else free_port("127.0.0.1")
        outbound = [(peer_ip(p.host), p.port) for p in self.peers]
        settings = {"inbound": [self.dicom_port, web_port], "outbound": outbound,
                    "web_port": web_port}
        self._isolation(settings)  # peers sharing an inside address: ConfigError now
        (self.workdir / ISOLATION_FILE).write_text(json.dumps(settings, indent=2))
        lines = [
            f"# generated by pacs-harness for node {self.name}",
            f"Dicom.ListeningPort={self.dicom_port}",
            f"Dicom.CalledAETitle={_property_value(self.ae_title)}",
            f"Dicom.CallingAETitle={_property_value(self.ae_title)}",
            "Dicom.PrimaryDeviceType=ARCHIVE",
            # HSQLDB's JDBC URL is "jdbc:hsqldb:" + this name; its URL properties follow a
            # ';' (write_delay: see the module docstring)
            "Application.DatabaseFileName="
            + _property_value(f"{self.database_dir / 'database'};{INDEX_DURABILITY}"),
            f"Application.SavedImagesFolderName={_property_value(str(self.images_dir))}",
            f"WebServer.ListeningPort={web_port}",
            "WebServer.NumberOfWorkers=2",
            "Dicom.RemoteAEs="
            + " ".join(_property_name(n, p.name) for n, p in enumerate(self.peers)),
        ]
        for number, (peer, (host, port)) in enumerate(zip(self.peers, outbound, strict=True)):
            inside_host, inside_port = netns.IsolatedServer.inside_address(host, port)
            key = f"Dicom.RemoteAEs.{_property_name(number, peer.name)}"
            lines += [
                f"{key}.CalledAETitle={_property_value(peer.ae_title)}",
                f"{key}.HostNameOrIPAddress={inside_host}",
                f"{key}.Port={inside_port}",
                f"{key}.QueryModel=STUDYROOT",
                f"{key}.PrimaryDeviceType=ARCHIVE",
            ]
        (self.workdir / "server.properties").write_text("\n".join(lines) + "\n")

    def _isolation_settings(self) -> dict | None:
        path = self.workdir / ISOLATION_FILE if self.workdir else None
        return json.loads(path.read_text()) if path and path.is_file() else None

    def _isolation(self, settings: dict | None = None) -> netns.IsolatedServer:
        settings = settings or self._isolation_settings()
        if settings is None:
            raise EnvironmentProblem(f"node {self.name}: {ISOLATION_FILE} missing in "
                                     f"{self.workdir} (it was never prepared)")
        return netns.IsolatedServer(
            self.name, self.workdir, settings["inbound"],
            [tuple(peer) for peer in settings["outbound"]],
        )

    def start_sidecars(self, *, detached: bool) -> None:
        """The relay outside the namespace, listening before the server starts."""
        popen, self.sidecars["netns-relay"] = self._isolation().start_relay(detached=detached)
        self.reap_on_stop.append(popen)

    def program(self) -> list[str]:
        return [self.require_binary("java")]

    def arguments(self) -> list[str]:
        return ["-Xmx256m", "-cp", str(JAR), SERVER_CLASS, "server.properties"]

    def command(self) -> list[str]:
        """java in its own network namespace, behind the inside relay (harness/launch/netns.py)."""
        return self._isolation().command([*self.program(), *self.arguments()])

    def start(self, *, detached: bool = False, run_id: str = "harness") -> None:
        """As a process: Node.start. As a container: the relay, then the container with no
        network but `lo` (harness/launch/netns.py)."""
        if self.spec.launch != "docker":
            super().start(detached=detached, run_id=run_id)
            return
        self.start_sidecars(detached=detached)
        self.handle = self._run_container(run_id, detached)

    def _run_container(self, run_id: str, detached: bool):
        return netns.run_isolated_container(
            self, self._isolation(), [*self.image_program, *self.arguments()],
            run_id=run_id, detached=detached,
        )

    def stop(self) -> None:
        """SIGTERM (the JVM exits by itself: 0 measured in the namespace, 143 in the
        research notes; its index is on disk at each commit), then the relay; the relays'
        socket directory is removed."""
        inside = netns.inside_processes(self.handle)
        super().stop()
        netns.wait_gone(inside)
        if self._isolation_settings() is not None:
            self._isolation().remove_socket_dir()

    def version(self) -> str:
        in_container = netns.container_package_version(self.handle, PACKAGE)
        if in_container:
            return f"PixelMed DicomAndWebStorageServer ({PACKAGE} {in_container}, container)"
        try:
            out = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", PACKAGE],
                                 capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            out = None
        if out is not None and out.returncode == 0 and out.stdout.strip():
            return f"PixelMed DicomAndWebStorageServer ({PACKAGE} {out.stdout.strip()})"
        jar = JAR.resolve().name if JAR.exists() else "not installed"
        return f"PixelMed DicomAndWebStorageServer ({jar})"

    def held_statistics(self) -> HeldStatistics:
        """Its image folder, every file read with pydicom (the HSQLDB index is what its
        C-FIND answers from, so it is not what is counted)."""
        return files_statistics(
            [p for p in self.images_dir.rglob("*") if p.is_file()],
            f"files of PixelMed's image folder {self.images_dir} read with pydicom",
        )

    def _empty_folders(self) -> None:
        for folder in (self.database_dir, self.images_dir):
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()

    def _wipe(self) -> None:
        """No delete over DICOM or HTTP and the index is held open: stop the server (not
        its relay), empty both folders, start it again and wait until it answers."""
        if self.spec.launch == "docker":  # the same container, stopped and started again
            netns.restart_container(self, self._empty_folders)
            self.wait_ready()
            return
        detached = self._popen is None  # started by `up` (attached from its state)
        inside = netns.inside_processes(self.handle)
        if self.handle is not None:
            self.handle.stop()
        if self._popen is not None:
            self._popen.wait(timeout=10)
        netns.wait_gone(inside)
        self._empty_folders()
        self._popen, self.handle = spawn(
            self.command(), log_path=self.log_path, cwd=self.workdir, detached=detached,
        )
        self.wait_ready()
