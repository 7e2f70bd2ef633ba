"""The reference migrator against real nodes: every method, resume after SIGKILL, retries,
rate limit, the site's own tool, and the refusals a user can act on.

One cluster for the module: sources legacy (dcmqrscp), pocket (embedded), central (Orthanc);
targets web (Orthanc) and sink (embedded), wiped by each test that writes to them.
"""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harness.cluster import Cluster
from harness.errors import ConfigError, EnvironmentProblem
from harness.fixtures import pacs_cluster_factory
from harness.launch.tools import find_binary
from harness.migration.discovery import list_studies
from harness.migration.external import ExternalMigration
from harness.migration.migrator import Migrator
from harness.migration.state import MigrationResult
from harness.nodes.base import Node
from synthetic_data.samples import sample_study
from tests.helpers import external_topology, login_env, processes_mentioning

TOPOLOGY = """name: migrate
nodes:
  legacy:  {kind: dcmqrscp, ae_title: LEGACY}
  pocket:  {kind: embedded, ae_title: POCKET}
  central: {kind: orthanc,  ae_title: CENTRAL}
  web:     {kind: orthanc,  ae_title: WEB}
  sink:    {kind: embedded, ae_title: SINK}
"""
# (source, studies, instances per study)
CONTENT = {"legacy": (4, 3), "pocket": (10, 2), "central": (4, 3)}


launched = pacs_cluster_factory(TOPOLOGY, scope="module",
                                requires=("Orthanc", "dcmqrscp", "movescu"))


@pytest.fixture(scope="module")
def cluster(launched):
    for offset, (name, (studies, instances)) in enumerate(CONTENT.items()):
        batch = [
            ds
            for n in range(studies)
            for ds in sample_study(seed=1000 * (offset + 1) + n, instances=instances)
        ]
        stored = launched.node(name).dimse().store(batch)
        assert stored.ok, [r.error for r in stored.failed]
    return launched


def _content(node: Node, studies: list[str]) -> dict[str, tuple[str, bytes]]:
    """SOP Instance UID -> (transfer syntax, pixel data bytes), by one C-GET of all studies
    (UID list matching, which all three servers support)."""
    got = node.dimse().get("STUDY", {"StudyInstanceUID": "\\".join(studies)})
    assert got.ok, f"{node.name}: C-GET: {got.status}"
    return {i.sop_instance_uid: (i.transfer_syntax_uid, i.dataset.PixelData) for i in got.instances}


def _assert_identical(source: Node, target: Node) -> None:
    studies = list_studies(source.dimse())
    assert sorted(list_studies(target.dimse())) == sorted(studies)
    on_source, on_target = _content(source, studies), _content(target, studies)
    assert on_source and on_target == on_source
    assert target.statistics().instances == len(on_source)


@pytest.mark.parametrize(
    ("method", "source", "target"),
    [
        ("move", "legacy", "web"),  # dcmqrscp -> Orthanc
        ("move", "pocket", "web"),  # embedded -> Orthanc
        ("get", "legacy", "sink"),  # dcmqrscp -> embedded
        ("dicomweb", "central", "web"),  # Orthanc -> Orthanc
        ("orthanc", "central", "sink"),  # Orthanc -> embedded
    ],
)
def test_method_copies_every_instance_unchanged(cluster, tmp_path, method, source, target):
    src, dst = cluster.node(source), cluster.node(target)
    dst.wipe()
    studies, per_study = CONTENT[source]
    with Migrator(src, dst, method, state_path=tmp_path / "state.sqlite") as migrator:
        result = migrator.run()
    assert result.ok, result.errors
    assert (result.studies_total, result.migrated) == (studies, studies)
    assert result.instances_sent == studies * per_study
    _assert_identical(src, dst)

    # idempotent: a second run sends nothing
    with Migrator(src, dst, method, state_path=tmp_path / "state.sqlite") as migrator:
        again = migrator.run()
    assert (again.skipped_already_confirmed, again.instances_sent) == (studies, 0)


def _topology_file(cluster: Cluster, path: Path, names: list[str]) -> Path:
    """The launched nodes as external nodes of a topology, for the CLI in a subprocess."""
    return external_topology(path, "ext", [cluster.node(n) for n in names], "HARNESS_TEST",
                             dict.fromkeys(names, ", writable: true"))


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "harness.cli.migrate", *args]


