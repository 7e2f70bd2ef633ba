"""What a PACS kind can do, declared once as `capabilities` on its Node class.

The topology checks, the launcher, the image builder, the inventory and the migrator ask
these declarations instead of testing a kind's name, so a new kind is one module under
harness/nodes/. tests/test_capabilities.py probes every declaration against the real server,
so a declaration that stops being true fails there. Standard library only: the topology
checks read it before any node module is imported.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Query/Retrieve levels (PS3.4 C.6.1.1.2 Patient Root, C.6.2.1.2 Study Root)
QUERY_LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
#: C-MOVE (PS3.4 C.4.2), C-GET (PS3.4 C.4.3), WADO-RS (PS3.18 10.4)
RETRIEVE_METHODS = ("C-MOVE", "C-GET", "WADO-RS")
#: DICOMweb services (PS3.18 10.6 QIDO-RS, 10.4 WADO-RS, 10.5 STOW-RS)
DICOMWEB_SERVICES = ("QIDO-RS", "WADO-RS", "STOW-RS")
#: how the harness runs a launched node
LAUNCHES = ("process", "docker")
#: where a launched node keeps its index (the topology's `index:` field)
INDEX_BACKENDS = ("sqlite", "postgresql")


@dataclass(frozen=True)
class ImageRecipe:
    """How `pacs-harness images build KIND` makes the kind's image from Debian packages."""

    packages: tuple[str, ...]
    python_packages: tuple[str, ...] = ()  # copied from this installation into /opt/pacs-harness
    harness_files: tuple[str, ...] = ()  # paths under harness/ copied into /opt/pacs-harness


@dataclass(frozen=True)
class Capabilities:
    """One kind's abilities, as the harness launches it (a fact about the server, not a wish).

    The defaults describe the least the harness counts on from any DICOM archive: C-FIND at
    study, series and image level and C-MOVE (PS3.4 C.4.1, C.4.2), nothing over HTTP.
    """

    query_levels: tuple[str, ...] = ("STUDY", "SERIES", "IMAGE")
    retrieve_methods: tuple[str, ...] = ("C-MOVE",)
    orthanc_rest: bool = False  # Orthanc's REST API (statistics, delete, jobs)
    dicomweb: tuple[str, ...] = ()  # DICOMweb services it serves
    dicomweb_root: str | None = None  # the URL path of DICOMweb, when fixed for the kind
    #: a C-GET offering every syntax returns each instance in the syntax it was stored in
    keeps_stored_syntax: bool = False
    #: a study-level C-FIND returns SOP Classes in Study (0008,0062) when asked (PS3.4 C.6.1.1.5)
    reports_sop_classes_in_study: bool = False
    max_associations: int | None = None  # beyond this many at once: A-ASSOCIATE-RJ (PS3.8 9.3.4)
    store_associations: int | None = None  # the most parallel C-STORE associations it survives
    tls: bool = False  # DICOM over TLS (PS3.15 B.1) on the port the harness gives it
    https: bool = False  # launched with `https: true`: its HTTP services over TLS (RFC 9110 4.2.2)
    audit_trail: bool = False  # sends IHE ATNA audit messages over syslog (PS3.15 A.5)
    storage_commitment: bool = False  # Storage Commitment Push Model SCP (PS3.4 J)
    worklist: bool = False  # Modality Worklist C-FIND SCP (PS3.4 K)
    mpps: bool = False  # Modality Performed Procedure Step SCP (PS3.4 F.7)
    hl7: bool = False  # takes HL7 v2 ADT patient updates and merges over MLLP
    launches: tuple[str, ...] = ("process", "docker")  # the first is the default; () external
    index_backends: tuple[str, ...] = ()  # choices of the topology's `index:` field
    own_fields: tuple[str, ...] = ()  # topology fields only some kinds accept
    binaries: tuple[tuple[str, str], ...] = ()  # (program, how to install it)
    image_recipe: ImageRecipe | None = None  # the harness builds its own image from this

    def __post_init__(self) -> None:
        """A declaration outside the vocabularies is a programming error, caught at import."""
        for name, values, allowed in (
            ("query_levels", self.query_levels, QUERY_LEVELS),
            ("retrieve_methods", self.retrieve_methods, RETRIEVE_METHODS),
            ("dicomweb", self.dicomweb, DICOMWEB_SERVICES),
            ("launches", self.launches, LAUNCHES),
            ("index_backends", self.index_backends, INDEX_BACKENDS),
        ):
            unknown = [v for v in values if v not in allowed]
            if unknown:
                raise ValueError(f"capabilities.{name}: unknown {unknown} (allowed: {allowed})")
        if "WADO-RS" in self.retrieve_methods and "WADO-RS" not in self.dicomweb:
            raise ValueError("capabilities: retrieve_methods has WADO-RS but dicomweb has not")

    @property
    def launched(self) -> bool:
        """The harness starts and stops it (else it is reached where it already runs)."""
        return bool(self.launches)

    @property
    def default_launch(self) -> str:
        return self.launches[0] if self.launches else "process"

    @property
    def serves_http(self) -> bool:
        """It needs an HTTP port (Orthanc REST or DICOMweb)."""
        return self.orthanc_rest or bool(self.dicomweb)

    def install_hint(self, program: str) -> str:
        return dict(self.binaries).get(program, "install it")
