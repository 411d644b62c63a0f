"""Deliver result objects from the durable outbox to every destination, exactly once as far as the PACS can tell.

Why it is shaped this way:

* The outbox files are written (validated, atomically) before ``enqueue`` is called, and they are never
  regenerated: a re-send carries the same SOP Instance UIDs, which is what makes re-sending after a crash
  harmless (a PACS stores a known SOP Instance UID once).
* One row per (destination, SOP Instance UID) in the listener's SQLite database holds the whole schedule
  (state, attempts, next attempt, last error), so a killed process resumes where it stopped; nothing about
  the schedule lives only in memory.
* A transient failure (connection refused, timeout, A-ASSOCIATE-RJ transient, 0xA7xx out of resources) is
  retried with exponential backoff and jitter until the destination's ``retry_max_hours``; then the row is
  dead-lettered.  A permanent refusal (A-ASSOCIATE-RJ permanent, presentation context rejected, a C-STORE
  failure that is not about resources, HTTP 4xx) is recorded once as ``failed-permanent`` and shown in
  status: retrying would only hammer a peer that has already said no.
* One association per destination per batch, proposing only the SOP classes and transfer syntaxes the batch
  needs (plus explicit and implicit little endian, so a peer that refuses our syntax still gets the object,
  re-encoded); stat items are picked first.

Run standalone (tests use this as "the process that delivers" and ``kill -9`` it)::

    python -m node.delivery --storage-dir DIR --config FILE

The package: ``model`` (rows, states, outcomes, backoff), ``dicom`` and ``stow`` (the senders), ``service``
(the loop), ``cli`` (``python -m node.delivery``).
"""

from node.delivery.dicom import DimseSender, association_failure, propose_contexts, tls_context
from node.delivery.model import (
    COMMITTED,
    DEAD,
    FAILED,
    PENDING,
    PRIORITY,
    SCHEMA,
    SENT,
    STATES,
    STORAGE_COMMITMENT_INSTANCE,
    STORAGE_COMMITMENT_PUSH,
    BackoffPolicy,
    Item,
    Outcome,
    Sender,
    is_transient_status,
    wants_commitment,
)
from node.delivery.service import DeliveryService
from node.delivery.stow import StowSender

__all__ = [
    "COMMITTED", "DEAD", "FAILED", "PENDING", "PRIORITY", "SCHEMA", "SENT", "STATES", "STORAGE_COMMITMENT_INSTANCE",
    "STORAGE_COMMITMENT_PUSH", "BackoffPolicy", "DeliveryService", "DimseSender", "Item", "Outcome", "Sender",
    "StowSender", "association_failure", "is_transient_status", "propose_contexts", "tls_context", "wants_commitment",
]
