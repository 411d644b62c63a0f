"""Chest radiograph (CR/DX, frontal) classification with CAM evidence and a draft report.

Options (``pipelines.cxr`` config merged with route options; also the constructor's options):

``model``                  manifest name under ``weights_dir``, a model directory or a manifest path
                           (default ``xrv-densenet121-res224-all``)
``weights_dir``            where model directories live (default: the repository's ``weights/``)
``allow_unverified_models``run manifests with ``verified: false`` (tests, evaluation sites); results
                           then carry ``model.verified = False`` and the UNVERIFIED banner
``providers``              ONNX Runtime providers in preference order (default TensorRT, CUDA, CPU)
``report_backend``         ``template`` (default) or ``openai``
``openai``                 mapping for the openai backend: base_url, model, api_key, timeout_s, retries, ...
``languages``              report languages (default ``[en, zh]``)
``min_size`` / ``min_layout`` / ``typical_layout``  input checks (see ``gating``)
``cam_level``              fraction of the CAM peak that bounds the region polygon (default 0.5)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.base import (
    PRIVATE_SCHEME,
    Code,
    Finding,
    ImageRef,
    ModelUnavailable,
    Narrative,
    Overlay,
    Pipeline,
    PipelineResult,
    Refused,
    Region,
    StudyInput,
)
from pipelines.cxr import cam as cammod
from pipelines.cxr import report as tpl
from pipelines.cxr.labeller import check_consistency
from pipelines.cxr.labels import Concept, concept_for
from pipelines.cxr.preprocess import ImageRefused, Prepared, prepare
from pipelines.models import Manifest, ModelRunner, load_manifest, load_model, resolve_manifest
from pipelines.options import CXROptions
from pipelines.policy import LabelNames, Vocabulary, effective

log = logging.getLogger(__name__)

DEFAULT_MODEL = "xrv-densenet121-res224-all"


def cxr_vocabulary(m: Manifest) -> Vocabulary:
    """Each label's manifest spelling, the name the report and SR use, and its code."""
    labels = []
    for label in m.labels:
        if not label:
            continue
        c = concept_for(label)
        if c is None:
            labels.append(LabelNames(label, code=f"CXR-{label.upper().replace(' ', '_')}"))
        else:
            labels.append(LabelNames(label, display=tpl._cap(c.en), code=c.code.value, other=[c.code.meaning, c.zh]))
    return Vocabulary(m.name, labels, critical=dict(m.critical),
                      thresholds={k: (t.possible, t.present) for k, t in m.thresholds.items()})


@dataclass
class PreparedImage:
    ref: ImageRef
    prepared: Prepared


def _truthy(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "on")
    return bool(v)


