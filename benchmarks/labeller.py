"""Measure the report labeller on the Indiana University chest X-ray reports against their MeSH tags.

The reports ship inside the PyPI torchxrayvision wheel (``torchxrayvision/data/NLMCXR_reports.tgz``,
3,955 reports, CC BY-NC-ND). Get it without installing its dependencies:

    pip download --no-deps torchxrayvision -d /tmp/txv
    python benchmarks/labeller.py --reports /tmp/txv/torchxrayvision-*.whl

Reference labels are the reports' MeSH *major* tags mapped to observations (table ``MESH`` below);
a report counts as positive for an observation when any major tag maps to it. The labeller reads
FINDINGS + IMPRESSION; "mentioned" counts positive and uncertain calls, "positive only" counts
only positive ones. MeSH tags were assigned by human indexers to the whole report and are not a
perfect reference either (e.g. they index "Lung/hypoinflation" which no observation covers).
"""

from __future__ import annotations

import argparse
import glob
import io
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
import zipfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.cxr.labeller import label_report  # noqa: E402

#: MeSH major heading (before the first '/') -> observation; a callable checks the sub-headings.
MESH: dict[str, str] = {
    "normal": "No Finding",
    "Cardiomegaly": "Cardiomegaly",
    "Pulmonary Atelectasis": "Atelectasis",
    "Pleural Effusion": "Pleural Effusion",
    "Pulmonary Edema": "Edema",
    "Pulmonary Congestion": "Edema",
    "Pneumonia": "Pneumonia",
    "Consolidation": "Consolidation",
    "Pneumothorax": "Pneumothorax",
    "Opacity": "Lung Opacity",
    "Airspace Disease": "Lung Opacity",
    "Infiltrate": "Lung Opacity",
    "Nodule": "Lung Lesion",
    "Mass": "Lung Lesion",
    "Fractures, Bone": "Fracture",
    "Emphysema": "Emphysema",
    "Pulmonary Emphysema": "Emphysema",
    "Pulmonary Disease, Chronic Obstructive": "Emphysema",
    "Pulmonary Fibrosis": "Fibrosis",
    "Hernia, Hiatal": "Hernia",
    "Hernia, Diaphragmatic": "Hernia",
    "Catheters, Indwelling": "Support Devices",
    "Tube, Inserted": "Support Devices",
    "Implanted Medical Device": "Support Devices",
    "Medical Device": "Support Devices",
    "Stents": "Support Devices",
}
OBSERVATIONS = sorted(set(MESH.values()))


def _major_observations(majors: list[str]) -> set[str]:
    out = set()
    for m in majors:
        parts = [p.strip() for p in m.split("/")]
        head = parts[0]
        if head in MESH:
            out.add(MESH[head])
        elif head == "Thickening" and any("pleura" in p.lower() for p in parts[1:]):
            out.add("Pleural Other")
        elif head in ("Mediastinum", "Cardiac Shadow") and any("enlarged" in p.lower() for p in parts[1:]):
            out.add("Cardiomegaly" if head == "Cardiac Shadow" else "Enlarged Cardiomediastinum")
    return out


def read_reports(path: str) -> list[tuple[str, str, set[str]]]:
    """(id, text, reference observations) for every report with text."""
    p = Path(path)
    blobs: list[tuple[str, bytes]] = []
    if p.is_dir():
        blobs = [(f.name, f.read_bytes()) for f in sorted(p.rglob("*.xml"))]
    else:
        data = p.read_bytes()
        if p.suffix == ".whl":
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                data = z.read("torchxrayvision/data/NLMCXR_reports.tgz")
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as t:
            for m in t.getmembers():
                if m.isfile() and m.name.endswith(".xml"):
                    blobs.append((Path(m.name).name, t.extractfile(m).read()))  # type: ignore[union-attr]
    out = []
    for name, blob in blobs:
        root = ET.fromstring(blob)
        text = " ".join((a.text or "") for a in root.iter("AbstractText")
                        if a.get("Label") in ("FINDINGS", "IMPRESSION"))
        if not text.strip():
            continue
        majors = [m.text or "" for m in root.iter("major")]
        out.append((name, text, _major_observations(majors)))
    return out


def evaluate(reports: list[tuple[str, str, set[str]]], count_uncertain: bool) -> dict[str, tuple[int, int, int]]:
    tp: Counter[str] = Counter()
    fp: Counter[str] = Counter()
    fn: Counter[str] = Counter()
    for _, text, gold in reports:
        st = label_report(text).status
        pred = {o for o, s in st.items() if s == "positive" or (count_uncertain and s == "uncertain")}
        for o in OBSERVATIONS:
            if o in pred and o in gold:
                tp[o] += 1
            elif o in pred:
                fp[o] += 1
            elif o in gold:
                fn[o] += 1
    return {o: (tp[o], fp[o], fn[o]) for o in OBSERVATIONS}


def table(res: dict[str, tuple[int, int, int]], title: str) -> str:
    lines = [title, f"{'observation':<26}{'support':>8}{'precision':>11}{'recall':>8}{'F1':>7}"]
    for o, (tp, fp, fn) in res.items():
        p = tp / (tp + fp) if tp + fp else float("nan")
        r = tp / (tp + fn) if tp + fn else float("nan")
        f = 2 * p * r / (p + r) if p + r else float("nan")
        lines.append(f"{o:<26}{tp + fn:>8}{p:>11.3f}{r:>8.3f}{f:>7.3f}")
    tp, fp, fn = (sum(v[i] for v in res.values() if True) for i in range(3))
    lines.append(f"{'micro-average':<26}{tp + fn:>8}{tp / (tp + fp):>11.3f}{tp / (tp + fn):>8.3f}"
                 f"{2 * tp / (2 * tp + fp + fn):>7.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = next(iter(sorted(glob.glob("/tmp/txv/torchxrayvision-*.whl"))), None)
    ap.add_argument("--reports", default=default, help="NLMCXR_reports.tgz, its extracted folder, or the wheel")
    args = ap.parse_args(argv)
    if not args.reports:
        ap.error("give --reports (see the module docstring for how to fetch the torchxrayvision wheel)")
    t0 = time.monotonic()
    reports = read_reports(args.reports)
    t1 = time.monotonic()
    mentioned = evaluate(reports, count_uncertain=True)
    t2 = time.monotonic()
    strict = evaluate(reports, count_uncertain=False)
    print(f"{len(reports)} IU reports with findings/impression text (read in {t1 - t0:.1f} s, "
          f"labelled in {t2 - t1:.1f} s = {1000 * (t2 - t1) / len(reports):.2f} ms/report)\n")
    print(table(mentioned, "Labeller vs MeSH major tags (positive or uncertain counts as mentioned):"))
    print()
    print(table(strict, "Positive only:"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
