"""A manifest-driven slice / image classifier: new detectors need a model file and a manifest, not code.

Slice scores become study findings the way slice-wise CT classifiers (RSNA intracranial haemorrhage
style) are meant to be read: per label, aggregate over slices (max or top-k mean), band with the
job's policy (the manifest's ``thresholds`` and ``critical`` levels, overridden by the route, decided
once before the run: ``pipelines.policy``), and point at the top-scoring slices so the radiologist
lands on them (key images, per-slice probabilities in the SR, and a montage of those slices in the
Secondary Capture).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.base import (
    UCUM_RATIO,
    Code,
    Finding,
    ImageRef,
    Measurement,
    ModelUnavailable,
    Narrative,
    Overlay,
    Pipeline,
    PipelineResult,
    Refused,
    Region,
    SeriesInput,
    StudyInput,
)
from pipelines.models import Manifest, ModelRunner, resolve_manifest
from pipelines.options import ClassifierOptions
from pipelines.policy import LabelNames, Vocabulary, effective

from .montage import render_montage
from .preprocess import iter_batches
from .spec import ClassifierSpec, load_classifier, split_manifest

log = logging.getLogger(__name__)

PROBABILITY = Code("122157", "DCM", "Probability")
DEFAULT_MODEL = "head-ct-ich"

_CERTAINTY_ZH = {"present": "提示存在", "possible": "可疑", "absent": "未见"}
_CERTAINTY_EN = {"present": "present", "possible": "possible", "absent": "absent"}


@dataclass
class SeriesScores:
    """Per-slice probabilities of one series: ``probs[i, j]`` is slice i, label j."""

    series: SeriesInput
    probs: np.ndarray

    def slice_number(self, i: int) -> str:
        try:
            n = self.series.header_for(i).get("InstanceNumber")
        except KeyError:
            n = None
        return str(n) if n not in (None, "") else str(i + 1)


def aggregate(probs: np.ndarray, spec: ClassifierSpec) -> np.ndarray:
    """(slices, labels) -> (labels,) with the manifest's aggregation."""
    if spec.aggregation.method == "max" or probs.shape[0] == 1:
        return probs.max(axis=0)
    k = min(spec.aggregation.k, probs.shape[0])
    return np.sort(probs, axis=0)[-k:].mean(axis=0)


