"""One table entry per modality: study structure, SOP class, pixel layout and IOD attributes.

Each `Modality` says how a study of that kind is laid out (series, instances, sizes per
scale) and adds the modality-specific modules of its IOD to a series template and to each
instance. Common modules (patient, study, series, equipment, SOP common) live in
:mod:`synthetic_data.generator`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID

from synthetic_data.pixels import PixelSpec

CT_IMAGE = UID("1.2.840.10008.5.1.4.1.1.2")
MR_IMAGE = UID("1.2.840.10008.5.1.4.1.1.4")
CR_IMAGE = UID("1.2.840.10008.5.1.4.1.1.1")
DX_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")
MG_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.2")
US_IMAGE = UID("1.2.840.10008.5.1.4.1.1.6.1")
US_MULTIFRAME = UID("1.2.840.10008.5.1.4.1.1.3.1")
NM_IMAGE = UID("1.2.840.10008.5.1.4.1.1.20")
PET_IMAGE = UID("1.2.840.10008.5.1.4.1.1.128")
XA_IMAGE = UID("1.2.840.10008.5.1.4.1.1.12.1")
SC_IMAGE = UID("1.2.840.10008.5.1.4.1.1.7")
BASIC_TEXT_SR = UID("1.2.840.10008.5.1.4.1.1.88.11")
ENCAPSULATED_PDF = UID("1.2.840.10008.5.1.4.1.1.104.1")


class ElementSink(Protocol):
    """Where per-instance elements go: a Dataset, or the generator's lighter element list."""

    def add_new(self, tag: int, VR: str, value: object) -> object: ...


def code(value: str, scheme: str, meaning: str) -> Dataset:
    """A code sequence item (Code Value, Coding Scheme Designator, Code Meaning)."""
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


@dataclass(frozen=True)
class Anatomy:
    """What a study images: body part, descriptions and a procedure code."""

    body_part: str
    study_description: str
    procedure: tuple[str, str, str]
    paired: bool = False


@dataclass
class SeriesLayout:
    """One series of a study: how many objects, of which class, with which pixels."""

    description: str
    count: int
    sop_class: str
    pixels: PixelSpec | None
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Modality:
    """A modality entry in the table below."""

    name: str  # the option name (SC for secondary capture)
    dicom: str  # the Modality attribute value
    anatomies: tuple[Anatomy, ...]
    layout: Callable[[str, Anatomy, random.Random], list[SeriesLayout]]
    series_attrs: Callable[[Dataset, SeriesLayout, Anatomy], None]
    instance_attrs: Callable[[ElementSink, SeriesLayout, int], None]
    image_plane: bool = False  # has Image Plane module (position per instance)
    frame_of_reference: bool = False
    has_pixels: bool = True


# ---- sizes per scale ---------------------------------------------------------------------

def _size(scale: str, tiny: int, small: int, realistic: int) -> int:
    return {"tiny": tiny, "small": small, "realistic": realistic}[scale]


# ---- CT ------------------------------------------------------------------------------------

CT_ANATOMY = (
    Anatomy("HEAD", "CT HEAD WO CONTRAST", ("CTHEAD", "99PACSH", "CT head without contrast")),
    Anatomy("CHEST", "CT CHEST W CONTRAST", ("CTCHESTC", "99PACSH", "CT chest with contrast")),
    Anatomy("ABDOMEN", "CT ABDOMEN PELVIS", ("CTABDPEL", "99PACSH", "CT abdomen and pelvis")),
)


