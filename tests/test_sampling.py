"""Sampling with stated confidence: `verify --sample N` and `inventory --sample N` say what the
sample proves about every study ("0 defects in 2 sampled studies of 6: at most 66.7% affected
at 95% confidence"), and the bound they state is the exact hypergeometric one.

The bound is checked against an independent computation: exact rational arithmetic over the
hypergeometric probabilities (math.comb), by brute force over every possible number of
affected studies where the archive is small. The CLI runs against two real embedded PACS
nodes holding the same studies, and a third whose copy of a sampled study was altered.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from fractions import Fraction

import pytest

from harness.fixtures import pacs_cluster_factory
from harness.migration.inventory import sample_rank
from harness.migration.reconcile import sample_bound
from synthetic_data.samples import sample_study
from tests.helpers import external_topology, login_env

ALPHA = Fraction(5, 100)  # 95% confidence


def p_at_most(found: int, sampled: int, bad: int, total: int) -> Fraction:
    """P(X <= found), X hypergeometric: `sampled` drawn from `total` of which `bad` are bad."""
    return Fraction(sum(math.comb(bad, i) * math.comb(total - bad, sampled - i)
                        for i in range(found + 1)), math.comb(total, sampled))


def brute_force_bound(found: int, sampled: int, total: int) -> int:
    """The largest number of affected studies that leaves P(X <= found) >= 5%, by trying
    every number there can be."""
    possible = [bad for bad in range(found, total - (sampled - found) + 1)
                if p_at_most(found, sampled, bad, total) >= ALPHA]
    return max(possible)


@pytest.mark.parametrize("total,sampled", [(60, 10), (37, 5), (200, 40)])
def test_stated_bound_equals_a_brute_force_over_every_count(total, sampled):
    for found in range(sampled + 1):
        stated = sample_bound(sampled, total, 0.95, found)
        assert round(stated * total) == brute_force_bound(found, sampled, total), found


@pytest.mark.parametrize("total,sampled,found", [
    (450_000, 500, 0), (450_000, 500, 3), (10_000_000, 5_000, 2), (1_000, 100, 5)])
def test_stated_bound_of_a_large_archive_is_exactly_the_boundary(total, sampled, found):
    """Too large to try every count: the stated count must still satisfy the bound, and one
    more affected study must not (exact fractions, no floating point)."""
    bad = round(sample_bound(sampled, total, 0.95, found) * total)
    assert p_at_most(found, sampled, bad, total) >= ALPHA
    assert p_at_most(found, sampled, bad + 1, total) < ALPHA


def test_a_full_census_and_an_empty_sample():
    assert sample_bound(100, 100, found=3) == 0.03  # every study compared: no uncertainty
    assert sample_bound(0, 100) == 1.0


# -- real nodes and the CLI ---------------------------------------------------------------

STUDIES = 6
SAMPLE = 2

NODES = ("src", "dst", "bad")  # embedded PACS: the source, a faithful and an altered copy
launched = pacs_cluster_factory("name: sampling\nnodes:\n" + "".join(
    f"  {name}: {{kind: embedded, ae_title: SAMPLE{name.upper()}}}\n" for name in NODES),
    scope="module")


@pytest.fixture(scope="module")
def archive(launched, tmp_path_factory):
    """Six studies on src and dst; on bad, the first sampled study has an altered
    description (the studies verify picks are the same on every node: sample_rank)."""
    studies = [sample_study(seed=610 + n, instances=2) for n in range(STUDIES)]
    everything = [ds for study in studies for ds in study]
    assert launched.node("src").dimse().store(everything).ok
    assert launched.node("dst").dimse().store(everything).ok
    victim = sorted((s[0].StudyInstanceUID for s in studies), key=sample_rank)[0]
    altered = [ds.copy() for ds in everything]
    for ds in altered:
        if ds.StudyInstanceUID == victim:
            ds.SeriesDescription = "EDITED BY THE MIGRATION"
    assert launched.node("bad").dimse().store(altered).ok
    workdir = tmp_path_factory.mktemp("sampling")
    topology = external_topology(workdir / "topology.yaml", "sampling",
                                 launched.nodes.values(), "SMP",
                                 dict.fromkeys(NODES, ", synthetic: true"))
    env = login_env(launched, "SMP", workdir / "state")

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "harness", *args, "-t", str(topology)],
                              capture_output=True, text=True, timeout=600, env=env, cwd=workdir)
    return cli, workdir


def expected(found: int) -> str:
    """The sentence a user reads, with the bound computed by brute_force_bound."""
    upper = f"{brute_force_bound(found, SAMPLE, STUDIES) / STUDIES * 100:.3g}%"
    if found:
        estimate = f"{found / SAMPLE * 100:.3g}%"
        return (f"{found} defect{'s' if found > 1 else ''} in {SAMPLE} sampled studies of "
                f"{STUDIES}: an estimated {estimate} affected, at most {upper} at 95% confidence")
    return (f"0 defects in {SAMPLE} sampled studies of {STUDIES}: at most {upper} affected at "
            "95% confidence")


@pytest.mark.parametrize("target,found,exit_code", [("dst", 0, 0), ("bad", 1, 1)])
def test_sampled_verify_states_its_confidence(archive, target, found, exit_code):
    cli, workdir = archive
    out = workdir / f"verify-{target}"
    proc = cli("verify", "--source", "src", "--target", target, "--depth", "full",
               "--sample", str(SAMPLE), "--out", str(out))
    assert proc.returncode == exit_code, proc.stderr
    assert f"sample: {expected(found)}\n" in proc.stdout
    written = json.loads((out / "findings.json").read_text())["sample"]
    assert written["statement"] == expected(found)
    assert (written["defects"], written["sampled"], written["population"]) == (
        found, SAMPLE, STUDIES)
    assert round(written["upper_bound"] * STUDIES) == brute_force_bound(found, SAMPLE, STUDIES)
    assert f"sample: {expected(found)}" in (out / "summary.txt").read_text()

    printed = cli("verify", "--source", "src", "--target", target, "--depth", "full",
                  "--sample", str(SAMPLE), "--out", str(out), "--json")
    assert json.loads(printed.stdout)["sample"]["statement"] == expected(found)


def test_sampled_inventory_states_its_confidence(archive):
    cli, workdir = archive
    proc = cli("inventory", "--node", "src", "--depth", "full", "--sample", str(SAMPLE),
               "--ledger", str(workdir / "src.sqlite"))
    assert proc.returncode == 0, proc.stderr
    assert f"sample: {expected(0)}\n" in proc.stdout