class CXRPipeline(Pipeline):
    name = "cxr"
    Options = CXROptions  # every option this pipeline reads (node.pipeline_options)
    version = "1.0.0"
    modalities = frozenset({"CR", "DX"})
    device = "cpu"  # DenseNet-121 at 224² is ~50 ms per image on a CPU core; GPU hosts still pick CUDA/TensorRT
    memory_mb = 2048

    def _opt(self, study: StudyInput | None, key: str, default: Any = None) -> Any:
        if study is not None and key in study.options:
            return study.options[key]
        return self.options.get(key, default)

    # ---------------------------------------------------------------- model
    def model(self, study: StudyInput | None = None) -> ModelRunner:
        """The checked, warm model for this study's options (raises ModelUnavailable)."""
        return load_model(self._opt(study, "model", DEFAULT_MODEL), weights_dir=self._opt(study, "weights_dir"),
                          allow_unverified=_truthy(self._opt(study, "allow_unverified_models", False)),
                          providers=self._opt(study, "providers"))

    def vocabulary(self, options: dict[str, Any]) -> Vocabulary:
        o = {**self.options, **options}
        path = resolve_manifest(o.get("model") or DEFAULT_MODEL, o.get("weights_dir"))
        return cxr_vocabulary(load_manifest(path))

    # ---------------------------------------------------------------- images
    def prepare_images(self, study: StudyInput, runner_spec: Any) -> tuple[list[PreparedImage], list[str]]:
        """Every acceptable frontal image as model input, and the reasons for each one refused."""
        self.check(study)
        ok: list[PreparedImage] = []
        refused: list[str] = []
        kw = {k: float(self._opt(study, k)) for k in ("min_layout", "typical_layout")
              if self._opt(study, k) is not None}
        if self._opt(study, "min_size") is not None:
            kw["min_size"] = int(self._opt(study, "min_size"))
        for s in self.select(study):
            label = f"series {s.tags.get('SeriesNumber', '?')}"
            if s.pixels is None:
                refused.append(f"{label}: no pixel data")
                continue
            if s.is_multiframe:
                refused.append(f"{label}: multi-frame image; chest radiographs are single-frame")
                continue
            if s.pixels.ndim != 3 or s.photometric not in ("MONOCHROME1", "MONOCHROME2"):
                refused.append(f"{label}: not a greyscale image ({s.photometric})")
                continue
            for i, ref in enumerate(s.frames):
                header = s.header_for(i)
                try:
                    p = prepare(s.pixels[i], header, s.photometric, s.window, runner_spec, **kw)  # type: ignore[arg-type]
                except ImageRefused as exc:
                    refused.append(f"{label} image {header.get('InstanceNumber', i + 1)}: {exc}")
                    continue
                ok.append(PreparedImage(ref, p))
        return ok, refused

    # ---------------------------------------------------------------- run
    def run(self, study: StudyInput) -> PipelineResult:
        t0 = time.monotonic()
        try:
            runner = self.model(study)
        except ModelUnavailable as exc:
            log.warning("cxr: model unavailable: %s", exc)
            self.check(study)  # a study we would refuse anyway says so rather than "model unavailable"
            return PipelineResult(self.name, self.version, status="model_unavailable", reason=str(exc))
        images, refused = self.prepare_images(study, runner.manifest.input)
        if not images:
            raise Refused("; ".join(refused) or "no usable chest radiograph")
        t_prep = time.monotonic()
        outs = runner.run(np.stack([im.prepared.tensor for im in images]))
        t_inf = time.monotonic()
        m = runner.manifest
        probs = outs[m.output.probabilities]
        cams = outs.get(m.output.cam) if m.output.cam else None

        # procedure left None: the results writer picks the code each SR template accepts for CR/DX
        result = PipelineResult(self.name, self.version, model=runner.identity)
        result.key_images = [im.ref for im in images]
        policy, notes = effective(study.policy, cxr_vocabulary(m))
        result.warnings += notes
        result.details["critical_policy"] = policy.to_dict()
        if refused:
            result.warnings.append("images not analysed: " + "; ".join(refused))
        calls: list[tpl.LabelCall] = []
        per_label: dict[str, Any] = {}
        for j, label in enumerate(m.labels):
            if not label:
                continue
            k = int(np.argmax(probs[:, j]))  # the study's strongest image for this label speaks for it
            p = float(probs[k, j])
            b = policy.band(p, label)
            critical = policy.is_critical(label, b == "present", p)
            concept = concept_for(label)
            per_label[label] = {"probability": round(p, 4), "band": b, "image": k}
            if concept is None:
                concept = Concept(label, Code(f"CXR-{label.upper().replace(' ', '_')}", PRIVATE_SCHEME, label),
                                  "other", label.lower().replace("_", " "), label, label)
            call = tpl.LabelCall(label, concept, p, b, critical, threshold=m.threshold(label).present)
            calls.append(call)
            regions: list[Region] = []
            if b != "absent" and cams is not None:
                im = images[k]
                cam_unit = cammod.upsample(cams[k, j], m.input.size)
                poly = cammod.hot_polygon(cam_unit, im.prepared.geometry, float(self._opt(study, "cam_level", 0.5)))
                if poly:
                    regions.append(Region(im.ref, "POLYLINE", poly, label=f"{concept.en} (class activation)"))
                result.overlays.append(Overlay(
                    name=f"cam-{concept.key}", kind="heatmap",
                    array=cammod.heatmap_on_source(cam_unit, im.prepared.geometry), source=im.ref,
                    caption=f"{tpl._cap(concept.en)}: model probability {p:.2f} ({b}); class activation map"))
            result.findings.append(Finding(
                code=concept.code, label=tpl._cap(concept.en), names={"zh": concept.zh},
                present=b == "present", probability=p, certainty=b, threshold=m.threshold(label).present,
                critical=critical, site=concept.site, regions=regions, key_images=[images[k].ref],
                note=f"model label {label!r}; thresholds possible {policy.bands(label)[0]:g}, "
                     f"present {policy.bands(label)[1]:g}"))

        languages = tuple(self._opt(study, "languages", None) or ("en", "zh"))
        narrative, report_details = self._report(study, calls, images, languages, result)
        self._consistency(calls, narrative, result)
        _image_cautions(images, refused, narrative, result)
        if not runner.manifest.verified:
            for lang, n in narrative.items():
                tpl.mark_unverified(n, lang)
            result.warnings.insert(0, "model is not verified (manifest verified: false); results are not for "
                                      "clinical use")
        result.narrative = narrative
        result.details.update({
            "labels": per_label,
            "probabilities": {label: float(probs[:, j].max()) for j, label in enumerate(m.labels) if label},
            "images": [{"sop_instance_uid": im.ref.sop_instance_uid, "view": im.prepared.view,
                        "preprocessing": im.prepared.notes, "cautions": im.prepared.cautions} for im in images],
            "providers": runner.providers,
            "report": report_details,
            "timing_s": {"prepare": round(t_prep - t0, 3), "inference": round(t_inf - t_prep, 3),
                         "total": round(time.monotonic() - t0, 3)},
        })
        return result

    # ---------------------------------------------------------------- report
    def _report(self, study: StudyInput, calls: list[tpl.LabelCall], images: list[PreparedImage],
                languages: tuple[str, ...], result: PipelineResult) -> tuple[dict[str, Narrative], dict[str, Any]]:
        narrative = tpl.template_report(calls, languages)
        backend = str(self._opt(study, "report_backend", "template"))
        details: dict[str, Any] = {"backend": "template"}
        if backend == "template":
            return narrative, details
        if backend != "openai":
            result.warnings.append(f"unknown report_backend {backend!r}; used template")
            details["requested"] = backend
            return narrative, details
        from pipelines.cxr import llm

        lang = study.language if study.language in languages else languages[0]
        opts = llm.LLMOptions.from_options(self._opt(study, "openai", {}))
        try:  # the first frontal image is the one the model describes
            n, info = llm.generate(calls, images[0].prepared.display, lang, opts)
        except llm.LLMFailed as exc:
            result.warnings.append(f"report LLM failed, template report used instead: {exc}")
            return narrative, {"backend": "template", "requested": "openai", "fallback": True, "error": str(exc)}
        n.recommendations = narrative[lang].recommendations
        n.critical = narrative[lang].critical
        narrative[lang] = n
        info["language"] = lang
        info["template_languages"] = [x for x in languages if x != lang]
        return narrative, info

    def _consistency(self, calls: list[tpl.LabelCall], narrative: dict[str, Narrative],
                     result: PipelineResult) -> None:
        en = narrative.get("en")
        if en is None:
            result.details["consistency"] = "skipped: the labeller reads English text only"
            return
        issues = check_consistency([(c.concept.observation, c.band) for c in calls], f"{en.findings}\n{en.impression}")
        result.details["consistency"] = [i.message for i in issues] or "ok"
        if not issues:
            return
        for i in issues:
            result.warnings.append(f"report/classifier mismatch: {i.message}")
        en.findings += " Automated consistency check: " + "; ".join(i.message for i in issues) + \
            ". Review before signing."
        zh = narrative.get("zh")
        if zh is not None:
            zh.findings += f"自动一致性核查：报告文字与分类结果有{len(issues)}处不一致（" + \
                "；".join(i.observation for i in issues) + "），签发前请复核。"


def _image_cautions(images: list[PreparedImage], refused: list[str], narrative: dict[str, Narrative],
                    result: PipelineResult) -> None:
    """What the reader must know about the images: unusual ones read anyway, and ones not read, and why.

    Said in the report SR (where the radiologist reads) as well as in the warnings (status)."""
    lines_en, lines_zh = [], []
    for n, im in enumerate(images, 1):
        if not im.prepared.cautions:
            continue
        text = "; ".join(im.prepared.cautions)
        which = f"image {n}" if len(images) > 1 else "the image"
        result.warnings.append(f"{which} read with caution: {text}")
        lines_en.append(f"Image check ({which}): {text}.")
        lines_zh.append(f"图像核查（第{n}幅，非典型胸片，仍按胸片读取）：{text}。")
    if refused:
        lines_en.append("Not analysed: " + "; ".join(refused) + ".")
        lines_zh.append("未分析的图像：" + "；".join(refused) + "。")
    for lang, lines in (("en", lines_en), ("zh", lines_zh)):
        if lines and lang in narrative:
            narrative[lang].findings += " " + " ".join(lines)
