"""What the harness proposes in presentation contexts: SOP classes and transfer syntaxes.

An association holds at most 128 presentation contexts (PS3.8 9.3.2.2, odd ids 1-255), so
the tables here are sized to fit: the everyday storage classes in the receivable syntaxes
(7 x 16), and C-GET's own query contexts beside its storage ones (PS3.4 C.4.3.3).
"""

from __future__ import annotations

from pydicom.uid import (
    JPEG2000,
    AllTransferSyntaxes,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    RLELossless,
)
from pynetdicom import AllStoragePresentationContexts
from pynetdicom.sop_class import (
    BasicTextSRStorage,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalMammographyXRayImageStorageForPresentation,
    DigitalXRayImageStorageForPresentation,
    EncapsulatedPDFStorage,
    EnhancedSRStorage,
    MRImageStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    NuclearMedicineImageStorage,
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    PositronEmissionTomographyImageStorage,
    SecondaryCaptureImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
    XRayAngiographicImageStorage,
)

MAX_CONTEXTS = 128

FIND_MODELS = {
    "study": StudyRootQueryRetrieveInformationModelFind,
    "patient": PatientRootQueryRetrieveInformationModelFind,
}
MOVE_MODELS = {
    "study": StudyRootQueryRetrieveInformationModelMove,
    "patient": PatientRootQueryRetrieveInformationModelMove,
}
GET_MODELS = {
    "study": StudyRootQueryRetrieveInformationModelGet,
    "patient": PatientRootQueryRetrieveInformationModelGet,
}


#: Storage SOP classes of everyday studies (the connectivity scenario's table; the C-GET
#: fallback when a node cannot say which classes a study holds).
COMMON_STORAGE_CLASSES: tuple[str, ...] = (
    CTImageStorage,
    MRImageStorage,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
    NuclearMedicineImageStorage,
    PositronEmissionTomographyImageStorage,
    DigitalMammographyXRayImageStorageForPresentation,
    XRayAngiographicImageStorage,
    SecondaryCaptureImageStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    BasicTextSRStorage,
    EnhancedSRStorage,
    EncapsulatedPDFStorage,
)
#: Every storage SOP class pynetdicom knows (what the harness accepts as a Storage SCP).
STORAGE_CLASSES: tuple[str, ...] = tuple(
    str(cx.abstract_syntax) for cx in AllStoragePresentationContexts
)
#: The syntaxes of the connectivity table and of the fallback proposal (7 x 16 fit in 128).
RECEIVABLE_TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGLosslessSV1,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)
#: What C-GET offers for each SOP class: every transfer syntax pydicom knows, each in its own
#: presentation context, uncompressed first. The SCP sends over the context that matches what
#: it holds (PS3.4 C.4.3.3), so nothing needs transcoding, whatever it stored.
RETRIEVE_TRANSFER_SYNTAXES: tuple[str, ...] = tuple(
    dict.fromkeys(
        [
            ExplicitVRLittleEndian,
            ImplicitVRLittleEndian,
            DeflatedExplicitVRLittleEndian,
            ExplicitVRBigEndian,
            *(str(ts) for ts in AllTransferSyntaxes),
        ]
    )
)
QUERY_CONTEXTS = 4  # C-GET and C-FIND models, each in explicit and implicit VR little endian
NON_IMAGE_CLASSES = {BasicTextSRStorage, EnhancedSRStorage, EncapsulatedPDFStorage}
#: The lossless fallbacks each class is proposed in besides its own syntax (C-STORE), and
#: the syntaxes offered in C-GET's rounds for classes a node did not name: the
#: uncompressed ones anything uncompressed converts to (63 classes fit in one association).
FALLBACK_SYNTAXES: tuple[str, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
