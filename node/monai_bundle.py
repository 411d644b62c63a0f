"""``ainode weights import --format monai-bundle``: a MONAI bundle -> ONNX + manifest, parity-checked.

The MONAI Model Zoo distributes models as bundles (MONAI Bundle Specification): ``configs/metadata.json``
(what goes in and comes out: ``network_data_format``), ``configs/inference.json`` (``network_def`` and the
``preprocessing`` / ``postprocessing`` transforms) and ``models/model.pt`` (a state dict) or
``models/model.ts`` (TorchScript). We read them with MONAI's own ``ConfigParser`` (so references,
macros and expressions resolve exactly as in MONAI), build the network, bake the output activation in
(``probabilities`` output), export ONNX and check it against torch (max |diff| <= 1e-4) before writing.

The manifest is derived, never guessed: labels from the output's ``channel_def``; input size and channels
from ``network_data_format`` and ``Resize``; intensity handling from the inference transforms where it has
an exact equivalent in the manifest (``ScaleIntensityRange`` with clip -> an HU window, ``ScaleIntensity``
-> [0, 1] scaling of a radiograph, ``NormalizeIntensity`` with fixed values -> mean/std). Anything else
(3D input, resampling, crops, per-image z-scores, unknown transforms) is refused with the reason, and
nothing is written. Radiograph bundles (modality CR/DX/XR) become ``cxr`` manifests; CT/MR bundles become
``classifier`` manifests (2D slices; 2.5D when the input channels' ``channel_def`` name neighbouring
slices as ``slice -1``, ``slice 0``, ``slice +1``).

Importing a bundle instantiates what its ``network_def`` names and evaluates its ``$`` expressions, as
MONAI does: import only bundles from a source you trust. The node itself never loads MONAI or torch.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pipelines.models import InputSpec, Manifest, Normalisation, OutputSpec, sha256_file, write_manifest

log = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4
RADIOGRAPH = {"CR", "DX", "XR", "X-RAY", "XRAY", "CXR", "RADIOGRAPH"}
CROSS_SECTIONAL = {"CT", "MR", "MRI"}
NEUTRAL = {"LoadImage", "EnsureChannelFirst", "AddChannel", "AsChannelFirst", "EnsureType", "ToTensor",
           "CastToType", "ToNumpy", "Identity", "RepeatChannel", "SqueezeDim", "DataStats", "Lambda"}
POST_IGNORED = {"AsDiscrete", "SaveImage", "CopyItems", "Invert", "EnsureType", "ToTensor", "CastToType",
                "DataStats", "SplitDim", "Identity", "ToNumpy", "SqueezeDim"}


class BundleRefused(Exception):
    """The bundle cannot be turned into a manifest the node can run as trained; the message says why."""


@dataclass
class Intensity:
    window: tuple[float, float] | None = None  # (centre, width) in stored units (HU)
    out_range: tuple[float, float] = (0.0, 1.0)
    mean: list[float] | None = None
    std: list[float] | None = None
    size: int | None = None
    notes: list[str] = field(default_factory=list)


def _name(target: Any) -> str:
    """``monai.transforms.ScaleIntensityRanged`` -> ``ScaleIntensityRange`` (dictionary versions -> array one)."""
    n = str(target).rsplit(".", 1)[-1]
    for suffix in ("d", "D", "Dict"):
        base = n[: -len(suffix)]
        if n.endswith(suffix) and base and (base in NEUTRAL or base in POST_IGNORED or base in {
                "ScaleIntensityRange", "ScaleIntensity", "NormalizeIntensity", "Resize", "Activations",
                "Spacing", "Orientation", "CenterSpatialCrop", "ResizeWithPadOrCrop"}):
            return base
    return n


def _parser(bundle: Path) -> tuple[Any, dict[str, Any]]:
    from monai.bundle import ConfigParser

    meta_path = bundle / "configs" / "metadata.json"
    infer = next((bundle / "configs" / f"inference.{ext}" for ext in ("json", "yaml", "yml")
                  if (bundle / "configs" / f"inference.{ext}").is_file()), None)
    if not meta_path.is_file():
        raise BundleRefused(f"{bundle} is not a MONAI bundle: configs/metadata.json is missing")
    if infer is None:
        raise BundleRefused(f"{bundle}: configs/inference.json is missing (it defines network_def and the transforms)")
    parser = ConfigParser()
    parser.read_meta(str(meta_path))
    parser.read_config(str(infer))
    parser["bundle_root"] = str(bundle)
    return parser, json.loads(meta_path.read_text(encoding="utf-8"))


def _transforms(parser: Any, key: str) -> list[tuple[str, dict[str, Any]]]:
    """(name, resolved arguments) of each transform in ``key`` (a Compose or a list), via MONAI's resolver."""
    if key not in parser.config:
        return []
    base = f"{key}#transforms" if isinstance(parser[key], dict) and "transforms" in parser[key] else key
    raw = parser[base]
    if not isinstance(raw, list):
        raise BundleRefused(f"inference config {key!r} is not a Compose or list of transforms")
    out = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or "_target_" not in item:
            raise BundleRefused(f"{base}#{i} is not a transform (no _target_); cannot tell what it does")
        args = {k: parser.get_parsed_content(f"{base}#{i}#{k}", instantiate=False)
                for k in item if not k.startswith("_")}
        out.append((_name(item["_target_"]), args))
    return out


