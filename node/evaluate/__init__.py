"""``ainode evaluate``: a model's predictions against the site's own labels, with the evidence kept.

The output is what a verification decision rests on (see ``node.evaluate.verify``): ``metrics.json``
(machine-readable, hashed into the manifest on verify), ``report.html`` (what a radiologist or physicist
reads) and a printed table. Metrics are computed in ``node.evaluate.metrics`` (no scikit-learn at run
time); the report needs matplotlib (``pip install 'ainode[evaluate]'``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .metrics import AUC_METHOD, LabelMetrics, label_metrics, roc_curve
from .tables import Labels, Predictions, TableError, join, norm_label, parse_label_map, read_labels, read_predictions

log = logging.getLogger(__name__)

FORMAT = "ainode-evaluation/1"
DEFAULT_TARGETS = (0.90, 0.95)

__all__ = ["FORMAT", "EvaluationError", "TableError", "evaluate", "load_model_manifest", "sha256_bytes", "table"]


class EvaluationError(Exception):
    """The evaluation cannot run as asked; the message says what to fix."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_path(path: Path) -> str:
    return sha256_bytes(path.read_bytes())


def load_model_manifest(model_dir: str | Path) -> tuple[dict[str, Any], Any, Path]:
    """(raw YAML mapping, validated shared Manifest, manifest path); a ``classifier:`` section is kept raw."""
    from pipelines.models import Manifest

    p = Path(model_dir)
    path = p if p.suffix in (".yaml", ".yml") else p / "manifest.yaml"
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise EvaluationError(f"model manifest {path} cannot be read: {exc}") from exc
    shared = {k: v for k, v in raw.items() if k != "classifier"}
    try:
        manifest = Manifest.model_validate(shared)
    except Exception as exc:  # pydantic ValidationError
        raise EvaluationError(f"model manifest {path} is invalid: {exc}") from exc
    return raw, manifest, path


def _model_block(model_dir: Path | None) -> tuple[dict[str, Any] | None, Any, dict[str, Any] | None, Path | None]:
    if model_dir is None:
        return None, None, None, None
    raw, manifest, mpath = load_model_manifest(model_dir)
    onnx = mpath.parent / manifest.file
    actual = sha256_path(onnx) if onnx.is_file() else ""
    block = {"name": manifest.name, "version": manifest.version, "task": manifest.task, "dir": str(mpath.parent),
             "file": manifest.file, "sha256": manifest.sha256, "file_sha256": actual,
             "file_matches_manifest": bool(actual) and actual.lower() == manifest.sha256.lower(),
             "manifest_sha256": sha256_path(mpath), "verified": manifest.verified, "labels": manifest.labels}
    return block, manifest, raw, mpath


