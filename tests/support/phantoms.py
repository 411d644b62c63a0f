"""Synthetic CT body phantom written as real DICOM (CT Image Storage), with known truth.

The phantom is an adult abdomen cross-section in patient coordinates (LPS, mm): an elliptical
body with a subcutaneous fat rim, a muscle wall continuous with paraspinal muscles, liver, a
vertebra, and an optional metal insert, on a patient table, inside a circular reconstruction FOV
(outside it: padding -3024 HU). Noise is white or correlated (Gaussian-filtered, rescaled exactly
to the requested sigma), independent per slice and per reconstruction. Every builder returns the
truth it used so tests can compare against it, not against the pipeline's own idea of the phantom.

Reused by other tests: ``write_series`` / ``write_recons`` / ``write_dose_sr`` write files and
return paths; ``phantom_slice`` gives noiseless HU and labels for any geometry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from scipy import ndimage as ndi

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
XRAY_DOSE_SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.67"

# tissue labels and HU
AIR, FAT, MUSCLE, VISCERA, LIVER, BONE, METAL, TABLE, OUTSIDE = range(9)
HU = {AIR: -1000.0, FAT: -100.0, MUSCLE: 50.0, VISCERA: 35.0, LIVER: 60.0, BONE: 400.0, METAL: 3500.0,
      TABLE: 150.0, OUTSIDE: -3024.0}


@dataclass
class PhantomSpec:
    """Geometry and acquisition of one synthetic series. Distances in mm."""

    rows: int = 512
    cols: int = 512
    spacing: float = 0.75
    n_slices: int = 10
    slice_spacing: float = 2.5
    z0: float = -100.0
    body_a: float = 165.0  # lateral semi-axis
    body_b: float = 120.0  # AP semi-axis
    fat_mm: float = 25.0
    wall_mm: float = 12.0
    fov_radius: float | None = None  # None: inscribed circle of the image
    metal: bool = False
    table: bool = True
    sigma: float = 15.0
    correlation_px: float = 0.0  # Gaussian filter sigma in pixels; 0 = white noise
    bandpass: bool = False  # CT-like texture: Gaussian(c) - 0.8 Gaussian(3c), NPS peaked away from zero
    seed: int = 0
    missing: list[int] = field(default_factory=list)  # slice indices left out of the series
    # headers
    kernel: str = "STANDARD"
    description: str = "ABD PELVIS 2.5mm"
    body_part: str = "ABDOMEN"
    protocol: str = "ABDOMEN PELVIS W CONTRAST"
    ctdivol: float | None = 9.8
    phantom_code: str | None = "113691"  # IEC Body Dosimetry Phantom; "113690" head; None = absent
    kvp: float = 120.0
    ma: int = 220
    manufacturer: str = "GE MEDICAL SYSTEMS"
    model: str = "SYNTHETIC CT"
    weight_kg: float | None = 78.0
    height_m: float | None = 1.76
    ge_ir: str | None = None  # GEHC_CT_ADVAPP_001 (0053,xx40) iterative recon annotation
    irradiation_uid: str | None = None  # (0008,3010), links the images to a dose-report event


def pixel_grid(spec: PhantomSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Patient x, y (mm) of every pixel centre and the ImagePositionPatient x/y of pixel (0, 0)."""
    x0 = -(spec.cols - 1) / 2 * spec.spacing
    y0 = -(spec.rows - 1) / 2 * spec.spacing
    xs = x0 + np.arange(spec.cols) * spec.spacing
    ys = y0 + np.arange(spec.rows) * spec.spacing
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return xx, yy, np.array([x0, y0])