def _pair(v: Any) -> list[float]:
    return [float(x) for x in (v if isinstance(v, (list, tuple)) else [v])]


def intensity(steps: list[tuple[str, dict[str, Any]]], cross_sectional: bool) -> Intensity:
    """Map the preprocessing transforms onto the manifest, or raise BundleRefused naming the transform."""
    it = Intensity()
    scaled = False
    for i, (name, a) in enumerate(steps):
        where = f"preprocessing transform #{i} {name}"
        if name in NEUTRAL:
            continue
        if name == "ScaleIntensityRange":
            lo, hi = float(a["a_min"]), float(a["a_max"])
            b = (float(a.get("b_min", 0.0) if a.get("b_min") is not None else 0.0),
                 float(a.get("b_max", 1.0) if a.get("b_max") is not None else 1.0))
            if not a.get("clip", False):
                raise BundleRefused(f"{where} has clip=false: values outside [{lo:g}, {hi:g}] pass through, which no "
                                    "window in the manifest reproduces")
            if hi <= lo:
                raise BundleRefused(f"{where}: a_max {hi:g} is not above a_min {lo:g}")
            if cross_sectional:
                it.window = ((lo + hi) / 2.0, hi - lo)
                it.notes.append(f"{name} a_min {lo:g}, a_max {hi:g} -> window centre {(lo + hi) / 2:g}, "
                                f"width {hi - lo:g}")
            else:
                it.notes.append(f"{name} a_min {lo:g}, a_max {hi:g} on raw pixel values is replaced by the node's "
                                "radiograph window (the image's VOI LUT / window, else 0.5-99.5 percentiles)")
            it.out_range, scaled = b, True
        elif name == "ScaleIntensity":
            if cross_sectional:
                raise BundleRefused(f"{where} scales each image by its own min and max; CT/MR models need a fixed "
                                    "window (ScaleIntensityRange with clip) for the manifest")
            if a.get("factor") is not None:
                raise BundleRefused(f"{where} with factor= multiplies intensities; no manifest equivalent")
            it.out_range = (float(a.get("minv", 0.0) if a.get("minv") is not None else 0.0),
                            float(a.get("maxv", 1.0) if a.get("maxv") is not None else 1.0))
            it.notes.append(f"{name} (min-max) is done by the node's radiograph window (VOI LUT / window, else "
                            "0.5-99.5 percentiles), then mapped to " f"[{it.out_range[0]:g}, {it.out_range[1]:g}]")
            scaled = True
        elif name == "NormalizeIntensity":
            if a.get("subtrahend") is None or a.get("divisor") is None:
                raise BundleRefused(f"{where} without fixed subtrahend and divisor is a per-image z-score; the "
                                    "manifest's normalisation takes fixed mean/std values")
            if a.get("nonzero"):
                raise BundleRefused(f"{where} with nonzero=true normalises only non-zero voxels; no manifest "
                                    "equivalent")
            if not scaled or it.out_range != (0.0, 1.0):
                raise BundleRefused(f"{where} must follow scaling to [0, 1] to map onto mean/std normalisation")
            it.mean, it.std = _pair(a["subtrahend"]), _pair(a["divisor"])
            it.notes.append(f"{name} subtrahend {it.mean} divisor {it.std} -> mean/std normalisation")
        elif name == "Resize":
            size = [int(x) for x in _pair(a.get("spatial_size"))]
            if len(size) != 2 or size[0] != size[1]:
                raise BundleRefused(f"{where} to {size}: the node resizes 2D images to a square input")
            it.size = size[0]
        elif name in ("Spacing", "Orientation"):
            raise BundleRefused(f"{where} resamples the volume in physical space; the node's pipelines do not "
                                "reproduce it")
        else:
            raise BundleRefused(f"{where} has no equivalent in ainode's manifest (HU windows, [0, 1] scaling, "
                                "mean/std normalisation, square resize); nothing written")
    if not scaled:
        raise BundleRefused("the preprocessing never scales intensities (ScaleIntensityRange / ScaleIntensity); "
                            "the manifest cannot say what the network expects")
    return it