def _predictions_model(pred_path: Path) -> dict[str, Any] | None:
    """The model named in ``analyze``'s summary.json next to its predictions.csv, if there is one."""
    s = pred_path.parent / "summary.json"
    try:
        data = json.loads(s.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    m = data.get("model") if isinstance(data, dict) else None
    return m if isinstance(m, dict) and m.get("sha256") else None


def parse_write_thresholds(spec: str | None) -> float | None:
    """``sensitivity=0.90`` -> 0.90."""
    if not spec:
        return None
    key, _, val = spec.partition("=")
    if key.strip().lower() != "sensitivity":
        raise EvaluationError(f"--write-thresholds {spec!r}: only sensitivity=<target> is supported, e.g. "
                              "sensitivity=0.90")
    try:
        t = float(val)
    except ValueError:
        raise EvaluationError(f"--write-thresholds {spec!r}: target must be a number, e.g. 0.90") from None
    if not 0 < t <= 1:
        raise EvaluationError(f"--write-thresholds {spec!r}: target sensitivity must be in (0, 1]")
    return t


@dataclass
class Evaluation:
    metrics: dict[str, Any]
    labels: list[LabelMetrics]
    out: Path


def evaluate(predictions: str | Path, labels: str | Path, out: str | Path, *, model_dir: str | Path | None = None,
             label_map: str | None = None, targets: tuple[float, ...] = DEFAULT_TARGETS,
             write_thresholds: str | None = None, report: bool = True) -> Evaluation:
    pred_path, lab_path, out_dir = Path(predictions), Path(labels), Path(out)
    target_write = parse_write_thresholds(write_thresholds)
    targets = tuple(sorted(set(targets) | ({target_write} if target_write else set())))
    preds: Predictions = read_predictions(pred_path)
    truth: Labels = read_labels(lab_path)
    lmap = parse_label_map(label_map)
    model, manifest, raw_manifest, manifest_path = _model_block(Path(model_dir) if model_dir else None)
    pred_model = _predictions_model(pred_path)
    if model and pred_model and pred_model["sha256"].lower() != model["sha256"].lower():
        raise EvaluationError(f"{pred_path} was made by {pred_model.get('name')} (sha256 {pred_model['sha256'][:12]}…) "
                              f"but --model {model_dir} is sha256 {model['sha256'][:12]}…; evaluate the predictions "
                              "of this model (run ainode analyze with it)")
    joined, idmap = join(preds, truth)
    if not joined.ids:
        raise EvaluationError(f"no image id of {pred_path} is in {lab_path} (e.g. {next(iter(preds.scores), '-')!r}); "
                              "the first column of the predictions must be the labels file's image id")
    manifest_labels = {norm_label(x): x for x in (manifest.labels if manifest else [])}
    results: list[LabelMetrics] = []
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    skipped: dict[str, str] = {}
    for key, column in preds.columns.items():
        truth_key = lmap.get(key, key)
        if truth_key not in truth.vocabulary:
            skipped[column] = f"not a label of {lab_path.name}" + (" (use --label-map to name it)" if not lmap else "")
            continue
        ids = [i for i in joined.ids if key in preds.scores[i] and truth_key in truth.truth[idmap[i]]]
        if not ids:
            skipped[column] = "no image has both a score and a label"
            continue
        y = np.array([truth.truth[idmap[i]][truth_key] for i in ids])
        s = np.array([preds.scores[i][key] for i in ids])
        name = manifest_labels.get(key, column[5:] if column.lower().startswith("prob_") else column)
        thresholds: list[tuple[float, str]] = []
        if manifest is not None and name in manifest.labels:
            t = manifest.threshold(name)
            src = "manifest" if name in manifest.thresholds else "default 0.5 (manifest has none)"
            thresholds.append((t.present, f"present ({src})"))
            if t.possible != t.present:
                thresholds.append((t.possible, f"possible ({src})"))
        results.append(label_metrics(name, column, truth.vocabulary[truth_key], y, s, thresholds, list(targets)))
        if results[-1].auc is not None:
            curves[name] = roc_curve(y, s)
    if not results:
        have = sorted(truth.vocabulary.values())[:20]
        raise EvaluationError(f"no prediction column matches a label of {lab_path}: predictions have "
                              f"{sorted(preds.columns.values())}, labels have {have}; use --label-map PRED=TRUTH")
    n_images = len(joined.ids)
    metrics: dict[str, Any] = {
        "format": FORMAT,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "auc_method": AUC_METHOD,
        "threshold_rule": "a label is called positive when score >= threshold",
        "dataset": {"images": n_images, "matched_by": "file name without extension" if joined.by_stem else "file name"},
        "predictions": {"path": str(pred_path), "sha256": sha256_path(pred_path), "rows": preds.rows,
                        "scored": len(preds.scores), "not_scored": len(preds.not_scored),
                        "not_scored_reasons": _count_reasons(preds.not_scored),
                        "unmatched": len(joined.predictions_unmatched),
                        "unmatched_examples": joined.predictions_unmatched[:10], "model": pred_model},
        "labels_file": {"path": str(lab_path), "sha256": sha256_path(lab_path), "format": truth.format,
                        "rows": truth.rows, "unmatched": joined.labels_unmatched},
        "label_map": lmap,
        "model": model,
        "labels": {m.label: m.to_json() for m in results},
        "skipped_labels": skipped,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    if target_write is not None:
        if manifest is None or raw_manifest is None:
            raise EvaluationError("--write-thresholds needs --model DIR (the manifest to copy)")
        metrics["written_thresholds"] = _write_thresholds(raw_manifest, manifest, results, target_write,
                                                          out_dir / "manifest.yaml")
    _write_json(out_dir / "metrics.json", metrics)
    if report:
        from .report import write_report

        write_report(metrics, results, out_dir / "report.html", curves, manifest_text=(
            manifest_path.read_text(encoding="utf-8") if manifest_path else None))
    return Evaluation(metrics, results, out_dir)


def _count_reasons(not_scored: dict[str, str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for why in not_scored.values():
        key = why.split(":", 1)[0]
        out[key] = out.get(key, 0) + 1
    return out


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str, ensure_ascii=False), encoding="utf-8")
    tmp.replace(path)


def _write_thresholds(raw: dict[str, Any], manifest: Any, results: list[LabelMetrics], target: float,
                      path: Path) -> dict[str, Any]:
    """A copy of the manifest whose present (and possible) thresholds give ``target`` sensitivity here.

    The copy stays ``verified: false``: thresholds are a proposal until ``ainode weights verify``.
    """
    from pipelines.models import Manifest

    chosen: dict[str, float] = {}
    for m in results:
        op = m.target_sensitivity.get(f"{target:g}")
        if op is not None and m.label in manifest.labels and m.positives > 0 and m.negatives > 0:
            chosen[m.label] = op.threshold
    new = dict(raw)
    thr = dict(new.get("thresholds") or {})
    for label, t in chosen.items():
        thr[label] = {"possible": round(t, 6), "present": round(t, 6)}
    new["thresholds"] = thr
    new["verified"] = False
    note = (f" Thresholds for {', '.join(chosen)} set by ainode evaluate for sensitivity {target:g} on "
            f"{results[0].n if results else 0} local images ({dt.date.today().isoformat()}).")
    new["notes"] = (str(new.get("notes") or "") + note).strip()
    Manifest.model_validate({k: v for k, v in new.items() if k not in ("classifier",)})
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(new, sort_keys=False, allow_unicode=True), encoding="utf-8")
    tmp.replace(path)
    return {"target_sensitivity": target, "manifest": str(path), "thresholds": chosen}


def table(ev: Evaluation, targets: tuple[float, ...] = DEFAULT_TARGETS) -> str:
    """The printed table: one row per label."""
    head = (f"{'label':<26} {'n':>5} {'pos':>4} {'prev':>6}  {'AUC [95% CI]':<21} {'thr':>6} {'sens':>5} {'spec':>5}"
            f" {'PPV':>5} {'NPV':>5}" + "".join(f"  {'thr@sens' + format(t, 'g'):>12} {'spec':>5}" for t in targets))
    lines = [head, "-" * len(head)]

    def f(x: float | None, w: int = 5, d: int = 2) -> str:
        return f"{x:>{w}.{d}f}" if x is not None else f"{'-':>{w}}"

    for m in ev.labels:
        auc = "-" if m.auc is None else f"{m.auc:.3f} [{m.auc_ci95[0]:.3f}, {m.auc_ci95[1]:.3f}]" if m.auc_ci95 \
            else f"{m.auc:.3f} [CI n/a]"
        op = m.operating_points[0] if m.operating_points else None
        row = (f"{m.label[:26]:<26} {m.n:>5} {m.positives:>4} {m.prevalence:>6.3f}  {auc:<21} "
               f"{f(op.threshold if op else None, 6, 3)} {f(op.sensitivity if op else None)} "
               f"{f(op.specificity if op else None)} {f(op.ppv if op else None)} {f(op.npv if op else None)}")
        for t in targets:
            tp = m.target_sensitivity.get(f"{t:g}")
            row += f"  {f(tp.threshold if tp else None, 12, 4)} {f(tp.specificity if tp else None)}"
        lines.append(row)
    d = ev.metrics
    lines.append("")
    lines.append(f"{d['dataset']['images']} images evaluated; predictions: {d['predictions']['scored']} scored, "
                 f"{d['predictions']['not_scored']} not scored, {d['predictions']['unmatched']} without a label; "
                 f"labels file: {d['labels_file']['rows']} rows, {d['labels_file']['unmatched']} without a prediction")
    if d["skipped_labels"]:
        lines.append("not evaluated: " + "; ".join(f"{k} ({v})" for k, v in d["skipped_labels"].items()))
    lines.append(f"AUC CI: {d['auc_method']}")
    return "\n".join(lines)

