"""Time from the end of a C-STORE send to the critical-finding notification, through a running node.

What a stroke team cares about is not inference speed but how long after the scanner finishes sending
the pager goes off. This drives the real path: ``ainode run`` (listener, embedded Redis, worker),
DCMTK ``storescu`` as the modality, the ``classifier`` pipeline with small random-weight ONNX models
whose manifests flag every study critical, and a local webhook receiver plus a local MLLP listener as
the notification targets. Cases: one CR chest radiograph (pydicom-data RG1_UNCR) and a 40-slice
512x512 head CT; every run uses fresh UIDs.

    python benchmarks/critical.py                      # 3 runs per case after one warm-up study
    python benchmarks/critical.py --runs 5 --slices 40 --keep /tmp/bench --out result.json

Per run it reports: send (storescu wall time), then from the end of the send: the webhook received,
the HL7 ORU received, and a breakdown from the webhook payload: study complete (assembly),
result detected (queue + load + inference + result encoding/validation in the worker), sent (notifier).
The random models measure the plumbing only; use ``--ct-model DIR`` / ``--cr-model DIR`` (a model
directory with manifest.yaml + model.onnx) for a real model's inference time.

Needs: the ainode package installed (``pip install -e .``), ``/usr/bin/storescu`` (dcmtk), and a node
config schema that accepts the ``notify:`` section (``node.notify.NotifyConfig``).
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import yaml
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines import models  # noqa: E402
from tests.support.mllp import MLLPListener  # noqa: E402
from tests.test_classifier import build_model, write_head_ct  # noqa: E402

STORESCU = "/usr/bin/storescu"
NODE_AE = "AINODE"
SECRET = "bench-secret"


# --------------------------------------------------------------------------- models and data
def make_models(weights: Path) -> None:
    """Two random-weight models whose thresholds make every study critical (this measures plumbing)."""
    specs = {
        "bench-ich": dict(labels=["any"], channels=3, modalities=["CT"], size=256, windows=[
            {"name": "brain", "center": 40, "width": 80}, {"name": "subdural", "center": 80, "width": 200},
            {"name": "bone", "center": 600, "width": 2800}], mode="slices", crop="none",
            code={"value": "1386000", "scheme": "SCT", "meaning": "Intracranial hemorrhage"}),
        "bench-cr": dict(labels=["pneumothorax"], channels=1, modalities=["CR", "DX"], size=224, windows=[],
                         mode="image", crop="center_square",
                         code={"value": "36118008", "scheme": "SCT", "meaning": "Pneumothorax"}),
    }
    for name, s in specs.items():
        d = weights / name
        onnx_path = build_model(d / "model.onnx", n_labels=len(s["labels"]), channels=s["channels"])
        label = s["labels"][0]
        manifest = {
            "name": name, "version": "bench", "labels": s["labels"],
            "input": {"name": "image", "size": s["size"], "channels": s["channels"],
                      "normalisation": {"kind": "unit"}, "crop": s["crop"]},
            "output": {"probabilities": "probabilities", "cam": None},
            "thresholds": {label: {"possible": 0.0, "present": 0.0}}, "critical": {label: 0.0},
            "sha256": models.sha256_file(onnx_path), "verified": False,
            "classifier": {"mode": s["mode"], "modalities": s["modalities"], "windows": s["windows"],
                           "labels": {label: {"code": s["code"]}}},
        }
        (d / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False), encoding="utf-8")


def cr_study(directory: Path) -> list[Path]:
    """pydicom-data's CR chest PA with fresh study/series/instance UIDs."""
    from pydicom.data import get_testdata_file

    directory.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.AccessionNumber = f"BENCH{int(time.time() * 1000) % 10**9}"
    path = directory / "cr.dcm"
    ds.save_as(path)
    return [path]