def _ct_layout(scale: str, anatomy: Anatomy, rng: random.Random) -> list[SeriesLayout]:
    n = _size(scale, 4, 40, 300)
    side = _size(scale, 32, 128, 512)
    fov = 350.0
    pix = PixelSpec("ct", side, side, bits_stored=12, spacing=(fov / side, fov / side))
    series = [SeriesLayout(f"{anatomy.body_part} 5.0 AX", max(2, n // 5), CT_IMAGE, pix,
                           {"thickness": 5.0, "kernel": "STANDARD"}),
              SeriesLayout(f"{anatomy.body_part} 1.0 AX BONE", n, CT_IMAGE, pix,
                           {"thickness": 1.0, "kernel": "BONE"})]
    return series[: 1 + rng.randrange(2)] if scale == "tiny" else series


def _ct_series(ds: Dataset, layout: SeriesLayout, anatomy: Anatomy) -> None:
    plane_static(ds, layout)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.KVP = "120"
    ds.SliceThickness = f"{layout.params['thickness']:.1f}"
    ds.ConvolutionKernel = layout.params["kernel"]
    ds.XRayTubeCurrent = 250
    ds.ExposureTime = 500
    ds.GantryDetectorTilt = "0"
    ds.ReconstructionDiameter = "350"
    ds.WindowCenter = "40" if anatomy.body_part != "HEAD" else "35"
    ds.WindowWidth = "400" if anatomy.body_part != "HEAD" else "80"


def _no_instance_attrs(ds: ElementSink, layout: SeriesLayout, index: int) -> None:
    return None


# ---- MR ------------------------------------------------------------------------------------

MR_ANATOMY = (
    Anatomy("HEAD", "MR BRAIN WO CONTRAST", ("MRBRAIN", "99PACSH", "MR brain without contrast")),
    Anatomy("KNEE", "MR KNEE", ("MRKNEE", "99PACSH", "MR knee"), paired=True),
    Anatomy("LSPINE", "MR LUMBAR SPINE", ("MRLSPINE", "99PACSH", "MR lumbar spine")),
)

_MR_SEQUENCES = (
    ("AX T1 SE", "SE", "NONE", "500", "12", None, 1),
    ("AX T2 TSE", "SE", "SK", "4000", "96", None, 16),
    ("AX FLAIR", "IR", "SK\\SP", "9000", "120", "2500", 20),
    ("AX DWI", "EP", "SK\\SS", "5000", "80", None, 1),
)


def _mr_layout(scale: str, anatomy: Anatomy, rng: random.Random) -> list[SeriesLayout]:
    n = _size(scale, 4, 24, 160)
    side = _size(scale, 32, 128, 256)
    fov = 240.0
    pix = PixelSpec("mr", side, side, bits_stored=12, spacing=(fov / side, fov / side))
    count = _size(scale, 1 + rng.randrange(2), 3, 4)
    out = []
    for name, seq, var, tr, te, ti, etl in _MR_SEQUENCES[:count]:
        out.append(SeriesLayout(name, n, MR_IMAGE, pix, {
            "seq": seq, "variant": var, "tr": tr, "te": te, "ti": ti, "etl": etl}))
    return out


def _mr_series(ds: Dataset, layout: SeriesLayout, anatomy: Anatomy) -> None:
    plane_static(ds, layout)
    p = layout.params
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.ScanningSequence = p["seq"].split("\\")
    ds.SequenceVariant = p["variant"].split("\\")
    ds.ScanOptions = "" if p["seq"] != "EP" else "FS"
    ds.MRAcquisitionType = "2D"
    ds.SequenceName = f"*{p['seq'].lower()}2d1"
    ds.AngioFlag = "N"
    ds.SliceThickness = "5.0"
    ds.SpacingBetweenSlices = "6.0"
    ds.RepetitionTime = p["tr"]
    ds.EchoTime = p["te"]
    if p["ti"] is not None:
        ds.InversionTime = p["ti"]
    ds.NumberOfAverages = "1"
    ds.ImagingFrequency = "63.86"
    ds.ImagedNucleus = "1H"
    ds.EchoNumbers = "1"
    ds.MagneticFieldStrength = "1.5"
    ds.EchoTrainLength = str(p["etl"])
    ds.FlipAngle = "90"
    ds.WindowCenter = "600"
    ds.WindowWidth = "1200"


# ---- shared planar geometry ---------------------------------------------------------------

def plane_static(ds: Dataset, layout: SeriesLayout) -> None:
    """Image Plane values shared by the whole axial stack."""
    pix = layout.pixels
    assert pix is not None
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [round(pix.spacing[0], 6), round(pix.spacing[1], 6)]


def axial_position(ds: ElementSink, layout: SeriesLayout, index: int) -> None:
    """Image Plane values for slice `index` of an axial stack, head first supine."""
    pix = layout.pixels
    assert pix is not None
    step = float(layout.params.get("step", layout.params.get("thickness", 5.0) or 5.0))
    z = -index * step + 0.0  # no "-0"
    x0 = round(-pix.spacing[1] * pix.columns / 2, 3)
    y0 = round(-pix.spacing[0] * pix.rows / 2, 3)
    ds.add_new(0x00200032, "DS", f"{x0:g}\\{y0:g}\\{z:g}")
    ds.add_new(0x00201041, "DS", f"{z:.2f}")


# ---- CR / DX -------------------------------------------------------------------------------

CHEST = (Anatomy("CHEST", "XR CHEST 2 VIEWS", ("XRCHEST2", "99PACSH", "XR chest two views")),)
DX_ANATOMY = CHEST + (
    Anatomy("HAND", "XR HAND 3 VIEWS", ("XRHAND3", "99PACSH", "XR hand three views"), True),
)


def _cr_layout(scale: str, anatomy: Anatomy, rng: random.Random) -> list[SeriesLayout]:
    rows = _size(scale, 32, 512, 2500)
    cols = _size(scale, 32, 420, 2048)
    px = 0.168 * 2048 / cols
    pix = PixelSpec("cr", rows, cols, bits_stored=12, photometric="MONOCHROME1",
                    spacing=(px, px))
    return [SeriesLayout("PA", 1, CR_IMAGE, pix, {"view": "PA"}),
            SeriesLayout("LATERAL", 1, CR_IMAGE, pix, {"view": "LL"})]


def _cr_series(ds: Dataset, layout: SeriesLayout, anatomy: Anatomy) -> None:
    assert layout.pixels is not None
    ds.ViewPosition = layout.params["view"]
    ds.PatientOrientation = ["L", "F"] if layout.params["view"] == "PA" else ["A", "F"]
    ds.KVP = "125"
    ds.ExposureTime = 10
    ds.XRayTubeCurrent = 320
    ds.ImagerPixelSpacing = [round(v, 6) for v in layout.pixels.spacing]
    ds.PlateType = "IP-1"
    ds.WindowCenter = "2048"
    ds.WindowWidth = "4096"


def _dx_layout(scale: str, anatomy: Anatomy, rng: random.Random) -> list[SeriesLayout]:
    rows = _size(scale, 32, 512, 3000)
    cols = _size(scale, 32, 512, 2500)
    px = 0.143 * 2500 / cols
    pix = PixelSpec("dx", rows, cols, bits_stored=14, spacing=(px, px))
    views = ["PA", "LL"] if anatomy.body_part == "CHEST" else ["PA", "LL", "AP"]
    return [SeriesLayout(f"{anatomy.body_part} {v}", 1, DX_PRESENTATION, pix, {"view": v})
            for v in views]


_DX_REGIONS = {"CHEST": ("51185008", "SCT", "Thorax"), "HAND": ("85562004", "SCT", "Hand"),
               "BREAST": ("76752008", "SCT", "Breast")}


def _dx_common(ds: Dataset, layout: SeriesLayout, anatomy: Anatomy) -> None:
    """DX Series, DX Anatomy Imaged, DX Image and DX Detector modules (also used by MG)."""
    assert layout.pixels is not None
    pix = layout.pixels
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = -1 if pix.photometric == "MONOCHROME1" else 1
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "IDENTITY" if pix.photometric == "MONOCHROME2" else "INVERSE"
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "NO"
    ds.DetectorType = "SCINTILLATOR"
    ds.ImagerPixelSpacing = [round(v, 6) for v in pix.spacing]
    ds.AnatomicRegionSequence = Sequence([code(*_DX_REGIONS[anatomy.body_part])])
    ds.AcquisitionContextSequence = Sequence()
    ds.KVP = "110" if anatomy.body_part != "BREAST" else "28"
    ds.ExposureTime = 20
    ds.XRayTubeCurrent = 200
    ds.WindowCenter = str(2 ** (pix.bits_stored - 1))
    ds.WindowWidth = str(2**pix.bits_stored)


def _dx_series(ds: Dataset, layout: SeriesLayout, anatomy: Anatomy) -> None:
    _dx_common(ds, layout, anatomy)
    view = layout.params["view"]
    ds.ViewPosition = view
    ds.PatientOrientation = ["L", "F"] if view in ("PA", "AP") else ["A", "F"]
    ds.ImageLaterality = "R" if anatomy.paired else "U"
    ds.PositionerType = "COLUMN"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]


