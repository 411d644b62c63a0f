"""``ainode weights verify DIR --evaluation EVAL/metrics.json``: the only way a manifest becomes verified.

"Verified" means "evaluated here, with this evidence": the evaluation must be an ``ainode evaluate``
``metrics.json`` made with ``--model`` pointing at these very weights (same SHA-256), and the manifest
then records the evaluation's SHA-256, date, data set size and AUCs (``evaluation_record``). The
metrics file and its report are copied into ``DIR/evaluation/`` so the evidence travels with the model.
The manifest schema refuses ``verified: true`` without such a record, so hand-editing the flag alone
makes the model unavailable rather than trusted.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from . import FORMAT, EvaluationError, load_model_manifest, sha256_bytes, sha256_path


def verify(model_dir: str | Path, evaluation: str | Path, *, min_images: int = 1) -> dict[str, Any]:
    """Mark the model verified with this evaluation; returns the record written. Raises EvaluationError."""
    from pipelines.models import Manifest

    raw, manifest, mpath = load_model_manifest(model_dir)
    epath = Path(evaluation)
    if epath.is_dir():
        epath = epath / "metrics.json"
    try:
        blob = epath.read_bytes()
        metrics = json.loads(blob)
    except (OSError, ValueError) as exc:
        raise EvaluationError(f"evaluation {epath} cannot be read as JSON: {exc}") from exc
    if not isinstance(metrics, dict) or metrics.get("format") != FORMAT:
        raise EvaluationError(f"{epath} is not an `ainode evaluate` metrics.json (format {FORMAT})")
    onnx = mpath.parent / manifest.file
    if not onnx.is_file():
        raise EvaluationError(f"model file {onnx} is missing; nothing to verify")
    actual = sha256_path(onnx)
    if actual.lower() != manifest.sha256.lower():
        raise EvaluationError(f"{onnx.name} has SHA-256 {actual[:12]}…, the manifest says {manifest.sha256[:12]}…; "
                              "re-import the model before verifying it")
    model = metrics.get("model") or {}
    if not model:
        raise EvaluationError(f"{epath} was made without --model; re-run ainode evaluate with --model {mpath.parent}")
    if str(model.get("file_sha256", "")).lower() != actual.lower():
        raise EvaluationError(f"{epath} evaluated weights with SHA-256 {str(model.get('file_sha256'))[:12]}…, this "
                              f"model's file is {actual[:12]}…: the evaluation is of other weights")
    aucs = {k: v["auc"] for k, v in (metrics.get("labels") or {}).items() if v.get("auc") is not None}
    n = int((metrics.get("dataset") or {}).get("images", 0))
    if not aucs:
        raise EvaluationError(f"{epath} has no label with an AUC (no positive or no negative cases?)")
    if n < min_images:
        raise EvaluationError(f"{epath} evaluated {n} images; at least {min_images} are required")
    unknown = sorted(set(aucs) - set(manifest.labels))
    if unknown:
        raise EvaluationError(f"{epath} reports labels this model does not have: {unknown}")
    dest = mpath.parent / "evaluation"
    dest.mkdir(exist_ok=True)
    (dest / "metrics.json").write_bytes(blob)
    report = epath.parent / "report.html"
    if report.is_file():
        shutil.copyfile(report, dest / "report.html")
    sha = sha256_bytes(blob)
    record = {"sha256": sha, "date": str(metrics.get("created", ""))[:10] or dt.date.today().isoformat(),
              "verified_on": dt.date.today().isoformat(), "images": n,
              "aucs": {k: round(float(v), 4) for k, v in aucs.items()},
              "auc_method": str(metrics.get("auc_method", "")), "file": "evaluation/metrics.json"}
    new = dict(raw)
    new["verified"] = True
    new["evaluation"] = (f"ainode evaluate {record['date']}: {n} images, metrics.json sha256 {sha}")
    new["evaluation_record"] = record
    Manifest.model_validate({k: v for k, v in new.items() if k != "classifier"})
    tmp = mpath.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(new, sort_keys=False, allow_unicode=True), encoding="utf-8")
    tmp.replace(mpath)
    return record


def cli_verify(model_dir: Path, evaluation: Path) -> int:
    """``ainode weights verify``: exit 0 when verified, 2 with the reason otherwise."""
    import sys

    try:
        rec = verify(model_dir, evaluation)
    except EvaluationError as exc:
        print(f"verify: {exc}", file=sys.stderr)
        return 2
    aucs = ", ".join(f"{k} {v:.3f}" for k, v in rec["aucs"].items())
    print(f"verified {model_dir}: evaluation of {rec['images']} images on {rec['date']} (metrics.json sha256 "
          f"{rec['sha256']}); AUC {aucs}")
    return 0
