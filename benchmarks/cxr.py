"""DenseNet-121 at 224x224 on CPU: ONNX Runtime (as the node runs it) vs PyTorch eager, same weights.

    pip install torch==2.13.0     # CPU wheel
    python benchmarks/cxr.py [--batch 1] [--seconds 10] [--threads N]

Random weights: speed does not depend on the values. Both run in alternating one-second blocks for
``--seconds`` each, so load from other processes hits both alike. Prints images/s and the ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _interleaved(fns: dict, batch: int, seconds: float, block_s: float = 1.0) -> dict[str, float]:
    """Images/s per function, measured in alternating ~1 s blocks.

    Alternating matters on shared hosts: whatever else runs on the machine slows both contenders
    alike, so the ratio stays meaningful even when the absolute numbers are not.
    """
    for fn in fns.values():  # warm-up (allocations, kernel selection)
        fn()
        fn()
    done = {k: 0 for k in fns}
    spent = {k: 0.0 for k in fns}
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        for k, fn in fns.items():
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < block_s:
                fn()
                done[k] += batch
            spent[k] += time.perf_counter() - t0
    return {k: done[k] / spent[k] for k in fns}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)

    import onnxruntime as ort
    import torch

    from node.weights import export_onnx
    from pipelines.cxr.densenet import DenseNet121

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = DenseNet121(18, in_channels=1).eval()
    x = np.random.default_rng(0).uniform(-1024, 1024, (args.batch, 1, 224, 224)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(net, path, 1)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    xt = torch.from_numpy(x)

    def eager() -> None:
        with torch.inference_mode():
            torch.sigmoid(net(xt))

    rates = _interleaved({"ort": lambda: sess.run(["probabilities"], {"image": x}), "torch": eager},
                         args.batch, 2 * args.seconds)
    ort_rate, torch_rate = rates["ort"], rates["torch"]
    print(f"DenseNet-121 224x224, batch {args.batch}, {args.threads} threads, CPU "
          f"(onnxruntime {ort.__version__}, torch {torch.__version__})")
    print(f"ONNX Runtime   : {ort_rate:7.2f} img/s")
    print(f"PyTorch eager  : {torch_rate:7.2f} img/s")
    print(f"ratio ORT/torch: {ort_rate / torch_rate:7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