# ---- MG ------------------------------------------------------------------------------------

MG_ANATOMY = (Anatomy("BREAST", "MAMMOGRAPHY SCREENING BILATERAL",
                      ("MGSCR", "99PACSH", "Screening mammography bilateral")),)
_MG_VIEWS = (  # laterality, view position, view code, patient orientation
    ("R", "CC", ("399162004", "SCT", "cranio-caudal"), ["L", "R"]),
    ("L", "CC", ("399162004", "SCT", "cranio-caudal"), ["R", "L"]),
    ("R", "MLO", ("399368009", "SCT", "medio-lateral oblique"), ["A", "FR"]),
    ("L", "MLO", ("399368009", "SCT", "medio-lateral oblique"), ["P", "FL"]),
)


def _mg_layout(scale: str, anatomy: Anatomy, rng: random.Random) -> list[SeriesLayout]:
    rows = _size(scale, 40, 1024, 4096)
    cols = _size(scale, 32, 832, 3328)
    px = 0.07 * 3328 / cols
    pix = PixelSpec("mg", rows, cols, bits_stored=12, spacing=(px, px))
    return [SeriesLayout("SCREENING MAMMOGRAM", 4, MG_PRESENTATION, pix, {})]


def _mg_series(ds: Dataset, layout: SeriesLayout, anatomy: Anatomy) -> None:
    _dx_common(ds, layout, anatomy)
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.PositionerType = "MAMMOGRAPHIC"
    ds.OrganExposed = "BREAST"
    ds.BreastImplantPresent = "NO"
    ds.PartialView = "NO"
    ds.BodyPartThickness = "45"
    ds.CompressionForce = "120"
    ds.DistanceSourceToDetector = "650"
    ds.DistanceSourceToPatient = "630"
    ds.EstimatedRadiographicMagnificationFactor = "1.0317"
    ds.AnodeTargetMaterial = "TUNGSTEN"
    ds.FilterMaterial = "RHODIUM"


