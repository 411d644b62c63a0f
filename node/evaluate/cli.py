"""``ainode evaluate`` argument parsing and exit codes (the work is in ``node.evaluate``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

EXIT_INPUT = 2


def register(sub: Any) -> None:
    """Add ``evaluate`` to ``ainode``'s subparsers."""
    ev = sub.add_parser("evaluate", help="predictions vs local labels: AUC with CI, operating points, report.html",
                        description="Compare a model's predictions with the site's reference labels.")
    ev.add_argument("--predictions", required=True, type=Path,
                    help="predictions.csv from `ainode analyze`, or image id + <Label>/prob_<Label> columns")
    ev.add_argument("--labels", required=True, type=Path,
                    help="one-hot CSV (image id, 0/1 per label) or NIH Data_Entry (Image Index, Finding Labels)")
    ev.add_argument("--out", required=True, type=Path, help="folder for metrics.json and report.html")
    ev.add_argument("--model", type=Path, help="model directory: its manifest's thresholds, hash and name")
    ev.add_argument("--label-map", help="PRED=TRUTH[,PRED=TRUTH...] or a YAML/JSON file mapping prediction "
                                        "labels to the labels file's names")
    ev.add_argument("--target-sensitivity", default="0.90,0.95",
                    help="comma-separated sensitivities to report thresholds for (default 0.90,0.95)")
    ev.add_argument("--write-thresholds", metavar="sensitivity=T",
                    help="write a copy of the manifest (OUT/manifest.yaml) whose thresholds give sensitivity T here")
    ev.add_argument("--no-report", action="store_true", help="skip report.html (no matplotlib needed)")
    ev.set_defaults(fn=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from node.evaluate import EvaluationError, TableError, evaluate, table

    try:
        targets = tuple(float(x) for x in str(args.target_sensitivity).split(",") if x.strip())
    except ValueError:
        print(f"evaluate: --target-sensitivity {args.target_sensitivity!r} must be numbers like 0.90,0.95",
              file=sys.stderr)
        return EXIT_INPUT
    try:
        ev = evaluate(args.predictions, args.labels, args.out, model_dir=args.model, label_map=args.label_map,
                      targets=targets, write_thresholds=args.write_thresholds, report=not args.no_report)
    except (EvaluationError, TableError) as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except ModuleNotFoundError as exc:
        print(f"evaluate: the report needs {exc.name}: pip install 'ainode[evaluate]' (or pass --no-report)",
              file=sys.stderr)
        return 1
    print(table(ev, targets))
    print(f"\nwrote {ev.out / 'metrics.json'}" + ("" if args.no_report else f" and {ev.out / 'report.html'}"))
    if "written_thresholds" in ev.metrics:
        print(f"proposed thresholds: {ev.metrics['written_thresholds']['manifest']} (still verified: false; review, "
              "copy into the model directory, then `ainode weights verify`)")
    return 0
