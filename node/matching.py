"""The grammar of a route's ``match:`` conditions on DICOM tags: checked when the config is read, applied
when a study is routed (``node.routing``). It knows nothing of the config, so the config can check its
rules without importing the router.

Conditions on a keyword:
  ``value``             equal (strings compared without surrounding spaces, case-insensitive)
  ``[v1, v2]``          equal to any of them
  ``{regex: "..."}``    re.search, case-insensitive
  ``{min: a, max: b}``  numeric range, both ends inclusive, either optional
A multi-valued attribute (e.g. ImageType) matches when any of its values does.
"""

from __future__ import annotations

import re
from typing import Any

SPECIAL_KEYS = {"calling_ae", "called_ae"}


def validate_match(match: dict[str, Any]) -> None:
    from pydicom.datadict import tag_for_keyword

    for key, cond in match.items():
        if key not in SPECIAL_KEYS and tag_for_keyword(key) is None:
            raise ValueError(f"match.{key}: not a DICOM keyword (e.g. Modality, BodyPartExamined) "
                             "nor calling_ae / called_ae")
        if isinstance(cond, dict):
            unknown = set(cond) - {"regex", "min", "max"}
            if unknown or not cond:
                raise ValueError(f"match.{key}: unknown condition {sorted(unknown) or '{}'}; use regex, min or max")
            if "regex" in cond:
                try:
                    re.compile(str(cond["regex"]))
                except re.error as exc:
                    raise ValueError(f"match.{key}.regex: invalid regular expression: {exc}") from exc
            for bound in ("min", "max"):
                if bound in cond and not isinstance(cond[bound], (int, float)):
                    raise ValueError(f"match.{key}.{bound}: must be a number")


def _values(v: Any) -> list[Any]:
    if v is None:
        return []
    if isinstance(v, (list, tuple)):
        return list(v)
    if isinstance(v, str) and "\\" in v:
        return v.split("\\")
    return [v]


def _number(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _one(cond: Any, value: Any) -> bool:
    if isinstance(cond, dict):
        if "regex" in cond and re.search(str(cond["regex"]), str(value), re.IGNORECASE) is None:
            return False
        if "min" in cond or "max" in cond:
            n = _number(value)
            if n is None:
                return False
            if "min" in cond and n < float(cond["min"]):
                return False
            if "max" in cond and n > float(cond["max"]):
                return False
        return True
    options = cond if isinstance(cond, list) else [cond]
    sval = str(value).strip().upper()
    for opt in options:
        if isinstance(opt, (int, float)) and not isinstance(opt, bool):
            if _number(value) == float(opt):
                return True
        elif sval == str(opt).strip().upper():
            return True
    return False


def matches(match: dict[str, Any], tags: dict[str, Any]) -> bool:
    for key, cond in match.items():
        values = _values(tags.get(key))
        if not values or not any(_one(cond, v) for v in values):
            return False
    return True