def _mg_instance(ds: ElementSink, layout: SeriesLayout, index: int) -> None:
    lat, view, vcode, orient = _MG_VIEWS[index % 4]
    ds.add_new(0x00200062, "CS", lat)  # Image Laterality
    ds.add_new(0x00185101, "CS", view)  # View Position
    ds.add_new(0x00200020, "CS", orient)  # Patient Orientation
    item = code(*vcode)
    item.ViewModifierCodeSequence = Sequence()
    ds.add_new(0x00540220, "SQ", Sequence([item]))  # View Code Sequence


# ---- US ------------------------------------------------------------------------------------

US_ANATOMY = (
    Anatomy("ABDOMEN", "US ABDOMEN COMPLETE", ("USABD", "99PACSH", "US abdomen complete")),
    Anatomy("THYROID", "US THYROID", ("USTHY", "99PACSH", "US thyroid")),
)


def _us_layout(scale: str, anatomy: Anatomy, rng: random.Random) -> list[SeriesLayout]:
    rows = _size(scale, 32, 480, 600)
    cols = _size(scale, 40, 640, 800)
    frames = _size(scale, 4, 20, 60)
    still = PixelSpec("usc", rows, cols, samples=3, photometric="RGB", bits_allocated=8,
                      bits_stored=8)
    cine = PixelSpec("us", rows, cols, frames=frames, bits_allocated=8, bits_stored=8)
    return [SeriesLayout(f"{anatomy.body_part} STILLS", _size(scale, 2, 6, 12), US_IMAGE, still),
            SeriesLayout(f"{anatomy.body_part} CINE", _size(scale, 1, 2, 3), US_MULTIFRAME, cine)]


