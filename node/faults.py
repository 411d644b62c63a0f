"""Fault injection for crash tests: ``AINODE_FAULT=<point>`` kills the process at that point with SIGKILL.

Why: some crash windows (a job marked done, its results not yet queued for delivery) are a few
microseconds wide; no test can hit them by killing the process from outside. A named point, read
from the environment, lets a test die exactly there and check what recovery makes of it. Unset
(always, in production), ``fault_point`` is one dictionary look-up.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)


def fault_point(name: str) -> None:
    if os.environ.get("AINODE_FAULT") == name:
        log.error("AINODE_FAULT=%s: killing this process (crash test)", name)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)
