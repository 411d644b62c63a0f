"""``ainode evaluate`` arithmetic and table handling, and ``ainode weights verify`` as the only way to verified."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from node.evaluate import EvaluationError, evaluate
from node.evaluate.metrics import auc_delong, midranks, operating_point, threshold_for_sensitivity
from node.evaluate.tables import TableError, read_labels, read_predictions
from node.evaluate.verify import verify
from pipelines import models


def _delong_slow(y: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    """DeLong 1988 straight from the definition: psi over every (positive, negative) pair."""
    pos, neg = s[y], s[~y]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    return float(psi.mean()), float(np.var(v10, ddof=1) / len(pos) + np.var(v01, ddof=1) / len(neg))


@pytest.mark.parametrize("n, ties", [(12, False), (60, True), (500, True), (2000, False)])
def test_auc_matches_sklearn_and_delong_matches_its_definition(n, ties):
    rng = np.random.default_rng(n)
    y = rng.random(n) < 0.3
    y[:2] = [True, False]
    s = rng.normal(size=n) + 0.8 * y
    if ties:
        s = np.round(s, 1)  # many tied scores, across classes too
    auc, var = auc_delong(y, s)
    assert abs(auc - roc_auc_score(y, s)) < 1e-9
    slow_auc, slow_var = _delong_slow(y, s)
    assert abs(auc - slow_auc) < 1e-12 and abs(var - slow_var) < 1e-12


def test_midranks_and_operating_points():
    assert midranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], bool)
    s = np.array([0.9, 0.8, 0.4, 0.2, 0.7, 0.3, 0.3, 0.1, 0.05, 0.0])
    op = operating_point(y, s, 0.4, "t")
    assert (op.tp, op.fn, op.fp, op.tn) == (3, 1, 1, 5)
    assert op.sensitivity == 0.75 and op.specificity == 5 / 6 and op.ppv == 0.75 and op.npv == 5 / 6
    # highest threshold with sensitivity >= target: 0.9 of 4 positives needs all 4 -> the lowest positive score
    assert threshold_for_sensitivity(y, s, 0.90) == 0.2
    assert threshold_for_sensitivity(y, s, 0.75) == 0.4 and threshold_for_sensitivity(y, s, 0.5) == 0.8
    assert operating_point(y, s, threshold_for_sensitivity(y, s, 0.75), "t").sensitivity >= 0.75


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_tables_formats_names_and_unmatched(tmp_path):
    preds = _write(tmp_path / "p.csv", "file,prob_Pleural_Thickening,prob_Effusion,Nodule\n"
                                       "a/x1.dcm,0.9,0.1,0.5\nx2.dcm,0.2,0.8,0.4\nx3.dcm,0.3,0.3,\nzz.dcm,0.1,0.1,0.1\n")
    nih = _write(tmp_path / "nih.csv", "Image Index,Finding Labels,Patient ID\nx1.png,Pleural_Thickening|Effusion,1\n"
                                       "x2.png,No Finding,2\nx3.png,Nodule,3\nx4.png,Mass,4\nx5.png,Hernia,5\n")
    p = read_predictions(preds)
    assert set(p.columns) == {"pleural thickening", "effusion", "nodule"} and "x1.dcm" in p.scores
    lab = read_labels(nih)
    assert lab.format == "nih" and lab.truth["x1.png"]["pleural thickening"] and not lab.truth["x2.png"]["effusion"]
    ev = evaluate(preds, nih, tmp_path / "out", report=False)
    m = ev.metrics
    assert m["dataset"]["images"] == 3 and m["dataset"]["matched_by"] == "file name without extension"
    assert m["predictions"]["unmatched"] == 1 and m["labels_file"]["unmatched"] == 2
    pt = m["labels"]["Pleural_Thickening"]
    assert (pt["n"], pt["positives"], pt["auc"]) == (3, 1, 1.0)
    assert pt["auc_ci95"] is None and "2 positive" in pt["note"]  # one positive: no honest DeLong interval
    assert m["labels"]["Nodule"]["n"] == 2  # x3 has no Nodule score: left out of that label only

    onehot = _write(tmp_path / "onehot.csv", "id,pleural effusion,PLEURAL THICKENING\nx1.dcm,1,1\nx2.dcm,0,\n"
                                             "x3.dcm,0,0\n")
    ev2 = evaluate(preds, onehot, tmp_path / "out2", report=False, label_map="Effusion=Pleural Effusion")
    eff = ev2.metrics["labels"]["Effusion"]
    assert eff["truth_label"] == "pleural effusion" and eff["positives"] == 1 and eff["n"] == 3
    assert ev2.metrics["labels"]["Pleural_Thickening"]["n"] == 2  # empty cell = not assessed
    assert "Nodule" in ev2.metrics["skipped_labels"]

    with pytest.raises(TableError, match="not a number"):
        read_predictions(_write(tmp_path / "bad.csv", "id,A\nx,high\n"))
    with pytest.raises(EvaluationError, match="no image id"):
        evaluate(preds, _write(tmp_path / "other.csv", "id,Effusion\nq.png,1\n"), tmp_path / "o3", report=False)


def _tiny_model(d, labels=("A", "B")):
    from tests.test_models import _tiny_onnx

    d.mkdir(parents=True, exist_ok=True)
    _tiny_onnx(d / "model.onnx")
    m = models.Manifest(name="tiny", version="1", labels=list(labels),
                        input=models.InputSpec(size=16, channels=1, normalisation=models.Normalisation(kind="unit")),
                        thresholds={"A": models.LabelThreshold(possible=0.3, present=0.6)},
                        sha256=models.sha256_file(d / "model.onnx"))
    models.write_manifest(m, d / "manifest.yaml")
    return d


def test_thresholds_written_and_verify_records_the_evidence(tmp_path, capsys):
    from node.cli import main
    from node.results.common import algorithm
    from pipelines.base import PipelineResult

    model = _tiny_model(tmp_path / "tiny")
    rng = np.random.default_rng(3)
    y = rng.random(80) < 0.4
    y[:2] = [True, False]
    a, b = rng.random(80) + 0.5 * y, rng.random(80)
    ids = [f"img{i:03d}.png" for i in range(80)]
    preds = _write(tmp_path / "p.csv", "image_id,A,B,status,reason\n" + "".join(
        f"{i},{float(x)!r},{float(z)!r},ok,\n" for i, x, z in zip(ids, a, b)) + "img999.png,,,refused,lateral view\n")
    labels = _write(tmp_path / "l.csv", "image,A,B\n" + "".join(f"{i},{int(t)},{int(t)}\n" for i, t in zip(ids, y)))
    out = tmp_path / "eval"
    rc = main(["evaluate", "--predictions", str(preds), "--labels", str(labels), "--model", str(model),
               "--out", str(out), "--write-thresholds", "sensitivity=0.90"])
    cap = capsys.readouterr()
    printed = cap.out
    assert rc == 0, cap.err
    assert "AUC [95% CI]" in printed and "thr@sens0.9" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert abs(metrics["labels"]["A"]["auc"] - roc_auc_score(y, a)) < 1e-9
    assert metrics["predictions"]["not_scored"] == 1 and metrics["predictions"]["not_scored_reasons"] == {"refused": 1}
    assert metrics["labels"]["A"]["operating_points"][0]["threshold"] == 0.6  # the manifest's present threshold
    lo, hi = metrics["labels"]["A"]["auc_ci95"]
    assert lo < metrics["labels"]["A"]["auc"] < hi and "DeLong" in metrics["auc_method"]
    proposed = yaml.safe_load((out / "manifest.yaml").read_text())
    t90 = threshold_for_sensitivity(y, a, 0.90)
    assert proposed["thresholds"]["A"] == {"possible": round(t90, 6), "present": round(t90, 6)}
    assert proposed["verified"] is False and "report.html" in {p.name for p in out.iterdir()}
    assert np.mean(a[y] >= t90) >= 0.90

    # not ainode's metrics, or another model's: refused, manifest untouched
    before = (model / "manifest.yaml").read_text()
    with pytest.raises(EvaluationError, match="not an `ainode evaluate` metrics.json"):
        verify(model, _write(tmp_path / "x.json", "{}"))
    other = dict(metrics, model=dict(metrics["model"], file_sha256="0" * 64))
    with pytest.raises(EvaluationError, match="other weights"):
        verify(model, _write(tmp_path / "other.json", json.dumps(other)))
    assert (model / "manifest.yaml").read_text() == before

    rc = main(["weights", "verify", str(model), "--evaluation", str(out / "metrics.json")])
    assert rc == 0
    m = models.load_manifest(model / "manifest.yaml")
    rec = m.evaluation_record
    assert m.verified and rec is not None and rec.images == 80
    assert rec.aucs["A"] == round(metrics["labels"]["A"]["auc"], 4)
    sha = models.sha256_file(out / "metrics.json")
    assert rec.sha256 == sha and models.sha256_file(model / "evaluation" / "metrics.json") == sha
    # the model now runs without allow_unverified, and its SR algorithm parameters cite the evaluation
    runner = models.load_model(model)
    params = [str(i.TextValue) for i in algorithm(PipelineResult("cxr", "1.0.0", model=runner.identity))
              if "TextValue" in i]
    assert any(sha in p and "80 images" in p for p in params) and not any("verified=false" in p for p in params)
    assert math.isfinite(rec.aucs["B"])
