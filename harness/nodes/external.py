"""A PACS that already runs (the site's own): reached, never started or stopped.

Not disposable unless the topology says so. Wiping needs a way to delete, which DIMSE
lacks: only an external Orthanc (`orthanc_rest: true`) declared disposable can be wiped.
"""

from __future__ import annotations

from harness.errors import EnvironmentProblem, NotDisposableError
from harness.nodes.base import Node, NodeStatistics


class ExternalNode(Node):
    kind = "external"
    has_process = False

    def version(self) -> str:
        rest = self.rest()
        if rest:
            try:
                return f"Orthanc {rest.system()['Version']} (external)"
            except (EnvironmentProblem, KeyError):
                pass
        return "external PACS"

    def _wipe(self) -> None:
        rest = self.rest()
        if rest is None:
            raise NotDisposableError(
                f"node {self.name}: external node offers no way to delete studies over DIMSE "
                "(declare orthanc_rest: true and http_port for an Orthanc)"
            )
        rest.delete_all()

    def statistics(self) -> NodeStatistics:
        rest = self.rest()
        if rest is not None:
            stats = rest.statistics()
            return NodeStatistics(
                int(stats["CountPatients"]),
                int(stats["CountStudies"]),
                int(stats["CountSeries"]),
                int(stats["CountInstances"]),
            )
        return super().statistics()
