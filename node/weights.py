"""``ainode weights import``: public PyTorch chest X-ray checkpoints -> ONNX + manifest, parity-checked.

Why an import step instead of loading checkpoints at run time: workers then need neither torch nor
either project's code, the file the node runs is pinned by SHA-256 in its manifest, and the export
is proven equal to the original network (max |torch - ONNX| <= 1e-4 on the same inputs) once, at
import, rather than assumed.

Both supported checkpoints are *pickled whole models* (``torch.save(model)``), which means
unpickling would normally need torchxrayvision / torchvision installed and would execute whatever
the pickle names. We unpickle with a restricted unpickler instead: torch's own tensor/parameter
rebuild functions and torch.nn layers load normally, classes from the two projects become inert
``nn.Module`` stand-ins that only carry parameters and buffers, and anything else is refused.

Manifests always come out ``verified: false``. The only way to ``verified: true`` is a local
evaluation: ``ainode analyze`` -> ``ainode evaluate --model DIR`` -> ``ainode weights verify DIR
--evaluation metrics.json`` (see ``node.evaluate.verify``).
"""

from __future__ import annotations

import argparse
import logging
import pickle
import re
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.models import (
    InputSpec,
    LabelThreshold,
    Manifest,
    Normalisation,
    OutputSpec,
    sha256_file,
    write_manifest,
)

log = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4

# torchxrayvision models.py, model_urls['all'] (densenet121-res224-all): label order and op_threshs.
XRV_ALL_LABELS = [
    "Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema", "Fibrosis", "Effusion",
    "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule", "Mass", "Hernia", "Lung Lesion", "Fracture",
    "Lung Opacity", "Enlarged Cardiomediastinum",
]
XRV_ALL_OP_THRESHS = [
    0.07422872, 0.038290843, 0.09814756, 0.0098118475, 0.023601074, 0.0022490358, 0.010060724, 0.103246614,
    0.056810737, 0.026791653, 0.050318155, 0.023985857, 0.01939503, 0.042889766, 0.053369623, 0.035975814,
    0.20204692, 0.05015312,
]
XRV_ALL_URL = ("https://github.com/mlmed/torchxrayvision/releases/download/v1/"
               "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt")

# jrzech/reproduce-chexnet cxr_dataset.py PRED_LABEL order (ChestX-ray14).
CHEXNET_LABELS = [
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
    "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
]
CHEXNET_URL = "https://github.com/jrzech/reproduce-chexnet (pretrained/checkpoint)"

FORMATS = ("torchxrayvision", "chexnet")
DEFAULT_NAMES = {"torchxrayvision": "xrv-densenet121-res224-all", "chexnet": "chexnet-densenet121"}
CRITICAL_LABELS = ("Pneumothorax",)


class ImportFailed(Exception):
    """The checkpoint could not be read, does not look like the named format, or failed parity."""


# --------------------------------------------------------------------------- restricted unpickling
_STUB_PREFIXES = ("torchxrayvision", "torchvision", "__main__", "model", "xrv")
_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "dict"),
    ("builtins", "list"), ("builtins", "tuple"), ("builtins", "slice"), ("builtins", "getattr"),
    ("copyreg", "_reconstructor"), ("builtins", "object"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"), ("numpy", "ndarray"),
}
_stub_cache: dict[tuple[str, str], type] = {}


def _stub(module: str, name: str) -> type:
    """An inert nn.Module subclass standing in for a class from a project we do not import."""
    import torch

    key = (module, name)
    if key not in _stub_cache:
        _stub_cache[key] = type(name, (torch.nn.Module,), {"__module__": f"ainode_stub.{module}",
                                                           "forward": lambda self, *a, **k: None})
    return _stub_cache[key]


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)
        if module == "torch" or module.startswith(("torch.", "torch._")):
            return super().find_class(module, name)
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module.split(".")[0] in _STUB_PREFIXES and (name[:1].isupper() or name.startswith("_")):
            return _stub(module, name)
        raise pickle.UnpicklingError(f"checkpoint refers to {module}.{name}, which the importer does not load "
                                     "(only torch modules and torchvision/torchxrayvision model classes)")


_restricted_pickle = types.ModuleType("ainode_restricted_pickle")
_restricted_pickle.Unpickler = _RestrictedUnpickler  # type: ignore[attr-defined]
_restricted_pickle.load = lambda f, **kw: _RestrictedUnpickler(f, **kw).load()  # type: ignore[attr-defined]
_restricted_pickle.__name__ = "pickle"


