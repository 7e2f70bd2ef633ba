"""Ingest (phase pilot): what does each node do with awkward but valid data?

A synthetic archive covering every modality, character set and transfer syntax is stored into
each node and retrieved back. Per object the node either kept it exactly (`kept`), changed only
its encoding with equal pixels and attributes (`coerced`), changed its content (`altered`),
refused it (`rejected`), or acknowledged it and then could not return it (`lost`). A refusal is
the node's documented capability (reported, not failed); alteration and loss fail the gate.
"""

from __future__ import annotations

from collections import Counter

import pytest
from pydicom import Dataset

from harness.interop.ingest import as_received, classify, differences
from synthetic_data import GeneratorOptions, generate
from synthetic_data.names import CHARSET_NAMES, MODALITIES, SYNTAX_NAMES

pytestmark = [pytest.mark.phase("pilot"), pytest.mark.scenario("ingest")]



@pytest.fixture(scope="module")
def archive() -> list[Dataset]:
    """Every modality x charset x transfer syntax at least once (tiny objects)."""
    options = GeneratorOptions(
        patients=len(CHARSET_NAMES), studies_per_patient=3, modalities=list(MODALITIES),
        facilities=2, seed=7, scale="tiny", charsets=list(CHARSET_NAMES),
        transfer_syntaxes=list(SYNTAX_NAMES), trap_rate=0.0,
    )
    return list(generate(options))


def test_ingest_every_modality_charset_and_transfer_syntax(
    pacs_node, pacs_node_name, pacs_janitor, pacs_metrics, archive
):
    node = pacs_node(pacs_node_name)
    if not node.disposable:
        pytest.skip(f"{pacs_node_name} is not disposable: the harness does not write to it")
    # each object in its own syntax only: what the node does with it, not what our sender
    # converted (a refused syntax is the outcome "rejected")
    stored = node.dimse().store(archive, associations=4, convert=False)
    accepted = {r.sop_instance_uid for r in stored.succeeded}
    reasons = {r.sop_instance_uid: r.error for r in stored.failed}

    returned: dict[str, tuple[Dataset, str]] = {}
    for study_uid in sorted({ds.StudyInstanceUID for ds in archive}):
        got = node.dimse().get("STUDY", {"StudyInstanceUID": study_uid})
        for item in got.instances:
            returned[item.sop_instance_uid] = (item.dataset, item.transfer_syntax_uid)

    per_object = []
    for ds in archive:
        uid = ds.SOPInstanceUID
        if uid not in accepted:
            outcome = "rejected"
        else:
            dataset, ts = returned.get(uid, (None, None))
            outcome = classify(ds, dataset, ts)
            if outcome == "altered":
                reasons[uid] = "changed: " + ", ".join(differences(as_received(ds), dataset))
        per_object.append({
            "sop_instance_uid": uid,
            "modality": ds.Modality,
            "charset": str(ds.get("SpecificCharacterSet", "default")),
            "transfer_syntax": ds.file_meta.TransferSyntaxUID.name,
            "outcome": outcome,
            **({"reason": reasons[uid]} if uid in reasons else {}),
        })
    counts = Counter(o["outcome"] for o in per_object)
    by_syntax: dict[str, Counter] = {}
    for o in per_object:
        by_syntax.setdefault(o["transfer_syntax"], Counter())[o["outcome"]] += 1
    pacs_metrics[f"ingest.{pacs_node_name}"] = {
        "objects": len(per_object),
        "outcomes": dict(counts),
        "by_transfer_syntax": {k: dict(v) for k, v in by_syntax.items()},
        "objects_not_kept": [o for o in per_object if o["outcome"] != "kept"][:200],
    }
    assert counts["lost"] == 0, f"{counts['lost']} acknowledged objects could not be retrieved"
    altered = [o for o in per_object if o["outcome"] == "altered"]
    assert not altered, f"{len(altered)} objects altered, first: {altered[0]}"
    assert counts["kept"] + counts["coerced"] > 0, "the node accepted nothing"