def _activate(out: np.ndarray, activation: str) -> np.ndarray:
    out = out.astype(np.float64)
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-out))
    if activation == "softmax":
        e = np.exp(out - out.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    return out


def classifier_vocabulary(manifest: Manifest, spec: ClassifierSpec) -> Vocabulary:
    """Each label as the manifest spells it, its display name and its code (``classifier.labels``)."""
    labels = [LabelNames(label, display=spec.display(label, "en"), code=spec.code(label).value,
                         other=[spec.code(label).meaning, spec.display(label, "zh")]) for label in manifest.labels]
    return Vocabulary(manifest.name, labels, critical=dict(manifest.critical),
                      thresholds={k: (t.possible, t.present) for k, t in manifest.thresholds.items()})


def _whole_slice(ref: ImageRef, rows: int, cols: int, label: str) -> Region:
    """The score belongs to the whole slice, so its SR region is the image outline, not an invented point."""
    pts = [(0.0, 0.0), (cols - 1.0, 0.0), (cols - 1.0, rows - 1.0), (0.0, rows - 1.0), (0.0, 0.0)]
    return Region(ref, "POLYLINE", pts, label=label)


class ClassifierPipeline(Pipeline):
    """Options (route ``options`` or ``pipelines.classifier``): ``model`` (manifest name under ``weights_dir``
    or a path), ``weights_dir``, ``allow_unverified_models``, ``providers`` (ONNX Runtime provider list)."""

    name = "classifier"
    Options = ClassifierOptions  # every option this pipeline reads (node.pipeline_options)
    version = "1.0.0"
    modalities = frozenset({"CT", "MR", "CR", "DX"})  # the manifest narrows this per model
    device = "gpu"
    memory_mb = 2048

    # ------------------------------------------------------------------ model and series
    def _opts(self, study: StudyInput) -> dict[str, Any]:
        return {**self.options, **study.options}

    def load(self, study: StudyInput) -> tuple[ModelRunner, ClassifierSpec]:
        o = self._opts(study)
        return load_classifier(o.get("model") or DEFAULT_MODEL, weights_dir=o.get("weights_dir"),
                               allow_unverified=bool(o.get("allow_unverified_models", False)),
                               providers=o.get("providers"))

    def vocabulary(self, options: dict[str, Any]) -> Vocabulary:
        o = {**self.options, **options}
        path = resolve_manifest(o.get("model") or DEFAULT_MODEL, o.get("weights_dir"))
        if not path.is_file():
            raise ModelUnavailable(f"model {o.get('model') or DEFAULT_MODEL!s}: no manifest at {path}")
        return classifier_vocabulary(*split_manifest(path))

    def series_for(self, study: StudyInput, spec: ClassifierSpec) -> tuple[list[SeriesInput], list[str]]:
        """Eligible series and, for each one left out, why (shown in status when nothing is left)."""
        chosen, why = [], []
        for s in study.series:
            label = f"series {s.tags.get('SeriesNumber', '') or s.series_uid}"
            if s.modality not in spec.modalities:
                why.append(f"{label}: modality {s.modality} (model takes {', '.join(spec.modalities)})")
            elif s.pixels is None or s.pixels.ndim != 3:
                why.append(f"{label}: no greyscale pixel data")
            elif len(s.frames) < spec.min_slices:
                why.append(f"{label}: {len(s.frames)} slices, model needs at least {spec.min_slices}")
            elif spec.max_slices is not None and len(s.frames) > spec.max_slices:
                why.append(f"{label}: {len(s.frames)} slices, model takes at most {spec.max_slices}")
            elif spec.slice_thickness_mm is not None and s.slice_thickness is not None and not (
                    spec.slice_thickness_mm[0] <= s.slice_thickness <= spec.slice_thickness_mm[1]):
                lo, hi = spec.slice_thickness_mm
                why.append(f"{label}: slice thickness {s.slice_thickness:g} mm outside {lo:g}-{hi:g} mm")
            else:
                chosen.append(s)
        if spec.series == "most_slices" and len(chosen) > 1:
            chosen = [max(chosen, key=lambda s: len(s.frames))]
        return chosen, why

    def check(self, study: StudyInput) -> None:
        _, spec = self.load(study)  # ModelUnavailable propagates: the node reports it as such
        chosen, why = self.series_for(study, spec)
        if not chosen:
            raise Refused("no series the model accepts: " + "; ".join(why))

    # ------------------------------------------------------------------ inference
    def score(self, runner: ModelRunner, spec: ClassifierSpec, series: SeriesInput) -> np.ndarray:
        """(slices, labels) probabilities for one series, batch by batch."""
        labels = runner.manifest.labels
        want = runner.manifest.output.probabilities
        out = np.empty((len(series.frames), len(labels)), np.float64)
        for start, batch in iter_batches(series, spec, runner.manifest.input, spec.batch_size):
            outputs = runner.run(batch)
            raw = outputs.get(want)
            if raw is None:
                raw = next(iter(outputs.values()))
            raw = np.asarray(raw).reshape(batch.shape[0], -1)
            if raw.shape[1] != len(labels):
                raise ModelUnavailable(f"model {runner.manifest.name} returned {raw.shape[1]} outputs per image; "
                                       f"the manifest lists {len(labels)} labels")
            out[start:start + batch.shape[0]] = _activate(raw, spec.activation)
        return out

    def run(self, study: StudyInput) -> PipelineResult:
        try:
            runner, spec = self.load(study)
        except ModelUnavailable as exc:
            return PipelineResult(self.name, self.version, status="model_unavailable", reason=str(exc))
        chosen, why = self.series_for(study, spec)
        if not chosen:
            return self.refused("no series the model accepts: " + "; ".join(why))
        scored = [SeriesScores(s, self.score(runner, spec, s)) for s in chosen]
        return self.build_result(study, runner, spec, scored)

    # ------------------------------------------------------------------ result
    def build_result(self, study: StudyInput, runner: ModelRunner, spec: ClassifierSpec,
                     scored: list[SeriesScores]) -> PipelineResult:
        manifest = runner.manifest
        labels = manifest.labels
        primary = spec.primary_label or labels[0]
        per_series = np.stack([aggregate(sc.probs, spec) for sc in scored])  # (series, labels)
        study_probs = per_series.max(axis=0)
        # every slice of every chosen series, as (series index, slice index)
        slots = [(si, i) for si, sc in enumerate(scored) for i in range(sc.probs.shape[0])]

        def top_slices(j: int) -> list[tuple[int, int]]:
            order = sorted(slots, key=lambda t: -scored[t[0]].probs[t[1], j])
            return order[:spec.key_images]

        findings: list[Finding] = []
        measurements: list[Measurement] = []
        reported: list[int] = []
        policy, notes = effective(study.policy, classifier_vocabulary(manifest, spec))
        for j, label in enumerate(labels):
            p = float(study_probs[j])
            certainty = policy.band(p, label)
            present = certainty == "present"
            critical = policy.is_critical(label, present, p)
            display = spec.display(label, "en")
            top = top_slices(j)
            key = [scored[si].series.frames[i] for si, i in top] if certainty != "absent" else []
            note = (f"{spec.aggregation.method} over {len(slots)} slices; top slices "
                    + ", ".join(f"{scored[si].slice_number(i)} ({scored[si].probs[i, j]:.2f})" for si, i in top))
            findings.append(Finding(code=spec.code(label), label=display, present=present, probability=p,
                                    certainty=certainty, critical=critical, key_images=key, note=note,
                                    names={"zh": spec.display(label, "zh")}))
            if certainty != "absent" or label == primary:
                reported.append(j)
                for si, i in top:
                    sc = scored[si]
                    ref = sc.series.frames[i]
                    rows, cols = sc.series.pixels.shape[-2:]  # type: ignore[union-attr]
                    name = f"{display}, slice {sc.slice_number(i)}"
                    measurements.append(Measurement(
                        code=PROBABILITY, value=float(sc.probs[i, j]), unit=UCUM_RATIO, group=name,
                        label="Probability", region=_whole_slice(ref, rows, cols, name),
                        series_uid=ref.series_uid))

        # lead with the most urgent finding: critical, then present, then possible, then the primary label
        def rank(f: Finding) -> tuple[int, float]:
            level = 3 if f.critical else {"present": 2, "possible": 1}.get(f.certainty or "", 0)
            return level, f.probability or 0.0

        lead_j = max(range(len(labels)), key=lambda j: rank(findings[j]))
        if rank(findings[lead_j])[0] == 0:
            lead_j = labels.index(primary)
        lead_top = top_slices(lead_j)
        key_images = [scored[si].series.frames[i] for si, i in lead_top]
        overlays = []
        try:
            montage = render_montage(scored, spec, manifest.input, lead_top, [labels.index(primary), lead_j]
                                     + [j for j in reported if j not in (lead_j, labels.index(primary))], labels,
                                     [spec.display(label, "en") for label in labels])
            overlays.append(Overlay(name="top-slices", kind="image", array=montage, caption=(
                f"Top {len(lead_top)} slices for {spec.display(labels[lead_j], 'en')} "
                f"({manifest.name} {manifest.version})")))
        except Exception as exc:  # a picture must never cost the result
            log.warning("montage failed: %s", exc)
        n_slices = len(slots)
        result = PipelineResult(
            pipeline=self.name, pipeline_version=self.version, findings=findings, measurements=measurements,
            overlays=overlays, key_images=key_images, model=runner.identity,
            narrative={lang: self._narrative(lang, spec, manifest.name, manifest.version, findings, labels, scored,
                                             n_slices) for lang in ("en", "zh")},
            details={"series": [{"series_uid": sc.series.series_uid, "slices": sc.probs.shape[0],
                                 "sop_instance_uids": [f.sop_instance_uid for f in sc.series.frames],
                                 "probabilities": {label: [round(float(v), 5) for v in sc.probs[:, j]]
                                                   for j, label in enumerate(labels)}} for sc in scored],
                     "aggregation": spec.aggregation.model_dump(), "providers": runner.providers,
                     "probabilities": {label: float(study_probs[j]) for j, label in enumerate(labels)},
                     "critical_policy": policy.to_dict()},
        )
        result.warnings += notes
        if result.unverified:
            result.warnings.append(f"model {manifest.name} {manifest.version} is not verified (verified: false); "
                                   "results are marked UNVERIFIED")
        return result

    def _narrative(self, lang: str, spec: ClassifierSpec, model: str, version: str, findings: list[Finding],
                   labels: list[str], scored: list[SeriesScores], n_slices: int) -> Narrative:
        zh = lang == "zh"
        pairs = list(zip(labels, findings))
        shown = [(label, f) for label, f in pairs if f.certainty != "absent"]
        crit = [(label, f) for label, f in pairs if f.critical and f.present]
        lines = []
        for label, f in shown:
            slices = ", ".join(self._slice_no(scored, r) for r in f.key_images)
            name, c, p = spec.display(label, lang), f.certainty or "absent", f.probability or 0.0
            lines.append(f"{name}：{_CERTAINTY_ZH[c]}（概率 {p:.2f}；关键层面 {slices}）。" if zh else
                         f"{name}: {_CERTAINTY_EN[c]} (probability {p:.2f}; key slices {slices}).")
        if zh:
            head = f"AI 逐层分类模型 {model} {version} 分析了 {len(scored)} 个序列共 {n_slices} 个层面。"
            none = "未发现超过阈值的 AI 发现。"
            impression = "AI 提示：" + "、".join(spec.display(lab, lang) for lab, _ in shown) + "。"
            critical = "AI 提示危急值：" + "、".join(
                f"{spec.display(lab, lang)}（概率 {f.probability or 0:.2f}）" for lab, f in crit) + "。需医师立即复核。"
        else:
            head = f"Slice-wise AI classifier {model} {version} analysed {n_slices} slices in {len(scored)} series."
            none = "No AI finding above threshold."
            impression = "AI suggests: " + "; ".join(
                f"{spec.display(lab, lang)} ({f.certainty})" for lab, f in shown) + "."
            critical = "Critical finding suggested by AI: " + "; ".join(
                f"{spec.display(lab, lang)} (probability {f.probability or 0:.2f})" for lab, f in crit
            ) + ". Requires immediate physician review."
        return Narrative(findings=" ".join([head, *lines]) if lines else f"{head} {none}",
                         impression=impression if shown else none, critical=critical if crit else "")

    @staticmethod
    def _slice_no(scored: list[SeriesScores], ref: ImageRef) -> str:
        for sc in scored:
            for i, f in enumerate(sc.series.frames):
                if f == ref:
                    return sc.slice_number(i)
        return "?"