def ct_study(directory: Path, slices: int) -> list[Path]:
    paths, _ = write_head_ct(directory, n=slices, rows=512, bleed_slice=slices // 2)
    return paths


# --------------------------------------------------------------------------- receivers
class Webhooks(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        self.received: dict[str, tuple[float, dict[str, Any]]] = {}
        self.cond = threading.Condition()
        super().__init__(("127.0.0.1", 0), _Hook)

    def wait(self, study_uid: str, timeout: float) -> tuple[float, dict[str, Any]]:
        with self.cond:
            if not self.cond.wait_for(lambda: study_uid in self.received, timeout):
                raise TimeoutError(f"no webhook for study {study_uid} within {timeout:g} s")
            return self.received[study_uid]


class _Hook(http.server.BaseHTTPRequestHandler):
    server: Webhooks

    def do_POST(self) -> None:  # noqa: N802
        t = time.time()
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        with self.server.cond:
            self.server.received.setdefault(body["study_instance_uid"], (t, body))
            self.server.cond.notify_all()
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def hl7_time(rx: MLLPListener, study_uid: str, timeout: float) -> float | None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for t, msg in zip(list(rx.received_at), list(rx.messages)):
            for obx in msg.segments("OBX"):
                if str(obx.extract_field(1, 3, 1, 1)) == "110180" and str(obx.extract_field(1, 5)) == study_uid:
                    return t
        time.sleep(0.01)
    return None


# --------------------------------------------------------------------------- node
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(work: Path, port: int, hook_port: int, mllp_port: int, ct_model: str, cr_model: str,
                 weights: Path, pacs_port: int | None) -> Path:
    dests = ["pacs"] if pacs_port else []
    cfg = {
        "node": {"ae_title": NODE_AE, "host": "127.0.0.1", "port": port, "storage_dir": str(work / "var"),
                 "accept_any_peer": True, "web_port": None, "allow_unverified_models": True},
        "workers": {"concurrency": 1},
        "destinations": [{"name": "pacs", "kind": "dicom", "ae_title": "PACS", "host": "127.0.0.1",
                          "port": pacs_port}] if pacs_port else [],
        "routes": [
            {"name": "head-ct", "match": {"Modality": "CT"}, "pipelines": ["classifier"], "complete_on": "release",
             "destinations": dests, "priority": "stat", "options": {"model": ct_model, "weights_dir": str(weights)}},
            {"name": "chest", "match": {"Modality": ["CR", "DX"]}, "pipelines": ["classifier"],
             "complete_on": "release", "destinations": dests, "priority": "stat",
             "options": {"model": cr_model, "weights_dir": str(weights)}},
        ],
        "notify": {"poll_interval_s": 0.5, "channels": [
            {"kind": "webhook", "name": "bench-webhook", "url": f"http://127.0.0.1:{hook_port}/ainode",
             "secret": SECRET, "backoff_base_s": 0.5},
            {"kind": "hl7", "name": "bench-ris", "host": "127.0.0.1", "port": mllp_port, "backoff_base_s": 0.5},
        ]},
    }
    path = work / "ainode.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ainode exited with {proc.returncode} before listening; see its log")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"ainode did not listen on {port} within {timeout:g} s")


def send(files: list[Path], port: int) -> float:
    """storescu wall time; TCP_NODELAY=1 because Debian's DCMTK otherwise pays ~50 ms per instance."""
    env = dict(os.environ, TCP_NODELAY="1")
    t0 = time.time()
    subprocess.run([STORESCU, "-aet", "BENCH", "-aec", NODE_AE, "127.0.0.1", str(port), *map(str, files)],
                   check=True, env=env, capture_output=True)
    return time.time() - t0


