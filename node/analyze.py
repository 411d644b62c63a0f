"""``ainode analyze PATH... --pipeline NAME --out DIR``: run a pipeline on files, no network.

Why the node's own code path: a local evaluation is only evidence about the node if the numbers come
from what the node runs. Each unit (one image for ``cxr``, one study otherwise) becomes the same
``JobSpec`` the listener would queue and goes through ``node.tasks.execute_job`` in this process:
``node.loader`` -> the pipeline's ``check``/``run`` -> critical policy -> ``node.results`` (validated
SR/SC/KOS, unless ``--no-dicom``). Nothing is sent anywhere.

PNG/JPEG radiographs (``cxr`` only) are wrapped first as MONOCHROME2 DX instances with no patient tags
(``OUT/inputs/``), with UIDs derived from the file's content so a re-run gives the same UIDs.

Outputs: ``OUT/predictions.csv`` (image id = file name without folder; one column per model label with
the raw probability; ``status`` and ``reason``), ``OUT/summary.json``, ``OUT/dicom/<id>/`` (results),
``OUT/work/`` (each job's result.json). Unverified models run here (that is how they get evaluated);
everything they produce is marked UNVERIFIED as in the node.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

EXIT_INPUT = 2
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SKIP_NAMES = {"DICOMDIR", "Thumbs.db", "desktop.ini"}
PER_IMAGE_PIPELINES = {"cxr"}


class InputError(Exception):
    """Input that cannot be analysed; the message lists the files and what is wrong with each."""


@dataclass
class Unit:
    image_id: str
    paths: list[Path]
    study_uid: str


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``analyze`` to ``ainode``'s subparsers."""
    a = sub.add_parser("analyze", parents=[common], help="run a pipeline on files or folders, no network",
                       description="Run a pipeline on DICOM files/folders (and PNG/JPEG radiographs for cxr) "
                                   "exactly as the node would; write DICOM results, predictions.csv, summary.json.")
    a.add_argument("paths", nargs="+", type=Path)
    a.add_argument("--pipeline", required=True, help="pipeline name, e.g. cxr or classifier")
    a.add_argument("--out", required=True, type=Path, help="output folder")
    a.add_argument("--model", help="model directory, manifest or name (sets the pipeline's model option)")
    a.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="pipeline option (YAML value), overrides pipelines.<name> from --config")
    a.add_argument("--unit", choices=("image", "study"),
                   help="one prediction per image (default for cxr) or per study (default otherwise)")
    a.add_argument("--no-dicom", action="store_true", help="skip DICOM result objects (predictions only)")
    a.add_argument("--language", default="en", help="narrative language of the DICOM results (en, zh)")
    a.add_argument("--body-part", default="", help="BodyPartExamined for wrapped PNG/JPEG inputs (e.g. CHEST) when "
                                                   "you know it; default none (the pipeline's heuristic decides)")
    a.set_defaults(fn=cmd_analyze)


# --------------------------------------------------------------------------- inputs
def _expand(paths: list[Path]) -> tuple[list[Path], list[str]]:
    files, problems = [], []
    for p in paths:
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")
                           and f.name not in SKIP_NAMES)
            if not found:
                problems.append(f"{p}: folder holds no files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            problems.append(f"{p}: no such file or folder")
    return files, problems


def wrap_image(path: Path, out_dir: Path, body_part: str = "") -> Path:
    """A PNG/JPEG radiograph as a MONOCHROME2 DX instance with no patient tags (UIDs from its content).

    ``body_part`` (``--body-part``) is the only clinical tag ever added: a site that knows its images are
    chest radiographs says so, instead of relying on the pipeline's image heuristic.
    """
    from PIL import Image
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with Image.open(path) as im:
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im, dtype=np.int64).clip(0, 65535).astype(np.uint16)
        else:
            arr = np.asarray(im.convert("L"), dtype=np.uint8)
    bits = 16 if arr.dtype == np.uint16 else 8
    sop = generate_uid(entropy_srcs=[digest, "sop"])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, sop
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[digest, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[digest, "series"])
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "DX", 1, 1
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
               "AccessionNumber", "StudyID", "ReferringPhysicianName"):
        setattr(ds, kw, "")
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    if body_part:
        ds.BodyPartExamined = body_part.upper()[:16]
    ds.SeriesDescription = f"wrapped {path.name}"[:64]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = int(arr.shape[0]), int(arr.shape[1])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.PixelData = np.ascontiguousarray(arr).tobytes()
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{path.stem}-{digest[:8]}{'-' + body_part.lower() if body_part else ''}.dcm"
    ds.save_as(out, enforce_file_format=True)
    return out


