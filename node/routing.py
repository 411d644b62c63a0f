"""Ordered routing rules on DICOM tags.

A rule matches a study when one of its series matches every condition of the rule (conditions are
read from the first instance of each series, plus ``calling_ae`` / ``called_ae`` of the association).
Rules are tried in order; the first match wins unless it says ``continue: true``.

The conditions are ``node.matching``'s grammar.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from node.matching import SPECIAL_KEYS, matches, validate_match

if TYPE_CHECKING:
    from node.config import RouteConfig

__all__ = ["SPECIAL_KEYS", "RouteDecision", "keywords_used", "matches", "route", "validate_match"]


@dataclass(frozen=True)
class RouteDecision:
    routes: list[RouteConfig]


def route(routes: Iterable[RouteConfig], series_tags: Iterable[dict[str, Any]]) -> RouteDecision:
    """The routes a study takes, given the tags of the first instance of each of its series."""
    series_tags = list(series_tags)
    chosen = []
    for r in routes:
        if any(matches(r.match, t) for t in series_tags):
            chosen.append(r)
            if not r.continue_:
                break
    return RouteDecision(chosen)


def keywords_used(routes: Iterable[RouteConfig]) -> set[str]:
    return {k for r in routes for k in r.match}