def activation(steps: list[tuple[str, dict[str, Any]]], out_format: dict[str, Any]) -> str:
    for name, a in steps:
        if name == "Activations":
            if a.get("sigmoid"):
                return "sigmoid"
            if a.get("softmax"):
                return "softmax"
            if a.get("other") is not None:
                raise BundleRefused("postprocessing Activations uses a custom function; cannot bake it into ONNX")
        elif name not in POST_IGNORED:
            log.info("postprocessing %s ignored (the node applies its own thresholds)", name)
    if [float(x) for x in out_format.get("value_range") or []] == [0.0, 1.0]:
        return "none"
    raise BundleRefused("neither the postprocessing (Activations sigmoid/softmax) nor the output's value_range "
                        "[0, 1] says how outputs become probabilities")


def _channel_def(fmt: dict[str, Any], what: str) -> list[str]:
    cd = fmt.get("channel_def") or {}
    try:
        items = sorted(((int(k), str(v)) for k, v in cd.items()), key=lambda kv: kv[0])
    except (TypeError, ValueError):
        raise BundleRefused(f"{what} channel_def keys must be channel indices") from None
    if [k for k, _ in items] != list(range(len(items))):
        raise BundleRefused(f"{what} channel_def must name channels 0..n-1")
    return [v for _, v in items]


def _network(parser: Any, bundle: Path) -> Any:
    import torch

    pt, ts = bundle / "models" / "model.pt", bundle / "models" / "model.ts"
    if pt.is_file():
        net = parser.get_parsed_content("network_def")
        state = torch.load(str(pt), map_location="cpu", weights_only=True)
        if isinstance(state, dict):
            for key in ("model", "state_dict", "network"):
                if isinstance(state.get(key), dict):
                    state = state[key]
                    break
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise BundleRefused(f"models/model.pt does not fit network_def: {str(exc)[:300]}") from exc
        return net.eval()
    if ts.is_file():
        return torch.jit.load(str(ts), map_location="cpu").eval()
    raise BundleRefused(f"{bundle}: neither models/model.pt nor models/model.ts exists")


def _export(net: Any, act: str, path: Path, channels: int, size: int, value_range: tuple[float, float]) -> float:
    """ONNX with a ``probabilities`` output; returns max |torch - ONNX| on random inputs in the input range."""
    import warnings

    import onnxruntime as ort
    import torch

    class WithActivation(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.inner(x)
            if act == "sigmoid":
                return torch.sigmoid(y)
            if act == "softmax":
                return torch.softmax(y, dim=1)
            return y

    wrapper = WithActivation(net).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".onnx.tmp")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (torch.zeros(1, channels, size, size),), str(tmp), dynamo=False,
                          input_names=["image"], output_names=["probabilities"], opset_version=17,
                          dynamic_axes={"image": {0: "n"}, "probabilities": {0: "n"}})
    tmp.replace(path)
    lo, hi = value_range
    x = np.random.default_rng(0).uniform(lo, hi, size=(2, channels, size, size)).astype(np.float32)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["probabilities"], {"image": x})[0]
    with torch.no_grad():
        ref = wrapper(torch.from_numpy(x)).numpy()
    if got.shape != ref.shape:
        return float("inf")
    return float(np.max(np.abs(got - ref)))


