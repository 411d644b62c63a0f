"""The contract between the node and its pipelines.

A pipeline is pure: it gets a ``StudyInput`` (pixel arrays in physical units plus tags) and returns a
``PipelineResult``. It never opens a socket and never writes DICOM; ``node/results`` turns the result
into SR / SC / KOS, so every pipeline's output looks the same to a viewer. Results cross process
boundaries (worker -> outbox -> listener), so they serialise to JSON plus ``.npy`` files.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args, get_origin, get_type_hints

import numpy as np

from pipelines.policy import CriticalPolicy, Vocabulary

try:  # only for type hints; pipelines may read headers but never write DICOM
    from pydicom import Dataset
except ImportError:  # pragma: no cover
    Dataset = Any  # type: ignore[misc,assignment]


# --------------------------------------------------------------------------- result vocabulary
@dataclass(frozen=True)
class Code:
    """A coded concept: (value, scheme designator, meaning), e.g. Code("36118008", "SCT", "Pneumothorax")."""

    value: str
    scheme: str
    meaning: str


UCUM_HU = Code("[hnsf'U]", "UCUM", "Hounsfield unit")
UCUM_MGY = Code("mGy", "UCUM", "mGy")
UCUM_MGYCM = Code("mGy.cm", "UCUM", "mGy.cm")
UCUM_MM = Code("mm", "UCUM", "mm")
UCUM_CM = Code("cm", "UCUM", "cm")
UCUM_RATIO = Code("1", "UCUM", "no units")
UCUM_PERCENT = Code("%", "UCUM", "%")
UCUM_KGM2 = Code("kg/m2", "UCUM", "kg/m2")

#: Private coding scheme for concepts DICOM has no code for (CNR, global noise level, ...).
#: ``node/results`` declares it in the SR's Coding Scheme Identification Sequence.
PRIVATE_SCHEME = "99AINODE"


@dataclass(frozen=True)
class ImageRef:
    """One source image (or one frame of a multi-frame image); frame is 1-based, None = whole image."""

    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    frame: int | None = None


GraphicType = Literal["POINT", "MULTIPOINT", "POLYLINE", "CIRCLE", "ELLIPSE"]


@dataclass
class Region:
    """A 2D region on a source image, in that image's pixel coordinates as (column, row).

    POLYLINE is closed when the last point equals the first. CIRCLE is [centre, a point on the
    circle], as in DICOM SCOORD.
    """

    image: ImageRef
    graphic_type: GraphicType
    points: list[tuple[float, float]]
    label: str = ""


@dataclass
class Finding:
    """A coded finding after thresholds were applied: present or not, with its probability."""

    code: Code
    label: str
    present: bool
    probability: float | None = None
    certainty: Literal["present", "possible", "absent"] | None = None
    critical: bool = False
    site: Code | None = None
    regions: list[Region] = field(default_factory=list)
    key_images: list[ImageRef] = field(default_factory=list)
    note: str = ""
    #: The finding's name per report language (``{"zh": "胸腔积液"}``), so a Chinese SC panel does not
    #: show English names; ``label`` serves every language not listed.
    names: dict[str, str] = field(default_factory=dict)
    #: The operating threshold at or above which ``probability`` counts as present, when the pipeline has
    #: one; shown next to the probability ("0.62, threshold 0.51") so a reader knows what the number means.
    threshold: float | None = None

    def name(self, language: str = "en") -> str:
        return self.names.get(language) or self.label or self.code.meaning


@dataclass
class Measurement:
    """A physical measurement; measurements sharing ``group`` go in one SR measurement group."""

    code: Code
    value: float
    unit: Code
    group: str
    label: str = ""
    site: Code | None = None
    region: Region | None = None
    series_uid: str | None = None
    derivation: Code | None = None


@dataclass
class Evaluation:
    """A coded qualitative result, e.g. (Image quality, 'fail') with the reasons in ``note``."""

    name: Code
    value: Code
    group: str = ""
    note: str = ""
    critical: bool = False


@dataclass
class Narrative:
    """Report text in one language; ``critical`` fills the Communication of Critical Results section."""

    findings: str = ""
    impression: str = ""
    recommendations: str = ""
    critical: str = ""


OverlayKind = Literal["image", "heatmap", "mask"]


@dataclass
class Overlay:
    """A picture for the Secondary Capture.

    kind="image":   ``array`` is RGB uint8 (H, W, 3) rendered by the pipeline (chart, table, montage).
    kind="heatmap": ``array`` is float (h, w) in [0, 1], any resolution, laid over ``source``.
    kind="mask":    ``array`` is bool (H, W) in ``source``'s pixel grid.
    """

    name: str
    kind: OverlayKind
    array: np.ndarray
    source: ImageRef | None = None
    caption: str = ""


@dataclass
class ModelIdentity:
    name: str
    version: str
    sha256: str = ""
    verified: bool = False
    task: str = ""
    source: str = ""
    licence: str = ""
    evaluation: str = ""  # the local evaluation a verified model rests on (``ainode weights verify``)


Status = Literal["ok", "refused", "model_unavailable"]


@dataclass
class PipelineResult:
    pipeline: str
    pipeline_version: str
    status: Status = "ok"
    reason: str = ""
    findings: list[Finding] = field(default_factory=list)
    measurements: list[Measurement] = field(default_factory=list)
    evaluations: list[Evaluation] = field(default_factory=list)
    narrative: dict[str, Narrative] = field(default_factory=dict)
    overlays: list[Overlay] = field(default_factory=list)
    key_images: list[ImageRef] = field(default_factory=list)
    model: ModelIdentity | None = None
    procedure: Code | None = None
    warnings: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def critical(self) -> bool:
        return any(f.critical and f.present for f in self.findings) or any(e.critical for e in self.evaluations)

    @property
    def unverified(self) -> bool:
        return self.model is not None and not self.model.verified

    # ---- persistence (worker writes, listener and results writer read)
    def save(self, directory: str | Path) -> Path:
        """Write result.json and one .npy per overlay; returns the JSON path. Atomic per file."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        data = _to_jsonable(self)
        for i, ov in enumerate(self.overlays):
            name = f"overlay-{i}.npy"
            np.save(d / name, np.asarray(ov.array))
            data["overlays"][i]["array"] = name
        tmp = d / "result.json.tmp"
        tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
        tmp.replace(d / "result.json")
        return d / "result.json"

    @classmethod
    def load(cls, directory: str | Path) -> PipelineResult:
        d = Path(directory)
        data = json.loads((d / "result.json").read_text(encoding="utf-8"))
        for ov in data.get("overlays", []):
            ov["array"] = np.load(d / ov["array"], allow_pickle=False)
        return _from_jsonable(cls, data)