def collect_units(paths: list[Path], pipeline: str, out: Path, unit: str | None, body_part: str = "") -> list[Unit]:
    """Read every input's header (or wrap it); InputError lists every file that cannot be used."""
    import pydicom
    from PIL import Image

    files, problems = _expand(paths)
    per_image = (unit or ("image" if pipeline in PER_IMAGE_PIPELINES else "study")) == "image"
    items: list[tuple[str, Path, str]] = []  # (image id, dicom path, study uid)
    for f in files:
        if f.suffix.lower() in IMAGE_SUFFIXES:
            if pipeline not in PER_IMAGE_PIPELINES:
                problems.append(f"{f}: PNG/JPEG input is only taken by the cxr pipeline; give DICOM files")
                continue
            try:
                with Image.open(f) as im:
                    im.verify()
                d = wrap_image(f, out / "inputs", body_part)
            except Exception as exc:
                problems.append(f"{f}: unreadable image ({exc})")
                continue
            items.append((f.name, d, str(pydicom.dcmread(d, stop_before_pixels=True).StudyInstanceUID)))
            continue
        try:
            h = pydicom.dcmread(f, stop_before_pixels=True)
            study = str(h.StudyInstanceUID)
            if not (h.get("SeriesInstanceUID") and h.get("SOPInstanceUID")):
                raise ValueError("no Series or SOP Instance UID")
        except Exception as exc:
            problems.append(f"{f}: not a readable DICOM file or PNG/JPEG image ({type(exc).__name__}: {exc})")
            continue
        items.append((f.name if per_image else f.parent.name or f.name, f, study))
    if problems:
        raise InputError("\n".join(problems))
    if not items:
        raise InputError("no input files")
    units: dict[str, Unit] = {}
    if per_image:
        for image_id, p, study in items:
            if image_id in units:
                raise InputError(f"two inputs are both named {image_id!r} ({units[image_id].paths[0]} and {p}); "
                                 "predictions are keyed by file name, so rename one")
            units[image_id] = Unit(image_id, [p], study)
        return list(units.values())
    by_study: dict[str, Unit] = {}
    for image_id, p, study in items:
        by_study.setdefault(study, Unit(image_id, [], study)).paths.append(p)
    seen: dict[str, int] = {}
    for u in by_study.values():  # study units are named by their folder; two studies in one folder get a suffix
        seen[u.image_id] = seen.get(u.image_id, 0) + 1
        if seen[u.image_id] > 1:
            u.image_id = f"{u.image_id}#{seen[u.image_id]}"
    return list(by_study.values())


# --------------------------------------------------------------------------- running
def _progress(i: int, n: int, label: str, t0: float) -> None:
    if not sys.stderr.isatty():
        return
    width = 30
    done = int(width * i / max(1, n))
    rate = i / max(1e-6, time.monotonic() - t0)
    eta = (n - i) / rate if rate > 0 else 0
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {i}/{n} {rate:4.1f}/s eta {eta:4.0f}s {label[:30]:<30}")
    if i == n:
        sys.stderr.write("\n")
    sys.stderr.flush()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:80] or "unit"


def probabilities(result: Any) -> dict[str, float]:
    """Raw per-model-label probabilities of a result (pipelines put them in details['probabilities'])."""
    probs = (result.details or {}).get("probabilities")
    if isinstance(probs, dict) and probs:
        return {str(k): float(v) for k, v in probs.items()}
    return {f.label: float(f.probability) for f in result.findings if f.probability is not None}


