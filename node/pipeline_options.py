"""Pipeline options checked against each pipeline's declared ``Options`` model, with the key path and the
valid names in every message (``ainode config check``, start-up and the console all run this)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from node.problems import Problem

if TYPE_CHECKING:
    from node.config import Config

HINTS = {
    "language": "the narrative language is a route key (routes[].language) or a destination key "
                "(destinations[].language), not a pipeline option",
    "destinations": "destinations are listed on the route (routes[].destinations)",
    "priority": "priority is a route key (routes[].priority)",
}


def _options_model(name: str) -> Any:
    from pipelines.registry import pipeline_class

    try:
        return pipeline_class(name).Options
    except Exception:  # not installed or broken: reported elsewhere (unknown pipeline)
        return None


def _check(model: Any, values: dict[str, Any], path: str, owner: str) -> list[Problem]:
    try:
        model.model_validate(values)
        return []
    except ValidationError as exc:
        out = []
        valid = ", ".join(sorted(model.model_fields))
        for e in exc.errors():
            key = ".".join(str(p) for p in e["loc"])
            if e["type"] == "extra_forbidden":
                hint = HINTS.get(str(e["loc"][0]), "")
                out.append(Problem(f"{path}.{key}", f"unknown option {e['loc'][0]!r} for {owner}"
                                   f"{'; ' + hint if hint else ''}; valid options: {valid}"))
            else:
                got = f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else ""
                out.append(Problem(f"{path}.{key}", f"{e['msg'].removeprefix('Value error, ')}{got}"))
        return out


def option_problems(cfg: Config, known_pipelines: set[str] | None) -> list[Problem]:
    problems: list[Problem] = []
    for name, values in cfg.pipelines.items():
        if known_pipelines is not None and name not in known_pipelines:
            continue  # the unknown pipeline itself is already reported
        model = _options_model(name)
        if model is not None:
            problems += _check(model, values, f"pipelines.{name}", f"pipeline {name}")
    for i, r in enumerate(cfg.routes):
        if not r.options:
            continue
        models = {p: _options_model(p) for p in r.pipelines if known_pipelines is None or p in known_pipelines}
        if not models or any(m is None for m in models.values()):
            continue  # a pipeline without declared options takes anything
        # route options go to every pipeline of the route: a key must be known to at least one of them,
        # and its value valid for each one that knows it
        for key, value in r.options.items():
            knowing = {p: m for p, m in models.items() if key in m.model_fields}
            if not knowing:
                valid = ", ".join(sorted({f for m in models.values() for f in m.model_fields}))
                hint = HINTS.get(key, "")
                problems.append(Problem(f"routes[{i}].options.{key}", f"unknown option {key!r} for pipeline(s) "
                                        f"{', '.join(models)}{'; ' + hint if hint else ''}; valid options: {valid}"))
                continue
            for p, m in knowing.items():
                problems += [x for x in _check(m, {key: value}, f"routes[{i}].options", f"pipeline {p}")
                             if x not in problems]
    return problems