def load_checkpoint(path: str | Path) -> Any:
    """torch.load through the restricted unpickler, tensors mapped to CPU (CheXNet was saved from GPU)."""
    import torch

    try:
        return torch.load(str(path), map_location="cpu", pickle_module=_restricted_pickle, weights_only=False)
    except FileNotFoundError as exc:
        raise ImportFailed(f"checkpoint {path} does not exist") from exc
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError) as exc:
        raise ImportFailed(f"checkpoint {path} cannot be read: {exc}") from exc


def module_tensors(obj: Any) -> dict[str, Any]:
    """A state_dict from a (possibly stand-in) module by walking _modules/_parameters/_buffers.

    Done by hand rather than ``obj.state_dict()`` because modules pickled by old torch versions lack
    attributes that state_dict() expects; the three dicts exist in every version.
    """
    import torch

    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)  # already a state_dict
    out: dict[str, Any] = {}

    def walk(mod: Any, prefix: str) -> None:
        d = getattr(mod, "__dict__", {})
        for k, v in (d.get("_parameters") or {}).items():
            if v is not None:
                out[prefix + k] = v.detach() if hasattr(v, "detach") else v
        for k, v in (d.get("_buffers") or {}).items():
            if v is not None:
                out[prefix + k] = v
        for k, child in (d.get("_modules") or {}).items():
            if child is not None:
                walk(child, f"{prefix}{k}.")

    walk(obj, "")
    if not out:
        raise ImportFailed("checkpoint holds no module parameters")
    return out


_OLD_DENSE_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def normalise_keys(state: dict[str, Any]) -> dict[str, Any]:
    """Strip DataParallel's ``module.``, map torchvision<0.3 ``norm.1`` names to ``norm1``, keep the net's keys."""
    out = {}
    for k, v in state.items():
        k = k.removeprefix("module.")
        m = _OLD_DENSE_KEY.match(k)
        if m:
            k = m.group(1) + m.group(2)
        if k.startswith(("features.", "classifier.")) and not k.endswith("num_batches_tracked"):
            out[k] = v
    return out


def checkpoint_state(path: str | Path, fmt: str) -> dict[str, Any]:
    obj = load_checkpoint(path)
    if fmt == "chexnet":
        if not (isinstance(obj, dict) and "model" in obj):
            if isinstance(obj, dict) and "state_dict" in obj:
                obj = {"model": obj["state_dict"]}
            else:
                raise ImportFailed("not a reproduce-chexnet checkpoint: expected a dict with the model under 'model'")
        obj = obj["model"]
    elif isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and "model" in obj and not hasattr(obj["model"], "shape"):
        raise ImportFailed("this looks like a reproduce-chexnet checkpoint (a dict with the model under 'model'); "
                           "is --format torchxrayvision right? try --format chexnet")
    return normalise_keys(module_tensors(obj))


# --------------------------------------------------------------------------- build, export, parity
def build_network(fmt: str, state: dict[str, Any]) -> Any:
    from pipelines.cxr.densenet import DenseNet121

    sigmoid_head = fmt == "chexnet"
    wkey = "classifier.0.weight" if sigmoid_head else "classifier.weight"
    if wkey not in state:
        raise ImportFailed(f"checkpoint has no {wkey}; is --format {fmt} right? "
                           f"classifier keys found: {sorted(k for k in state if k.startswith('classifier'))}")
    num_classes, _ = state[wkey].shape
    in_channels = int(state["features.conv0.weight"].shape[1])
    net = DenseNet121(num_classes, in_channels=in_channels, sigmoid_head=sigmoid_head)
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ImportFailed(f"checkpoint does not match DenseNet-121: missing {list(missing)[:5]}, "
                           f"unexpected {list(unexpected)[:5]}")
    return net.eval()


def export_onnx(net: Any, path: Path, in_channels: int, size: int = 224) -> None:
    import torch

    from pipelines.cxr.densenet import CXRExport

    wrapper = CXRExport(net).eval()
    x = torch.zeros(1, in_channels, size, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".onnx.tmp")
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (x,), str(tmp), dynamo=False, input_names=["image"],
                          output_names=["probabilities", "cam"], opset_version=17,
                          dynamic_axes={"image": {0: "n"}, "probabilities": {0: "n"}, "cam": {0: "n"}})
    tmp.replace(path)


