"""The one configuration file IT staff edit, validated so every mistake names its key and its fix.

Every key can be overridden from the environment as ``AINODE_<SECTION>__<KEY>`` (for example
``AINODE_NODE__PORT=11113``), so containers need no edited copy of the file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from node.matching import validate_match
from node.notify import NotifyConfig
from node.pipeline_options import option_problems
from node.problems import ConfigError, Problem

UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_ae(value: str) -> str:
    if not value or not value.strip():
        raise ValueError("AE title must not be empty; use 1 to 16 characters such as AINODE")
    if len(value) > 16:
        raise ValueError(f"AE title {value!r} is {len(value)} characters; DICOM allows at most 16")
    if "\\" in value or any(ord(c) < 32 or ord(c) > 126 for c in value):
        raise ValueError(
            f"AE title {value!r} contains a backslash or control character; "
            "use letters, digits, spaces, '-' or '_'"
        )
    return value.strip()


def _check_port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError(f"port {value} is out of range; use 1-65535 (11112 is the DICOM default)")
    return value


class TLSConfig(_Strict):
    cert: Path
    key: Path
    ca: Path | None = None
    require_client_cert: bool = False


class NodeConfig(_Strict):
    ae_title: str = "AINODE"
    host: str = "0.0.0.0"
    port: int = 11112
    storage_dir: Path = Path("./var")
    min_free_disk_mb: int = Field(1024, ge=0)
    accept_any_peer: bool = False
    max_associations: int = Field(32, ge=1, le=1000)
    max_pdu: int = Field(0, ge=0, description="0 = unlimited")
    tls: TLSConfig | None = None
    web_port: int | None = 8080
    web_host: str = "127.0.0.1"  # the console; beyond loopback only with console credentials
    no_route_retention_hours: float = Field(24.0, ge=0)
    housekeeping_seconds: float = Field(30.0, gt=0)  # how often retention and outbox clean-up run
    allow_unverified_models: bool = False
    # before association (issue 10): a connection must send its A-ASSOCIATE-RQ within this many seconds of TCP
    # accept; at most this many such connections per source address and in all (the oldest is closed first)
    handshake_timeout_s: float = Field(10.0, gt=0)
    max_pending_per_host: int = Field(16, ge=1, le=10000)
    max_pending_associations: int = Field(256, ge=1, le=100000)
    # same SOP Instance UID, same study and series, different content: keep the first copy or replace it
    duplicates: Literal["keep_first", "replace"] = "keep_first"
    # storage lifecycle (node/lifecycle): how long instances stay once their study is finished and delivered
    retention_hours: float = Field(24.0, ge=0)  # per route: routes[].retention_hours
    failed_retention_hours: float = Field(6.0, ge=0)  # refused and failed studies
    disk_high_water_percent: float = Field(85.0, gt=0, le=100)  # above: oldest deletable studies go first
    disk_low_water_percent: float = Field(75.0, gt=0, le=100)  # ... until this
    outbox_audit_hours: float = Field(0.0, ge=0)  # keep delivered result files this long (0: delete at once)
    summary_retention_days: float = Field(365.0, gt=0)  # summaries of purged studies
    lifecycle_seconds: float = Field(5.0, gt=0)  # how often the lifecycle pass runs
    db_maintenance_seconds: float = Field(60.0, gt=0)  # WAL checkpoint and incremental vacuum

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae(v)))
    _port = field_validator("port")(classmethod(lambda cls, v: _check_port(v)))


class BrokerConfig(_Strict):
    url: str | None = None

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("redis://", "rediss://", "redis+socket://")):
            raise ValueError(f"broker url {v!r} must start with redis://, rediss:// or redis+socket://, "
                             "or be null for the embedded Redis")
        return v


class WorkersConfig(_Strict):
    concurrency: int = Field(2, ge=0, le=64)
    queues: list[Literal["cpu", "gpu"]] = ["cpu", "gpu"]
    max_retries: int = Field(3, ge=0, le=20)
    task_time_limit_s: int = Field(900, ge=10)
    # a running job's worker renews its lease this often / 3; a job whose lease expires is queued again
    lease_seconds: float = Field(30.0, ge=2)


class PeerConfig(_Strict):
    ae_title: str
    host: str | None = None
    port: int | None = None

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae(v)))
    _port = field_validator("port")(classmethod(lambda cls, v: None if v is None else _check_port(v)))


class DestinationConfig(_Strict):
    name: str
    kind: Literal["dicom", "dicomweb"] = "dicom"
    ae_title: str | None = None
    host: str | None = None
    port: int | None = None
    url: str | None = None
    bearer_token: str | None = None
    tls: TLSConfig | None = None
    storage_commitment: bool = False
    sr_class: Literal["comprehensive", "comprehensive3d"] = "comprehensive"
    language: Literal["en", "zh"] | None = None
    retry_max_hours: float = Field(24.0, gt=0)

    _port = field_validator("port")(classmethod(lambda cls, v: None if v is None else _check_port(v)))

    @model_validator(mode="after")
    def _complete(self) -> DestinationConfig:
        if self.kind == "dicom":
            missing = [k for k in ("ae_title", "host", "port") if getattr(self, k) in (None, "")]
            if missing:
                raise ValueError(f"a dicom destination needs {', '.join(missing)}")
            _check_ae(self.ae_title or "")
            _check_port(self.port or 0)
        elif not self.url:
            raise ValueError("a dicomweb destination needs url (the STOW-RS base URL)")
        return self


class DeliveryConfig(_Strict):
    """How the outbox retries; per destination ``retry_max_hours`` says when to give up."""

    retry_base_seconds: float = Field(30.0, gt=0)
    retry_max_delay_seconds: float = Field(3600.0, gt=0)
    poll_seconds: float = Field(5.0, gt=0)


MatchValue = str | int | float | list[str | int | float] | dict[str, Any]


class RouteConfig(_Strict):
    name: str
    match: dict[str, MatchValue] = {}
    pipelines: list[str]
    destinations: list[str] = []
    priority: Literal["routine", "stat"] = "routine"
    complete_on: Literal["release", "quiet"] = "release"
    quiet_seconds: float = Field(5.0, ge=0)
    max_wait_seconds: float = Field(600.0, gt=0)
    language: Literal["en", "zh"] = "en"
    options: dict[str, Any] = {}
    # label -> probability threshold at which a present finding is critical (null: never critical on this
    # route); labels not listed keep the model manifest's operating point
    critical: dict[str, float | None] = {}
    # label -> {possible, present} (or one number for both): when a finding counts as possible / present on
    # this route. Keys of critical: and thresholds: may be the manifest label, the display name or the code.
    thresholds: dict[str, dict[Literal["possible", "present"], float] | float] = {}
    continue_: bool = Field(False, alias="continue")
    retention_hours: float | None = Field(None, ge=0)  # null: node.retention_hours

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("critical", "thresholds", mode="before")
    @classmethod
    def _label_keys(cls, v: Any) -> Any:
        """A SNOMED code written unquoted (``36118008: 0.3``) is read by YAML as a number."""
        return {str(k): x for k, x in v.items()} if isinstance(v, dict) else v

    @field_validator("match")
    @classmethod
    def _match(cls, v: dict[str, MatchValue]) -> dict[str, MatchValue]:
        validate_match(v)
        return v


class ConsoleUser(_Strict):
    """A local console user; the hash comes from ``ainode console hash-password`` (argon2id)."""

    name: str = Field(min_length=1, max_length=64)
    role: Literal["viewer", "admin"] = "viewer"
    password_hash: str

    @field_validator("password_hash")
    @classmethod
    def _hashed(cls, v: str) -> str:
        if not v.startswith("$argon2"):
            raise ValueError("not an argon2 password hash; make one with: ainode console hash-password")
        return v


class ConsoleConfig(_Strict):
    """Who may use the web console. ``token`` is meant to come from the environment
    (``AINODE_CONSOLE__TOKEN``), never from the file; it authenticates API and /metrics clients."""

    users: list[ConsoleUser] = []
    token: str | None = None
    token_role: Literal["viewer", "admin"] = "viewer"
    session_hours: float = Field(8.0, gt=0, le=24 * 30)
    audit_log: Path | None = None  # default: <storage_dir>/audit.jsonl
    audit_max_mb: float = Field(64.0, gt=0)  # then the file is renamed <name>.<UTC time> and a new one begins
    audit_keep: int = Field(8, ge=0)  # renamed files kept, newest first
    #: failed sign-ins (form, Basic or token) from one address before it must wait; the wait starts at
    #: ``lockout_seconds`` and doubles with each further failure, up to 15 minutes
    max_failed_logins: int = Field(5, ge=1, le=100)
    lockout_seconds: float = Field(30.0, gt=0, le=900)

    def has_credentials(self) -> bool:
        return bool(self.users) or bool(self.token)


class Config(_Strict):
    node: NodeConfig = NodeConfig()
    broker: BrokerConfig = BrokerConfig()
    workers: WorkersConfig = WorkersConfig()
    peers: list[PeerConfig] = []
    destinations: list[DestinationConfig] = []
    delivery: DeliveryConfig = DeliveryConfig()
    notify: NotifyConfig = NotifyConfig()
    routes: list[RouteConfig] = []
    pipelines: dict[str, dict[str, Any]] = {}
    console: ConsoleConfig = ConsoleConfig()

    @property
    def storage_dir(self) -> Path:
        return self.node.storage_dir


_HINTS = {
    "extra_forbidden": "unknown key; remove it or check its spelling against config/ainode.yaml",
    "missing": "required key is missing; add it",
}


def _pydantic_problems(err: ValidationError) -> list[Problem]:
    out = []
    for e in err.errors():
        path = ""
        for part in e["loc"]:
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        path = path or "(top level)"
        msg = _HINTS.get(e["type"], e["msg"].removeprefix("Value error, "))
        if e["type"] not in _HINTS and "input" in e and e["type"].endswith(("_type", "_parsing")):
            msg = f"{msg} (got {e['input']!r})"
        out.append(Problem(path, msg))
    return out


def _env_overrides(data: dict[str, Any], environ: dict[str, str]) -> dict[str, Any]:
    """Apply AINODE_<SECTION>__<KEY>=value; values are parsed as YAML so numbers and booleans work."""
    for name, raw in environ.items():
        if not name.startswith("AINODE_") or "__" not in name:
            continue
        parts = [p.lower() for p in name[len("AINODE_"):].split("__")]
        target = data
        for p in parts[:-1]:
            if not isinstance(target.get(p), dict):
                target[p] = {}
            target = target[p]
        target[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return data


def semantic_problems(cfg: Config, known_pipelines: set[str] | None) -> list[Problem]:
    problems: list[Problem] = []

    def dupes(items: list[Any], attr: str, section: str) -> None:
        seen: dict[str, int] = {}
        for i, item in enumerate(items):
            key = getattr(item, attr)
            if key in seen:
                problems.append(Problem(f"{section}[{i}].{attr}", f"duplicate {attr} {key!r} "
                                        f"(also {section}[{seen[key]}]); give each a unique {attr}"))
            seen.setdefault(key, i)

    dupes(cfg.destinations, "name", "destinations")
    dupes(cfg.routes, "name", "routes")
    dupes(cfg.peers, "ae_title", "peers")
    dest_names = {d.name for d in cfg.destinations}
    for i, r in enumerate(cfg.routes):
        if not r.pipelines:
            problems.append(Problem(f"routes[{i}].pipelines", "route names no pipeline; list at least one"))
        for j, p in enumerate(r.pipelines):
            if known_pipelines is not None and p not in known_pipelines:
                problems.append(Problem(
                    f"routes[{i}].pipelines[{j}]",
                    f"unknown pipeline {p!r}; installed pipelines: {', '.join(sorted(known_pipelines)) or 'none'}"))
        for j, d in enumerate(r.destinations):
            if d not in dest_names:
                problems.append(Problem(
                    f"routes[{i}].destinations[{j}]",
                    f"unknown destination {d!r}; define it under destinations: or use one of "
                    f"{', '.join(sorted(dest_names)) or '(none defined)'}"))
        if r.quiet_seconds > r.max_wait_seconds:
            problems.append(Problem(f"routes[{i}].quiet_seconds",
                                    "quiet_seconds is longer than max_wait_seconds; make it shorter"))
    if cfg.node.disk_low_water_percent >= cfg.node.disk_high_water_percent:
        problems.append(Problem("node.disk_low_water_percent",
                                f"{cfg.node.disk_low_water_percent:g} is not below disk_high_water_percent "
                                f"({cfg.node.disk_high_water_percent:g}); make it lower, e.g. 10 points below"))
    for name in cfg.pipelines:
        if known_pipelines is not None and name not in known_pipelines:
            problems.append(Problem(f"pipelines.{name}", f"settings for unknown pipeline {name!r}; "
                                    f"installed: {', '.join(sorted(known_pipelines)) or 'none'}"))
    tls = cfg.node.tls
    if tls is not None:
        for k in ("cert", "key", "ca"):
            p = getattr(tls, k)
            if p is not None and not Path(p).is_file():
                problems.append(Problem(f"node.tls.{k}", f"file {str(p)!r} does not exist; give the path "
                                        "to a PEM file"))
        if tls.require_client_cert and tls.ca is None:
            problems.append(Problem("node.tls.ca", "require_client_cert needs ca: the CA that signs "
                                    "client certificates"))
    return problems


def load_config(path: str | Path | None = None, environ: dict[str, str] | None = None,
                known_pipelines: set[str] | None = None, check_semantics: bool = True) -> Config:
    """Read, override from the environment, validate; raise ConfigError with every problem at once."""
    environ = dict(os.environ if environ is None else environ)
    source = str(path) if path else "defaults"
    data: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text(encoding="utf-8")
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError([Problem("(file)", f"not valid YAML: {exc}")], source) from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError([Problem("(top level)", "must be a mapping of sections (node:, routes:, ...)")],
                              source)
        data = loaded
    data = _env_overrides(data, environ)
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_pydantic_problems(exc), source) from exc
    if check_semantics:
        if known_pipelines is None:
            from pipelines.registry import available_pipelines

            known_pipelines = set(available_pipelines())
        problems = semantic_problems(cfg, known_pipelines)
        problems += option_problems(cfg, known_pipelines)
        if problems:
            raise ConfigError(problems, source)
    return cfg
