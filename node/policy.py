"""Route critical policies resolved against the models the route's pipelines will run.

The listener calls ``job_policy`` when it builds a job, so the decision "which finding is critical on
this route" is made once, from the manifest the job's options select and the route's ``critical:`` and
``thresholds:`` keys, and travels with the job to the worker (``JobSpec.policy``). ``ainode config
check`` calls ``route_policy_problems`` so a key that names no label of any of the route's models is
an error with its key path and the valid names, instead of being silently ignored at run time.
"""

from __future__ import annotations

import logging
from typing import Any

from node.config import Config, Problem, RouteConfig
from pipelines.base import ModelUnavailable
from pipelines.policy import CriticalPolicy, Vocabulary, resolve, unknown_key_message

log = logging.getLogger(__name__)


def job_options(cfg: Config, route: RouteConfig | None, pipeline: str) -> dict[str, Any]:
    """Options a job of ``pipeline`` on ``route`` runs with: ``pipelines.<name>``, then route options."""
    options: dict[str, Any] = dict(cfg.pipelines.get(pipeline, {}))
    if route is not None:
        options.update(route.options)
    options.setdefault("allow_unverified_models", cfg.node.allow_unverified_models)
    return options


def vocabulary(pipeline: str, options: dict[str, Any]) -> Vocabulary | None:
    """The model's vocabulary, None for a pipeline without labelled findings; ModelUnavailable when its
    manifest cannot be read here."""
    from pipelines.registry import pipeline_class

    return pipeline_class(pipeline)(options).vocabulary(options)


def job_policy(cfg: Config, route: RouteConfig | None, pipeline: str,
               options: dict[str, Any]) -> CriticalPolicy | None:
    """The effective policy for one job, or None when this process cannot see the model's manifest (the
    worker then resolves the route's keys with the same rules before the pipeline runs)."""
    try:
        vocab = vocabulary(pipeline, options)
    except ModelUnavailable as exc:
        log.debug("critical policy for %s left to the worker: %s", pipeline, exc)
        return None
    except Exception as exc:  # a broken plugin must not stop job creation; the worker reports it
        log.warning("critical policy for %s cannot be resolved here: %s", pipeline, exc)
        return None
    if vocab is None:
        return None
    path = f"routes.{route.name}" if route is not None else "route"
    critical = route.critical if route else {}
    thresholds = route.thresholds if route else {}
    policy, problems = resolve(vocab, critical, thresholds, strict=False, path=path)
    unknown = {f"{path}.{section}.{k}": k for section, keys in (("critical", critical), ("thresholds", thresholds))
               for k in keys if not vocab.match(k)}
    for where, message in problems:  # a key another pipeline of the route knows is not a problem here
        if where not in unknown or not _known_elsewhere(cfg, route, pipeline, unknown[where]):
            log.error("%s: %s", where, message)
    return policy


def _known_elsewhere(cfg: Config, route: RouteConfig | None, pipeline: str, key: str) -> bool:
    """A key another pipeline of the same route knows is not a problem for this one."""
    if route is None or len(route.pipelines) < 2:
        return False
    for other in route.pipelines:
        if other == pipeline:
            continue
        try:
            v = vocabulary(other, job_options(cfg, route, other))
        except Exception:
            continue
        if v is not None and v.match(key):
            return True
    return False


def route_policy_problems(cfg: Config) -> tuple[list[Problem], list[str]]:
    """(problems, notes) for every route's ``critical:`` / ``thresholds:`` keys.

    A key is a problem when it names no label of any model the route's pipelines would load, or when its
    bands are inverted. When no model of the route can be read here (weights on the worker hosts only), the
    keys cannot be checked: that is a note, not a problem.
    """
    problems: list[Problem] = []
    notes: list[str] = []
    for i, r in enumerate(cfg.routes):
        if not r.critical and not r.thresholds:
            continue
        vocabs: list[Vocabulary] = []
        unreadable: list[str] = []
        for p in r.pipelines:
            try:
                v = vocabulary(p, job_options(cfg, r, p))
            except (ModelUnavailable, KeyError) as exc:
                unreadable.append(f"{p}: {exc}")
                continue
            if v is not None:
                vocabs.append(v)
        if not vocabs:
            if unreadable:
                notes.append(f"routes[{i}] ({r.name}): critical/thresholds keys not checked, no model manifest "
                             f"readable here ({'; '.join(unreadable)})")
            else:
                problems.append(Problem(f"routes[{i}].critical", f"pipelines {', '.join(r.pipelines)} report no "
                                        "labelled findings; remove critical: and thresholds: from this route"))
            continue
        for section, keys in (("critical", r.critical), ("thresholds", r.thresholds)):
            for key in keys:
                if not any(v.match(key) for v in vocabs):
                    problems.append(Problem(f"routes[{i}].{section}.{key}", unknown_key_message(key, vocabs)))
        for v in vocabs:
            known_c = {k: x for k, x in r.critical.items() if v.match(k)}
            known_t = {k: x for k, x in r.thresholds.items() if v.match(k)}
            _, bad = resolve(v, known_c, known_t, strict=False, path=f"routes[{i}]")
            problems += [Problem(where, message) for where, message in bad]
    return problems, notes
