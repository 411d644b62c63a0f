"""End-of-send to results-at-the-PACS latency, with the model-free ``echo`` pipeline (measures the node).

    python benchmarks/latency.py [--runs 5] [--ct-slices 200] [--quiet 2] [--cxr]

A real ``ainode run`` with a DCMTK storescp as the PACS. For each run: /usr/bin/storescu sends the
study (fresh UIDs), and the clock runs from storescu's exit to the moment the last result object is
in storescp's folder. CR uses ``complete_on: release``; CT uses ``complete_on: quiet``, so its
figure includes ``quiet_seconds`` (printed separately). ``--cxr`` runs the CR through the chest X-ray
pipeline with a random-weight DenseNet-121 imported the way a hospital imports real weights (needs
torch: ``pip install ".[import]"``), so the figure includes the model.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support.dcmtk import StoreSCP  # noqa: E402
from support.dicomgen import copy_with_new_uids, ct_series, sample_file  # noqa: E402
from support.node import NodeProcess, base_config, free_port  # noqa: E402

ENV = dict(os.environ, TCP_NODELAY="1")


def send(port: int, files: list[Path]) -> float:
    subprocess.run(["/usr/bin/storescu", "-aet", "MODALITY1", "-aec", "AINODE", "127.0.0.1", str(port),
                    *map(str, files)], check=True, env=ENV, capture_output=True)
    return time.perf_counter()


def wait_files(scp: StoreSCP, n: int, timeout: float = 120) -> float:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if len(scp.files()) >= n:
            return time.perf_counter()
        time.sleep(0.01)
    raise TimeoutError(f"only {len(scp.files())} of {n} result objects arrived")


def node_latency(web_port: int) -> None:
    """The node's own view of the same runs: per-stage p50/p95 over the last hour, as the console shows."""
    import json
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/api/dashboard", timeout=30) as r:
        lat = json.loads(r.read())["latency"]
    for stage, v in lat.items():
        p50 = "-" if v["p50"] is None else f"{v['p50']:.2f} s"
        p95 = "-" if v["p95"] is None else f"{v['p95']:.2f} s"
        print(f"  node metric {stage:<20} n={v['n']:<4} p50 {p50:>8}  p95 {p95:>8}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--ct-slices", type=int, default=200)
    ap.add_argument("--quiet", type=float, default=2.0)
    ap.add_argument("--cxr", action="store_true", help="CR through the cxr pipeline with a DenseNet-121")
    ap.add_argument("--one-finding", action="store_true",
                    help="with --cxr: thresholds so that one label is present (the random model calls all 18"
                         " present at torchxrayvision's operating points, far more than a real radiograph)")
    args = ap.parse_args()
    if args.cxr:
        cxr_latency(args)
        return
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        scp = StoreSCP(tmp / "pacs", aet="PACS").start()
        port, web = free_port(), free_port()
        cfg = base_config(tmp / "var", port, web_port=web)
        cfg["destinations"] = [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": scp.port}]
        cfg["delivery"] = {"poll_seconds": 1}
        cfg["routes"] = [
            {"name": "cr", "match": {"Modality": "CR"}, "pipelines": ["echo"], "destinations": ["pacs"],
             "complete_on": "release"},
            {"name": "ct", "match": {"Modality": "CT"}, "pipelines": ["echo"], "destinations": ["pacs"],
             "complete_on": "quiet", "quiet_seconds": args.quiet},
        ]
        node = NodeProcess(tmp, cfg).start()
        try:
            per_study = 3  # echo: measurement SR, narrative SR, summary SC (no findings, so no KOS)
            cr_times, ct_times = [], []
            expected = 0
            for i in range(args.runs + 1):  # the first run warms the worker (imports, fonts) and is dropped
                cr = copy_with_new_uids(sample_file("RG1_UNCR.dcm"), tmp / f"cr{i}.dcm")
                t_end = send(port, [cr])
                expected += per_study
                dt = wait_files(scp, expected) - t_end
                if i:
                    cr_times.append(dt)
            for i in range(args.runs):
                ct = ct_series(tmp / f"ct{i}", args.ct_slices, size=512, seed=i, shuffle=False)
                t_end = send(port, ct)
                expected += per_study
                ct_times.append(wait_files(scp, expected) - t_end)
            print(f"CR (release): median {statistics.median(cr_times):.2f} s  runs "
                  + " ".join(f"{t:.2f}" for t in cr_times) + "   target <= 1.0 s")
            print(f"CT {args.ct_slices} slices (quiet {args.quiet:g} s): median {statistics.median(ct_times):.2f} s"
                  f" = quiet {args.quiet:g} s + {statistics.median(ct_times) - args.quiet:.2f} s  runs "
                  + " ".join(f"{t:.2f}" for t in ct_times) + "   target <= 3 s + quiet")
            node_latency(web)
        finally:
            node.stop()
            scp.stop()


def cxr_latency(args: argparse.Namespace) -> None:
    from support.cxr_models import imported_model
    from support.node import wait_for

    src = imported_model("torchxrayvision")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model = tmp / "model"
        model.mkdir()
        import shutil

        import yaml

        shutil.copy(src / "model.onnx", model / "model.onnx")
        manifest = yaml.safe_load((src / "manifest.yaml").read_text())
        if args.one_finding:
            manifest["thresholds"] = {k: {"possible": 1.0, "present": 1.0} for k in manifest["labels"]}
            manifest["thresholds"]["Effusion"] = {"possible": 0.0, "present": 0.0}
        (model / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
        scp = StoreSCP(tmp / "pacs", aet="PACS").start()
        port = free_port()
        cfg = base_config(tmp / "var", port)
        cfg["destinations"] = [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": scp.port}]
        cfg["routes"] = [{"name": "cr", "match": {"Modality": "CR"}, "pipelines": ["cxr"], "destinations": ["pacs"],
                          "complete_on": "release",
                          "options": {"model": str(model), "allow_unverified_models": True}}]
        # a fresh PixelMed cache, so that the warm-up run shows what the first report of its kind costs
        node = NodeProcess(tmp, cfg, env={"AINODE_PIXELMED_CACHE": str(tmp / "pixelmed-cache")}).start()
        times = []
        per_study = 0
        cold = 0.0
        try:
            for i in range(args.runs + 1):  # the first run loads the model into the worker and is dropped
                cr = copy_with_new_uids(sample_file("RG1_UNCR.dcm"), tmp / f"cr{i}.dcm")
                uid = str(__import__("pydicom").dcmread(cr, stop_before_pixels=True).StudyInstanceUID)
                before = len(scp.files())
                t_end = send(port, [cr])
                wall_end = time.time()
                if i:  # the clock stops when the last object is in the PACS folder (polled every 10 ms)
                    times.append(wait_files(scp, before + per_study) - t_end)
                # then, off the clock (`ainode status` is a Python process start: polling it while the clock
                # runs would take a core from the worker): every object delivered, and no more than counted
                wait_for(lambda u=uid: (x := node.study(u)) and x.get("delivered"), 120, 0.5)
                n = len(scp.files()) - before
                if i and n != per_study:
                    raise RuntimeError(f"run {i}: {n} result objects at the PACS, the warm-up run had {per_study}")
                if not i:  # arrival times from the files themselves (the warm-up is polled slowly)
                    cold = max(p.stat().st_mtime for p in scp.files()) - wall_end
                per_study = n
            what = "one finding present" if args.one_finding else "all 18 labels present"
            runs = " ".join(f"{t:.2f}" for t in times)
            print(f"CR through cxr (DenseNet-121, CPU, {what}, {per_study} result objects): median "
                  f"{statistics.median(times):.2f} s  runs {runs}   target <= 1.0 s")
            print(f"  warm-up run (model load, and PixelMed validating the first report of this kind): {cold:.2f} s")
        finally:
            node.stop()
            scp.stop()


if __name__ == "__main__":
    main()
