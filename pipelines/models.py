"""ONNX model files with manifests, checked before they run, and sessions kept warm per worker.

Every model-based pipeline goes through here so that the safety rules live in one place: a model
runs only when its file exists and its SHA-256 equals the manifest's, and a manifest marked
``verified: false`` (random, imported-but-unevaluated or locally retrained weights) runs only when
the node was told ``allow_unverified_models: true``. Anything else raises ``ModelUnavailable`` with
a reason that a pipeline turns into ``status="model_unavailable"``; nothing ever falls back to
random weights.

Sessions are expensive (hundreds of ms for DenseNet-121 on CPU, seconds with TensorRT engine
builds), so they are cached per process, keyed by the file path and its hash: a replaced file gets a
new session, an unchanged one is reused by every task the worker runs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipelines.base import ModelIdentity, ModelUnavailable

log = logging.getLogger(__name__)

#: Tried in this order; ones this onnxruntime build lacks are skipped (``onnxruntime-gpu`` adds CUDA/TRT).
DEFAULT_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")

#: Where shipped manifests live: ``<repo>/weights`` next to the ``pipelines`` package.
DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"

UNVERIFIED_BANNER = "UNVERIFIED MODEL — NOT FOR CLINICAL USE"
UNVERIFIED_BANNER_ZH = "未经验证的模型——不得用于临床"


# --------------------------------------------------------------------------- manifest schema
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Normalisation(_Strict):
    """How pixel values in [0, 1] (after windowing and polarity) become model input.

    ``xrv``: torchxrayvision's scale to [-1024, 1024]; ``imagenet``: (x - mean) / std per channel;
    ``unit``: left in [0, 1].
    """

    kind: Literal["xrv", "imagenet", "unit"]
    mean: list[float] | None = None
    std: list[float] | None = None
    range: tuple[float, float] | None = None


class InputSpec(_Strict):
    name: str = "image"
    size: int = Field(224, ge=16, le=4096)
    channels: Literal[1, 3] = 1
    normalisation: Normalisation
    #: The model was trained on images where bone/soft tissue is bright (MONOCHROME2 display);
    #: MONOCHROME1 sources are inverted to match.
    photometric: Literal["MONOCHROME2"] = "MONOCHROME2"
    #: ``center_square``: crop the central square, then resize (what both source projects trained with).
    crop: Literal["center_square", "none"] = "center_square"


class OutputSpec(_Strict):
    probabilities: str = "probabilities"
    #: Name of the class-activation output (N, labels, h, w), or None when the export lacks one.
    cam: str | None = "cam"


class LabelThreshold(_Strict):
    """Probability bands: ``>= present`` is present, ``>= possible`` is possible, else absent."""

    possible: float = Field(ge=0, le=1)
    present: float = Field(ge=0, le=1)

    @model_validator(mode="after")
    def _ordered(self) -> LabelThreshold:
        if self.possible > self.present:
            raise ValueError(f"possible threshold {self.possible} is above present threshold {self.present}")
        return self


class EvaluationRecord(_Strict):
    """What ``ainode weights verify`` records: the local evaluation a ``verified: true`` rests on."""

    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")  # of the metrics.json (copied to ``file``)
    date: str
    verified_on: str = ""
    images: int = Field(ge=1)
    aucs: dict[str, float]
    auc_method: str = ""
    file: str = "evaluation/metrics.json"

    def citation(self) -> str:
        return f"local evaluation {self.date}, {self.images} images, metrics.json sha256 {self.sha256}"


class Manifest(_Strict):
    name: str
    version: str
    task: str = "classification"
    labels: list[str]
    input: InputSpec
    output: OutputSpec = OutputSpec()
    thresholds: dict[str, LabelThreshold] = {}
    #: label -> probability at or above which a present finding is flagged critical.
    critical: dict[str, float] = {}
    licence: str = ""
    source_url: str = ""
    file: str = "model.onnx"
    sha256: str = ""
    verified: bool = False
    #: Where the operator's evaluation of these weights is documented (required when verified).
    evaluation: str = ""
    #: Written by ``ainode weights verify`` only; ``verified: true`` needs it.
    evaluation_record: EvaluationRecord | None = None
    notes: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        unknown = sorted((set(self.thresholds) | set(self.critical)) - set(self.labels))
        if unknown:
            raise ValueError(f"thresholds/critical name labels the model does not have: {unknown}")
        if self.verified and self.evaluation_record is None:
            raise ValueError("verified: true needs evaluation_record:, which only `ainode weights verify DIR "
                             "--evaluation metrics.json` writes (after `ainode evaluate --model DIR`)")
        return self

    def threshold(self, label: str) -> LabelThreshold:
        """Labels without explicit bands get 0.5/0.5, a neutral default that says nothing clinical."""
        return self.thresholds.get(label) or LabelThreshold(possible=0.5, present=0.5)

    def identity(self, sha256: str | None = None) -> ModelIdentity:
        return ModelIdentity(name=self.name, version=self.version, sha256=sha256 or self.sha256,
                             verified=self.verified, task=self.task, source=self.source_url, licence=self.licence,
                             evaluation=self.evaluation_record.citation() if self.evaluation_record else "")


def load_manifest(path: str | Path) -> Manifest:
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ModelUnavailable(f"manifest {p} cannot be read: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise ModelUnavailable(f"manifest {p} is not valid YAML: {exc}") from exc
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or '(top)'}: {e['msg']}" for e in exc.errors())
        raise ModelUnavailable(f"manifest {p} is invalid: {problems}") from exc


def write_manifest(manifest: Manifest, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    data = manifest.model_dump(mode="json")
    tmp = p.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    tmp.replace(p)
    return p


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- runner
def select_providers(preferred: list[str] | tuple[str, ...] | None = None) -> list[str]:
    """Preferred providers this onnxruntime build actually has, CPU always last as the safety net."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    chosen = [p for p in (preferred or DEFAULT_PROVIDERS) if p in available]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


