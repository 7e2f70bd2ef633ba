"""A PACS that already runs (the site's own): reached, never started or stopped.

Not disposable unless the topology says so. Wiping needs a way to delete, which DIMSE
lacks: only an external Orthanc (`orthanc_rest: true`) declared disposable can be wiped.
"""

from __future__ import annotations

from harness.errors import EnvironmentProblem, NotDisposableError
from harness.nodes.base import Node, NodeStatistics, rest_statistics
from harness.nodes.capabilities import Capabilities


class ExternalNode(Node):
    kind = "external"
    has_process = False
    #: a site's PACS is unknown: the harness tries C-MOVE and C-GET (a refusal is reported);
    #: `orthanc_rest` and `dicomweb_root` in the topology declare its HTTP services per node
    capabilities = Capabilities(retrieve_methods=("C-MOVE", "C-GET"), launches=())

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
            return rest_statistics(rest)
        return super().statistics()