def _env(tmp_path: Path, cluster: Cluster) -> dict[str, str]:
    return login_env(cluster, "HARNESS_TEST", tmp_path / "harness-state")


def _confirmed(state: Path) -> int:
    """Studies confirmed so far (0 while the migrator has not created its schema yet)."""
    try:
        with sqlite3.connect(state) as conn:
            query = "SELECT count(*) FROM studies WHERE state = 'confirmed'"
            return conn.execute(query).fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def test_sigkill_mid_run_then_restart_ends_with_zero_loss_and_no_resend(cluster, tmp_path):
    source, target = cluster.node("pocket"), cluster.node("web")
    target.wipe()
    topo = _topology_file(cluster, tmp_path / "ext.yaml", ["pocket", "web"])
    state = tmp_path / "state.sqlite"
    args = ["--topology", str(topo), "--from", "pocket", "--to", "web", "--state", str(state)]

    # run 1: rate-limited so there is time to kill it after a few confirmed studies
    proc = subprocess.Popen(
        _cli(*args, "--rate", "3", "--workers", "1", "--json"),
        env=_env(tmp_path, cluster),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if state.exists() and _confirmed(state) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the migrator ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    confirmed_before = _confirmed(state)
    assert 3 <= confirmed_before < CONTENT["pocket"][0]

    # run 2: resumes with the saved plan
    done = subprocess.run(
        _cli(*args, "--json", "--no-monitor"),
        env=_env(tmp_path, cluster),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)["result"]
    assert result["skipped_already_confirmed"] == confirmed_before
    assert result["failed"] == 0
    assert (
        result["skipped_already_confirmed"] + result["migrated"] + result["already_on_target"]
        == CONTENT["pocket"][0]
    )

    # zero loss, no duplicate, pixel data identical
    _assert_identical(source, target)
    assert target.statistics().instances == source.statistics().instances
    with sqlite3.connect(state) as conn:
        run1, run2 = (r[0] for r in conn.execute("SELECT run_id FROM runs ORDER BY run_id"))
        assert (
            conn.execute("SELECT count(*) FROM studies WHERE state != 'confirmed'").fetchone()[0]
            == 0
        )
        confirmed_in_run1 = {
            r[0]
            for r in conn.execute(
                "SELECT study_instance_uid FROM studies WHERE confirmed_run = ?", (run1,)
            )
        }
        resent = {
            r[0]
            for r in conn.execute("SELECT study_instance_uid FROM sends WHERE run_id = ?", (run2,))
        }
        assert len(confirmed_in_run1) == confirmed_before
        assert not confirmed_in_run1 & resent, "a confirmed study was sent again"
        # every study went out once, plus at most one re-send of the study cut by the kill
        sends = conn.execute("SELECT count(*) FROM sends").fetchone()[0]
        assert CONTENT["pocket"][0] <= sends <= CONTENT["pocket"][0] + 1


def _run_while_target_restarts(migrator: Migrator, target: Node, until) -> MigrationResult:
    """Run the migrator in a thread; start the (stopped) target once `until()` returns."""
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("result", migrator.run()))
    thread.start()
    try:
        until()
        target.start()
        target.wait_ready(120)
    finally:
        thread.join(240)
        migrator.close()
    return outcome["result"]


def test_target_down_for_a_while_is_retried_with_backoff(cluster, tmp_path):
    source, target = cluster.node("legacy"), cluster.node("sink")
    target.wipe()
    target.stop()
    assert not target.alive()
    migrator = Migrator(
        # 8 retries: waits of 0.3 s doubling, 76 s in all, for the target's restart under load
        source, target, "get", state_path=tmp_path / "s.sqlite", retries=8, backoff_s=0.3
    )
    # the first attempts fail: connection refused
    result = _run_while_target_restarts(migrator, target, lambda: time.sleep(1.0))
    assert result.ok, result.errors
    assert result.retries_used > 0
    assert result.migrated == CONTENT["legacy"][0]
    _assert_identical(source, target)


