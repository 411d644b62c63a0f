"""The ``classifier:`` section of a model manifest, and loading a model that has one.

A hospital adds a detector by dropping ``weights/<name>/model.onnx`` and ``manifest.yaml`` into the
weights directory. Everything common to all models (labels, input size, normalisation, thresholds,
critical thresholds, hash, verified flag) is the shared ``pipelines.models.Manifest`` schema and its
checks; this module adds only what a slice/image classifier needs on top: which series to take, the
HU windows stacked as channels, neighbouring-slice context, how slice scores become a study score,
and the codes and display names of the labels.

The shared schema forbids unknown keys, so the ``classifier:`` section is split off before the rest is
validated, and the model is loaded through ``pipelines.models.load_model`` (hash and verified policy
live there only) from a derived copy of the manifest without that section (see ``load_classifier``).
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import threading
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipelines import models
from pipelines.base import PRIVATE_SCHEME, Code, ModelUnavailable

log = logging.getLogger(__name__)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Window(_Strict):
    """A linear HU window mapped to [0, 1]: clip(x, c - w/2, c + w/2), then (x - (c - w/2)) / w."""

    name: str = ""
    center: float
    width: float = Field(gt=0)


class CodeSpec(_Strict):
    value: str
    scheme: str
    meaning: str

    def code(self) -> Code:
        return Code(self.value, self.scheme, self.meaning)


class LabelSpec(_Strict):
    """How one model output is reported: its code and the words used in reports (per language)."""

    code: CodeSpec | None = None
    en: str = ""
    zh: str = ""


class Aggregation(_Strict):
    """Slice probabilities -> one probability per label and series; the study takes the max over series.

    ``max`` is what RSNA-style slice classifiers use for "any haemorrhage in the study"; ``topk_mean``
    (mean of the k highest slices) is less sensitive to a single noisy slice.
    """

    method: Literal["max", "topk_mean"] = "max"
    k: int = Field(3, ge=1)


class ClassifierSpec(_Strict):
    #: ``slices``: one prediction per frame of a cross-sectional series (CT/MR); ``image``: one per image (CR/DX).
    mode: Literal["slices", "image"] = "slices"
    modalities: list[str] = ["CT"]
    #: HU windows stacked as channels; empty = the image itself min-max scaled to [0, 1] (radiographs).
    windows: list[Window] = []
    #: Slice offsets stacked per window, e.g. [-1, 0, 1]; edges repeat the first / last slice.
    context: list[int] = [0]
    #: ``window_major``: w0(i-1), w0(i), w0(i+1), w1(i-1), ...; ``slice_major``: w0(i-1), w1(i-1), ..., w0(i), ...
    channel_order: Literal["window_major", "slice_major"] = "window_major"
    #: What the ONNX output holds: probabilities already, or logits that need a sigmoid / softmax.
    activation: Literal["none", "sigmoid", "softmax"] = "none"
    aggregation: Aggregation = Aggregation()
    #: Slices shown as key images (and given per-slice probabilities in the SR) per reported label.
    key_images: int = Field(3, ge=1, le=20)
    #: Label whose key slices lead the result (e.g. "any"); default the first label.
    primary_label: str | None = None
    min_slices: int = Field(1, ge=1)
    max_slices: int | None = Field(None, ge=1)
    #: Refuse series whose SliceThickness lies outside this range (mm): models trained on 5 mm slices mislead on 0.6 mm.
    slice_thickness_mm: tuple[float, float] | None = None
    #: ``all`` eligible series, or only the one with most slices (e.g. skip the scout and the bone-kernel copy).
    series: Literal["all", "most_slices"] = "all"
    batch_size: int = Field(32, ge=1, le=1024)
    labels: dict[str, LabelSpec] = {}

    @model_validator(mode="after")
    def _check(self) -> ClassifierSpec:
        if 0 not in self.context:
            raise ValueError("context must include 0 (the slice itself)")
        if self.mode == "image" and self.context != [0]:
            raise ValueError("context slices only make sense with mode: slices")
        return self

    @property
    def channels(self) -> int:
        return max(1, len(self.windows)) * len(self.context)

    def code(self, label: str) -> Code:
        spec = self.labels.get(label)
        if spec is not None and spec.code is not None:
            return spec.code.code()
        return Code(label.upper()[:16], PRIVATE_SCHEME, spec.en if spec and spec.en else label)

    def display(self, label: str, language: str = "en") -> str:
        spec = self.labels.get(label)
        if spec is None:
            return label
        localised = spec.zh if language == "zh" else ""
        return localised or spec.en or (spec.code.meaning if spec.code else label)


def split_manifest(path: Path) -> tuple[models.Manifest, ClassifierSpec]:
    """Validate the shared part with the shared schema and the ``classifier:`` part with ours."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ModelUnavailable(f"manifest {path} cannot be read: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise ModelUnavailable(f"manifest {path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ModelUnavailable(f"manifest {path} must be a mapping")
    section = raw.pop("classifier", None)
    if section is None:
        raise ModelUnavailable(f"manifest {path} has no classifier: section; the classifier pipeline needs one")
    try:
        spec = ClassifierSpec.model_validate(section)
        manifest = models.Manifest.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or '(top)'}: {e['msg']}" for e in exc.errors())
        raise ModelUnavailable(f"manifest {path} is invalid: {problems}") from exc
    unknown = sorted(set(spec.labels) - set(manifest.labels))
    if unknown:
        raise ModelUnavailable(f"manifest {path}: classifier.labels names labels the model does not have: {unknown}")
    if spec.primary_label is not None and spec.primary_label not in manifest.labels:
        raise ModelUnavailable(f"manifest {path}: primary_label {spec.primary_label!r} is not one of the labels")
    if spec.channels != manifest.input.channels:
        raise ModelUnavailable(
            f"manifest {path}: {max(1, len(spec.windows))} window(s) x {len(spec.context)} context slice(s) make "
            f"{spec.channels} channels but input.channels is {manifest.input.channels}")
    return manifest, spec


_DERIVED_LOCK = threading.Lock()


def _derived_manifest(path: Path, manifest: models.Manifest) -> Path:
    """The shared part of the manifest with an absolute ``file:``, for ``models.load_model``.

    Written only when its content changes, under the temp directory (the weights directory may be
    read-only). Goes away once ``load_model`` accepts an already-parsed manifest.
    """
    onnx = (path.parent / manifest.file).resolve()
    derived = manifest.model_copy(update={"file": str(onnx)})
    text = yaml.safe_dump(derived.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    target = Path(tempfile.gettempdir()) / "ainode-classifier" / key / "manifest.yaml"
    with _DERIVED_LOCK:
        if not target.is_file() or target.read_text(encoding="utf-8") != text:
            models.write_manifest(derived, target)
    return target


def load_classifier(model: str | Path, *, weights_dir: str | Path | None = None, allow_unverified: bool = False,
                    providers: list[str] | None = None) -> tuple[models.ModelRunner, ClassifierSpec]:
    """Resolve, validate and load; every problem is a ``ModelUnavailable`` with a reason for status."""
    path = models.resolve_manifest(model, weights_dir)
    if not path.is_file():
        raise ModelUnavailable(f"model {model!s}: no manifest at {path}")
    manifest, spec = split_manifest(path)
    runner = models.load_model(_derived_manifest(path, manifest), allow_unverified=allow_unverified,
                               providers=providers)
    return runner, spec
