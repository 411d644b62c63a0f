"""Ordered routing rules on DICOM tags."""

from __future__ import annotations

import re
from typing import Any


def validate_match(match: dict[str, Any]) -> None:
    for key, cond in match.items():
        if isinstance(cond, dict):
            unknown = set(cond) - {"regex", "min", "max"}
            if unknown:
                raise ValueError(f"match.{key}: unknown condition {sorted(unknown)}; use regex, min or max")
            if "regex" in cond:
                try:
                    re.compile(str(cond["regex"]))
                except re.error as exc:
                    raise ValueError(f"match.{key}.regex: invalid regular expression: {exc}") from exc
