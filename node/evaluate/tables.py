"""Reading the two tables an evaluation joins: model predictions and the site's reference labels.

Formats are recognised from the header row, so a hospital can bring what it has:

- predictions: ``ainode analyze``'s ``predictions.csv`` (image id, one column per label, ``status``,
  ``reason``), or any CSV whose first column is the image id and whose other columns are scores named
  ``<Label>`` or ``prob_<Label>``.
- labels: one-hot (image id first, then a 0/1 column per label; an empty cell means "not assessed"), or
  NIH ChestX-ray14 ``Data_Entry`` (``Image Index`` and ``Finding Labels`` = labels joined by ``|``,
  ``No Finding`` for none). ``.csv.gz`` is read directly.

Label names compare case-insensitively with ``_`` and spaces equivalent (``Pleural_Thickening`` =
``pleural thickening``); a label map renames prediction labels to the labels file's vocabulary. Image
ids compare by file name without folder and, failing that, without extension (``x.dcm`` = ``x.png``).
"""

from __future__ import annotations

import csv
import gzip
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

NON_SCORE_COLUMNS = {"status", "reason"}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff")
#: ChestX-ray14's vocabulary: a Data_Entry labels file can say "absent" for exactly these.
NIH_LABELS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
              "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")
NO_FINDING = "no finding"


class TableError(Exception):
    """A table cannot be read or understood; the message names the file, the column or row, and the fix."""


def norm_label(name: str) -> str:
    return re.sub(r"\s+", " ", name.replace("_", " ")).strip().lower()


def norm_id(image_id: str) -> str:
    return image_id.strip().replace("\\", "/").rsplit("/", 1)[-1]


def stem_id(image_id: str) -> str:
    i = norm_id(image_id)
    low = i.lower()
    for ext in IMAGE_EXTENSIONS:
        if low.endswith(ext):
            return i[: -len(ext)]
    return i


def _read_rows(path: Path) -> list[list[str]]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise TableError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if path.suffix == ".gz" or raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except OSError as exc:
            raise TableError(f"{path}: not a valid gzip file ({exc})") from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TableError(f"{path}: not UTF-8 text; save the table as UTF-8 CSV") from exc
    rows = [r for r in csv.reader(io.StringIO(text)) if any(c.strip() for c in r)]
    if len(rows) < 2:
        raise TableError(f"{path}: needs a header row and at least one data row")
    return rows


@dataclass
class Predictions:
    path: Path
    columns: dict[str, str]  # normalised label -> column name as written
    scores: dict[str, dict[str, float]]  # image id -> normalised label -> score
    rows: int
    not_scored: dict[str, str] = field(default_factory=dict)  # image id -> why (refused, unavailable, empty)


def read_predictions(path: str | Path) -> Predictions:
    p = Path(path)
    rows = _read_rows(p)
    header = [h.strip() for h in rows[0]]
    cols: dict[str, int] = {}
    names: dict[str, str] = {}
    for i, h in enumerate(header[1:], start=1):
        if h.lower() in NON_SCORE_COLUMNS or not h:
            continue
        label = norm_label(h[5:] if h.lower().startswith("prob_") else h)
        if label in cols:
            raise TableError(f"{p}: columns {names[label]!r} and {h!r} name the same label")
        cols[label], names[label] = i, h
    if not cols:
        raise TableError(f"{p}: no score columns; expected the image id first, then one column per label "
                         "(<Label> or prob_<Label>)")
    status_i = header.index("status") if "status" in header else None
    reason_i = header.index("reason") if "reason" in header else None
    out = Predictions(p, names, {}, len(rows) - 1)
    for n, r in enumerate(rows[1:], start=2):
        r = r + [""] * (len(header) - len(r))
        image = norm_id(r[0])
        status = r[status_i].strip() if status_i is not None else "ok"
        if status and status != "ok":
            out.not_scored[image] = f"{status}: {r[reason_i] if reason_i is not None else ''}".strip(": ")
            continue
        vals: dict[str, float] = {}
        for label, i in cols.items():
            cell = r[i].strip()
            if cell == "":
                continue
            try:
                vals[label] = float(cell)
            except ValueError:
                raise TableError(f"{p} row {n}: column {names[label]!r} holds {cell!r}, not a number") from None
        if not vals:
            out.not_scored[image] = "no scores"
            continue
        if image in out.scores:
            raise TableError(f"{p} row {n}: image id {image!r} appears twice")
        out.scores[image] = vals
    return out