def phantom_slice(spec: PhantomSpec) -> tuple[np.ndarray, np.ndarray]:
    """Noiseless HU and label map (rows, cols); the same for every z (a cylinder)."""
    xx, yy, _ = pixel_grid(spec)
    lab = np.full(xx.shape, AIR, np.int8)

    def ell(cx: float, cy: float, a: float, b: float) -> np.ndarray:
        return ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1.0

    a, b = spec.body_a, spec.body_b
    if spec.table:
        lab[(np.abs(xx) < 150) & (yy > b + 8) & (yy < b + 15)] = TABLE
    lab[ell(0, 0, a, b)] = FAT
    lab[ell(0, 0, a - spec.fat_mm, b - spec.fat_mm)] = MUSCLE
    lab[ell(0, 0, a - spec.fat_mm - spec.wall_mm, b - spec.fat_mm - spec.wall_mm)] = VISCERA
    lab[ell(-60, -10, 65, 55) & (lab == VISCERA)] = LIVER  # patient right = -x
    inner = ell(0, 0, a - spec.fat_mm - spec.wall_mm, b - spec.fat_mm - spec.wall_mm)
    lab[inner & (np.abs(xx) < 55) & (yy > 50)] = MUSCLE  # paraspinal block, posterior = +y
    lab[ell(0, 36, 17, 15)] = BONE  # vertebral body
    lab[ell(0, 66, 5, 14)] = BONE  # spinous process
    if spec.metal:
        lab[ell(45, -30, 4, 4)] = METAL
    r_fov = spec.fov_radius if spec.fov_radius is not None else (min(spec.rows, spec.cols) - 1) / 2 * spec.spacing
    lab[xx**2 + yy**2 > r_fov**2] = OUTSIDE
    hu = np.vectorize(HU.get, otypes=[np.float64])(lab)
    return hu, lab


def noise_field(shape: tuple[int, ...], sigma: float, correlation_px: float, rng: np.random.Generator,
                bandpass: bool = False) -> np.ndarray:
    """Noise with exactly ``sigma`` expected SD: the filter's power is measured, not approximated.

    ``bandpass`` gives a filtered-back-projection-like texture (difference of Gaussians: little
    power at zero frequency, negative correlation at a few pixels) instead of plain low-pass noise.
    """
    w = rng.standard_normal(shape)
    if correlation_px <= 0:
        return w * sigma
    lead = (0,) * (len(shape) - 2)

    def filt(a: np.ndarray, extra: tuple[int, ...]) -> np.ndarray:
        out = ndi.gaussian_filter(a, extra + (correlation_px, correlation_px))
        if bandpass:
            out = out - 0.8 * ndi.gaussian_filter(a, extra + (3 * correlation_px, 3 * correlation_px))
        return out

    delta = np.zeros((121, 121))
    delta[60, 60] = 1.0
    gain = 1.0 / np.sqrt((filt(delta, ()) ** 2).sum())
    return filt(w, lead) * gain * sigma


def _code_item(value: str, scheme: str, meaning: str) -> Dataset:
    d = Dataset()
    d.CodeValue, d.CodingSchemeDesignator, d.CodeMeaning = value, scheme, meaning
    return d


@dataclass
class StudyIds:
    study_uid: str = field(default_factory=generate_uid)
    frame_of_reference_uid: str = field(default_factory=generate_uid)
    patient_id: str = "PHANTOM-001"
    patient_name: str = "PHANTOM^SYNTHETIC"
    accession: str = "ACC0001"