def _us_series(ds: Dataset, layout: SeriesLayout, anatomy: Anatomy) -> None:
    assert layout.pixels is not None
    region = "ABDOMINAL" if anatomy.body_part == "ABDOMEN" else "SMALL PART"
    ds.ImageType = ["ORIGINAL", "PRIMARY", region, "0001"]  # value 4: 2D imaging
    ds.LossyImageCompression = "00"
    ds.PatientOrientation = ""
    if layout.pixels.frames > 1:
        ds.FrameTime = "33.3"
        ds.FrameIncrementPointer = 0x00181063  # Frame Time
        ds.CineRate = 30
        ds.RecommendedDisplayFrameRate = 30
        ds.FrameDelay = "0"
    ds.TransducerData = ["C5-2"]
    ds.ProcessingFunction = "GEN"


# ---- NM ------------------------------------------------------------------------------------

NM_ANATOMY = (Anatomy("WHOLEBODY", "NM BONE SCAN WHOLE BODY",
                      ("NMBONEWB", "99PACSH", "NM bone scan whole body")),)


def _nm_layout(scale: str, anatomy: Anatomy, rng: random.Random) -> list[SeriesLayout]:
    side = _size(scale, 32, 128, 256)
    windows = _size(scale, 2, 1, 1)
    pix = PixelSpec("nm", side * 2, side, frames=2 * windows, bits_stored=16,
                    spacing=(2.4, 2.4))
    return [SeriesLayout("WB ANT/POST", 1, NM_IMAGE, pix, {"windows": windows})]


def _nm_series(ds: Dataset, layout: SeriesLayout, anatomy: Anatomy) -> None:
    assert layout.pixels is not None
    windows = layout.params["windows"]
    ds.ImageType = ["ORIGINAL", "PRIMARY", "STATIC", "EMISSION"]
    ds.PixelSpacing = list(layout.pixels.spacing)
    ds.FrameIncrementPointer = [0x00540010, 0x00540020]
    ds.NumberOfEnergyWindows = windows
    ds.EnergyWindowVector = [w + 1 for w in range(windows) for _ in range(2)]
    ds.NumberOfDetectors = 2
    ds.DetectorVector = [d + 1 for _ in range(windows) for d in range(2)]
    ds.PatientOrientationCodeSequence = Sequence([code("102538003", "SCT", "recumbent")])
    ds.PatientOrientationCodeSequence[0].PatientOrientationModifierCodeSequence = Sequence(
        [code("40199007", "SCT", "supine")])
    ds.PatientGantryRelationshipCodeSequence = Sequence([code("102540008", "SCT", "headfirst")])
    ew = []
    for w in range(windows):
        item = Dataset()
        rng_item = Dataset()
        rng_item.EnergyWindowLowerLimit = f"{126 + 20 * w}"
        rng_item.EnergyWindowUpperLimit = f"{154 + 20 * w}"
        item.EnergyWindowRangeSequence = Sequence([rng_item])
        item.EnergyWindowName = f"TC99M_{w + 1}"
        ew.append(item)
    ds.EnergyWindowInformationSequence = Sequence(ew)
    rp = Dataset()
    rp.RadionuclideCodeSequence = Sequence([code("44588005", "SCT", "^99m^Technetium")])
    rp.RadiopharmaceuticalCodeSequence = Sequence([code("C-B1039", "SRT",
                                                        "Tc-99m medronate")])
    rp.RadionuclideTotalDose = "740"
    ds.RadiopharmaceuticalInformationSequence = Sequence([rp])
    dets = []
    for d in range(2):
        item = Dataset()
        item.CollimatorType = "PARA"
        item.CollimatorGridName = "LEHR"
        item.ViewCodeSequence = Sequence(
            [code("G-A117" if d == 0 else "G-A118", "SRT", "anterior" if d == 0 else "posterior")])
        item.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
        item.ImagePositionPatient = [-307.2, 0, 0]
        dets.append(item)
    ds.DetectorInformationSequence = Sequence(dets)
    ds.CountsAccumulated = 1200000
    ds.ActualFrameDuration = 600000
    ds.PatientOrientation = ""


# ---- PT ------------------------------------------------------------------------------------