def sr_at_pacs(pacs_dir: Path | None, study_uid: str, timeout: float) -> float | None:
    """When the first result SR of the study reached the PACS (file mtime), or None."""
    if pacs_dir is None:
        return None
    deadline = time.time() + timeout
    seen: set[Path] = set()
    while time.time() < deadline:
        for p in pacs_dir.glob("SR*"):
            if p in seen:
                continue
            seen.add(p)
            try:
                if str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) == study_uid:
                    return p.stat().st_mtime
            except Exception:  # still being written
                seen.discard(p)
        time.sleep(0.05)
    return None


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def one_run(case: str, files: list[Path], port: int, hooks: Webhooks, rx: MLLPListener, timeout: float,
            pacs_dir: Path | None = None) -> dict[str, Any]:
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    send_s = send(files, port)
    t_sent = time.time()
    t_hook, body = hooks.wait(study_uid, timeout)
    t_hl7 = hl7_time(rx, study_uid, timeout)
    t_sr = sr_at_pacs(pacs_dir, study_uid, timeout)
    return {
        "case": case, "instances": len(files), "study_uid": study_uid, "send_s": round(send_s, 3),
        "webhook_s": round(t_hook - t_sent, 3), "hl7_s": round(t_hl7 - t_sent, 3) if t_hl7 else None,
        "complete_s": round(_ts(body["completed_at"]) - t_sent, 3),
        "detected_s": round(_ts(body["detected_at"]) - _ts(body["completed_at"]), 3),
        "notify_s": round(_ts(body["sent_at"]) - _ts(body["detected_at"]), 3),
        "sr_at_pacs_s": round(t_sr - t_sent, 3) if t_sr else None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--slices", type=int, default=40)
    ap.add_argument("--timeout", type=float, default=600, help="seconds to wait for one notification")
    ap.add_argument("--ct-model", type=Path, help="model directory to use instead of the random head-CT model")
    ap.add_argument("--cr-model", type=Path, help="model directory to use instead of the random CR model")
    ap.add_argument("--no-pacs", action="store_true",
                    help="no result destination: the worker then skips encoding and validating DICOM results")
    ap.add_argument("--keep", type=Path, help="work directory to keep (default: a temporary one, removed)")
    ap.add_argument("--out", type=Path, help="write the runs as JSON here")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still stop the node we started (finally below)
    if not Path(STORESCU).exists():
        print(f"{STORESCU} not found (apt-get install dcmtk)", file=sys.stderr)
        return 2
    work = args.keep or Path(tempfile.mkdtemp(prefix="ainode-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    weights = work / "weights"
    make_models(weights)
    ct_model = str(args.ct_model.resolve()) if args.ct_model else "bench-ich"
    cr_model = str(args.cr_model.resolve()) if args.cr_model else "bench-cr"
    hooks = Webhooks()
    threading.Thread(target=hooks.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    rx = MLLPListener().start()
    port = free_port()
    pacs_port = pacs_dir = pacs = None
    if not args.no_pacs:
        pacs_port, pacs_dir = free_port(), work / "pacs"
        pacs_dir.mkdir(parents=True, exist_ok=True)
        pacs = subprocess.Popen(["/usr/bin/storescp", "-aet", "PACS", "-od", str(pacs_dir), str(pacs_port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=dict(os.environ, TCP_NODELAY="1"))
    config = write_config(work, port, hooks.server_port, rx.port, ct_model, cr_model, weights, pacs_port)
    log = open(work / "ainode.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "node.cli", "run", "--config", str(config)], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=dict(os.environ, TCP_NODELAY="1"))
    runs: list[dict[str, Any]] = []
    try:
        wait_port(port, proc)
        warm = one_run("warm-up ct", ct_study(work / "data" / "warm", args.slices), port, hooks, rx, args.timeout,
                       pacs_dir)
        print(f"warm-up (cold worker): webhook {warm['webhook_s']:.2f} s after send", flush=True)
        for i in range(args.runs):
            for case, make in (("cr", lambda d: cr_study(d)), (f"ct{args.slices}", lambda d: ct_study(d, args.slices))):
                r = one_run(case, make(work / "data" / f"{case}-{i}"), port, hooks, rx, args.timeout, pacs_dir)
                runs.append(r)
                print(json.dumps(r), flush=True)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        if pacs is not None:
            pacs.terminate()
            pacs.wait(10)
        rx.stop()
        hooks.shutdown()
    print(f"\n{'case':8} {'n':>3} {'send':>7} {'complete':>9} {'detected':>9} {'notify':>7} {'webhook':>8} {'hl7':>7}"
          f" {'SR@PACS':>8}")
    for case in sorted({r["case"] for r in runs}):
        rs = [r for r in runs if r["case"] == case]

        def med(key: str, rs: list[dict[str, Any]] = rs) -> float:
            vals = [r[key] for r in rs if r[key] is not None]
            return statistics.median(vals) if vals else float("nan")

        print(f"{case:8} {len(rs):3d} {med('send_s'):7.2f} {med('complete_s'):9.2f} {med('detected_s'):9.2f} "
              f"{med('notify_s'):7.2f} {med('webhook_s'):8.2f} {med('hl7_s'):7.2f} {med('sr_at_pacs_s'):8.2f}")
    print("(medians, seconds; complete/webhook/hl7/SR@PACS from the end of the send, detected from complete, "
          "notify from detected)")
    if args.out:
        args.out.write_text(json.dumps({"runs": runs, "warm_up": warm}, indent=1), encoding="utf-8")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    raise SystemExit(main())