_SESSIONS: dict[tuple[str, str, tuple[str, ...]], Any] = {}
_HASHES: dict[tuple[str, int, int, int], str] = {}
_LOCK = threading.Lock()


def _hash_cached(path: Path) -> str:
    """Hash once per (path, inode, size, mtime): re-hashing 30 MB on every study buys nothing."""
    st = path.stat()
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    with _LOCK:
        if key in _HASHES:
            return _HASHES[key]
    digest = sha256_file(path)
    with _LOCK:
        _HASHES[key] = digest
    return digest


def clear_cache() -> None:
    """Drop cached sessions and hashes (tests; a worker never needs it)."""
    with _LOCK:
        _SESSIONS.clear()
        _HASHES.clear()


@dataclass
class ModelRunner:
    """A checked, warm model: the manifest, the hash actually found, and the ONNX Runtime session."""

    manifest: Manifest
    path: Path
    sha256: str
    session: Any
    providers: list[str]

    @property
    def identity(self) -> ModelIdentity:
        return self.manifest.identity(self.sha256)

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run one batch (N, C, H, W float32); returns every output by name.

        One study's images go in one call so that GPU hosts pay the launch cost once per study.
        """
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        spec = self.manifest.input
        if batch.ndim != 4 or batch.shape[1:] != (spec.channels, spec.size, spec.size):
            raise ValueError(f"model {self.manifest.name} wants (N, {spec.channels}, {spec.size}, {spec.size}); "
                             f"got {batch.shape}")
        names = self.output_names
        outs = self.session.run(names, {spec.name: batch})
        return dict(zip(names, outs))


def resolve_manifest(model: str | Path, weights_dir: str | Path | None = None) -> Path:
    """``model`` is a manifest path, a model directory, or a model name under ``weights_dir``.

    Without ``weights_dir``: ``$AINODE_WEIGHTS_DIR``, else the ``weights/`` folder of the source tree
    (an installed wheel has no such folder, so installed nodes set one of the two).
    """
    p = Path(model)
    if p.suffix in (".yaml", ".yml"):
        return p
    if p.is_dir():
        return p / "manifest.yaml"
    root = weights_dir or os.environ.get("AINODE_WEIGHTS_DIR") or DEFAULT_WEIGHTS_DIR
    return Path(root) / str(model) / "manifest.yaml"


def load_model(model: str | Path, *, weights_dir: str | Path | None = None, allow_unverified: bool = False,
               providers: list[str] | tuple[str, ...] | None = None, intra_op_threads: int | None = None
               ) -> ModelRunner:
    """Check the manifest and the file, then return a runner with a cached session.

    Raises ModelUnavailable (never anything else for a bad model) so pipelines can report it.
    """
    manifest_path = resolve_manifest(model, weights_dir)
    if not manifest_path.is_file():
        raise ModelUnavailable(f"model {model!s}: no manifest at {manifest_path}")
    return load_runner(load_manifest(manifest_path), manifest_path.parent, allow_unverified=allow_unverified,
                       providers=providers, intra_op_threads=intra_op_threads)


def load_runner(manifest: Manifest, base_dir: str | Path, *, allow_unverified: bool = False,
                providers: list[str] | tuple[str, ...] | None = None, intra_op_threads: int | None = None
                ) -> ModelRunner:
    """``load_model`` for a manifest already parsed (e.g. split off a larger pipeline-specific file).

    ``manifest.file`` is resolved against ``base_dir``; the same hash and verified rules apply.
    """
    onnx_path = (Path(base_dir) / manifest.file).resolve()
    if not onnx_path.is_file():
        raise ModelUnavailable(f"model {manifest.name}: weights file {onnx_path} is missing; "
                               "import it with `ainode weights import` (see README)")
    if not manifest.sha256:
        raise ModelUnavailable(f"model {manifest.name}: manifest has no sha256; re-run `ainode weights import` "
                               "so the file's hash is recorded")
    actual = _hash_cached(onnx_path)
    if actual.lower() != manifest.sha256.lower():
        raise ModelUnavailable(f"model {manifest.name}: {onnx_path.name} has SHA-256 {actual[:12]}…, manifest says "
                               f"{manifest.sha256[:12]}…; the file was changed or replaced")
    if not manifest.verified and not allow_unverified:
        raise ModelUnavailable(f"model {manifest.name} {manifest.version} is not verified (manifest verified: false) "
                               "and allow_unverified_models is off")
    chosen = tuple(select_providers(providers))
    key = (str(onnx_path), actual, chosen)
    with _LOCK:
        session = _SESSIONS.get(key)
    if session is None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        threads = intra_op_threads or int(os.environ.get("AINODE_ORT_THREADS", "0") or 0)
        if threads:
            opts.intra_op_num_threads = threads
        try:
            session = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=list(chosen))
        except Exception as exc:  # a corrupt file with a matching hash is still unavailable, not a crash
            raise ModelUnavailable(f"model {manifest.name}: ONNX Runtime cannot load {onnx_path.name}: {exc}") from exc
        log.info("model %s %s loaded with %s", manifest.name, manifest.version, session.get_providers())
        with _LOCK:
            _SESSIONS[key] = session
    in_names = [i.name for i in session.get_inputs()]
    if manifest.input.name not in in_names:
        raise ModelUnavailable(f"model {manifest.name}: manifest input {manifest.input.name!r} not in ONNX inputs "
                               f"{in_names}")
    return ModelRunner(manifest, onnx_path, actual, session, list(session.get_providers()))


def band(probability: float, manifest: Manifest, label: str) -> Literal["present", "possible", "absent"]:
    t = manifest.threshold(label)
    if probability >= t.present:
        return "present"
    if probability >= t.possible:
        return "possible"
    return "absent"