PT_ANATOMY = (Anatomy("WHOLEBODY", "PET CT WHOLE BODY FDG",
                      ("PETWB", "99PACSH", "PET whole body FDG")),)


def _pt_layout(scale: str, anatomy: Anatomy, rng: random.Random) -> list[SeriesLayout]:
    n = _size(scale, 4, 47, 250)
    side = _size(scale, 32, 128, 192)
    pix = PixelSpec("pt", side, side, bits_stored=16, signed=True,
                    spacing=(700.0 / side, 700.0 / side))
    return [SeriesLayout("PET WB AC", n, PET_IMAGE, pix, {"thickness": 3.27, "corrected": True}),
            SeriesLayout("PET WB NAC", n, PET_IMAGE, pix, {"thickness": 3.27,
                                                           "corrected": False})][:2]


def _pt_series(ds: Dataset, layout: SeriesLayout, anatomy: Anatomy) -> None:
    plane_static(ds, layout)
    corrected = layout.params["corrected"]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.Units = "BQML"
    ds.CountsSource = "EMISSION"
    ds.SeriesType = ["WHOLE BODY", "IMAGE"]
    ds.NumberOfSlices = layout.count
    ds.CorrectedImage = ["DECY", "ATTN", "NORM"] if corrected else ["DECY", "NORM"]
    ds.DecayCorrection = "START"
    ds.CollimatorType = "NONE"
    ds.RandomsCorrectionMethod = "DLYD"
    ds.AttenuationCorrectionMethod = "CT" if corrected else ""
    ds.ReconstructionMethod = "OSEM"
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "0.5"
    ds.FrameReferenceTime = "0"
    ds.ActualFrameDuration = 180000
    ds.DecayFactor = "1.05"
    ds.SliceThickness = f"{layout.params['thickness']:.2f}"
    rp = Dataset()
    rp.RadionuclideCodeSequence = Sequence([code("77004003", "SCT", "^18^Fluorine")])
    rp.RadiopharmaceuticalCodeSequence = Sequence(
        [code("35321007", "SCT", "Fluorodeoxyglucose F^18^")])
    rp.Radiopharmaceutical = "FDG"
    rp.RadionuclideTotalDose = "370000000"
    rp.RadionuclideHalfLife = "6586.2"
    rp.RadionuclidePositronFraction = "0.97"
    rp.RadiopharmaceuticalStartTime = "080000"
    ds.RadiopharmaceuticalInformationSequence = Sequence([rp])
    ds.PatientOrientationCodeSequence = Sequence([code("102538003", "SCT", "recumbent")])
    ds.PatientOrientationCodeSequence[0].PatientOrientationModifierCodeSequence = Sequence(
        [code("40199007", "SCT", "supine")])
    ds.PatientGantryRelationshipCodeSequence = Sequence([code("102540008", "SCT", "headfirst")])


def _pt_instance(ds: ElementSink, layout: SeriesLayout, index: int) -> None:
    axial_position(ds, layout, index)
    ds.add_new(0x00541330, "US", index + 1)  # Image Index


# ---- XA ------------------------------------------------------------------------------------

XA_ANATOMY = (Anatomy("HEART", "XA CORONARY ANGIOGRAM",
                      ("XACOR", "99PACSH", "Coronary angiography")),)


def _xa_layout(scale: str, anatomy: Anatomy, rng: random.Random) -> list[SeriesLayout]:
    side = _size(scale, 32, 512, 1024)
    frames = _size(scale, 4, 15, 60)
    pix = PixelSpec("xa", side, side, frames=frames, bits_allocated=8, bits_stored=8,
                    spacing=(0.2, 0.2))
    return [SeriesLayout("LCA RAO 30", _size(scale, 1, 2, 4), XA_IMAGE, pix, {})]


