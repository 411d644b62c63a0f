"""The critical-finding policy of one job: decided once, before the pipeline runs, read by every output.

A model's manifest says at which probability each label is present (``thresholds``) and critical
(``critical``); a route may override both for its studies. Before, the pipeline decided from the
manifest and the node patched the flags afterwards, so text written in between (narrative, SC panel)
could disagree with the flags. Now the listener resolves the route's keys against the model's
vocabulary when it builds the job (``resolve``), the worker hands the resulting ``CriticalPolicy``
to the pipeline in ``StudyInput.policy``, and the pipeline asks it (``band``, ``is_critical``) for
each label. Every writer then reads ``Finding.critical`` and never decides again.

Route keys may name a label as the model's manifest spells it (``Lung Opacity``), as the node
displays it (``Airspace opacity``), or by its code (``36118008``); matching ignores case, spaces,
``_`` and ``-``. A key that names nothing is an error with the list of valid names.

Pure: no DICOM, no node imports, so pipelines and the listener share it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

Band = Literal["present", "possible", "absent"]


@dataclass
class LabelNames:
    """One model label and every name an operator may use for it."""

    label: str  # as in the manifest
    display: str = ""  # the node's display name (English)
    code: str = ""  # code value (SNOMED CT where there is one)
    other: list[str] = field(default_factory=list)  # code meaning, other languages

    def names(self) -> list[str]:
        return [n for n in (self.label, self.display, self.code, *self.other) if n]


@dataclass
class Vocabulary:
    """What a model's labels are called and the manifest's own operating points."""

    model: str
    labels: list[LabelNames]
    critical: dict[str, float] = field(default_factory=dict)  # manifest label -> critical threshold
    thresholds: dict[str, tuple[float, float]] = field(default_factory=dict)  # label -> (possible, present)

    def match(self, key: Any) -> list[str]:
        """Manifest labels a route key names (several when a code is shared)."""
        k = _norm(key)
        return [ln.label for ln in self.labels if any(_norm(n) == k for n in ln.names())]

    def valid_names(self) -> list[str]:
        """One entry per label: ``label`` or ``label / display name``, then ``[code]``."""
        out = []
        for ln in self.labels:
            text = ln.label + (f" / {ln.display}" if ln.display and _norm(ln.display) != _norm(ln.label) else "")
            out.append(text + (f" [{ln.code}]" if ln.code else ""))
        return out


def _norm(name: Any) -> str:
    return re.sub(r"[\s_\-]+", " ", str(name).strip().casefold())


DEFAULT_BANDS = (0.5, 0.5)  # labels without explicit bands: a neutral default that says nothing clinical


@dataclass
class CriticalPolicy:
    """Effective per-label operating points for one job; ``critical[label] is None``: never critical."""

    model: str = ""
    critical: dict[str, float | None] = field(default_factory=dict)
    thresholds: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: label -> where its critical threshold / bands came from (``manifest`` or ``route <key>``), for audit
    source: dict[str, str] = field(default_factory=dict)

    def bands(self, label: str) -> tuple[float, float]:
        return self.thresholds.get(label, DEFAULT_BANDS)

    def band(self, probability: float, label: str) -> Band:
        possible, present = self.bands(label)
        if probability >= present:
            return "present"
        if probability >= possible:
            return "possible"
        return "absent"

    def is_critical(self, label: str, present: bool, probability: float | None) -> bool:
        """The one decision: a present finding at or above the label's critical threshold."""
        threshold = self.critical.get(label)
        return bool(present and threshold is not None and probability is not None and probability >= threshold)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "critical": dict(self.critical),
                "thresholds": {k: list(v) for k, v in self.thresholds.items()}, "source": dict(self.source)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CriticalPolicy:
        return cls(model=str(data.get("model", "")), critical=dict(data.get("critical") or {}),
                   thresholds={k: (float(v[0]), float(v[1])) for k, v in (data.get("thresholds") or {}).items()},
                   source=dict(data.get("source") or {}))


class PolicyError(ValueError):
    """A route key that names no label of the model; ``problems`` are (key path, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{p}: {m}" for p, m in problems))


def unknown_key_message(key: Any, vocabularies: list[Vocabulary]) -> str:
    names = [n for v in vocabularies for n in v.valid_names()]
    models = ", ".join(v.model for v in vocabularies)
    return (f"{key!r} names no label of model {models}; use a manifest label, display name or code: "
            + "; ".join(names))


def resolve(vocab: Vocabulary, critical: dict[str, float | None] | None = None,
            thresholds: dict[str, dict[str, float] | float] | None = None, *, strict: bool = True,
            path: str = "route") -> tuple[CriticalPolicy, list[tuple[str, str]]]:
    """The manifest's operating points overridden by the route's; returns the policy and key problems.

    ``thresholds`` values are ``{possible, present}`` (either may be left out: the manifest's stays) or
    one number for both. With ``strict`` a key naming no label raises ``PolicyError``; otherwise it is
    returned as a problem and ignored (a route with several pipelines names labels of each model).
    """
    policy = CriticalPolicy(model=vocab.model, critical={k: float(v) for k, v in vocab.critical.items()},
                            thresholds=dict(vocab.thresholds))
    for label in policy.critical:
        policy.source[label] = "manifest"
    problems: list[tuple[str, str]] = []
    for key, value in (thresholds or {}).items():
        labels = vocab.match(key)
        if not labels:
            problems.append((f"{path}.thresholds.{key}", unknown_key_message(key, [vocab])))
            continue
        for label in labels:
            possible, present = policy.bands(label)
            if isinstance(value, dict):
                possible = float(value.get("possible", possible))
                present = float(value.get("present", present))
            else:
                possible = present = float(value)
            if possible > present:
                problems.append((f"{path}.thresholds.{key}", f"possible {possible:g} is above present {present:g}"
                                 f" for label {label!r}; make possible <= present"))
                continue
            policy.thresholds[label] = (possible, present)
    for key, value in (critical or {}).items():
        labels = vocab.match(key)
        if not labels:
            problems.append((f"{path}.critical.{key}", unknown_key_message(key, [vocab])))
            continue
        for label in labels:
            policy.critical[label] = None if value is None else float(value)
            policy.source[label] = f"route {key}"
    if problems and strict:
        raise PolicyError(problems)
    return policy, problems


def effective(given: CriticalPolicy | None, vocab: Vocabulary) -> tuple[CriticalPolicy, list[str]]:
    """What a pipeline uses: the policy the node resolved for the job, or the manifest's own when the
    pipeline runs outside the node; plus warnings for the result."""
    if given is None:
        return resolve(vocab)[0], []
    if given.model != vocab.model:
        return given, [f"critical policy was resolved for model {given.model!r} but {vocab.model!r} ran; labels "
                       "it does not name use the default bands"]
    return given, []
