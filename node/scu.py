"""Requesting associations with pynetdicom, without its two blind spots.

1. pynetdicom never disables Nagle's algorithm, which delays each small PDU by up to 40 ms on loopback.
2. A peer that rejects quickly can be reported as an abort.  pynetdicom's requestor thread checks
   ``socket._is_connected`` after the A-ASSOCIATE-RQ has gone out; when the A-ASSOCIATE-RJ arrives and the
   DUL thread closes the transport first (AE-4), the check fails and the association is marked aborted
   instead of rejected.  On a loaded 2-core machine that happened to about one in six rejections (a fast
   acceptor such as DCMTK or ainode answers in well under a millisecond).  A rejection is the one answer
   that tells an operator "fix the AE title", so the RJ PDU is captured where it is received and the
   association's state is repaired from it.
3. A response can be taken by the association's own reactor thread. Each ``send_*`` pauses the reactor
   by clearing an event and waiting for ``_is_paused``, but that flag is still True for a moment after the
   reactor passes the event, so a loaded machine lets the sender go on while the reactor runs once more;
   when the peer answers in that moment the reactor takes the C-STORE response, logs "Received unexpected
   C-STORE service message" and drops it, the sender waits for an answer that never comes, and the peer
   (DCMTK storescp, here) closes the idle association. The object was stored, but is counted as failed and
   sent again. A response the reactor takes is now put back where the sender is waiting for it.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from ssl import SSLContext
from typing import Any, Literal

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext

log = logging.getLogger(__name__)


def set_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN fires after connect() and before the A-ASSOCIATE-RQ."""
    event.assoc.ainode_connected = True  # lets callers tell "refused" from "aborted"
    try:
        sock = event.assoc.dul.socket.socket
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError) as exc:  # never fail an association over a socket option
        log.debug("could not set TCP_NODELAY: %s", exc)


def _on_pdu(event: evt.Event) -> None:
    pdu = event.pdu
    if isinstance(pdu, A_ASSOCIATE_RJ):
        event.assoc.ainode_rejection = pdu.to_primitive()


def rejection_kind(rj: A_ASSOCIATE) -> Literal["permanent", "transient"]:
    """PS3.8 9.3.4: result 1 means do not retry as configured; 2 means try again later."""
    return "permanent" if rj.result == 0x01 else "transient"


def rejection_reason(rj: A_ASSOCIATE) -> str:
    """The peer's reason in PS3.8's words, as operators see it in status and on the command line."""
    return f"{rj.reason_str} (source: {rj.source_str})"


def associate(ae: AE, host: str, port: int, *, ae_title: str, contexts: list[PresentationContext] | None = None,
              tls_args: tuple[SSLContext, str] | None = None,
              handlers: Sequence[tuple[Any, Any]] = ()) -> Association:
    """``ae.associate`` with TCP_NODELAY and a rejection that is always reported as one."""
    assoc = ae.associate(host, port, contexts=contexts, ae_title=ae_title, tls_args=tls_args,
                         evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay), (evt.EVT_PDU_RECV, _on_pdu), *handlers])
    keep_responses(assoc)
    rejection = getattr(assoc, "ainode_rejection", None)
    if rejection is not None and not assoc.is_established and not assoc.is_rejected:
        assoc.acceptor.primitive = rejection
        assoc.is_aborted = False
        assoc.is_rejected = True
    return assoc


def keep_responses(assoc: Association) -> None:
    """Point 3 of the module docstring: a response the reactor takes goes back to the sender's queue.

    Only responses are returned (a response is never a valid request); requests the peer sends still go
    to pynetdicom, and so do N-EVENT-REPORTs (storage commitment), which it serves on a thread of their own."""
    serve = getattr(assoc, "_serve_request", None)
    queue = getattr(getattr(assoc, "dimse", None), "msg_queue", None)
    if serve is None or queue is None:  # another pynetdicom: leave it as it is
        return

    def serve_or_return(msg: Any, context_id: int) -> None:
        if not getattr(msg, "is_valid_request", True):
            log.debug("a %s response taken by the association's reactor went back to the sender", msg.msg_type)
            queue.put((context_id, msg))
            return
        serve(msg, context_id)

    assoc._serve_request = serve_or_return  # type: ignore[method-assign]