def parity(net: Any, onnx_path: Path, in_channels: int, size: int = 224, n: int = 2, seed: int = 0,
           value_range: tuple[float, float] = (-1024.0, 1024.0)) -> float:
    """Max |torch - ONNX| over probabilities and CAM-derived logits on random inputs in the model's range."""
    import onnxruntime as ort
    import torch

    from pipelines.cxr.densenet import CXRExport, reference_probabilities

    rng = np.random.default_rng(seed)
    lo, hi = value_range
    x = rng.uniform(lo, hi, size=(n, in_channels, size, size)).astype(np.float32)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    probs, cam = sess.run(["probabilities", "cam"], {"image": x})
    with torch.no_grad():
        ref = reference_probabilities(net, torch.from_numpy(x)).numpy()
        ref_probs, ref_cam = CXRExport(net).eval()(torch.from_numpy(x))
    diff = float(np.max(np.abs(probs - ref)))
    diff = max(diff, float(np.max(np.abs(probs - ref_probs.numpy()))))
    # CAM maps are large-valued; compare relative to their scale so float32 rounding does not fail a good export.
    scale = max(1.0, float(np.max(np.abs(ref_cam.numpy()))))
    diff = max(diff, float(np.max(np.abs(cam - ref_cam.numpy()))) / scale)
    return diff


