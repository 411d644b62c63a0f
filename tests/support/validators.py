"""Helpers for checking result objects: the node's own validators plus content-tree and pixel probes.

The validators themselves live in node.results.validate (the worker runs the same code); these helpers
only make the assertions in tests short and their failure messages useful.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from node.results import validate_many


def assert_all_valid(objs: list[Dataset | Path]) -> None:
    reports = validate_many(list(objs))
    bad = {f"{getattr(o, 'Modality', o)} {getattr(o, 'SeriesDescription', '')}": r for o, r in zip(objs, reports) if r}
    assert not bad, f"validator problems: {bad}"


def dsrdump(path: Path) -> str:
    p = subprocess.run(["/usr/bin/dsrdump", "-Ec", str(path)], capture_output=True, text=True, errors="replace")
    assert p.returncode == 0, p.stderr
    return p.stdout


def items(ds: Dataset) -> Iterator[Dataset]:
    """Every content item below ``ds`` (depth first)."""
    for item in ds.get("ContentSequence", []):
        yield item
        yield from items(item)


def concept(item: Dataset) -> tuple[str, str] | None:
    if "ConceptNameCodeSequence" not in item:
        return None
    c = item.ConceptNameCodeSequence[0]
    return str(c.CodeValue), str(c.CodingSchemeDesignator)


def code_value(item: Dataset) -> tuple[str, str] | None:
    if "ConceptCodeSequence" not in item:
        return None
    c = item.ConceptCodeSequence[0]
    return str(c.CodeValue), str(c.CodingSchemeDesignator)


def find_items(ds: Dataset, name: tuple[str, str] | None = None, value_type: str | None = None) -> list[Dataset]:
    return [i for i in items(ds) if (name is None or concept(i) == name)
            and (value_type is None or i.ValueType == value_type)]


def texts(ds: Dataset) -> list[str]:
    return [str(i.TextValue).replace("\n", "") for i in items(ds) if i.ValueType == "TEXT"]  # unwrapped


def num_units(ds: Dataset) -> set[str]:
    out = set()
    for i in items(ds):
        if i.ValueType == "NUM":
            out.add(str(i.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue))
    return out


def red_pixels(rgb: np.ndarray) -> int:
    """Pixels of the banner red (and nothing a grey image or yellow/cyan outlines produce)."""
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    return int(np.count_nonzero((r > 200) & (g < 60) & (b < 60)))


def bright_pixels(rgb: np.ndarray) -> int:
    return int(np.count_nonzero(rgb.min(axis=-1) > 200))
