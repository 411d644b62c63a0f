"""Hot reload of the configuration (console save, ``kill -HUP``): new associations and new work use the
new configuration, while whatever is running finishes under the one it started with.

Why this is safe without locks: each component reads its configuration through one attribute at the
moment a unit of work starts (the SCP's policy when an association is requested, the job manager when a
study completes or a job is published, the delivery service when it picks a destination for a batch).
Replacing that attribute is atomic, and work already started holds references to the old objects.
Settings bound at start-up (sockets, storage, broker, worker pool, notifier) are reported, not applied.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from node.config import Config
from node.routing import keywords_used

if TYPE_CHECKING:
    from node.service import Listener

log = logging.getLogger(__name__)

RESTART_NODE_KEYS = ("host", "port", "storage_dir", "tls", "max_pdu", "max_associations", "web_port", "web_host",
                     "min_free_disk_mb")
RESTART_SECTIONS = ("broker", "workers", "notify")


def _dump(value: Any) -> Any:
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value


def restart_needed(old: Config, new: Config) -> list[str]:
    """Key paths whose change only takes effect after a restart."""
    keys = [f"node.{k}" for k in RESTART_NODE_KEYS if _dump(getattr(old.node, k)) != _dump(getattr(new.node, k))]
    keys += [s for s in RESTART_SECTIONS if _dump(getattr(old, s)) != _dump(getattr(new, s))]
    return keys


def apply(listener: Listener, new: Config) -> list[str]:
    """Switch the listener to ``new``; returns the keys that still need a restart."""
    pending = restart_needed(listener.cfg, new)
    scp, jobs = listener.scp, listener.jobs
    scp.route_keywords = keywords_used(new.routes) - {"calling_ae", "called_ae"}
    jobs._routes = {r.name: r for r in new.routes}
    jobs.cfg = new
    if listener.delivery is not None:
        listener.delivery.destinations = {d.name: d for d in new.destinations}
        listener.delivery._unknown_warned.clear()
    listener.cfg = new
    scp.cfg = new  # last: from here on, new associations are judged by the new peers and AE title
    if listener.delivery is None and new.destinations:
        listener._start_delivery()
    log.info("configuration reloaded: %d peer(s), %d destination(s), %d route(s)%s", len(new.peers),
             len(new.destinations), len(new.routes),
             f"; needs a restart to apply: {', '.join(pending)}" if pending else "")
    return pending
