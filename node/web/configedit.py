"""Peers, destinations and routes, viewed and edited in the console; C-ECHO; the route tester.

A save goes through exactly what ``ainode config check`` and start-up run (``load_config`` on the
candidate file, environment overrides included), so the console cannot save what the node would refuse;
problems are shown at their field and nothing is written. A good file replaces the old one atomically
(written beside it, fsynced, renamed), the previous version is kept as ``<file>.prev``, comments survive
(ruamel round-trip), and the listener reloads it (``node.reload``). Secrets are never sent back to the
browser: a secret field left empty keeps its value.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from node.config import Config, ConfigError, Problem, load_config
from node.web.audit import MASK, mask_secrets

if TYPE_CHECKING:
    from node.web.server import Console

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FieldSpec:
    name: str
    kind: str = "text"  # text | int | float | bool | list | yaml | secret | choice
    choices: tuple[str, ...] = ()
    help: str = ""


SECTIONS: dict[str, tuple[FieldSpec, ...]] = {
    "peers": (FieldSpec("ae_title", help="calling AE title allowed to send to us"),
              FieldSpec("host", help="optional: the association must come from this address"),
              FieldSpec("port", "int", help="optional: where the C-ECHO button reaches it")),
    "destinations": (FieldSpec("name"), FieldSpec("kind", "choice", ("dicom", "dicomweb")),
                     FieldSpec("ae_title"), FieldSpec("host"), FieldSpec("port", "int"),
                     FieldSpec("url", help="dicomweb: the STOW-RS base URL"),
                     FieldSpec("bearer_token", "secret", help="dicomweb: sent as Authorization: Bearer"),
                     FieldSpec("storage_commitment", "bool"),
                     FieldSpec("sr_class", "choice", ("", "comprehensive", "comprehensive3d")),
                     FieldSpec("language", "choice", ("", "en", "zh")), FieldSpec("retry_max_hours", "float")),
    "routes": (FieldSpec("name"), FieldSpec("match", "yaml", help="e.g. {Modality: [CR, DX]}"),
               FieldSpec("pipelines", "list", help="comma-separated"),
               FieldSpec("destinations", "list", help="comma-separated destination names"),
               FieldSpec("priority", "choice", ("", "routine", "stat")),
               FieldSpec("complete_on", "choice", ("", "release", "quiet")), FieldSpec("quiet_seconds", "float"),
               FieldSpec("max_wait_seconds", "float"), FieldSpec("language", "choice", ("", "en", "zh")),
               FieldSpec("options", "yaml"), FieldSpec("critical", "yaml"), FieldSpec("continue", "bool")),
}
KEY = {"peers": "ae_title", "destinations": "name", "routes": "name"}


def _yaml() -> YAML:
    y = YAML()
    y.preserve_quotes = True
    y.indent(mapping=2, sequence=4, offset=2)
    return y


def _parse_field(spec: FieldSpec, raw: str) -> tuple[bool, Any]:
    """(present, value) from a form field; unparseable numbers stay text so validation names them."""
    raw = raw.strip()
    if spec.kind == "bool":
        return raw in ("on", "true", "yes", "1"), True
    if raw == "":
        return False, None
    if spec.kind == "int":
        try:
            return True, int(raw)
        except ValueError:
            return True, raw
    if spec.kind == "float":
        try:
            return True, float(raw)
        except ValueError:
            return True, raw
    if spec.kind == "list":
        return True, [p.strip() for p in raw.split(",") if p.strip()]
    if spec.kind == "yaml":
        import yaml

        try:
            return True, yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            return True, ValueError(f"not valid YAML: {exc}".splitlines()[0])
    return True, raw


class ConfigFile:
    def __init__(self, path: Path):
        self.path = path

    def load(self) -> Any:
        data = _yaml().load(self.path.read_text(encoding="utf-8")) if self.path.exists() else None
        return data if data is not None else CommentedMap()

    def dump(self, data: Any) -> str:
        buf = io.StringIO()
        _yaml().dump(data, buf)
        return buf.getvalue()

    def check(self, text: str) -> tuple[Config | None, list[Problem]]:
        """The node's own validation of a candidate file (same function as start-up and config check)."""
        tmp = self.path.with_name(f".{self.path.name}.check-{os.getpid()}-{time.monotonic_ns()}")
        tmp.write_text(text, encoding="utf-8")
        try:
            return load_config(tmp), []
        except ConfigError as exc:
            return None, exc.problems
        finally:
            tmp.unlink(missing_ok=True)

    def save(self, text: str) -> None:
        """Atomically: write beside, fsync, keep the previous file as .prev, rename over."""
        tmp = self.path.with_name(f".{self.path.name}.new")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if self.path.exists():
            shutil.copy2(self.path, self.path.with_name(self.path.name + ".prev"))
        os.replace(tmp, self.path)
        dfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def field_errors(problems: list[Problem], section: str, index: int) -> tuple[dict[str, str], list[str]]:
    """Problems of the edited item by field; every other problem as a line of its own."""
    prefix = f"{section}[{index}]"
    by_field: dict[str, str] = {}
    other: list[str] = []
    for p in problems:
        if p.path.startswith(prefix + "."):
            name = p.path[len(prefix) + 1:].split(".")[0].split("[")[0]
            by_field.setdefault(name, p.message)
        elif p.path == prefix:
            other.append(p.message)
        else:
            other.append(str(p))
    return by_field, other