def analyze(paths: list[Path], pipeline: str, out: Path, options: dict[str, Any], *, unit: str | None = None,
            dicom: bool = True, language: str = "en", body_part: str = "") -> dict[str, Any]:
    """Run every unit through the node's job path; write predictions.csv and summary.json; return the summary."""
    from node.tasks import JobSpec, execute_job
    from pipelines.base import PipelineResult

    out.mkdir(parents=True, exist_ok=True)
    units = collect_units(paths, pipeline, out, unit, body_part)
    t0 = time.monotonic()
    rows: list[dict[str, Any]] = []
    labels: list[str] = []
    model: dict[str, Any] | None = None
    for i, u in enumerate(units):
        _progress(i, len(units), u.image_id, t0)
        work = out / "work" / f"{i:05d}-{_safe(u.image_id)}"
        shutil.rmtree(work, ignore_errors=True)  # never reuse a result from an earlier run (other model?)
        spec = JobSpec(job_id=f"analyze-{i:05d}", study_uid=u.study_uid, pipeline=pipeline,
                       paths=[str(p) for p in u.paths], result_dir=str(work),
                       outbox_dir=str(out / "dicom" / _safe(u.image_id)), options=options, language=language,
                       encode=dicom)
        row: dict[str, Any] = {"image_id": u.image_id, "status": "", "reason": "", "probs": {}, "files": 0}
        try:
            summary = execute_job(spec)
            result = PipelineResult.load(work)
            row["status"], row["reason"] = summary["status"], summary.get("reason", "")
            row["files"], row["critical"] = len(summary.get("outbox_files") or []), summary.get("critical", False)
            if result.status == "ok":
                row["probs"] = probabilities(result)
                labels.extend(k for k in row["probs"] if k not in labels)
            if result.model is not None and model is None:
                model = {"name": result.model.name, "version": result.model.version, "sha256": result.model.sha256,
                         "verified": result.model.verified}
        except Exception as exc:  # one unreadable study must not end the run
            log.warning("analyze %s failed: %s", u.image_id, exc)
            row["status"], row["reason"] = "failed", f"{type(exc).__name__}: {exc}"
        rows.append(row)
    _progress(len(units), len(units), "done", t0)
    _write_predictions(out / "predictions.csv", rows, labels)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    summary = {"pipeline": pipeline, "model": model, "inputs": len(units), "statuses": counts,
               "labels": labels, "seconds": round(time.monotonic() - t0, 2), "dicom": dicom,
               "predictions": str(out / "predictions.csv"),
               "units": [{k: r.get(k) for k in ("image_id", "status", "reason", "files", "critical")} for r in rows]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")
    return summary


def _write_predictions(path: Path, rows: list[dict[str, Any]], labels: list[str]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["image_id", *labels, "status", "reason"])
        for r in rows:
            w.writerow([r["image_id"], *[repr(r["probs"][k]) if k in r["probs"] else "" for k in labels],
                        r["status"], " ".join(str(r["reason"]).split())])
    tmp.replace(path)


def _parse_options(items: list[str]) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for it in items:
        key, sep, val = it.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--option {it!r}: write KEY=VALUE, e.g. --option min_symmetry=0.6")
        out[key.strip()] = yaml.safe_load(val)
    return out


def cmd_analyze(args: argparse.Namespace) -> int:
    from node.config import load_config
    from pipelines.registry import available_pipelines

    if args.pipeline not in available_pipelines():
        print(f"analyze: unknown pipeline {args.pipeline!r}; installed: {', '.join(sorted(available_pipelines()))}",
              file=sys.stderr)
        return EXIT_INPUT
    cfg = load_config(args.config, check_semantics=False)
    try:
        options: dict[str, Any] = dict(cfg.pipelines.get(args.pipeline, {}))
        options.update(_parse_options(args.option))
        if args.model:
            options["model"] = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
        options["allow_unverified_models"] = True  # analysing is how a model gets evaluated; outputs say UNVERIFIED
        summary = analyze(args.paths, args.pipeline, args.out, options, unit=args.unit, dicom=not args.no_dicom,
                          language=args.language, body_part=args.body_part)
    except InputError as exc:
        print("analyze: cannot read the input:\n" + "\n".join(f"  {line}" for line in str(exc).splitlines()),
              file=sys.stderr)
        return EXIT_INPUT
    st = ", ".join(f"{v} {k}" for k, v in sorted(summary["statuses"].items()))
    m = summary["model"]
    print(f"analysed {summary['inputs']} input(s) with {args.pipeline} in {summary['seconds']:.1f} s: {st}")
    if m:
        print(f"model {m['name']} {m['version']} sha256 {m['sha256'][:12]}… verified {str(m['verified']).lower()}")
    print(f"wrote {args.out / 'predictions.csv'} and {args.out / 'summary.json'}"
          + ("" if args.no_dicom else f"; DICOM results under {args.out / 'dicom'}"))
    return 0 if summary["statuses"].get("ok") else 1