@dataclass
class Labels:
    path: Path
    format: str  # "nih" | "onehot"
    vocabulary: dict[str, str]  # normalised label -> label as written
    truth: dict[str, dict[str, bool]]  # image id -> normalised label -> positive?
    rows: int


_TRUE = {"1", "1.0", "true", "yes", "y", "positive", "pos"}
_FALSE = {"0", "0.0", "false", "no", "n", "negative", "neg"}


def read_labels(path: str | Path) -> Labels:
    p = Path(path)
    rows = _read_rows(p)
    header = [h.strip() for h in rows[0]]
    lower = [h.lower() for h in header]
    if "finding labels" in lower:
        return _read_nih(p, rows, lower)
    vocab = {norm_label(h): h for h in header[1:] if h}
    out = Labels(p, "onehot", vocab, {}, len(rows) - 1)
    for r in rows[1:]:
        r = r + [""] * (len(header) - len(r))
        t: dict[str, bool] = {}
        for i, h in enumerate(header[1:], start=1):
            cell = r[i].strip().lower()
            if cell in _TRUE:
                t[norm_label(h)] = True
            elif cell in _FALSE:
                t[norm_label(h)] = False  # anything else (empty, -1 "uncertain") = not assessed
        out.truth[norm_id(r[0])] = t
    if not any(out.truth.values()):
        raise TableError(f"{p}: no 0/1 label values found; expected one-hot columns (0/1) per label, or the NIH "
                         "Data_Entry format (Image Index, Finding Labels)")
    return out


def _read_nih(p: Path, rows: list[list[str]], lower: list[str]) -> Labels:
    try:
        id_i = lower.index("image index")
    except ValueError:
        raise TableError(f"{p}: has 'Finding Labels' but no 'Image Index' column") from None
    f_i = lower.index("finding labels")
    vocab = {norm_label(x): x for x in NIH_LABELS}
    seen: list[list[str]] = []
    for r in rows[1:]:
        if len(r) <= max(id_i, f_i):
            continue
        found = [x.strip() for x in r[f_i].split("|") if x.strip()]
        seen.append([r[id_i]] + found)
        for x in found:
            if norm_label(x) != NO_FINDING:
                vocab.setdefault(norm_label(x), x)
    out = Labels(p, "nih", vocab, {}, len(rows) - 1)
    for r in seen:
        present = {norm_label(x) for x in r[1:]} - {NO_FINDING}
        out.truth[norm_id(r[0])] = {k: k in present for k in vocab}
    return out


def parse_label_map(spec: str | None) -> dict[str, str]:
    """``--label-map``: ``A=B,C=D`` or a YAML/JSON file mapping prediction label -> labels-file label."""
    if not spec:
        return {}
    p = Path(spec)
    if p.is_file():
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise TableError(f"label map {p}: cannot read ({exc})") from exc
        if not isinstance(data, dict):
            raise TableError(f"label map {p}: must be a mapping of prediction label: labels-file label")
        return {norm_label(str(k)): norm_label(str(v)) for k, v in data.items()}
    out = {}
    for part in spec.split(","):
        if "=" not in part:
            raise TableError(f"--label-map {spec!r}: write PRED=TRUTH pairs separated by commas, or give a file")
        k, v = part.split("=", 1)
        out[norm_label(k)] = norm_label(v)
    return out


@dataclass
class Joined:
    ids: list[str]  # image ids present in both tables (as in the predictions)
    predictions_unmatched: list[str]
    labels_unmatched: int
    by_stem: bool


def join(preds: Predictions, labels: Labels) -> tuple[Joined, dict[str, str]]:
    """Images in both tables; returns the join and prediction id -> labels id."""
    ids = list(preds.scores)
    mapping = {i: i for i in ids if i in labels.truth}
    by_stem = False
    if len(mapping) < len(ids):
        stems: dict[str, str] = {}
        for k in labels.truth:
            stems.setdefault(stem_id(k), k)
        for i in ids:
            if i not in mapping and stem_id(i) in stems:
                mapping[i] = stems[stem_id(i)]
                by_stem = True
    matched = [i for i in ids if i in mapping]
    return Joined(matched, [i for i in ids if i not in mapping], len(labels.truth) - len(set(mapping.values())),
                  by_stem), mapping
