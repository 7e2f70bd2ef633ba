"""Node faults: a crash, a stop, a freeze or a restart of a node the harness launched.

A node is made faulty by signals on its process group or the Docker API (`kill`, `stop`,
`pause`, `resume`, `restart`, `start_again`); each is refused unless the node is disposable
and was launched by the harness.
"""

from __future__ import annotations

import queue
import signal
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from harness.config.faults import NODE_FAULTS  # noqa: F401 - the schema's vocabulary
from harness.errors import ConfigError, EnvironmentProblem
from harness.launch.docker import ContainerHandle
from harness.launch.process import ProcessHandle
from harness.nodes.base import Node

# ---------------------------------------------------------------------------------------
# node faults


def _process_signal(node: Node, sig: int) -> None:
    handle = node.handle
    if not isinstance(handle, ProcessHandle) or not handle.alive():
        raise EnvironmentProblem(f"node {node.name}: no running process to signal")
    handle.signal_group(sig)


def _container(node: Node):
    handle = node.handle
    assert isinstance(handle, ContainerHandle)
    container = handle._container()
    if container is None:
        raise EnvironmentProblem(f"node {node.name}: its container is gone")
    return container


def _require_launched(node: Node, action: str) -> None:
    node.require_disposable(action)
    if node.handle is None:
        raise ConfigError(f"node {node.name}: refusing to {action}: the harness did not launch it")


def kill(node: Node) -> None:
    """SIGKILL the node's process group (or `docker kill`): a crash, no clean shutdown."""
    _require_launched(node, "kill it")
    if isinstance(node.handle, ContainerHandle):
        _container(node).kill()
    else:
        _process_signal(node, signal.SIGKILL)
        if node._popen is not None:
            node._popen.wait(timeout=10)


def stop(node: Node) -> None:
    """Graceful stop (SIGTERM, then SIGKILL after the timeout); sidecars stop too."""
    _require_launched(node, "stop it")
    node.stop()


def pause(node: Node) -> None:
    """Freeze the node: SIGSTOP on its process group, `docker pause` for a container.

    The kernel still accepts TCP connections for a frozen process, so a health check that
    only connects sees it as up: a realistic and nasty fault.
    """
    _require_launched(node, "pause it")
    if isinstance(node.handle, ContainerHandle):
        _container(node).pause()
    else:
        _process_signal(node, signal.SIGSTOP)


def resume(node: Node) -> None:
    """Undo `pause`."""
    _require_launched(node, "resume it")
    if isinstance(node.handle, ContainerHandle):
        container = _container(node)
        if container.status == "paused":
            container.unpause()
    else:
        _process_signal(node, signal.SIGCONT)


_launcher_lock = threading.Lock()
_launcher_queue: queue.Queue = queue.Queue()
_launcher_thread: threading.Thread | None = None


def _launcher_loop() -> None:
    while True:
        future, fn, args = _launcher_queue.get()
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
            future.set_exception(exc)


def _from_long_lived_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """Run `fn` in the main thread or in one thread that lives as long as the process.

    Why: launched processes get PR_SET_PDEATHSIG, which the kernel fires when the *thread*
    that forked them ends. A node started again from a short-lived fault thread would be
    killed the moment that thread finishes.
    """
    global _launcher_thread
    if threading.current_thread() is threading.main_thread():
        return fn(*args)
    with _launcher_lock:
        if _launcher_thread is None:
            _launcher_thread = threading.Thread(
                target=_launcher_loop, name="fault-launcher", daemon=True
            )
            _launcher_thread.start()
    future: Future = Future()
    _launcher_queue.put((future, fn, args))
    return future.result()


def _run_id_of(node: Node) -> str:
    if isinstance(node.handle, ContainerHandle):
        container = node.handle._container()
        if container is not None:
            from harness.launch.docker import LABEL_RUN

            return container.labels.get(LABEL_RUN, "harness")
    return "harness"


def start_again(node: Node, ready_timeout_s: float = 60.0) -> None:
    """Start a stopped or killed node on the same ports and data, and wait until it answers."""
    _require_launched(node, "start it again")
    run_id = _run_id_of(node)
    if isinstance(node.handle, ContainerHandle):
        node.handle.stop(timeout_s=5)  # a killed container still exists under its name
    elif node.handle is not None and node.handle.alive():
        raise EnvironmentProblem(f"node {node.name}: still running, stop or kill it first")
    for sidecar in node.sidecars.values():
        if sidecar is not None and sidecar.alive():
            sidecar.stop()  # start() starts the sidecars again
    _from_long_lived_thread(lambda: node.start(run_id=run_id))
    node.wait_ready(ready_timeout_s)


def restart(node: Node, ready_timeout_s: float = 60.0) -> None:
    """Graceful stop, then start on the same ports, then wait until it answers."""
    _require_launched(node, "restart it")
    run_id = _run_id_of(node)
    node.stop()
    _from_long_lived_thread(lambda: node.start(run_id=run_id))
    node.wait_ready(ready_timeout_s)