def test_rate_limit_is_honoured(cluster, tmp_path):
    source, target = cluster.node("central"), cluster.node("sink")
    target.wipe()
    with Migrator(source, target, "orthanc", state_path=tmp_path / "a.sqlite") as migrator:
        assert migrator.run().ok
    studies = CONTENT["central"][0]
    # with fresh state files every study is checked again (and found on the target)
    with Migrator(source, target, state_path=tmp_path / "b.sqlite", rate_limit=2.0) as limited:
        slow = limited.run()
    with Migrator(source, target, state_path=tmp_path / "c.sqlite") as unlimited:
        fast = unlimited.run()
    assert slow.already_on_target == fast.already_on_target == studies
    assert slow.elapsed_s >= (studies - 1) / 2.0 * 0.95  # evenly spaced starts


def test_external_command_runs_and_harness_verifies(cluster, tmp_path):
    target = cluster.node("web")
    target.wipe()
    topo = _topology_file(cluster, tmp_path / "ext.yaml", ["legacy", "web"])
    movescu = find_binary("movescu")
    command = (
        f"{movescu} -S -aet PACSHARNESS -aec {{source_ae}} -aem {{target_ae}} "
        "-k QueryRetrieveLevel=STUDY -k StudyInstanceUID= {source_host} {source_port}"
    )
    base = ["--topology", str(topo), "--from", "legacy", "--to", "web", "--json"]
    done = subprocess.run(
        _cli(*base, "--state", str(tmp_path / "x.sqlite"), "--external-command", command),
        env=_env(tmp_path, cluster),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(done.stdout)
    assert summary["external"]["exit_code"] == 0
    assert summary["external"]["argv"][4:8] == ["-aec", "LEGACY", "-aem", "WEB"]
    assert summary["result"]["already_on_target"] == CONTENT["legacy"][0]
    assert summary["availability"]["probes"]["source"]["total"] >= 1
    _assert_identical(cluster.node("legacy"), target)

    # a tool that fails: its exit code is reported, the command exits 1
    failing = subprocess.run(
        _cli(
            *base,
            "--state",
            str(tmp_path / "y.sqlite"),
            "--no-monitor",
            "--external-command",
            "sh -c 'exit 3'",
        ),
        env=_env(tmp_path, cluster),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert failing.returncode == 1, failing.stderr
    assert json.loads(failing.stdout)["external"]["exit_code"] == 3


def test_external_command_timeout_kills_its_process_group(cluster, tmp_path):
    # a sleep no other process on the machine runs: its processes are this tool's
    naptime = f"{600 + random.random():.6f}"
    tool = ExternalMigration(
        f"sh -c 'sleep {naptime} & sleep {naptime}'",
        cluster.node("legacy"),
        cluster.node("web"),
        timeout_s=0.5,
        log_path=tmp_path / "tool.log",
    )
    result = tool.run()
    assert result.timed_out and result.exit_code is None and not result.ok
    # it returned while the sleeps (600 s) still ran, and killed both: they are gone
    deadline = time.monotonic() + 60  # the killed processes' exit, awaited (bounded)
    while processes_mentioning(f"sleep {naptime}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_mentioning(f"sleep {naptime}") == []
    assert f"sleep {naptime}" in (tmp_path / "tool.log").read_text()
    with pytest.raises(EnvironmentProblem, match="program not found: no-such-tool"):
        ExternalMigration(
            "no-such-tool {source_ae}",
            cluster.node("legacy"),
            cluster.node("web"),
            log_path=tmp_path / "t.log",
        ).run()


def test_refusals_name_the_node(cluster, tmp_path):
    legacy, web, sink = cluster.node("legacy"), cluster.node("web"), cluster.node("sink")
    with pytest.raises(ConfigError, match="dicomweb: source node legacy serves no DICOMweb"):
        Migrator(legacy, web, "dicomweb", state_path=tmp_path / "s")
    with pytest.raises(ConfigError, match="orthanc: source node sink is not an Orthanc"):
        Migrator(sink, web, "orthanc", state_path=tmp_path / "s")
    with pytest.raises(ConfigError, match="unknown"):
        Migrator(legacy, web, "ftp", state_path=tmp_path / "s")
    # a state file belongs to one migration
    with Migrator(legacy, web, state_path=tmp_path / "bound.sqlite") as first:
        first.open()
    with pytest.raises(ConfigError, match="belongs to another migration"):
        Migrator(sink, web, state_path=tmp_path / "bound.sqlite").open()
    # CLI: bad input is exit 2 with one line
    done = subprocess.run(
        _cli("--from", "legacy", "--to", "web", "--method", "ftp"),
        env=_env(tmp_path, cluster),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2


# -- listings are not taken on one read ---------------------------------------------------


# dcmqrscp (returns no NumberOfStudyRelatedInstances: two reads must agree) as source,
# the embedded PACS (returns it: the count must agree) as target.
unsteady = pacs_cluster_factory(
    "name: unsteady\nnodes:\n"
    "  old: {kind: dcmqrscp, ae_title: OLDARCH}\n"
    "  new: {kind: embedded, ae_title: NEWARCH}\n",
    scope="module",
    requires=("dcmqrscp",),
)


def _store_on_read(node: Node, role: str, study, reads: set[int]):
    """A listing hook that C-STOREs the next instance of `study` into `node` during the
    given reads of the `role` listing: the node really changes between two reads."""
    pending = list(study)
    uid = study[0].StudyInstanceUID

    def hook(listing_role: str, listing_study: str, read: int) -> None:
        if (listing_role, listing_study, read) in {(role, uid, r) for r in reads} and pending:
            stored = node.dimse().store([pending.pop(0)])
            assert stored.ok, stored.failed[0].error

    return hook


def _unstable_rows(state: Path) -> list[tuple[str, str, int]]:
    with sqlite3.connect(state) as conn:
        return conn.execute(
            "SELECT study_instance_uid, detail, settled FROM unstable_listings ORDER BY id"
        ).fetchall()


def test_source_listing_checked_against_its_study_count(cluster, tmp_path):
    """Orthanc returns NumberOfStudyRelatedInstances: an instance stored between the
    IMAGE-level listing and the count makes the read disagree; the next read is used."""
    source, target = cluster.node("central"), cluster.node("sink")
    target.wipe()
    study = sample_study(seed=4242, instances=3)
    uid = study[0].StudyInstanceUID
    assert source.dimse().store(study[:2]).ok
    hook = _store_on_read(source, "source", study[2:], {1})
    try:
        with Migrator(source, target, state_path=tmp_path / "s.sqlite", on_listing=hook) as m:
            result = m.run()
    finally:
        (orthanc_id,) = [r["ID"] for r in source.rest().lookup(uid) if r["Type"] == "Study"]
        source.rest().delete(f"/studies/{orthanc_id}")
    assert result.ok, result.errors
    assert list(result.unstable_listings) == [uid]  # the other studies: one agreeing read
    assert result.unstable_listings[uid] == [
        "source read 1: 2 listed, NumberOfStudyRelatedInstances 3"
    ]
    (outcome,) = [o for o in result.outcomes if o.study_instance_uid == uid]
    assert outcome.instances == 3 and outcome.status == "migrated"
    # the target's own index holds the whole study, the instance stored late included
    assert target.statistics().instances == CONTENT["central"][0] * 3 + 3
    assert _unstable_rows(tmp_path / "s.sqlite") == [
        (uid, "source read 1: 2 listed, NumberOfStudyRelatedInstances 3", 1)
    ]
    assert result.as_dict()["unstable_listings"] == {uid: result.unstable_listings[uid]}


def test_source_listing_must_be_read_twice_alike(unsteady, tmp_path):
    """dcmqrscp returns no count: a listing is taken when two consecutive reads agree."""
    source, target = unsteady.node("old"), unsteady.node("new")
    source.wipe()
    target.wipe()
    study = sample_study(seed=4343, instances=3)
    uid = study[0].StudyInstanceUID
    assert source.dimse().store(study[:2]).ok
    hook = _store_on_read(source, "source", study[2:], {1})
    with Migrator(source, target, state_path=tmp_path / "s.sqlite", on_listing=hook) as m:
        result = m.run()
    assert result.ok, result.errors
    assert result.unstable_listings == {uid: ["source read 2: listing changed (2 -> 3 instances)"]}
    assert result.outcomes[0].instances == 3
    assert target.statistics().instances == 3  # embedded's SQLite index


def test_listing_that_never_settles_is_not_confirmed(unsteady, tmp_path):
    source, target = unsteady.node("old"), unsteady.node("new")
    source.wipe()
    target.wipe()
    study = sample_study(seed=4444, instances=6)
    uid = study[0].StudyInstanceUID
    assert source.dimse().store(study[:1]).ok
    hook = _store_on_read(source, "source", study[1:], {1, 2, 3, 4})  # a new one each read
    state = tmp_path / "s.sqlite"
    with Migrator(source, target, state_path=state, retries=0, listing_tries=4,
                  on_listing=hook) as m:
        result = m.run()
    assert not result.ok and result.failed == 1
    assert "did not settle in 4 reads (1 listed; 2 listed; 3 listed; 4 listed)" in (
        result.errors[uid]
    )
    assert result.unstable_listings[uid][:3] == [
        f"source read {n}: listing changed ({n - 1} -> {n} instances)" for n in (2, 3, 4)
    ]
    with sqlite3.connect(state) as conn:
        assert conn.execute("SELECT state FROM studies").fetchall() == [("failed",)]
        assert conn.execute("SELECT count(*) FROM sends").fetchone()[0] == 0
    assert {settled for _uid, _detail, settled in _unstable_rows(state)} == {0}
    assert target.statistics().instances == 0


def test_target_listing_changed_between_reads_is_reported(unsteady, tmp_path):
    """An instance appears on the target (embedded: returns the count) during a read."""
    source, target = unsteady.node("old"), unsteady.node("new")
    source.wipe()
    target.wipe()
    study = sample_study(seed=4545, instances=3)
    uid = study[0].StudyInstanceUID
    assert source.dimse().store(study[:2]).ok
    hook = _store_on_read(target, "target", study[2:], {1})  # only the target gets it
    with Migrator(source, target, state_path=tmp_path / "s.sqlite", on_listing=hook) as m:
        result = m.run()
    assert result.ok, result.errors
    assert result.unstable_listings == {
        uid: ["target read 1: 0 listed, NumberOfStudyRelatedInstances 1"]
    }
    assert result.outcomes[0].instances == 2 and result.outcomes[0].instances_sent == 2
    assert target.statistics().instances == 3


def test_summary_names_unstable_listings(capsys):
    """What `pacs-harness migrate` prints for a study whose listing changed between reads."""
    from harness.cli.migrate import _print_summary
    from harness.migration.state import MigrationResult, StudyOutcome

    result = MigrationResult("move", "legacy", "web", studies_total=1)
    note = "source read 1: 2 listed, NumberOfStudyRelatedInstances 3"
    result.add(StudyOutcome("1.2.3", "migrated", instances=3, unstable_listings=[note]))
    _print_summary({"state": "s.sqlite", "result": result.as_dict()})
    printed = capsys.readouterr().out
    assert "1 studies with unstable listings" in printed
    assert f"unstable listing study 1.2.3: {note}" in printed


# -- per-study durations and slow studies --------------------------------------------------


def _duration_rows(state: Path) -> dict[str, sqlite3.Row]:
    """Table study_durations of the last run, read with sqlite3 (not the harness)."""
    with sqlite3.connect(state) as conn:
        conn.row_factory = sqlite3.Row
        (run,) = conn.execute("SELECT max(run_id) FROM runs").fetchone()
        rows = conn.execute("SELECT * FROM study_durations WHERE run_id = ?", (run,))
        return {row["study_instance_uid"]: row for row in rows}


def _nearest_rank(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, -(-len(ordered) * share // 100)) - 1]


def test_study_durations_kept_in_state_and_printed(cluster, tmp_path):
    """`migrate --slow-study-s 0`: every study is beyond the bound, so each is reported
    with the phase it spent most time in; p50/p99/max are those of the state file."""
    source, target = cluster.node("legacy"), cluster.node("web")
    target.wipe()
    topo = _topology_file(cluster, tmp_path / "ext.yaml", ["legacy", "web"])
    state = tmp_path / "state.sqlite"
    args = ["--topology", str(topo), "--from", "legacy", "--to", "web", "--state", str(state),
            "--no-monitor", "--slow-study-s", "0"]
    done = subprocess.run(_cli(*args), env=_env(tmp_path, cluster), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = _duration_rows(state)
    studies = list_studies(source.dimse())
    assert sorted(rows) == sorted(studies)
    phases = ("list_source_s", "send_s", "confirm_target_s", "backoff_s")
    for row in rows.values():
        assert row["status"] == "migrated"
        assert row["send_s"] > 0 and row["list_source_s"] > 0 and row["confirm_target_s"] > 0
        assert sum(row[p] for p in phases) <= row["elapsed_s"] + 1e-6
    elapsed = [row["elapsed_s"] for row in rows.values()]
    printed = " ".join(done.stdout.split())  # the console may wrap long lines
    figures = ", ".join(f"{name} {round(_nearest_rank(elapsed, share), 3)} s"
                        for name, share in (("p50", 50), ("p99", 99), ("max", 100)))
    assert f"per study ({len(studies)} worked on): {figures}" in printed
    assert f"{len(studies)} studies slower than 0 s" in printed
    words = {"list_source_s": "listing source", "send_s": "sending",
             "confirm_target_s": "confirming on target", "backoff_s": "retry backoff"}
    for uid, row in rows.items():
        slowest = max(phases, key=lambda p: row[p])
        assert (f"slow study {uid}: {round(row['elapsed_s'], 3)} s, waiting for "
                f"{words[slowest]}") in printed

    # --json: the same figures; a second run works on no study (all confirmed)
    again = subprocess.run(_cli(*args, "--json"), env=_env(tmp_path, cluster),
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    result = json.loads(again.stdout)["result"]
    assert result["study_durations_s"]["studies"] == 0 and result["slow_studies"] == []
    assert result["skipped_already_confirmed"] == len(studies)


def test_slow_study_waiting_for_a_target_that_is_down(cluster, tmp_path):
    """A target down for a while makes the studies wait in retry backoff: reported so.
    One worker: the source listing of a second study means the first one's attempt has
    failed (connection refused) and waits for its retry; the target starts then."""
    source, target = cluster.node("pocket"), cluster.node("sink")
    target.wipe()
    target.stop()
    listed: list[str] = []
    second_study = threading.Event()

    def hook(role: str, study: str, _read: int) -> None:
        if role == "source" and study not in listed:
            listed.append(study)
            if len(listed) == 2:
                second_study.set()

    migrator = Migrator(source, target, "get", state_path=tmp_path / "s.sqlite", workers=1,
                        retries=8, backoff_s=0.3, slow_study_s=0.2, on_listing=hook)
    result = _run_while_target_restarts(migrator, target, lambda: second_study.wait(120))
    assert result.ok, result.errors
    (first,) = [o for o in result.outcomes if o.study_instance_uid == listed[0]]
    assert first.attempts > 1 and first.phases["backoff"] >= 0.3
    slow = {entry["study"]: entry for entry in result.as_dict()["slow_studies"]}
    assert slow[listed[0]]["phases_s"]["backoff"] >= 0.3
    rows = _duration_rows(tmp_path / "s.sqlite")
    assert rows[listed[0]]["backoff_s"] == pytest.approx(first.phases["backoff"])
    assert target.statistics().instances == source.statistics().instances


def test_state_file_of_schema_2_gains_the_durations_table(tmp_path):
    """A state file written before durations were kept resumes; the table is added."""
    from harness.migration.state import STATE_SCHEMA_VERSION, MigrationState

    path = tmp_path / "old.sqlite"
    MigrationState(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE study_durations")
        conn.execute("PRAGMA user_version = 2")
    MigrationState(path).close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == STATE_SCHEMA_VERSION == 3
        assert conn.execute("SELECT count(*) FROM study_durations").fetchone()[0] == 0


def test_a_peer_slow_to_answer_the_release_holds_no_study():
    """The migrator's associations are released in the background once their last response
    came: a peer that never answers the A-RELEASE-RQ (the 30 s stall of issue 18 with 0
    retries) no longer holds the study; the release still ends at the ARTIM timer."""
    from tests.test_wire import associate, raw_peer, silent_release, sockets_to

    with raw_peer(silent_release) as peer:
        assoc = associate(peer.port, timeout_s=3600, artim_s=20)
        assoc.release_in_background()
        # a release on this thread would have aborted the association (after 20 s) before
        # returning; in the background the peer still waits for it
        assert not peer.eof.is_set() and assoc.is_open
        assert peer.eof.wait(120)  # then the ARTIM timer ends it: A-ABORT, socket closed
        assert peer.after_script == [bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0])]
        for thread in threading.enumerate():
            if thread.name == "release":
                thread.join(60)
        assert not assoc.is_open and sockets_to(peer.port) == []