def _to_jsonable(obj: Any) -> Any:
    if is_dataclass(obj):
        return {f.name: _to_jsonable(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, dict):
        return {k: _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj  # replaced by a file name in save()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _from_jsonable(tp: Any, data: Any) -> Any:
    if data is None:
        return None
    origin = get_origin(tp)
    if is_dataclass(tp):
        hints = get_type_hints(tp)
        return tp(**{k: _from_jsonable(hints[k], v) for k, v in data.items() if k in hints})
    if origin in (list,):
        (inner,) = get_args(tp)
        return [_from_jsonable(inner, v) for v in data]
    if origin is tuple:
        return tuple(data)
    if origin is dict:
        _, inner = get_args(tp)
        return {k: _from_jsonable(inner, v) for k, v in data.items()}
    args = [a for a in get_args(tp) if a is not type(None)]
    if args and origin is not Literal:  # Optional[X] / X | None
        dcs = [a for a in args if is_dataclass(a)]
        if dcs and isinstance(data, dict):
            return _from_jsonable(dcs[0], data)
        if any(get_origin(a) is list for a in args) and isinstance(data, list):
            return [tuple(p) if isinstance(p, list) else p for p in data]
    if tp is np.ndarray:
        return data
    if isinstance(data, list) and origin is None:
        return [tuple(v) if isinstance(v, list) else v for v in data]
    return data


# --------------------------------------------------------------------------- study input
@dataclass
class SeriesInput:
    """One series, frames sorted along the slice normal (head-first order as stored positions say).

    ``pixels`` is float32 (frames, rows, cols) with Modality LUT (rescale) applied, so CT is in HU;
    photometric polarity is NOT changed (MONOCHROME1 stays as stored: see ``photometric``).
    Colour images are uint8 (frames, rows, cols, 3). Series without pixels (SR, dose reports)
    have ``pixels`` None and only ``headers``.
    """

    series_uid: str
    modality: str
    sop_class_uid: str
    frames: list[ImageRef]
    headers: list[Dataset]
    pixels: np.ndarray | None = None
    pixel_spacing: tuple[float, float] | None = None
    positions: np.ndarray | None = None  # (frames, 3) ImagePositionPatient, mm
    orientation: np.ndarray | None = None  # (6,) ImageOrientationPatient
    slice_positions: np.ndarray | None = None  # (frames,) position along the normal, mm
    slice_thickness: float | None = None
    photometric: str = "MONOCHROME2"
    window: tuple[float, float] | None = None  # (centre, width) from the first frame
    frame_headers: list[Dataset] = field(default_factory=list)  # per-frame functional groups, if any
    tags: dict[str, Any] = field(default_factory=dict)  # keyword -> value of the first instance
    paths: list[Path] = field(default_factory=list)

    @property
    def is_multiframe(self) -> bool:
        return any(r.frame is not None for r in self.frames)

    def header_for(self, index: int) -> Dataset:
        """The instance header that frame ``index`` came from."""
        uid = self.frames[index].sop_instance_uid
        for h in self.headers:
            if h.SOPInstanceUID == uid:
                return h
        raise KeyError(uid)


@dataclass
class StudyInput:
    study_uid: str
    series: list[SeriesInput]
    tags: dict[str, Any] = field(default_factory=dict)  # study-level keywords of the first instance
    options: dict[str, Any] = field(default_factory=dict)  # route options + pipelines.<name> config
    language: str = "en"
    #: The job's critical policy (manifest overridden by the route), resolved when the job was built;
    #: None: the model manifest's own operating points (a pipeline run outside the node).
    policy: CriticalPolicy | None = None

    def by_modality(self, *modalities: str) -> list[SeriesInput]:
        return [s for s in self.series if s.modality in modalities]


# --------------------------------------------------------------------------- pipeline interface
class Refused(Exception):
    """Raised by a pipeline that will not process a study; the reason is shown in status."""


class ModelUnavailable(Exception):
    """Raised when the model file is missing, its hash differs, or it is unverified and not allowed."""


class Pipeline(ABC):
    """Base class for pipelines found through the ``ainode.pipelines`` entry-point group.

    One instance lives for the life of a worker process, so models load once and stay warm.
    """

    name: ClassVar[str]
    version: ClassVar[str] = "0.0.0"
    modalities: ClassVar[frozenset[str]] = frozenset()
    sop_classes: ClassVar[frozenset[str] | None] = None  # None = any storage class
    device: ClassVar[Literal["cpu", "gpu"]] = "cpu"
    memory_mb: ClassVar[int] = 1024
    # a pydantic model of the options it reads (extra keys forbidden); None accepts any option
    Options: ClassVar[Any] = None
    min_instances: ClassVar[int] = 1
    max_instances: ClassVar[int | None] = None
    needs_pixels: ClassVar[bool] = True

    def __init__(self, options: dict[str, Any] | None = None):
        self.options = dict(options or {})

    def select(self, study: StudyInput) -> list[SeriesInput]:
        """The series this pipeline would process; an empty list means refuse."""
        out = []
        for s in study.series:
            if self.modalities and s.modality not in self.modalities:
                continue
            if self.sop_classes is not None and s.sop_class_uid not in self.sop_classes:
                continue
            out.append(s)
        return out

    def check(self, study: StudyInput) -> None:
        """Raise Refused when the study is outside what this pipeline accepts."""
        chosen = self.select(study)
        if not chosen:
            found = sorted({s.modality for s in study.series})
            raise Refused(f"{self.name} accepts modality {sorted(self.modalities)}; study has {found}")
        n = sum(len(s.frames) for s in chosen)
        if n < self.min_instances:
            raise Refused(f"{self.name} needs at least {self.min_instances} images; got {n}")
        if self.max_instances is not None and n > self.max_instances:
            raise Refused(f"{self.name} accepts at most {self.max_instances} images; got {n}")

    def vocabulary(self, options: dict[str, Any]) -> Vocabulary | None:
        """The labels of the model these options select, with every name a route may use for them, and the
        manifest's thresholds; None for a pipeline without labelled findings. Reads the manifest only (the
        listener calls it when it builds a job); raises ModelUnavailable when there is no manifest."""
        return None

    def refused(self, reason: str) -> PipelineResult:
        return PipelineResult(self.name, self.version, status="refused", reason=reason)

    @abstractmethod
    def run(self, study: StudyInput) -> PipelineResult: ...
