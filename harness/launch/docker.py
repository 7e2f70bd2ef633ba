"""Run a node as a Docker container: host networking on 127.0.0.1, labelled, always removed.

Containers never use the Docker bridge (it sits on 172.17.x); they share the host's network
and listen on the loopback ports the harness picked, or (`network_mode="none"`, servers that
bind every address: harness/launch/netns.py) have no network but their own loopback.
Every container carries labels naming the harness run and the process that started it, so
a crashed run's containers are found and removed (`sweep_orphans`, `pacs-harness down --all`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from harness.errors import EnvironmentProblem
from harness.launch.process import process_start_time

LABEL_RUN = "pacs-harness.run"
LABEL_NODE = "pacs-harness.node"
LABEL_OWNER = "pacs-harness.owner"  # "<pid>:<start time>" of an attached owner, or "detached"
LABEL_STATE = "pacs-harness.state-dir"  # the state root (PACS_HARNESS_STATE_DIR) of the run

START_HINT = (
    "start it with `dockerd --bridge=none --iptables=false --ip-masq=false &` "
    "(or `systemctl start docker`), then check `docker info`"
)


_client = None


def docker_client():
    """A connected Docker SDK client, or an EnvironmentProblem saying how to start Docker."""
    global _client
    if _client is not None:
        return _client
    try:
        import docker
    except ImportError:
        raise EnvironmentProblem(
            "the Python package 'docker' is missing (pip install docker)"
        ) from None
    try:
        client = docker.from_env(timeout=30)
        client.ping()
    except Exception as exc:  # noqa: BLE001 - any failure here means "no engine"
        reason = str(exc).splitlines()[0][:160]
        raise EnvironmentProblem(f"Docker engine not reachable ({reason}): {START_HINT}") from None
    _client = client
    return client


def image_present(client, image: str) -> bool:
    import docker

    try:
        client.images.get(image)
        return True
    except docker.errors.ImageNotFound:
        return False


def current_state_root() -> str:
    """This process's state root, absolute, as it is written in the state-dir label."""
    from harness.launch.state import state_root

    return str(state_root().resolve())


def owner_label(detached: bool) -> str:
    if detached:
        return "detached"
    pid = os.getpid()
    return f"{pid}:{process_start_time(pid)}"


@dataclass
class ContainerHandle:
    """A container we started, found again by id (the same interface as ProcessHandle)."""

    container_id: str

    def _container(self):
        import docker

        try:
            return docker_client().containers.get(self.container_id)
        except docker.errors.NotFound:
            return None

    def alive(self) -> bool:
        container = self._container()
        return container is not None and container.status == "running"

    def paused(self) -> bool:
        container = self._container()
        return container is not None and container.status == "paused"

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop gracefully, then remove the container whatever state it is in."""
        container = self._container()
        if container is None:
            return
        try:
            if container.status == "paused":
                container.unpause()
            if container.status in ("running", "paused"):
                container.stop(timeout=int(timeout_s))
        finally:
            container.remove(force=True)

    def logs(self, tail: int = 200) -> str:
        container = self._container()
        if container is None:
            return ""
        return container.logs(tail=tail).decode("utf-8", "replace")


def run_container(
    *,
    image: str,
    command: list[str] | None,
    name: str,
    run_id: str,
    node_name: str,
    mounts: dict[Path, str],
    environment: dict[str, str] | None = None,
    detached: bool = False,
    network_mode: str = "host",
    working_dir: str | None = None,
    hostname: str | None = None,
    extra_hosts: dict[str, str] | None = None,
) -> ContainerHandle:
    """Start a container on the host network (or none: `lo` only); `mounts` maps host paths
    to container paths."""
    if network_mode not in ("host", "none"):  # never the bridge, never a published port
        raise ValueError(f"network_mode {network_mode!r}: only host or none")
    import docker

    client = docker_client()
    if not image_present(client, image):
        raise EnvironmentProblem(
            f"image {image} is not present and no registry is reachable here: build it with "
            "`pacs-harness images build` or `docker load` it"
        )
    try:
        container = client.containers.run(
            image,
            command=command,
            name=name,
            detach=True,
            network_mode=network_mode,
            working_dir=working_dir,
            hostname=hostname,
            extra_hosts=extra_hosts,
            # docker-init (tini) as PID 1: it forwards SIGTERM (a server as PID 1 that sets
            # no handler, dcmqrscp, ignores it and `docker stop` waits out its whole grace)
            # and reaps the children dcmqrscp forks per association
            init=True,
            labels={
                LABEL_RUN: run_id,
                LABEL_NODE: node_name,
                LABEL_OWNER: owner_label(detached),
                LABEL_STATE: current_state_root(),
            },
            volumes={str(host): {"bind": inside, "mode": "rw"} for host, inside in mounts.items()},
            environment=environment or {},
        )
    except docker.errors.APIError as exc:
        raise EnvironmentProblem(
            f"docker could not start {image} for node {node_name}: {exc}"
        ) from None
    return ContainerHandle(container.id)


def harness_containers(run_id: str | None = None) -> list:
    """Containers carrying the harness label (of one run, or of every run)."""
    client = docker_client()
    label = f"{LABEL_RUN}={run_id}" if run_id else LABEL_RUN
    return client.containers.list(all=True, filters={"label": label})


def remove_containers(containers: list) -> int:
    for container in containers:
        ContainerHandle(container.id).stop(timeout_s=5)
    return len(containers)


def owner_is_dead(container) -> bool:
    """True when the container was started by an attached process that no longer runs."""
    owner = container.labels.get(LABEL_OWNER, "detached")
    if owner == "detached":
        return False
    pid, _, start = owner.partition(":")
    if not pid.isdigit():
        return False
    return str(process_start_time(int(pid))) != start


def sweep_orphans() -> int:
    """Remove containers whose attached owner process has died (a killed pytest, say)."""
    return remove_containers([c for c in harness_containers() if owner_is_dead(c)])


def leftover_containers() -> list:
    """Containers `down --all` may remove: a dead owner's, or those of this state root.

    A live run with another state directory (another user's `up`, a parallel test
    session) keeps its containers.
    """
    this_root = current_state_root()
    return [
        container
        for container in harness_containers()
        if owner_is_dead(container) or container.labels.get(LABEL_STATE) == this_root
    ]
