"""analyze -> evaluate -> verify on the real NIH dev radiographs with a random-weight model.

The model is random (AUC near 0.5 is expected): the test checks the plumbing and the arithmetic, i.e.
that the node's own job path produced the predictions, that every AUC equals scikit-learn's on the same
joined rows, that report.html renders in headless Chromium, and that a verified model's SR cites its
evaluation.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from node.cli import main
from pipelines import models
from tests.support.cxr_models import imported_model

DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "nih-cxr-frontal-dev"
if not DEV.is_dir():
    DEV = Path("/work/shared/data/nih-cxr-frontal-dev")
N_IMAGES = 24  # of 156: every ChestX-ray14 label has positives among the first 24; keeps the test short


def nih_labels() -> Path:
    """Data_Entry_2017_v2020.csv.gz from the torchxrayvision wheel (found without importing the package)."""
    spec = importlib.util.find_spec("torchxrayvision")
    assert spec is not None and spec.origin, "torchxrayvision (test extra) is not installed"
    return Path(spec.origin).parent / "data" / "Data_Entry_2017_v2020.csv.gz"


def screenshot(html: Path, png: Path, tmp: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian chromium is not installed (scripts/test installs it)"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--user-data-dir={tmp / 'chromium-profile'}", f"--screenshot={png}", "--window-size=1400,2400",
                    html.resolve().as_uri()], check=True, capture_output=True, timeout=180)


@pytest.fixture(scope="module")
def lifecycle(tmp_path_factory):
    """Random model -> analyze (node job path, predictions only) -> evaluate against the NIH labels."""
    root = tmp_path_factory.mktemp("lifecycle")
    model = root / "weights" / "xrv-random"
    shutil.copytree(imported_model("torchxrayvision"), model)
    subset = sorted(DEV.glob("*.png"))[:N_IMAGES]
    run, ev = root / "run", root / "eval"
    rc_analyze = main(["analyze", *map(str, subset), "--pipeline", "cxr", "--model", str(model),
                       "--body-part", "CHEST", "--no-dicom", "--out", str(run)])
    rc_evaluate = main(["evaluate", "--predictions", str(run / "predictions.csv"), "--labels", str(nih_labels()),
                        "--model", str(model), "--out", str(ev), "--write-thresholds", "sensitivity=0.90"])
    return {"root": root, "model": model, "subset": subset, "run": run, "eval": ev, "rc": (rc_analyze, rc_evaluate)}


@pytest.mark.slow
def test_analyze_then_evaluate_on_dev_radiographs(lifecycle, tmp_path, capsys):
    model, subset, run, ev = lifecycle["model"], lifecycle["subset"], lifecycle["run"], lifecycle["eval"]
    assert lifecycle["rc"] == (0, 0)
    manifest = models.load_manifest(model / "manifest.yaml")
    assert len(sorted(DEV.glob("*.png"))) == 156

    # unreadable input: exit 2, every bad path named, nothing analysed
    junk = tmp_path / "notes.txt"
    junk.write_text("not an image")
    rc = main(["analyze", str(subset[0]), str(junk), str(tmp_path / "missing"), "--pipeline", "cxr",
               "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert rc == 2 and "notes.txt: not a readable DICOM file or PNG/JPEG" in err and "missing: no such file" in err
    assert not (tmp_path / "bad" / "predictions.csv").exists()

    # analyze wrote one row per image, the node's job results behind each
    rows = list(csv.DictReader(open(run / "predictions.csv", encoding="utf-8")))
    assert [r["image_id"] for r in rows] == [p.name for p in subset]
    assert list(rows[0]) == ["image_id", *manifest.labels, "status", "reason"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) >= N_IMAGES - 2, [r["reason"] for r in rows if r["status"] != "ok"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model"]["sha256"] == manifest.sha256 and summary["statuses"]["ok"] == len(ok)
    result = json.loads(next((run / "work").glob("00000-*/result.json")).read_text())
    assert result["model"]["verified"] is False and result["details"]["probabilities"]["Effusion"] == \
        float(rows[0]["Effusion"])

    # evaluate against the whole 112,120-row NIH table (most rows unmatched); AUCs equal scikit-learn's
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["dataset"]["images"] == len(ok) and metrics["labels_file"]["rows"] == 112120
    assert metrics["labels_file"]["unmatched"] == 112120 - len(ok) and metrics["labels_file"]["format"] == "nih"
    assert set(metrics["skipped_labels"]) == {"Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum"}
    truth: dict[str, set[str]] = {}
    with gzip.open(nih_labels(), "rt", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            truth[r["Image Index"]] = set(r["Finding Labels"].split("|"))
    checked = 0
    for label, m in metrics["labels"].items():
        y = np.array([label in truth[r["image_id"]] for r in ok])
        s = np.array([float(r[label]) for r in ok])
        assert m["n"] == len(ok) and m["positives"] == int(y.sum())
        if 0 < y.sum() < len(y):
            assert abs(m["auc"] - roc_auc_score(y, s)) < 1e-9
            checked += 1
    assert checked >= 10

    # the report renders in headless Chromium (the screenshot stays in this test's tmp dir)
    html = (ev / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "not verified" in html and manifest.sha256 in html
    png = tmp_path / "report.png"
    screenshot(ev / "report.html", png, tmp_path)
    shot = np.asarray(Image.open(png).convert("L"), dtype=np.float32)
    assert shot.shape == (2400, 1400) and shot.std() > 20  # a page with text, tables and plots, not blank


def _tiny_cxr_model(d: Path) -> Path:
    """A 2-label model small enough that its SR validates in seconds (the 18-label model's takes minutes here)."""
    from tests.test_models import _tiny_onnx

    d.mkdir(parents=True)
    _tiny_onnx(d / "model.onnx")
    models.write_manifest(models.Manifest(
        name="tiny-cxr", version="1", labels=["Nodule", "Consolidation"], sha256=models.sha256_file(d / "model.onnx"),
        input=models.InputSpec(size=16, channels=1, normalisation=models.Normalisation(kind="unit"))),
        d / "manifest.yaml")
    return d


@pytest.mark.slow
def test_verified_model_sr_cites_its_evaluation(tmp_path):
    model = _tiny_cxr_model(tmp_path / "weights" / "tiny-cxr")
    images = sorted(DEV.glob("*.png"))[:8]  # 3 Nodule and 3 Consolidation positives among them
    run, ev = tmp_path / "run", tmp_path / "eval"
    assert main(["analyze", *map(str, images), "--pipeline", "cxr", "--model", str(model), "--body-part", "CHEST",
                 "--no-dicom", "--out", str(run)]) == 0
    assert main(["evaluate", "--predictions", str(run / "predictions.csv"), "--labels", str(nih_labels()),
                 "--model", str(model), "--out", str(ev), "--no-report"]) == 0
    n = json.loads((ev / "metrics.json").read_text())["dataset"]["images"]
    assert main(["weights", "verify", str(model), "--evaluation", str(ev / "metrics.json")]) == 0
    verified = models.load_manifest(model / "manifest.yaml")
    assert verified.verified and verified.evaluation_record.images == n == 8
    sha = verified.evaluation_record.sha256
    rc = main(["analyze", str(images[0]), "--pipeline", "cxr", "--model", str(model), "--body-part", "CHEST",
               "--out", str(tmp_path / "dicom-run")])
    assert rc == 0
    objs = [pydicom.dcmread(p) for p in (tmp_path / "dicom-run" / "dicom").rglob("*.dcm")]
    srs = [d for d in objs if d.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"]  # TID 1500, Comprehensive SR
    assert srs and all("UNVERIFIED" not in str(d.SeriesDescription) for d in objs)
    texts = [str(i.TextValue).replace("\n", "") for d in srs for i in _walk(d) if "TextValue" in i]
    assert any(sha in t and f"{n} images" in t for t in texts), texts


def _walk(ds):
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _walk(item)
