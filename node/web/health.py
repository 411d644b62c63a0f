"""``/healthz``: what a load balancer or a container runtime asks; open without credentials on purpose."""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from node.service import Listener


def health(listener: Listener) -> tuple[bool, dict[str, Any]]:
    checks: dict[str, Any] = {}
    try:
        listener.state.one("SELECT 1")
        checks["state_db"] = "ok"
    except Exception as exc:
        checks["state_db"] = f"error: {exc}"
    try:
        listener.app.connection_for_write().ensure_connection(max_retries=1, timeout=2)
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"error: {exc}"
    free_mb = shutil.disk_usage(listener.spool.root).free // (1024 * 1024)
    checks["disk_free_mb"] = free_mb
    checks["disk"] = "ok" if free_mb >= listener.cfg.node.min_free_disk_mb else "low"
    checks["listener"] = "ok" if listener.scp.server is not None else "stopped"
    lifecycle = getattr(listener, "lifecycle", None)
    if lifecycle is not None:  # node/lifecycle: "full" says why nothing can be deleted
        st = lifecycle.status
        checks["storage"] = "ok" if st.get("state") != "full" else f"full: {st.get('reason')}"
        checks["storage_detail"] = {k: st.get(k) for k in ("state", "disk_used_percent", "high_water_percent",
                                                           "low_water_percent", "deletable", "held", "purged_total")}
    ok = all(v == "ok" for k, v in checks.items() if k not in ("disk_free_mb", "storage_detail"))
    return ok, checks
