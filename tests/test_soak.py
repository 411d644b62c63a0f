"""The short soak (benchmarks/soak.py, about 1.5 minutes): studies never stop coming, the disk stays bounded.

Marked ``soak`` so it can be selected (``-m soak``) or left out (``-m "not soak"``). The full soak is the same
code run for 20-30 minutes: ``python benchmarks/soak.py --minutes 20 --interval 10 --fs-mb 256``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.soak, pytest.mark.slow]

SOAK = Path(__file__).resolve().parent.parent / "benchmarks" / "soak.py"


def _soak_module():
    spec = importlib.util.spec_from_file_location("ainode_soak", SOAK)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is made
    spec.loader.exec_module(mod)
    return mod


def test_short_soak_steady_state(tmp_path: Path) -> None:
    """2 senders, CT and CR mixed, 10 s retention, a 192 MB tmpfs as storage_dir, for 45 s after a warm-up study
    of each kind: disk under
    the high watermark, RSS and database flat after warm-up, no 0xA700, every result delivered exactly once."""
    soak = _soak_module()
    opts = soak.Options(minutes=0.75, senders=2, pause=5.0, interval=2.0, fs_mb=192, retention_s=8.0,
                        out=tmp_path / "soak", drain_s=40.0)
    problems, summary = soak.soak(opts)
    print("\n".join(f"{k}: {v}" for k, v in summary.items()))
    assert problems == []
    assert summary["studies"] >= 8 and summary["final"]["summaries"] >= 4  # it really ran, and purged
    assert (tmp_path / "soak" / "soak.png").stat().st_size > 10_000
    assert (tmp_path / "soak" / "soak.csv").read_text().count("\n") >= 20