def _base(ids: StudyIds, series_uid: str, sop_class: str, modality: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = ids.study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.PatientName = ids.patient_name
    ds.PatientID = ids.patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = ids.accession
    ds.StudyID = "1"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT ABDOMEN PELVIS"
    return ds


def _ct_header(ids: StudyIds, spec: PhantomSpec, series_uid: str, series_number: int) -> Dataset:
    ds = _base(ids, series_uid, CT_IMAGE_STORAGE, "CT")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.FrameOfReferenceUID = ids.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.SeriesNumber = series_number
    ds.SeriesDescription = spec.description
    ds.ProtocolName = spec.protocol
    ds.BodyPartExamined = spec.body_part
    ds.Manufacturer = spec.manufacturer
    ds.ManufacturerModelName = spec.model
    if spec.weight_kg is not None:
        ds.PatientWeight = spec.weight_kg
    if spec.height_m is not None:
        ds.PatientSize = spec.height_m
    ds.KVP = spec.kvp
    ds.XRayTubeCurrent = spec.ma
    ds.ExposureTime = 500
    ds.Exposure = int(spec.ma * 0.5)
    ds.SliceThickness = spec.slice_spacing
    ds.SpacingBetweenSlices = spec.slice_spacing
    ds.ConvolutionKernel = spec.kernel
    ds.ReconstructionDiameter = round(spec.cols * spec.spacing, 2)
    ds.SpiralPitchFactor = 0.984
    ds.PatientPosition = "FFS"
    if spec.ctdivol is not None:
        ds.CTDIvol = spec.ctdivol
    if spec.phantom_code is not None:
        meaning = {"113691": "IEC Body Dosimetry Phantom", "113690": "IEC Head Dosimetry Phantom"}[spec.phantom_code]
        ds.CTDIPhantomTypeCodeSequence = Sequence([_code_item(spec.phantom_code, "DCM", meaning)])
    if spec.irradiation_uid:
        ds.IrradiationEventUID = spec.irradiation_uid
    if spec.ge_ir:
        block = ds.private_block(0x0053, "GEHC_CT_ADVAPP_001", create=True)
        block.add_new(0x40, "SH", spec.ge_ir)
    ds.Rows, ds.Columns = spec.rows, spec.cols
    ds.PixelSpacing = [spec.spacing, spec.spacing]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    ds.WindowCenter, ds.WindowWidth = 40, 400
    return ds


def _write_ct(ds: Dataset, hu: np.ndarray, path: Path) -> None:
    stored = np.clip(np.round(hu + 1024.0), -32768, 32767).astype(np.int16)
    ds.PixelData = stored.tobytes()
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


def write_series(directory: str | Path, spec: PhantomSpec, ids: StudyIds | None = None, series_number: int = 2,
                 series_uid: str | None = None) -> tuple[list[Path], StudyIds]:
    """Write one axial series; returns the file paths and the study identifiers used."""
    ids = ids or StudyIds()
    series_uid = series_uid or generate_uid()
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    hu0, lab = phantom_slice(spec)
    rng = np.random.default_rng(spec.seed)
    inside = lab != OUTSIDE
    _, _, xy0 = pixel_grid(spec)
    paths = []
    for i in range(spec.n_slices):
        noise = noise_field((spec.rows, spec.cols), spec.sigma, spec.correlation_px, rng, spec.bandpass)
        if i in spec.missing:
            continue
        hu = np.where(inside, hu0 + noise, hu0)
        ds = _ct_header(ids, spec, series_uid, series_number)
        z = spec.z0 + i * spec.slice_spacing
        ds.ImagePositionPatient = [float(xy0[0]), float(xy0[1]), z]
        ds.SliceLocation = z
        ds.InstanceNumber = i + 1
        p = out / f"s{series_number}_{i:04d}.dcm"
        _write_ct(ds, hu, p)
        paths.append(p)
    return paths, ids


@dataclass
class Recon:
    description: str
    kernel: str
    sigma: float
    ge_ir: str | None = None


DEFAULT_RECONS = (Recon("FBP", "STANDARD", 25.0), Recon("ASiR-V 50%", "STANDARD", 15.0, "ASiR-V 50%"),
                  Recon("DLIR-H", "STANDARD", 8.0, "DLIR High"))


def write_recons(directory: str | Path, spec: PhantomSpec, recons: tuple[Recon, ...] = DEFAULT_RECONS,
                 ids: StudyIds | None = None) -> tuple[dict[str, list[Path]], StudyIds]:
    """Several reconstructions of one acquisition: same FoR and positions, own UIDs, noise and sigma."""
    ids = ids or StudyIds()
    out: dict[str, list[Path]] = {}
    for j, r in enumerate(recons):
        s = PhantomSpec(**{**spec.__dict__, "sigma": r.sigma, "kernel": r.kernel, "description": r.description,
                           "ge_ir": r.ge_ir, "seed": spec.seed + 101 * (j + 1)})
        out[r.description], _ = write_series(directory, s, ids, series_number=2 + j)
    return out, ids


ENHANCED_CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"


def _item(**kw: object) -> Dataset:
    d = Dataset()
    for k, v in kw.items():
        setattr(d, k, v)
    return d


def write_enhanced(directory: str | Path, spec: PhantomSpec, ids: StudyIds | None = None,
                   series_number: int = 5) -> tuple[Path, StudyIds]:
    """The same phantom as one Enhanced CT Image (multi-frame, functional groups) instance."""
    ids = ids or StudyIds()
    hu0, lab = phantom_slice(spec)
    rng = np.random.default_rng(spec.seed)
    inside = lab != OUTSIDE
    _, _, xy0 = pixel_grid(spec)
    frames, per_frame = [], []
    for i in range(spec.n_slices):
        noise = noise_field((spec.rows, spec.cols), spec.sigma, spec.correlation_px, rng, spec.bandpass)
        if i in spec.missing:
            continue
        frames.append(np.clip(np.round(np.where(inside, hu0 + noise, hu0) + 1024.0), -32768, 32767).astype(np.int16))
        z = spec.z0 + i * spec.slice_spacing
        per_frame.append(_item(
            PlanePositionSequence=Sequence([_item(ImagePositionPatient=[float(xy0[0]), float(xy0[1]), z])]),
            FrameContentSequence=Sequence([_item(InStackPositionNumber=i + 1, StackID="1")])))
    ds = _base(ids, generate_uid(), ENHANCED_CT_STORAGE, "CT")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.FrameOfReferenceUID = ids.frame_of_reference_uid
    ds.SeriesNumber = series_number
    ds.InstanceNumber = 1
    ds.SeriesDescription = spec.description + " ENH"
    ds.BodyPartExamined = spec.body_part
    ds.ProtocolName = spec.protocol
    ds.Manufacturer, ds.ManufacturerModelName = spec.manufacturer, spec.model
    ds.NumberOfFrames = len(frames)
    ds.Rows, ds.Columns = spec.rows, spec.cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    exposure = _item(ExposureTimeInms=500.0, XRayTubeCurrentInmA=float(spec.ma), ExposureInmAs=spec.ma * 0.5)
    if spec.ctdivol is not None:
        exposure.CTDIvol = spec.ctdivol
    if spec.phantom_code is not None:
        meaning = {"113691": "IEC Body Dosimetry Phantom", "113690": "IEC Head Dosimetry Phantom"}[spec.phantom_code]
        exposure.CTDIPhantomTypeCodeSequence = Sequence([_code_item(spec.phantom_code, "DCM", meaning)])
    ds.SharedFunctionalGroupsSequence = Sequence([_item(
        PixelMeasuresSequence=Sequence([_item(PixelSpacing=[spec.spacing, spec.spacing],
                                              SliceThickness=spec.slice_spacing)]),
        PlaneOrientationSequence=Sequence([_item(ImageOrientationPatient=[1, 0, 0, 0, 1, 0])]),
        PixelValueTransformationSequence=Sequence([_item(RescaleIntercept=-1024, RescaleSlope=1, RescaleType="HU")]),
        CTImageFrameTypeSequence=Sequence([_item(FrameType=["ORIGINAL", "PRIMARY", "AXIAL", "NONE"])]),
        CTXRayDetailsSequence=Sequence([_item(KVP=spec.kvp)]),
        CTExposureSequence=Sequence([exposure]),
        CTReconstructionSequence=Sequence([_item(ConvolutionKernel=spec.kernel,
                                                 ReconstructionAlgorithm="FILTER_BACK_PROJ")]),
    )])
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.PixelData = np.stack(frames).tobytes()
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    p = out / f"enhanced_{series_number}.dcm"
    pydicom.dcmwrite(p, ds, enforce_file_format=True)
    return p, ids


def write_localizer(directory: str | Path, ids: StudyIds, spec: PhantomSpec | None = None) -> Path:
    """A single coronal scout image (ImageType LOCALIZER) in its own series."""
    spec = spec or PhantomSpec()
    ds = _ct_header(ids, spec, generate_uid(), 1)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.SeriesDescription = "Scout"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.ImagePositionPatient = [-191.625, 0.0, 200.0]
    ds.InstanceNumber = 1
    for k in ("CTDIvol", "CTDIPhantomTypeCodeSequence"):
        if k in ds:
            delattr(ds, k)
    hu, _ = phantom_slice(spec)
    p = Path(directory) / "scout.dcm"
    Path(directory).mkdir(parents=True, exist_ok=True)
    _write_ct(ds, hu + np.random.default_rng(1).normal(0, 5, hu.shape), p)
    return p


def _num(concept: tuple[str, str], value: float, unit: tuple[str, str]) -> Dataset:
    d = Dataset()
    d.RelationshipType, d.ValueType = "CONTAINS", "NUM"
    d.ConceptNameCodeSequence = Sequence([_code_item(concept[0], "DCM", concept[1])])
    mv = Dataset()
    mv.NumericValue = f"{value:.2f}"
    mv.MeasurementUnitsCodeSequence = Sequence([_code_item(unit[0], "UCUM", unit[1])])
    d.MeasuredValueSequence = Sequence([mv])
    return d


def _container(concept: tuple[str, str], items: list[Dataset], rel: str = "CONTAINS") -> Dataset:
    d = Dataset()
    d.RelationshipType, d.ValueType, d.ContinuityOfContent = rel, "CONTAINER", "SEPARATE"
    d.ConceptNameCodeSequence = Sequence([_code_item(concept[0], "DCM", concept[1])])
    d.ContentSequence = Sequence(items)
    return d


def write_dose_sr(directory: str | Path, ids: StudyIds, events: list[tuple],
                  total_dlp: float | None = None) -> Path:
    """X-Ray Radiation Dose SR (TID 10011) with CT Acquisition events.

    Each event: (protocol, CTDIvol mGy, DLP mGy.cm, phantom code) or with an Irradiation Event UID
    as a fifth element.
    """
    ds = _base(ids, generate_uid(), XRAY_DOSE_SR_STORAGE, "SR")
    ds.SeriesNumber = 997
    ds.InstanceNumber = 1
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    ds.ConceptNameCodeSequence = Sequence([_code_item("113701", "DCM", "X-Ray Radiation Dose Report")])
    tmpl = Dataset()
    tmpl.MappingResource, tmpl.TemplateIdentifier = "DCMR", "10011"
    ds.ContentTemplateSequence = Sequence([tmpl])
    items = []
    total = total_dlp if total_dlp is not None else sum(e[2] for e in events)
    items.append(_container(("113811", "CT Accumulated Dose Data"),
                            [_num(("113813", "CT Dose Length Product Total"), total, ("mGy.cm", "mGy.cm"))]))
    for event in events:
        protocol, ctdi, dlp, phantom = event[:4]
        proto = Dataset()
        proto.RelationshipType, proto.ValueType = "CONTAINS", "TEXT"
        proto.ConceptNameCodeSequence = Sequence([_code_item("125203", "DCM", "Acquisition Protocol")])
        proto.TextValue = protocol
        ph = Dataset()
        ph.RelationshipType, ph.ValueType = "CONTAINS", "CODE"
        ph.ConceptNameCodeSequence = Sequence([_code_item("113835", "DCM", "CTDIw Phantom Type")])
        meaning = {"113691": "IEC Body Dosimetry Phantom", "113690": "IEC Head Dosimetry Phantom"}[phantom]
        ph.ConceptCodeSequence = Sequence([_code_item(phantom, "DCM", meaning)])
        dose = _container(("113829", "CT Dose"), [
            _num(("113830", "Mean CTDIvol"), ctdi, ("mGy", "mGy")), ph,
            _num(("113838", "DLP"), dlp, ("mGy.cm", "mGy.cm"))])
        parts = [proto, dose]
        if len(event) > 4:
            uid = Dataset()
            uid.RelationshipType, uid.ValueType = "CONTAINS", "UIDREF"
            uid.ConceptNameCodeSequence = Sequence([_code_item("113769", "DCM", "Irradiation Event UID")])
            uid.UID = event[4]
            parts.append(uid)
        items.append(_container(("113819", "CT Acquisition"), parts))
    ds.ContentSequence = Sequence(items)
    p = Path(directory) / "dose_sr.dcm"
    Path(directory).mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(p, ds, enforce_file_format=True)
    return p