def _xa_series(ds: Dataset, layout: SeriesLayout, anatomy: Anatomy) -> None:
    ds.ImageType = ["ORIGINAL", "PRIMARY", "SINGLE PLANE"]
    ds.PixelIntensityRelationship = "LIN"
    ds.FrameIncrementPointer = 0x00181063
    ds.FrameTime = "66.7"
    ds.CineRate = 15
    ds.RecommendedDisplayFrameRate = 15
    ds.KVP = "80"
    ds.RadiationSetting = "GR"
    ds.XRayTubeCurrent = 600
    ds.ExposureTime = 8
    ds.PositionerMotion = "STATIC"
    ds.PositionerPrimaryAngle = "-30"
    ds.PositionerSecondaryAngle = "0"
    ds.DistanceSourceToDetector = "1100"
    ds.DistanceSourceToPatient = "750"
    ds.IntensifierSize = "230"
    ds.ContrastBolusAgent = "IOHEXOL"
    ds.ContrastBolusAgentSequence = Sequence([code("C-B0300", "SRT", "Iohexol")])
    ds.ContrastBolusRoute = "INTRA-ARTERIAL"
    ds.PatientOrientation = ""
    ds.WindowCenter = "128"
    ds.WindowWidth = "256"


# ---- SC ------------------------------------------------------------------------------------

SC_ANATOMY = (Anatomy("CHEST", "OUTSIDE IMAGES SCREENSHOT",
                      ("SCOUT", "99PACSH", "Outside images secondary capture")),)


def _sc_layout(scale: str, anatomy: Anatomy, rng: random.Random) -> list[SeriesLayout]:
    rows = _size(scale, 32, 480, 1024)
    cols = _size(scale, 40, 640, 1280)
    pix = PixelSpec("sc", rows, cols, samples=3, photometric="RGB", bits_allocated=8,
                    bits_stored=8)
    return [SeriesLayout("SCREEN CAPTURE", _size(scale, 1, 3, 5), SC_IMAGE, pix, {})]


def _sc_series(ds: Dataset, layout: SeriesLayout, anatomy: Anatomy) -> None:
    ds.ConversionType = "WSD"
    ds.PatientOrientation = ""
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.BurnedInAnnotation = "YES"


# ---- SR and DOC (no pixels; content is built in documents.py) -----------------------------

REPORT_ANATOMY = (Anatomy("CHEST", "XR CHEST REPORT", ("XRCHEST2", "99PACSH",
                                                        "XR chest two views")),)


def _sr_layout(scale: str, anatomy: Anatomy, rng: random.Random) -> list[SeriesLayout]:
    return [SeriesLayout("RADIOLOGY REPORT", 1, BASIC_TEXT_SR, None, {})]


def _doc_layout(scale: str, anatomy: Anatomy, rng: random.Random) -> list[SeriesLayout]:
    return [SeriesLayout("SCANNED REPORT", 1, ENCAPSULATED_PDF, None, {})]


def _nothing(ds: Dataset, layout: SeriesLayout, anatomy: Anatomy) -> None:
    return None


MODALITIES: dict[str, Modality] = {
    m.name: m
    for m in (
        Modality("CT", "CT", CT_ANATOMY, _ct_layout, _ct_series, axial_position, True, True),
        Modality("MR", "MR", MR_ANATOMY, _mr_layout, _mr_series, axial_position, True, True),
        Modality("CR", "CR", CHEST, _cr_layout, _cr_series, _no_instance_attrs),
        Modality("DX", "DX", DX_ANATOMY, _dx_layout, _dx_series, _no_instance_attrs),
        Modality("MG", "MG", MG_ANATOMY, _mg_layout, _mg_series, _mg_instance),
        Modality("US", "US", US_ANATOMY, _us_layout, _us_series, _no_instance_attrs),
        Modality("NM", "NM", NM_ANATOMY, _nm_layout, _nm_series, _no_instance_attrs),
        Modality("PT", "PT", PT_ANATOMY, _pt_layout, _pt_series, _pt_instance, True, True),
        Modality("XA", "XA", XA_ANATOMY, _xa_layout, _xa_series, _no_instance_attrs),
        Modality("SC", "OT", SC_ANATOMY, _sc_layout, _sc_series, _no_instance_attrs),
        Modality("SR", "SR", REPORT_ANATOMY, _sr_layout, _nothing, _no_instance_attrs,
                 has_pixels=False),
        Modality("DOC", "DOC", REPORT_ANATOMY, _doc_layout, _nothing, _no_instance_attrs,
                 has_pixels=False),
    )
}
