"""Disaster-recovery drill for a launched node: back up, destroy, restore, reconcile.

Why: a backup is only proven by a restore. The drill takes a cold backup of the node (its
data directories: Orthanc's storage and SQLite index or a `pg_dump` of its PostgreSQL
index, dcmqrscp's storage area, the embedded PACS's storage), destroys the node (processes
or container stopped, directory deleted), restores into a freshly launched node at the same
path (DCMTK's index.dat records absolute file paths) and compares what the restored node
serves (pixel sha256 over C-GET) with the manifest of what was stored: zero lost, zero
altered, and the restore time measured. Processes and containers alike (a container's
work directory is mounted at the same path).
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from harness.cluster import Cluster
from harness.config import Topology
from harness.errors import ConfigError, EnvironmentProblem
from harness.launch.postgres import DATABASE, PostgresServer, postgres_bin_dir
from harness.nodes.base import Node
from harness.resilience import node_faults


def pixel_sha256(ds: Any) -> str:
    """The manifest's fingerprint of one instance: sha256 of its Pixel Data (or empty)."""
    return hashlib.sha256(bytes(getattr(ds, "PixelData", b"") or b"")).hexdigest()


def _pg(tool: str) -> str:
    return str(postgres_bin_dir() / tool)


def backup(node: Node, dest: Path) -> dict[str, Any]:
    """Cold backup: pg_dump while running (postgresql), stop the node, copy its directories."""
    node.require_disposable("stop it for a backup")
    if node.workdir is None or not node.data_directories():
        raise ConfigError(
            f"node {node.name} ({node.kind}): the DR drill handles launched orthanc, "
            "dcmqrscp and embedded nodes"
        )
    start = time.monotonic()
    dest.mkdir(parents=True, exist_ok=True)
    if node.spec.index == "postgresql":
        port = node.postgres_port  # type: ignore[attr-defined]
        dump = subprocess.run(
            [_pg("pg_dump"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
             "-Fc", "-f", str(dest / "index.pgdump"), DATABASE],
            capture_output=True, text=True, timeout=300,
        )
        if dump.returncode != 0:
            raise EnvironmentProblem(f"pg_dump failed: {dump.stderr.strip()[-400:]}")
    node_faults.stop(node)  # no writes while the files are copied
    for sub in node.data_directories():
        shutil.copytree(node.workdir / sub, dest / sub)
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    return {"backup_s": round(time.monotonic() - start, 3), "backup_bytes": size}


def restore(topology: Topology, name: str, source: Path, root: Path) -> tuple[Cluster, float]:
    """Launch a fresh node from `topology`, put the backup in place, start it on it.

    Returns the new cluster (the caller stops it) and the restore time in seconds, from the
    launch of the fresh node until it answers with the restored data in place.
    """
    start = time.monotonic()
    cluster = Cluster.launch(topology, root=root)
    try:
        node = cluster[name]
        node_faults.stop(node)
        for sub in node.data_directories():
            shutil.rmtree(node.workdir / sub, ignore_errors=True)
            shutil.copytree(source / sub, node.workdir / sub)
        if (source / "index.pgdump").exists():
            pg = PostgresServer(node.workdir / "pg", node.postgres_port)  # type: ignore[attr-defined]
            pg.start()
            try:
                load = subprocess.run(
                    [_pg("pg_restore"), "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres",
                     "--clean", "--if-exists", "--no-owner", "-d", DATABASE,
                     str(source / "index.pgdump")],
                    capture_output=True, text=True, timeout=300,
                )
            finally:
                pg.stop()
            if load.returncode != 0:
                raise EnvironmentProblem(f"pg_restore failed: {load.stderr.strip()[-400:]}")
        node_faults.start_again(node)
    except BaseException:
        cluster.stop()
        raise
    return cluster, round(time.monotonic() - start, 3)


def reconcile(
    node: Node, manifest: dict[str, str], series: set[tuple[str, str]]
) -> dict[str, Any]:
    """Compare the node's instances (C-FIND) and pixel sha256 (C-GET) with the manifest."""
    client = node.dimse(timeout_s=30)
    seen: dict[str, str] = {}
    for study, one_series in sorted(series):
        got = client.get("SERIES", {"StudyInstanceUID": study, "SeriesInstanceUID": one_series})
        for instance in got.instances:
            seen[instance.sop_instance_uid] = pixel_sha256(instance.dataset)
    lost = sorted(set(manifest) - set(seen))
    altered = sorted(u for u in manifest if u in seen and seen[u] != manifest[u])
    extra = sorted(set(seen) - set(manifest))
    return {
        "expected": len(manifest),
        "restored": len(seen),
        "lost": len(lost),
        "altered": len(altered),
        "unexpected": len(extra),
        "lost_uids": lost[:20],
        "altered_uids": altered[:20],
    }


def dr_drill(
    cluster: Cluster,
    name: str,
    manifest: dict[str, str],
    series: set[tuple[str, str]],
    workdir: Path,
) -> dict[str, Any]:
    """Back up node `name` of `cluster`, destroy the cluster, restore, reconcile.

    `cluster` is stopped and its directory deleted (the destruction); the restored node is
    stopped before returning. Returns backup_s, restore_time_s, lost, altered and counts.
    """
    node = cluster[name]
    topology = cluster.topology
    result: dict[str, Any] = {"kind": node.kind, "index": node.spec.index}
    result.update(backup(node, workdir / "backup"))
    old_dir, root = node.workdir, cluster.root
    cluster.stop()  # destroy: every process stopped, the node's directory deleted
    if old_dir is not None and old_dir.exists():
        raise EnvironmentProblem(f"node {name}: {old_dir} still exists after destruction")
    # the same path as before: a node's own index may hold absolute paths (dcmqrscp)
    restored, restore_s = restore(topology, name, workdir / "backup", root)
    try:
        result["restore_time_s"] = restore_s
        started = time.monotonic()
        result.update(reconcile(restored[name], manifest, series))
        result["reconcile_s"] = round(time.monotonic() - started, 3)
    finally:
        restored.stop()
    return result
