"""Confusion table of the chest X-ray input checks on real radiographs and on images they must refuse.

    python benchmarks/cxr_gating.py [--images DIR] [--forms DX,CR,CR-MONOCHROME1] [--no-negatives]
                                    [--cross-validate] [--write-template] [--show N]

``--images`` (default: ``shared/data/nih-cxr-frontal-dev``) holds frontal chest radiographs as PNG
(wrapped as tagless DICOM in each form: DX and CR MONOCHROME2 with no tags and no window, CR
MONOCHROME1 with the pixels inverted) or as DICOM files (read as they are). Every file goes
through the real loader and ``CXRPipeline.prepare_images``, as in production. Negatives are CT/MR
slices, ultrasound, colour images, the RG3 extremity radiograph and half chests from pydicom-data
(``tests/support/cxr_data.py``), relabelled DX without telling tags so that only the image decides.

``--cross-validate`` rebuilds the layout template from a random half of the images and judges the
other half with it (both ways, three seeds): the acceptance a held-out set can expect.
``--write-template`` rebuilds ``pipelines/cxr/chest_layout.json`` from ``--images`` (PNG only).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from support.cxr_data import FORMS, dev_dir, dev_files, negatives, read_png  # noqa: E402

from node.loader import load_study  # noqa: E402
from pipelines.cxr import CXRPipeline, gating  # noqa: E402
from pipelines.models import InputSpec, Normalisation  # noqa: E402

SPEC = InputSpec(normalisation=Normalisation(kind="xrv", range=(-1024.0, 1024.0)))


def judge(path: Path) -> tuple[str, str]:
    """('accepted' | 'noted' | 'refused', reason or notes) for one DICOM file."""
    pipe = CXRPipeline({})
    try:
        study = load_study([path])
        images, refused = pipe.prepare_images(study, SPEC)
    except Exception as exc:  # the pipeline's own refusal (modality, ...) or a loader error
        return "refused", str(exc)
    if not images:
        return "refused", "; ".join(refused)
    cautions = images[0].prepared.cautions
    return ("noted", "; ".join(cautions)) if cautions else ("accepted", "")


def table(rows: dict[str, Counter]) -> str:
    head = f"{'':34s} {'accepted':>9s} {'+note':>7s} {'refused':>8s} {'total':>6s}"
    lines = [head, "-" * len(head)]
    for name, c in rows.items():
        n = sum(c.values())
        lines.append(f"{name:34s} {c['accepted']:9d} {c['noted']:7d} {c['refused']:8d} {n:6d}")
    return "\n".join(lines)


def cross_validate(pngs: list[Path], seeds: int = 3) -> None:
    arrays = [read_png(p).astype(np.float32) / 255.0 for p in pngs]
    reduced = np.stack([gating.rank_image(a, 32) for a in arrays])
    original = gating.layout_template
    print("\ncross-validation (template from one half, rules judged on the other):")
    try:
        for seed in range(seeds):
            idx = np.random.default_rng(seed).permutation(len(arrays))
            halves = (idx[: len(idx) // 2], idx[len(idx) // 2:])
            for a, b in (halves, halves[::-1]):
                t = reduced[a].mean(0)
                t = ((t - t.mean()) / t.std()).astype(np.float32)
                gating.layout_template = lambda t=t: t  # type: ignore[assignment]
                ok, low = 0, []
                for i in b:
                    try:
                        gating.check(None, arrays[i])
                        ok += 1
                    except gating.ImageRefused:
                        low.append(pngs[i].name)
                lowest = ", ".join(f"{v:.2f}" for v in sorted(gating.layout_score(arrays[i]) for i in b)[:3])
                print(f"  seed {seed}: accepted {ok}/{len(b)}  lowest layout {lowest}  refused {low}")
    finally:
        gating.layout_template = original  # type: ignore[assignment]


def write_template(pngs: list[Path]) -> None:
    d = np.stack([gating.rank_image(read_png(p).astype(np.float32) / 255.0, 32) for p in pngs])
    t = d.mean(0)
    t = (t - t.mean()) / t.std()
    gating.LAYOUT_FILE.write_text(json.dumps({
        "about": "Mean frontal chest layout: each image box-reduced to 32x32, rank-transformed and standardised, "
                 "averaged over the NIH ChestX-ray14 dev radiographs (shared/data/nih-cxr-frontal-dev), "
                 "standardised. Rebuild with benchmarks/cxr_gating.py --write-template.",
        "n_images": len(d), "template": [[round(float(v), 4) for v in row] for row in t]}), encoding="utf-8")
    print(f"wrote {gating.LAYOUT_FILE} from {len(d)} images")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=Path, default=None)
    ap.add_argument("--forms", default=",".join(FORMS))
    ap.add_argument("--no-negatives", action="store_true")
    ap.add_argument("--cross-validate", action="store_true")
    ap.add_argument("--write-template", action="store_true")
    ap.add_argument("--show", type=int, default=20, help="list up to N refusals and notes")
    args = ap.parse_args(argv)
    folder = args.images or dev_dir()
    pngs = sorted(folder.glob("*.png"))
    dicoms = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".dcm", "")) if folder.is_dir() else []
    if args.write_template:
        write_template(pngs)
        return 0
    forms = tuple(f for f in args.forms.split(",") if f)
    rows: dict[str, Counter] = {}
    listed: list[str] = []
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name, form, path in dev_files(tmp / "dev", forms, pngs):
            verdict, why = judge(path)
            rows.setdefault(f"frontal chest, {form}", Counter())[verdict] += 1
            if verdict != "accepted":
                listed.append(f"  {verdict:8s} {form:15s} {name}: {why}")
            path.unlink()
        for path in dicoms:
            verdict, why = judge(path)
            rows.setdefault("frontal chest, DICOM as stored", Counter())[verdict] += 1
            if verdict != "accepted":
                listed.append(f"  {verdict:8s} {'DICOM':15s} {path.name}: {why}")
        if not args.no_negatives:
            for name, path in negatives(tmp / "neg"):
                verdict, why = judge(path)
                rows.setdefault("not a frontal chest", Counter())[verdict] += 1
                listed.append(f"  {verdict:8s} {'negative':15s} {name}: {why[:160]}")
    print(f"chest X-ray input checks on {folder} ({len(pngs)} PNG, {len(dicoms)} DICOM), "
          f"{time.monotonic() - t0:.0f} s\n")
    print(table(rows))
    print("\nnot plainly accepted (verdict, form, image: reason):")
    for line in listed[: args.show] + ([f"  ... {len(listed) - args.show} more"] if len(listed) > args.show else []):
        print(line[:260])
    if args.cross_validate and pngs:
        cross_validate(pngs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
