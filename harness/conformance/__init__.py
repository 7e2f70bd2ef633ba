"""Conformance probes: the same questions asked of every node, answered side by side.

Each probe is defined once (`model.Probe`: what the standard expects, with its PS3
reference) and run against every node of a topology; its outcome per node is one of
conforms, differs (with what was observed), not supported, or not tested (and why).
Differences that break a migration between two nodes become migration risks with a remedy
(`risks.py`), and the reference migrator applies the remedies the matrix found.

* model.py      Probe, ProbeContext, ProbeResult, Evidence; the probe registry
* corpus.py     the synthetic studies stored into a writable node for the probes to find
* association.py, query.py, retrieve.py, storage.py, services.py, limits.py
                the probes of each area (they register themselves when imported)
* runner.py     every probe against every node: the matrix
* risks.py      migration risks per (source, target) pair, with remedies
"""
