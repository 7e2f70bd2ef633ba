"""The go-live readiness report (index.html) and the rollout-phase gates.

`html.write_html_report` turns a run's report.json and node logs into one self-contained page
that a radiology director, a QA lead and a vendor can read; `gate.evaluate_gate` decides
whether a finished run makes a rollout phase ready, the same way for `run --phase` and
`gate`. Import the modules themselves: this package face stays empty so that a command
needing only `identities` does not load jinja2.
"""
