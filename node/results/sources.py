"""The study's source instances as the writer needs them: light headers, patient/study filled, the key image.

Sources may arrive as paths (the spool) or datasets (tests, callers that already read them). We only
read pixels for the key image, because a 500-slice CT does not need to be decoded to write an SR.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from pipelines.base import ImageRef, PipelineResult

log = logging.getLogger(__name__)

#: Type 2 attributes of the Patient / General Study modules that highdicom reads by attribute access.
TYPE2_EMPTY = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber",
)

#: Patient / Patient Study / General Study attributes every result object carries when the source has them,
#: so all objects of one result describe the patient identically (highdicom's SR and SC copy different sets).
PATIENT_STUDY_COPY = (
    "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence", "OtherPatientIDsSequence", "PatientBirthTime",
    "PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
    "ResponsiblePerson", "ResponsiblePersonRole", "ResponsibleOrganization", "PatientSpeciesDescription",
    "PatientSpeciesCodeSequence", "PatientBreedDescription", "PatientBreedCodeSequence", "BreedRegistrationSequence",
    "StudyDescription", "IssuerOfAccessionNumberSequence", "PatientAge", "PatientSize", "PatientWeight",
)

NON_IMAGE_MODALITIES = {"SR", "KO", "PR", "DOC", "SEG", "RTSTRUCT", "REG"}


@dataclass
class SOPRef:
    """A reference to an earlier result object (e.g. the SR this run supersedes)."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str

    def as_dataset(self) -> Dataset:
        """The minimal dataset highdicom's ``previous_versions`` reads UIDs from."""
        ds = Dataset()
        ds.StudyInstanceUID = self.study_uid
        ds.SeriesInstanceUID = self.series_uid
        ds.SOPInstanceUID = self.sop_instance_uid
        ds.SOPClassUID = self.sop_class_uid
        return ds


@dataclass
class Source:
    header: Dataset  # no pixel data, type-2 attributes present
    path: Path | None = None
    dataset: Dataset | None = None  # the caller's dataset, possibly with pixels

    @property
    def sop_uid(self) -> str:
        return str(self.header.SOPInstanceUID)

    @property
    def is_image(self) -> bool:
        h = self.header
        return str(h.get("Modality", "")) not in NON_IMAGE_MODALITIES and "Rows" in h and "Columns" in h


def clone_header(ds: Dataset) -> Dataset:
    """A new top-level dataset without pixel data; the caller's dataset is never modified.

    (``copy.copy`` of a pydicom Dataset shares its element dict, and even a new dict shares the element
    objects, so ``clone.Modality = "OT"`` would rewrite the caller's Modality: elements are copied.)
    """
    out = Dataset({tag: copy.deepcopy(elem) for tag, elem in ds.items() if tag.group != 0x7FE0})
    if hasattr(ds, "file_meta"):
        out.file_meta = ds.file_meta
    return out


def fill_type2(ds: Dataset) -> Dataset:
    """Missing type-2 attributes become empty, so copying them never raises and dciodvfy stays quiet."""
    for kw in TYPE2_EMPTY:
        if kw not in ds or ds[kw].value is None:
            setattr(ds, kw, "")
    return ds


def copy_patient_study(obj: Dataset, src: Dataset) -> None:
    """Bring the patient/study attributes highdicom skipped; keep de-identified data conformant.

    A source flagged PatientIdentityRemoved YES but naming no method (seen in public data sets) would
    make every result object fail dciodvfy (type 1C); we say the method is unknown rather than drop the flag.
    """
    for kw in PATIENT_STUDY_COPY:
        if kw in src and kw not in obj and src[kw].value not in (None, ""):
            obj[kw] = copy.deepcopy(src[kw])
    if str(obj.get("PatientIdentityRemoved", "")).upper() == "YES" and not (
            obj.get("DeidentificationMethod") or obj.get("DeidentificationMethodCodeSequence")):
        obj.DeidentificationMethod = "Unspecified by the source"


def load_sources(sources: list[Path] | list[Dataset]) -> list[Source]:
    out: list[Source] = []
    for s in sources:
        if isinstance(s, Dataset):
            header = clone_header(s)
            out.append(Source(fill_type2(header), path=Path(s.filename) if getattr(s, "filename", None)
                              and isinstance(s.filename, str) else None, dataset=s))
        else:
            p = Path(s)
            try:
                header = pydicom.dcmread(p, stop_before_pixels=True)
            except (OSError, InvalidDicomError) as exc:  # one unreadable file must not cost the whole result
                log.warning("source %s unreadable, skipped: %s", p.name, exc)
                continue
            out.append(Source(fill_type2(header), path=p))
    if not out:
        raise ValueError("encode() needs at least one readable source instance")
    return out


def _instance_key(src: Source) -> tuple[int, float]:
    h = src.header
    try:
        n = int(h.get("InstanceNumber", 0) or 0)
    except (TypeError, ValueError):
        n = 0
    try:
        z = float(h.ImagePositionPatient[2]) if "ImagePositionPatient" in h else 0.0
    except (TypeError, ValueError, IndexError):
        z = 0.0
    return n, z


def key_image_ref(result: PipelineResult, sources: list[Source]) -> ImageRef | None:
    """result.key_images[0], else the first region's image, else the middle image of the first series."""
    if result.key_images:
        return result.key_images[0]
    for f in result.findings:
        if f.regions:
            return f.regions[0].image
    for m in result.measurements:
        if m.region is not None:
            return m.region.image
    images = [s for s in sources if s.is_image]
    if not images:
        return None
    first_series = str(images[0].header.SeriesInstanceUID)
    series = sorted((s for s in images if str(s.header.SeriesInstanceUID) == first_series), key=_instance_key)
    mid = series[len(series) // 2].header
    return ImageRef(str(mid.SeriesInstanceUID), str(mid.SOPInstanceUID), str(mid.SOPClassUID))


def find(sources: list[Source], sop_uid: str) -> Source | None:
    for s in sources:
        if s.sop_uid == sop_uid:
            return s
    return None


def with_pixels(src: Source) -> Dataset | None:
    """The full dataset of one source (pixels decoded lazily by pydicom), or None when we cannot get it."""
    if src.dataset is not None and "PixelData" in src.dataset:
        return src.dataset
    if src.path is not None and src.path.exists():
        return pydicom.dcmread(src.path)
    log.warning("no pixel data available for key image %s; skipping the summary image", src.sop_uid)
    return None