def routes(c: Console) -> list[Route]:
    def cfile() -> ConfigFile | None:
        return ConfigFile(c.config_path) if c.config_path else None

    def item_view(section: str, item: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for spec in SECTIONS[section]:
            v = item.get(spec.name)
            if spec.kind == "secret":
                out[spec.name] = "(set)" if v else ""
            elif spec.kind == "yaml" and v not in (None, {}, []):
                import yaml

                out[spec.name] = yaml.safe_dump(mask_secrets(_plain(v)), default_flow_style=True).strip()
            elif spec.kind == "list" and isinstance(v, list):
                out[spec.name] = ", ".join(map(str, v))
            else:
                out[spec.name] = "" if v is None else v
        return out

    async def overview(request: Request) -> Response:
        await c.require(request)
        cfg = c.listener.cfg
        dumped = {s: [x.model_dump(mode="json", by_alias=True) for x in getattr(cfg, s)] for s in SECTIONS}
        failed: dict[str, int] = {}
        if c.listener.delivery is not None:
            for r in c.listener.state.query("SELECT destination, COUNT(*) n FROM deliveries WHERE state IN"
                                            " ('failed-permanent','dead-letter') GROUP BY destination"):
                failed[r["destination"]] = r["n"]
        return c.page(request, "config.html", sections={s: [item_view(s, i) for i in v] for s, v in dumped.items()},
                      failed=failed, editable=c.config_path is not None, path=c.config_path,
                      message=request.query_params.get("msg", ""))

    def current_item(section: str, index: str) -> tuple[Any, Any, int]:
        cf = cfile()
        assert cf is not None
        data = cf.load()
        items = data.setdefault(section, [])
        if index == "new":
            return data, CommentedMap(), len(items)
        i = int(index)
        if not 0 <= i < len(items):
            raise IndexError(i)
        return data, items[i], i

    async def edit_form(request: Request) -> Response:
        await c.require(request, "admin")
        section, index = request.path_params["section"], request.path_params["index"]
        if section not in SECTIONS or cfile() is None:
            return c.page(request, "message.html", status=404, title="Not editable",
                          error_text="the node was started without a config file (--config), so there is none to edit")
        try:
            _, item, i = current_item(section, index)
        except (IndexError, ValueError):
            return c.page(request, "message.html", status=404, title="No such item", error_text=f"{section}[{index}]")
        return c.page(request, "config_edit.html", section=section, index=index, specs=SECTIONS[section],
                      values=item_view(section, dict(item)), errors={}, other=[])

    async def edit_save(request: Request) -> Response:
        who = await c.require(request, "admin")
        section, index = request.path_params["section"], request.path_params["index"]
        cf = cfile()
        if section not in SECTIONS or cf is None:
            return c.page(request, "message.html", status=404, title="Not editable", error_text=section)
        form = await request.form()
        data, item, i = current_item(section, index)
        before = _plain(item) if index != "new" else None
        errors: dict[str, str] = {}
        deleting = form.get("delete") == "yes"
        if deleting:
            del data[section][i]
        else:
            for spec in SECTIONS[section]:
                present, value = _parse_field(spec, str(form.get(spec.name, "")))
                if spec.kind == "secret" and not present:
                    continue  # empty secret field: keep what is there
                if spec.kind == "yaml" and present:
                    value = _unmask(value, _plain(item.get(spec.name)))
                if isinstance(value, ValueError):
                    errors[spec.name] = str(value)
                elif present:
                    item[spec.name] = value
                elif spec.name in item:
                    del item[spec.name]
            if index == "new":
                data[section].append(item)
        text = cf.dump(data)
        cfg, problems = (None, []) if errors else await run_in_threadpool(cf.check, text)
        values = {**item_view(section, dict(item)), **{k: form.get(k, "") for k in errors}}
        if errors or problems:
            by_field, other = field_errors(problems, section, i)
            errors.update(by_field)
            raw = {s.name: str(form.get(s.name, "")) for s in SECTIONS[section] if s.kind != "secret"}
            c.audit.write(who=who.name, role=who.role, ip=c.ip(request), action=f"config-{section}",
                          target=f"{section}[{index}]", outcome="invalid", detail="; ".join(
                              f"{k}: {v}" for k, v in errors.items()) or "; ".join(other))
            return c.page(request, "config_edit.html", status=422, section=section, index=index,
                          specs=SECTIONS[section], values={**values, **raw}, errors=errors, other=other)
        assert cfg is not None
        await run_in_threadpool(cf.save, text)
        pending = await run_in_threadpool(c.listener.reload, cfg)
        c.audit.write(who=who.name, role=who.role, ip=c.ip(request), action=f"config-{section}",
                      target=f"{section}[{index}]", outcome="deleted" if deleting else "saved",
                      before=before, after=None if deleting else _plain(item))
        msg = f"saved {section}[{i}] and reloaded" + (f"; needs a restart: {', '.join(pending)}" if pending else "")
        return RedirectResponse(f"/config?msg={msg}", status_code=303)

    async def echo(request: Request) -> Response:
        who = await c.require(request, "admin")
        form = await request.form()
        section, name = str(form.get("section", "")), str(form.get("name", ""))
        target = next((x for x in getattr(c.listener.cfg, section, []) if getattr(x, KEY.get(section, "name"), None)
                       == name), None) if section in ("peers", "destinations") else None
        if target is None or not getattr(target, "host", None) or not getattr(target, "port", None):
            result = f"C-ECHO {name}: no host and port configured to reach it"
        else:
            result = await run_in_threadpool(c_echo, c.listener.cfg.node.ae_title, target.ae_title, target.host,
                                             target.port)
        c.audit.write(who=who.name, role=who.role, ip=c.ip(request), action="c-echo", target=f"{section}:{name}",
                      outcome="ok" if "success" in result else "failed", detail=result)
        return RedirectResponse(f"/config?msg={result}", status_code=303)

    async def route_test(request: Request) -> Response:
        await c.require(request)
        result = None
        if request.method == "POST":
            form = await request.form()
            upload = form.get("file")
            payload = await upload.read() if upload is not None and hasattr(upload, "read") else b""
            result = await run_in_threadpool(try_route, c, str(form.get("study_uid", "")).strip(), payload,
                                             str(form.get("calling_ae", "")))
        return c.page(request, "route_test.html", result=result)

    return [Route("/config", overview), Route("/config/route-test", route_test, methods=["GET", "POST"]),
            Route("/config/echo", echo, methods=["POST"]),
            Route("/config/{section}/{index}", edit_form, methods=["GET"]),
            Route("/config/{section}/{index}", edit_save, methods=["POST"])]


def _unmask(new: Any, old: Any) -> Any:
    """Secrets were shown as ``***``: where the submitted value still says so, keep the stored one."""
    if new == MASK:
        return old
    if isinstance(new, dict):
        prev = old if isinstance(old, dict) else {}
        return {k: _unmask(v, prev.get(k)) for k, v in new.items()}
    return new


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def c_echo(our_ae: str, ae_title: str, host: str, port: int) -> str:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from node import scu

    ae = AE(ae_title=our_ae)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 5
    t0 = time.monotonic()
    where = f"{ae_title}@{host}:{port}"
    assoc = scu.associate(ae, host, port, ae_title=ae_title)
    if not assoc.is_established:
        if assoc.is_rejected:
            rj = assoc.acceptor.primitive
            return f"C-ECHO {where}: association rejected {scu.rejection_kind(rj)}ly: {scu.rejection_reason(rj)}"
        return f"C-ECHO {where}: {'aborted by the peer' if assoc.is_aborted else 'could not connect'}"
    status = assoc.send_c_echo()
    assoc.release()
    ok = bool(status) and status.Status == 0
    return f"C-ECHO {where}: {'success' if ok else 'failed'} in {1000 * (time.monotonic() - t0):.0f} ms"


def try_route(c: Console, study_uid: str, payload: bytes, calling_ae: str) -> dict[str, Any]:
    """Which routes (and pipelines) the current configuration picks for a stored study or an uploaded file."""
    from node.routing import route
    from node.scp import series_tags

    cfg = c.listener.cfg
    if payload:
        import pydicom

        try:
            ds = pydicom.dcmread(io.BytesIO(payload), stop_before_pixels=True, force=True)
            tags = series_tags(ds, {k for r in cfg.routes for k in r.match})
        except Exception as exc:
            return {"error": f"the uploaded file is not readable DICOM: {type(exc).__name__}"}
        tags.update(calling_ae=calling_ae, called_ae=cfg.node.ae_title)
        series, what = [tags], "uploaded file"
    elif study_uid:
        if c.listener.state.one("SELECT 1 FROM studies WHERE study_uid=?", (study_uid,)) is None:
            return {"error": "no stored study with this UID"}
        series, what = c.listener.jobs.series_tags(study_uid), f"stored study {study_uid}"
    else:
        return {"error": "give a stored study's UID or upload a DICOM file"}
    decision = route(cfg.routes, series)
    shown = [{k: v for k, v in s.items() if k in {"Modality", "BodyPartExamined", "SeriesDescription",
                                                    "calling_ae", "ImageType", "SOPClassUID"}} for s in series]
    return {"what": what, "routes": [{"name": r.name, "pipelines": r.pipelines, "destinations": r.destinations}
                                     for r in decision.routes], "series": shown}
