"""Report objects: a Basic Text SR and an Encapsulated PDF, with a tiny hand-made PDF."""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from synthetic_data.modalities import code

_FINDINGS = (
    "The lungs are clear without focal consolidation, effusion or pneumothorax.",
    "Heart size is within normal limits. The mediastinal contours are unremarkable.",
    "No acute osseous abnormality. Degenerative changes of the thoracic spine.",
    "Small calcified granuloma in the right upper lobe, unchanged from prior.",
)
_IMPRESSIONS = ("No acute cardiopulmonary process.", "Stable examination compared to prior.",
                "Findings as above; clinical correlation recommended.")


def report_text(seed: int, long: bool = False) -> tuple[str, str]:
    """Findings and impression; `long` makes a multi-kilobyte text to test long values."""
    findings = " ".join(_FINDINGS[(seed + i) % len(_FINDINGS)] for i in range(3))
    if long:
        findings = "\r\n".join([findings] * 40)
    return findings, _IMPRESSIONS[seed % len(_IMPRESSIONS)]


def _text_item(concept: Dataset, text: str) -> Dataset:
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    item.ConceptNameCodeSequence = Sequence([concept])
    item.TextValue = text
    return item


def _container(concept: Dataset, children: list[Dataset], relationship: str | None) -> Dataset:
    item = Dataset()
    if relationship:
        item.RelationshipType = relationship
    item.ValueType = "CONTAINER"
    item.ConceptNameCodeSequence = Sequence([concept])
    item.ContinuityOfContent = "SEPARATE"
    item.ContentSequence = Sequence(children)
    return item


def add_basic_text_sr(ds: Dataset, findings: str, impression: str, observer: str,
                      date: str, time: str) -> None:
    """SR Document General and SR Document Content modules (TID 2000-like structure)."""
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "VERIFIED"
    verifier = Dataset()
    verifier.VerifyingObserverName = observer
    verifier.VerifyingObserverIdentificationCodeSequence = Sequence()
    verifier.VerifyingOrganization = "Radiology"
    verifier.VerificationDateTime = f"{date}{time}"
    ds.VerifyingObserverSequence = Sequence([verifier])
    ds.PerformedProcedureCodeSequence = Sequence()
    ds.ReferencedPerformedProcedureStepSequence = Sequence()
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = Sequence([code("18748-4", "LN", "Diagnostic Imaging Report")])
    ds.ContinuityOfContent = "SEPARATE"
    ds.ContentSequence = Sequence([
        _container(code("121070", "DCM", "Findings"),
                   [_text_item(code("121071", "DCM", "Finding"), findings)], "CONTAINS"),
        _container(code("121072", "DCM", "Impressions"),
                   [_text_item(code("121073", "DCM", "Impression"), impression)], "CONTAINS"),
    ])


def _pdf_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def tiny_pdf(title: str, lines: list[str]) -> bytes:
    """A valid one-page PDF 1.4 with Helvetica text; byte-stable (no dates, fixed /ID)."""
    ascii_lines = [ln.encode("ascii", "replace").decode("ascii") for ln in [title, *lines]]
    ops = ["BT", "/F1 14 Tf", "50 780 Td", f"({_pdf_escape(ascii_lines[0])}) Tj", "/F1 10 Tf"]
    for ln in ascii_lines[1:]:
        for start in range(0, max(len(ln), 1), 90):
            ops += ["0 -16 Td", f"({_pdf_escape(ln[start:start + 90])}) Tj"]
    ops.append("ET")
    stream = "\n".join(ops).encode("ascii")
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 842] "
        b"/Resources << /Font << /F1 5 0 R >> >> /Contents 4 0 R >>",
        b"<< /Length " + str(len(stream)).encode() + b" >>\nstream\n" + stream
        + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for i, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    for off in offsets:
        out += f"{off:010d} 00000 n \n".encode()
    out += (f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n"
            ).encode()
    return bytes(out)


def add_encapsulated_pdf(ds: Dataset, pdf: bytes, title: str) -> None:
    """Encapsulated Document and SC Equipment modules."""
    ds.ConversionType = "SD"
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = title
    ds.ConceptNameCodeSequence = Sequence([code("18748-4", "LN", "Diagnostic Imaging Report")])
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocumentLength = len(pdf)
    ds.EncapsulatedDocument = pdf + (b"\x00" if len(pdf) % 2 else b"")