def _context(channel_names: list[str], channels: int) -> list[int]:
    offsets = [re.search(r"slice\s*([+-]?\d+)", n, re.I) for n in channel_names]
    if channels == 1:
        return [0]
    if len(offsets) == channels and all(offsets):
        ctx = [int(m.group(1)) for m in offsets if m]
        if 0 in ctx and len(set(ctx)) == len(ctx):
            return ctx
    raise BundleRefused(f"the input has {channels} channels but its channel_def does not name the neighbouring "
                        "slice each holds (e.g. 'slice -1', 'slice 0', 'slice +1'); a single HU window cannot fill "
                        "them otherwise")


def import_bundle(bundle_dir: str | Path, out_dir: str | Path, *, name: str | None = None, version: str | None = None,
                  tolerance: float = PARITY_TOLERANCE) -> tuple[Manifest, float]:
    """Bundle -> ``out_dir/model.onnx`` + ``manifest.yaml`` (verified: false); returns (manifest, parity)."""
    bundle, out = Path(bundle_dir), Path(out_dir)
    t0 = time.monotonic()
    parser, meta = _parser(bundle)
    ndf = meta.get("network_data_format") or {}
    inputs, outputs = ndf.get("inputs") or {}, ndf.get("outputs") or {}
    if not inputs or not outputs:
        raise BundleRefused("metadata.json has no network_data_format inputs/outputs (required by the MONAI Bundle "
                            "Specification)")
    in_key, in_fmt = next(iter(inputs.items()))
    _, out_fmt = next(iter(outputs.items()))
    shape = list(in_fmt.get("spatial_shape") or [])
    if len(shape) == 3:
        raise BundleRefused(f"input {in_key!r} is a 3D volume {shape}; the classifier pipeline runs 2D slices (a 2.5D "
                            "model with neighbouring slices as channels imports); export a 2D/2.5D model")
    if len(shape) != 2:
        raise BundleRefused(f"input {in_key!r} spatial_shape {shape} is not 2D")
    if str(out_fmt.get("format", "")).lower() in ("labels", "segmentation") or out_fmt.get("type") == "image":
        raise BundleRefused("the output is an image (segmentation); the node imports classifiers only")
    labels = _channel_def(out_fmt, "output")
    if not labels:
        raise BundleRefused("the output has no channel_def naming its classes")
    modality = str(in_fmt.get("modality", "")).upper()
    cross = modality in CROSS_SECTIONAL or str(in_fmt.get("format", "")).lower() == "hounsfield"
    if not cross and modality not in RADIOGRAPH:
        raise BundleRefused(f"input modality {modality or 'n/a'!r}: the node imports radiograph (CR/DX/XR) bundles "
                            "for cxr and CT/MR bundles for the classifier pipeline")
    channels = int(in_fmt.get("num_channels", 1))
    it = intensity(_transforms(parser, "preprocessing"), cross)
    act = activation(_transforms(parser, "postprocessing"), out_fmt)
    size = it.size or int(shape[0])
    if all(isinstance(s, int) for s in shape) and (shape[0] != shape[1] or shape[0] != size):
        raise BundleRefused(f"input spatial_shape {shape} and Resize {it.size} disagree or are not square")
    if cross and it.window is None:
        raise BundleRefused("a CT/MR bundle must window HU with ScaleIntensityRange(clip=true)")
    context = _context(_channel_def(in_fmt, "input"), channels) if cross else [0]
    if channels not in (1, 3):
        raise BundleRefused(f"{channels} input channels; the manifest takes 1 or 3")
    norm = (Normalisation(kind="imagenet", mean=it.mean, std=it.std) if it.mean is not None else
            Normalisation(kind="unit") if it.out_range == (0.0, 1.0) else
            Normalisation(kind="xrv", range=it.out_range))
    lo, hi = it.out_range
    value_range = (lo, hi)
    if it.mean and it.std:
        ends = [(v - m) / s for m, s in zip(it.mean, it.std) for v in (lo, hi)]
        value_range = (min(ends), max(ends))
    net = _network(parser, bundle)
    onnx_path = out / "model.onnx"
    diff = _export(net, act, onnx_path, channels, size, value_range)
    if not diff <= tolerance:
        onnx_path.unlink(missing_ok=True)
        raise BundleRefused(f"parity check failed: max |torch - ONNX| = {diff:.3g} > {tolerance:g}; nothing written")
    sha = sha256_file(onnx_path)
    bundle_name = str(meta.get("name") or bundle.name)
    licence_file = bundle / "docs" / "license.txt"
    licence = str(meta.get("copyright", "")) + (f"; licence: {licence_file.read_text(encoding='utf-8')[:200].strip()}"
                                               if licence_file.is_file() else "")
    notes = (f"Imported from MONAI bundle {bundle_name} {meta.get('version', '')} ({meta.get('task', '')}). "
             f"{meta.get('intended_use', '')} Preprocessing mapped: {'; '.join(it.notes)}. Output activation "
             f"{act} baked into model.onnx. Thresholds default to 0.5 until a local evaluation sets them. Check the "
             "image orientation MONAI's readers gave the network in training against the node's rows x columns.")
    manifest = Manifest(
        name=name or re.sub(r"[^A-Za-z0-9._-]+", "-", bundle_name).strip("-").lower(),
        version=version or str(meta.get("version", time.strftime("%Y%m%d"))),
        task="cxr-multilabel-classification" if not cross else "classification", labels=labels,
        input=InputSpec(size=size, channels=channels, normalisation=norm,  # type: ignore[arg-type]
                        crop="center_square" if not cross else "none"),
        output=OutputSpec(probabilities="probabilities", cam=None), licence=licence.strip("; "),
        source_url=f"MONAI bundle {bundle_name} {meta.get('version', '')}".strip(), file="model.onnx", sha256=sha,
        verified=False, notes=" ".join(notes.split()))
    (out / "manifest.yaml").unlink(missing_ok=True)
    if cross:
        data = manifest.model_dump(mode="json")
        data["classifier"] = {
            "mode": "slices", "modalities": ["CT"] if modality in ("CT", "") or modality == "N/A" else [modality],
            "windows": [{"name": "bundle", "center": it.window[0], "width": it.window[1]}],  # type: ignore[index]
            "context": context, "channel_order": "window_major", "activation": "none",
            "aggregation": {"method": "max"}, "primary_label": labels[0],
            "labels": {lab: {"en": lab} for lab in labels}}
        if "MRI" in data["classifier"]["modalities"]:
            data["classifier"]["modalities"] = ["MR"]
        tmp = out / "manifest.yaml.tmp"
        tmp.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
        from pipelines.classifier.spec import split_manifest

        split_manifest(tmp)  # the classifier pipeline must accept what we wrote
        tmp.replace(out / "manifest.yaml")
    else:
        write_manifest(manifest, out / "manifest.yaml")
    log.info("imported MONAI bundle %s in %.1f s (parity %.2e, sha256 %s)", bundle_name, time.monotonic() - t0,
             diff, sha[:12])
    return manifest, diff


def cli_import(bundle: Path, out: Path, name: str | None, version: str | None) -> int:
    """``ainode weights import --format monai-bundle``: exit 0 when imported, 1 with the reason otherwise."""
    import sys

    try:
        manifest, diff = import_bundle(bundle, out, name=name, version=version)
    except BundleRefused as exc:
        print(f"import refused: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:
        print(f"import needs {exc.name}: pip install 'ainode[import]' (torch==2.13.0, onnx, monai)", file=sys.stderr)
        return 1
    print(f"imported MONAI bundle {bundle} as {manifest.name} {manifest.version}: {len(manifest.labels)} labels, "
          f"parity max |diff| {diff:.2e}, sha256 {manifest.sha256}, verified false -> {Path(out) / 'manifest.yaml'}")
    return 0
