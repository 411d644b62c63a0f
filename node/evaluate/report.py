"""``report.html``: one self-contained page (plots embedded as PNG) a radiologist or physicist can read.

It leads with what the evaluation can and cannot say (data set size, how many images were left out and
why, whether the model is verified), then the table, then ROC curves and calibration plots per label,
then the model's manifest and hashes so the page names exactly which file was evaluated.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

import numpy as np

from .metrics import LabelMetrics


def _png(fig: Any) -> str:
    """The figure as base64 PNG; the figure is closed (pyplot keeps every open one alive)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _grid(n: int) -> tuple[int, int]:
    cols = min(4, max(1, n))
    return math.ceil(n / cols), cols


def _panels(n: int) -> tuple[Any, Any]:
    """One small panel per label in a grid (matplotlib headless); the unused panels blank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = _grid(n)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.1 * rows), squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    return fig, axes


def roc_figure(results: list[LabelMetrics], curves: dict[str, tuple[np.ndarray, np.ndarray]]) -> str:
    fig, axes = _panels(len(results))
    for ax, m in zip(axes.ravel(), results):
        ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="#999999")
        if m.label in curves:
            fpr, tpr = curves[m.label]
            ax.plot(fpr, tpr, lw=1.6, color="#1f5fa8", drawstyle="default")
        for op in m.operating_points[:1]:
            if op.sensitivity is not None and op.specificity is not None:
                ax.plot([1 - op.specificity], [op.sensitivity], "o", color="#c0392b", ms=5,
                        label=f"threshold {op.threshold:.3g}")
        for key, op in m.target_sensitivity.items():
            if op is not None and op.specificity is not None and op.sensitivity is not None:
                ax.plot([1 - op.specificity], [op.sensitivity], "^", ms=4, color="#27ae60",
                        label=f"sens≥{key}: thr {op.threshold:.3g}")
        auc = "AUC undefined" if m.auc is None else f"AUC {m.auc:.3f} [{m.auc_ci95[0]:.2f}–{m.auc_ci95[1]:.2f}]" \
            if m.auc_ci95 else f"AUC {m.auc:.3f} (CI n/a)"
        ax.set_title(f"{m.label}\n{auc}, {m.positives}/{m.n} pos", fontsize=8.5)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=7)
        ax.set_xlabel("1 − specificity", fontsize=7.5)
        ax.set_ylabel("sensitivity", fontsize=7.5)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="lower right", frameon=False)
    fig.tight_layout()
    return _png(fig)


def calibration_figure(results: list[LabelMetrics]) -> str:
    fig, axes = _panels(len(results))
    for ax, m in zip(axes.ravel(), results):
        ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="#999999")
        if m.calibration:
            x = [b["mean_predicted"] for b in m.calibration]
            y = [b["observed"] for b in m.calibration]
            ax.plot(x, y, "o-", ms=3.5, lw=1.2, color="#8e44ad")
            hi = max(0.05, max(x + y) * 1.1)
            ax.set_xlim(0, min(1, hi))
            ax.set_ylim(0, min(1, hi))
        ax.set_title(f"{m.label} (prevalence {m.prevalence:.3f})", fontsize=8.5)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("mean predicted probability", fontsize=7.5)
        ax.set_ylabel("observed frequency", fontsize=7.5)
    fig.tight_layout()
    return _png(fig)


CSS = """
body{font-family:DejaVu Sans,Arial,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:12.5px} th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#eef2f7} td.l,th.l{text-align:left}
.warn{background:#fff3cd;border:1px solid #e0c36a;padding:8px 12px;margin:10px 0}
.bad{background:#f8d7da;border:1px solid #d9959c;padding:8px 12px;margin:10px 0}
pre{background:#f6f6f6;padding:10px;font-size:11.5px;overflow:auto;max-height:420px}
.meta td{text-align:left} img{max-width:100%}
"""


def _f(x: float | None, d: int = 3) -> str:
    return f"{x:.{d}f}" if x is not None else "–"


def write_report(metrics: dict[str, Any], results: list[LabelMetrics], path: Path,
                 curves: dict[str, tuple[np.ndarray, np.ndarray]], manifest_text: str | None = None) -> Path:
    """Write the page; ``curves`` holds each label's ROC curve (false-positive rate, true-positive rate)."""
    e = html.escape
    model = metrics.get("model") or {}
    pred, lab, ds = metrics["predictions"], metrics["labels_file"], metrics["dataset"]
    notes = []
    if model and not model.get("verified"):
        notes.append('<div class="warn">The model is <b>not verified</b> (manifest <code>verified: false</code>). '
                     "This evaluation is the evidence a verification would rest on.</div>")
    if model and not model.get("file_matches_manifest"):
        notes.append('<div class="bad">The model file\'s SHA-256 does not match its manifest: these numbers may not '
                     "describe the file the node would run.</div>")
    small = [m.label for m in results if m.positives < 10]
    if small:
        notes.append(f'<div class="warn">Fewer than 10 positive cases for {e(", ".join(small))}: their AUC intervals '
                     "are wide and thresholds chosen from them are unreliable.</div>")
    rows = []
    for m in results:
        op = m.operating_points[0] if m.operating_points else None
        t90 = m.target_sensitivity.get("0.9")
        t95 = m.target_sensitivity.get("0.95")
        ci = f"{_f(m.auc_ci95[0])}–{_f(m.auc_ci95[1])}" if m.auc_ci95 else "–"
        rows.append(
            f"<tr><td class=l>{e(m.label)}</td><td class=l>{e(m.truth_label)}</td><td>{m.n}</td><td>{m.positives}</td>"
            f"<td>{_f(m.prevalence)}</td><td><b>{_f(m.auc)}</b></td><td>{ci}</td>"
            f"<td>{_f(op.threshold if op else None, 4)}</td><td>{_f(op.sensitivity if op else None, 2)}</td>"
            f"<td>{_f(op.specificity if op else None, 2)}</td><td>{_f(op.ppv if op else None, 2)}</td>"
            f"<td>{_f(op.npv if op else None, 2)}</td>"
            f"<td>{_f(t90.threshold if t90 else None, 4)}</td><td>{_f(t90.specificity if t90 else None, 2)}</td>"
            f"<td>{_f(t95.threshold if t95 else None, 4)}</td><td>{_f(t95.specificity if t95 else None, 2)}</td>"
            f"<td class=l>{e(m.note)}</td></tr>")
    skipped = "".join(f"<li>{e(k)}: {e(v)}</li>" for k, v in metrics.get("skipped_labels", {}).items())
    written = metrics.get("written_thresholds")
    roc_png = roc_figure(results, curves)
    cal_png = calibration_figure(results)
    title = f"Local evaluation of {model.get('name', 'predictions')} {model.get('version', '')}".strip()
    doc = f"""<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>
<style>{CSS}</style></head><body>
<h1>{e(title)}</h1>
<div>Created {e(metrics['created'])} by <code>ainode evaluate</code>. AI-generated model output compared with the
site's reference labels; for quality assurance, not a clinical report.</div>
{''.join(notes)}
<h2>Data set</h2>
<table class="meta">
<tr><td><b>Images evaluated</b></td><td>{ds['images']} (present in both tables; matched by
 {e(ds['matched_by'])})</td></tr>
<tr><td>Predictions</td><td>{e(pred['path'])}: {pred['rows']} rows, {pred['scored']} scored,
 {pred['not_scored']} not scored {e(str(pred.get('not_scored_reasons') or ''))},
 {pred['unmatched']} without a label</td></tr>
<tr><td>Labels</td><td>{e(lab['path'])} ({e(lab['format'])}): {lab['rows']} rows,
 {lab['unmatched']} without a prediction</td></tr>
<tr><td>SHA-256 predictions / labels</td><td><code>{e(pred['sha256'])}</code><br>
 <code>{e(lab['sha256'])}</code></td></tr>
</table>
<h2>Results per label</h2>
<table><tr><th class=l>label</th><th class=l>reference label</th><th>n</th><th>positives</th><th>prevalence</th>
<th>AUC</th><th>95% CI</th><th>threshold</th><th>sens</th><th>spec</th><th>PPV</th><th>NPV</th>
<th>thr for sens 0.90</th><th>spec</th><th>thr for sens 0.95</th><th>spec</th><th class=l>note</th></tr>
{''.join(rows)}</table>
<p>Threshold columns: the manifest's present threshold (a label is called positive when score ≥ threshold).
AUC confidence interval: {e(metrics['auc_method'])}.</p>
{f'<p>Not evaluated:</p><ul>{skipped}</ul>' if skipped else ''}
{_written(written)}
<h2>ROC curves</h2>
<p>Red dot: the manifest threshold; green triangles: thresholds for the target sensitivities.</p>
<img alt="ROC curves" src="data:image/png;base64,{roc_png}">
<h2>Calibration</h2>
<p>Equal-count bins of the predicted probability; a calibrated model lies on the dashed line.</p>
<img alt="Calibration plots" src="data:image/png;base64,{cal_png}">
<h2>Model</h2>
{_model_table(model)}
{f'<pre>{e(manifest_text)}</pre>' if manifest_text else '<p>No model manifest was given (--model).</p>'}
</body></html>"""
    path.write_text(doc, encoding="utf-8")
    return path


def _written(written: dict[str, Any] | None) -> str:
    if not written:
        return ""
    return (f'<p>Proposed thresholds (sensitivity {written["target_sensitivity"]:g}) written to '
            f'<code>{html.escape(written["manifest"])}</code>; the model stays unverified until '
            "<code>ainode weights verify</code>.</p>")


def _model_table(model: dict[str, Any]) -> str:
    if not model:
        return ""
    e = html.escape
    return (f'<table class="meta"><tr><td>Name / version</td><td>{e(model["name"])} {e(model["version"])}</td></tr>'
            f'<tr><td>Directory</td><td>{e(model["dir"])}</td></tr>'
            f'<tr><td>Model file SHA-256</td><td><code>{e(model["file_sha256"] or "missing")}</code></td></tr>'
            f'<tr><td>Manifest says</td><td><code>{e(model["sha256"])}</code></td></tr>'
            f'<tr><td>Manifest file SHA-256</td><td><code>{e(model["manifest_sha256"])}</code></td></tr>'
            f'<tr><td>Verified</td><td>{str(model["verified"]).lower()}</td></tr></table>')


__all__ = ["write_report"]
