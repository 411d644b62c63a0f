"""Per-label discrimination and operating-point statistics, computed here rather than with scikit-learn.

Why our own arithmetic: the node's runtime should not need scikit-learn, and the numbers that decide
whether a model is trusted must be reproducible from this file alone. Tests compare the AUC with
``sklearn.metrics.roc_auc_score`` to 1e-9.

- AUC: the Mann-Whitney statistic with mid-ranks (ties count one half), which equals the trapezoidal
  area under the empirical ROC curve.
- 95 % CI: DeLong, DeLong & Clarke-Pearson (Biometrics 1988) variance, computed with the fast
  mid-rank algorithm of Sun & Xu (IEEE SPL 2014), normal approximation, clipped to [0, 1].
- Sensitivity / specificity / PPV / NPV of ``score >= threshold`` (the node calls a finding present at
  ``probability >= present``), with Wilson 95 % intervals for sensitivity and specificity.
- Threshold for a target sensitivity: the highest threshold whose sensitivity is at least the target
  (the k-th highest positive score, k = ceil(target x positives)).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

Z95 = 1.959963984540054
AUC_METHOD = ("Mann-Whitney AUC (ties count 1/2); 95% CI from the DeLong (1988) variance, fast algorithm of "
              "Sun & Xu (2014), normal approximation clipped to [0, 1]")


def midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their mean rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    n = len(x)
    ranks_sorted = np.empty(n, dtype=np.float64)
    i = 0
    while i < n:
        j = i
        while j < n and xs[j] == xs[i]:
            j += 1
        ranks_sorted[i:j] = 0.5 * (i + j - 1) + 1.0
        i = j
    out = np.empty(n, dtype=np.float64)
    out[order] = ranks_sorted
    return out


def auc_delong(y: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    """(AUC, DeLong variance) for binary truth ``y`` (1 = positive) and scores ``s``."""
    y = np.asarray(y).astype(bool)
    s = np.asarray(s, dtype=np.float64)
    pos, neg = s[y], s[~y]
    m, n = len(pos), len(neg)
    if m == 0 or n == 0:
        raise ValueError("AUC needs at least one positive and one negative case")
    tx, ty, tz = midranks(pos), midranks(neg), midranks(np.concatenate([pos, neg]))
    auc = float((tz[:m].sum() - m * (m + 1) / 2.0) / (m * n))
    v01 = (tz[:m] - tx) / n  # structural components of the positives
    v10 = 1.0 - (tz[m:] - ty) / m  # ... and of the negatives
    sx = float(np.var(v01, ddof=1)) if m > 1 else 0.0
    sy = float(np.var(v10, ddof=1)) if n > 1 else 0.0
    return auc, sx / m + sy / n


def wilson(k: int, n: int) -> tuple[float, float] | None:
    if n == 0:
        return None
    p = k / n
    d = 1 + Z95 ** 2 / n
    c = (p + Z95 ** 2 / (2 * n)) / d
    h = Z95 * math.sqrt(p * (1 - p) / n + Z95 ** 2 / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


@dataclass
class OperatingPoint:
    threshold: float
    source: str
    tp: int
    fp: int
    tn: int
    fn: int
    sensitivity: float | None
    specificity: float | None
    ppv: float | None
    npv: float | None
    sensitivity_ci: tuple[float, float] | None
    specificity_ci: tuple[float, float] | None


def operating_point(y: np.ndarray, s: np.ndarray, threshold: float, source: str) -> OperatingPoint:
    y = np.asarray(y).astype(bool)
    called = np.asarray(s, dtype=np.float64) >= threshold
    tp, fp = int(np.sum(called & y)), int(np.sum(called & ~y))
    fn, tn = int(np.sum(~called & y)), int(np.sum(~called & ~y))
    return OperatingPoint(float(threshold), source, tp, fp, tn, fn, _ratio(tp, tp + fn), _ratio(tn, tn + fp),
                          _ratio(tp, tp + fp), _ratio(tn, tn + fn), wilson(tp, tp + fn), wilson(tn, tn + fp))


def threshold_for_sensitivity(y: np.ndarray, s: np.ndarray, target: float) -> float | None:
    """Highest threshold t with sensitivity(score >= t) >= target; None without positives."""
    pos = np.sort(np.asarray(s, dtype=np.float64)[np.asarray(y).astype(bool)])[::-1]
    if len(pos) == 0:
        return None
    k = max(1, math.ceil(target * len(pos) - 1e-12))
    return float(pos[k - 1])


def roc_curve(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rate, true-positive rate) at every distinct threshold, from (0, 0) to (1, 1)."""
    y = np.asarray(y).astype(bool)
    s = np.asarray(s, dtype=np.float64)
    order = np.argsort(-s, kind="mergesort")
    ys, ss = y[order], s[order]
    last = np.r_[np.nonzero(np.diff(ss))[0], len(ss) - 1]  # index of the last case at each distinct score
    tps = np.cumsum(ys)[last]
    fps = (last + 1) - tps
    p, n = max(1, int(y.sum())), max(1, int((~y).sum()))
    return np.r_[0.0, fps / n], np.r_[0.0, tps / p]


def calibration(y: np.ndarray, s: np.ndarray, bins: int = 10) -> list[dict[str, float]]:
    """Reliability table: equal-count bins of the score, mean predicted vs observed frequency."""
    y = np.asarray(y).astype(float)
    s = np.asarray(s, dtype=np.float64)
    order = np.argsort(s, kind="mergesort")
    out = []
    for chunk in np.array_split(order, min(bins, len(s))):
        if len(chunk):
            out.append({"n": int(len(chunk)), "mean_predicted": float(s[chunk].mean()),
                        "observed": float(y[chunk].mean())})
    return out


@dataclass
class LabelMetrics:
    label: str
    prediction_column: str
    truth_label: str
    n: int
    positives: int
    negatives: int
    prevalence: float
    auc: float | None = None
    auc_ci95: tuple[float, float] | None = None
    auc_se: float | None = None
    operating_points: list[OperatingPoint] = field(default_factory=list)
    target_sensitivity: dict[str, OperatingPoint | None] = field(default_factory=dict)
    calibration: list[dict[str, float]] = field(default_factory=list)
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def label_metrics(label: str, column: str, truth_label: str, y: np.ndarray, s: np.ndarray,
                  thresholds: list[tuple[float, str]], targets: list[float]) -> LabelMetrics:
    y = np.asarray(y).astype(bool)
    n, p = len(y), int(y.sum())
    m = LabelMetrics(label, column, truth_label, n, p, n - p, p / n if n else 0.0)
    if p == 0 or p == n:
        m.note = "AUC undefined: " + ("no positive cases" if p == 0 else "no negative cases")
    else:
        auc, var = auc_delong(y, s)
        m.auc = auc
        if p < 2 or n - p < 2:  # one case's structural component has no variance: the CI would be falsely narrow
            m.note = "95% CI not computed: DeLong needs at least 2 positive and 2 negative cases"
        else:
            se = math.sqrt(max(var, 0.0))
            m.auc_se, m.auc_ci95 = se, (max(0.0, auc - Z95 * se), min(1.0, auc + Z95 * se))
    for t, src in thresholds:
        m.operating_points.append(operating_point(y, s, t, src))
    for target in targets:
        t = threshold_for_sensitivity(y, s, target)
        m.target_sensitivity[f"{target:g}"] = operating_point(y, s, t, f"sensitivity >= {target:g}") \
            if t is not None else None
    if n:
        m.calibration = calibration(y, s)
    return m
