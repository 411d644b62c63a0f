"""ainode's cxr probabilities against the reference implementations' own paths, same weights: max |dP|.

    pip install ".[test]"    # torchxrayvision, torchvision (CPU torch), as the tests use them
    python benchmarks/cxr_parity.py [--images DIR] [--limit N]

Random DenseNet-121 weights saved in each project's own checkpoint format and imported with
``ainode weights import`` (the parity is about the input path). torchxrayvision: RG1 (real CR, VOI
window, MONOCHROME1) and each image wrapped as tagless DX and as inverted MONOCHROME1 CR, through
``read_xray_dcm(voi_lut=True)`` -> ``XRayCenterCrop`` -> ``XRayResizer(224)``. reproduce-chexnet:
the PNG through its torchvision transforms vs ainode on the DX and CR-MONOCHROME1 wraps.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from support.cxr_data import dev_dir, read_png, save, wrap  # noqa: E402
from support.cxr_models import checkpoint_of, imported_model  # noqa: E402
from support.reference import (  # noqa: E402
    ainode_probabilities,
    chexnet_model,
    chexnet_probabilities,
    xrv_model,
    xrv_probabilities,
)

from node.weights import checkpoint_state  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=Path, default=None)
    ap.add_argument("--limit", type=int, default=0)
    args = ap.parse_args(argv)
    pngs = sorted((args.images or dev_dir()).glob("*.png"))
    if args.limit:
        pngs = pngs[: args.limit]
    from pydicom.data import get_testdata_file

    t0 = time.monotonic()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        files = {form: [save(wrap(read_png(p), form), tmp / form / f"{p.stem}.dcm") for p in pngs]
                 for form in ("DX", "CR-MONOCHROME1")}
        net = xrv_model(checkpoint_state(checkpoint_of("torchxrayvision"), "torchxrayvision"))
        xdir = imported_model("torchxrayvision")
        rg1 = Path(get_testdata_file("RG1_UNCR.dcm"))
        d_rg1 = np.abs(ainode_probabilities(xdir, [rg1])[0] - xrv_probabilities(net, rg1)).max()
        rows.append(("torchxrayvision", "RG1 CR (window, MONOCHROME1)", 1, float(d_rg1)))
        refused: dict[str, list[Path]] = {}
        for form, fs in files.items():
            gone = refused.setdefault(form, [])
            ours = ainode_probabilities(xdir, fs, gone)
            ref = np.stack([xrv_probabilities(net, f) for f in fs if f not in gone])
            rows.append(("torchxrayvision", f"dev {form}", len(ref), float(np.abs(ours - ref).max())))
        net = chexnet_model(checkpoint_state(checkpoint_of("chexnet"), "chexnet"))
        cdir = imported_model("chexnet")
        for form, fs in files.items():
            gone = []
            ours = ainode_probabilities(cdir, fs, gone)
            ref = np.stack([chexnet_probabilities(net, p) for p, f in zip(pngs, fs) if f not in gone])
            rows.append(("chexnet", f"dev {form} vs PNG", len(ref), float(np.abs(ours - ref).max())))
            refused[form] = sorted(set(refused[form]) | set(gone))
    print(f"max |dP| per label, ainode vs reference, same weights ({time.monotonic() - t0:.0f} s)")
    print(f"{'format':16s} {'input':32s} {'images':>6s} {'max |dP|':>9s}")
    for fmt, what, n, dmax in rows:
        print(f"{fmt:16s} {what:32s} {n:6d} {dmax:9.5f}")
    for form, gone in refused.items():  # refused by the input checks: no probabilities to compare
        if gone:
            print(f"refused as {form} (left out above): {', '.join(p.stem for p in gone)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