def default_manifest(fmt: str, name: str, labels: list[str], in_channels: int, sha: str, version: str
                     ) -> Manifest:
    if fmt == "torchxrayvision":
        thr = dict(zip(XRV_ALL_LABELS, XRV_ALL_OP_THRESHS)) if labels == XRV_ALL_LABELS else {}
        thresholds = {k: LabelThreshold(possible=v, present=v) for k, v in thr.items()}
        norm = Normalisation(kind="xrv", range=(-1024.0, 1024.0))
        licence = "torchxrayvision code Apache-2.0; weights: see the torchxrayvision project and its training datasets"
        source = XRV_ALL_URL
        notes = ("Thresholds are torchxrayvision's published op_threshs (possible = present); widen the possible "
                 "band only from a local evaluation.")
    else:
        thresholds = {}
        norm = Normalisation(kind="imagenet", mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
        licence = "BSD-3-Clause (jrzech/reproduce-chexnet); NIH ChestX-ray14 data terms apply"
        source = CHEXNET_URL
        notes = ("reproduce-chexnet publishes no operating thresholds; the neutral 0.5 default applies until a "
                 "local evaluation sets thresholds.")
    critical = {k: (thresholds[k].present if k in thresholds else 0.5) for k in CRITICAL_LABELS if k in labels}
    notes += (" Critical thresholds equal the present threshold until a local evaluation sets them; expect many "
              "false critical alerts at a screening operating point.")
    return Manifest(
        name=name, version=version, task="cxr-multilabel-classification", labels=labels,
        input=InputSpec(size=224, channels=in_channels, normalisation=norm),  # type: ignore[arg-type]
        output=OutputSpec(probabilities="probabilities", cam="cam"), thresholds=thresholds, critical=critical,
        licence=licence, source_url=source, file="model.onnx", sha256=sha, verified=False, notes=notes)


def import_checkpoint(fmt: str, checkpoint: str | Path, out_dir: str | Path, *, name: str | None = None,
                      labels: list[str] | None = None, version: str | None = None,
                      tolerance: float = PARITY_TOLERANCE) -> tuple[Manifest, float]:
    """Checkpoint -> ``out_dir/model.onnx`` + ``out_dir/manifest.yaml``; returns (manifest, parity difference).

    The manifest is written last, only after parity passed, so a failed import never leaves a
    runnable model behind.
    """
    if fmt not in FORMATS:
        raise ImportFailed(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    out = Path(out_dir)
    state = checkpoint_state(checkpoint, fmt)
    net = build_network(fmt, state)
    num_classes = int(net.linear.weight.shape[0])
    in_channels = int(state["features.conv0.weight"].shape[1])
    if labels is None:
        labels = {"torchxrayvision": XRV_ALL_LABELS, "chexnet": CHEXNET_LABELS}[fmt]
    if len(labels) != num_classes:
        raise ImportFailed(f"checkpoint has {num_classes} outputs but {len(labels)} labels were given; pass "
                           "--labels in the checkpoint's output order")
    onnx_path = out / "model.onnx"
    t0 = time.monotonic()
    export_onnx(net, onnx_path, in_channels)
    value_range = (-1024.0, 1024.0) if fmt == "torchxrayvision" else (-2.2, 2.7)
    diff = parity(net, onnx_path, in_channels, value_range=value_range)
    if not diff <= tolerance:
        onnx_path.unlink(missing_ok=True)
        raise ImportFailed(f"parity check failed: max |torch - ONNX| = {diff:.3g} > {tolerance:g}; nothing written")
    sha = sha256_file(onnx_path)
    manifest = default_manifest(fmt, name or DEFAULT_NAMES[fmt], list(labels), in_channels, sha,
                                version or time.strftime("%Y%m%d"))
    (out / "manifest.yaml").unlink(missing_ok=True)
    write_manifest(manifest, out / "manifest.yaml")
    log.info("imported %s as %s in %.1f s (parity %.2e, sha256 %s)", fmt, manifest.name, time.monotonic() - t0,
             diff, sha[:12])
    return manifest, diff


# --------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ainode weights", description="Manage model files and manifests.")
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="turn a public PyTorch checkpoint into ONNX + manifest")
    imp.add_argument("--format", required=True, choices=(*FORMATS, "monai-bundle"))
    imp.add_argument("--checkpoint", type=Path, help="checkpoint file (torchxrayvision, chexnet)")
    imp.add_argument("--bundle", type=Path, help="MONAI bundle directory (monai-bundle)")
    imp.add_argument("--out", required=True, type=Path, help="model directory, e.g. weights/<model>")
    imp.add_argument("--name", help="model name in the manifest (default per format)")
    imp.add_argument("--version", help="model version in the manifest (default: today's date)")
    imp.add_argument("--labels", help="comma-separated labels in output order (default: the format's own)")
    imp.add_argument("--verified", action="store_true", help=argparse.SUPPRESS)  # removed: see `verify`
    imp.add_argument("--evaluation", help=argparse.SUPPRESS)
    ver = sub.add_parser("verify", help="mark a model verified by a local evaluation (ainode evaluate --model DIR)")
    ver.add_argument("model", type=Path, help="model directory")
    ver.add_argument("--evaluation", required=True, type=Path, help="metrics.json written by ainode evaluate")
    chk = sub.add_parser("check", help="check a model directory's manifest and file hash")
    chk.add_argument("model", help="model directory or manifest path")
    return p


def main(argv: list[str]) -> int:
    """Entry point for ``ainode weights ...`` (argv without the word 'weights')."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help or a usage error: hand the code back to the caller's CLI
        return int(exc.code or 0)
    if args.command == "verify":
        from node.evaluate.verify import cli_verify

        return cli_verify(args.model, args.evaluation)
    if args.command == "import":
        if args.verified or args.evaluation:
            print("import: --verified/--evaluation were removed; imports are always verified: false. Evaluate the "
                  "model locally (ainode analyze, ainode evaluate --model DIR), then run "
                  "`ainode weights verify DIR --evaluation OUT/metrics.json`", file=sys.stderr)
            return 2
        if args.format == "monai-bundle":
            if args.bundle is None:
                print("import: --format monai-bundle needs --bundle DIR", file=sys.stderr)
                return 2
            try:
                from node.monai_bundle import cli_import
            except ModuleNotFoundError as exc:
                print(f"import needs {exc.name}: pip install 'ainode[import]' (torch==2.13.0, onnx, monai)",
                      file=sys.stderr)
                return 1
            return cli_import(args.bundle, args.out, args.name, args.version)
        if args.checkpoint is None:
            print(f"import: --format {args.format} needs --checkpoint FILE", file=sys.stderr)
            return 2
        labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
        try:
            manifest, diff = import_checkpoint(args.format, args.checkpoint, args.out, name=args.name, labels=labels,
                                               version=args.version)
        except ImportFailed as exc:
            print(f"import failed: {exc}", file=sys.stderr)
            return 1
        except ModuleNotFoundError as exc:
            print(f"import needs {exc.name}: install the import extra, e.g. pip install 'ainode[import]' "
                  "(torch==2.13.0 and onnx)", file=sys.stderr)
            return 1
        print(f"imported {manifest.name} {manifest.version}: {len(manifest.labels)} labels, parity max |diff| "
              f"{diff:.2e}, sha256 {manifest.sha256}, verified {str(manifest.verified).lower()} -> "
              f"{Path(args.out) / 'manifest.yaml'}")
        return 0
    if args.command == "check":
        from pipelines.base import ModelUnavailable
        from pipelines.models import load_model

        try:
            runner = load_model(args.model, allow_unverified=True)
        except ModelUnavailable as exc:
            print(f"unavailable: {exc}", file=sys.stderr)
            return 1
        m = runner.manifest
        print(f"{m.name} {m.version}: sha256 ok, verified {str(m.verified).lower()}, providers {runner.providers}")
        return 0
    return 2


if __name__ == "__main__":  # pragma: no cover
    logging.basicConfig(level=logging.INFO)
    raise SystemExit(main(sys.argv[1:]))


__all__ = ["ImportFailed", "import_checkpoint", "load_checkpoint", "main"]
