"""Critical-finding notifications: signed webhooks and HL7 v2.5 ORU^R01 over MLLP, with a delivery log.

A critical AI finding is only useful if a human hears about it before the radiologist reaches the
study in the worklist, so the listener hands every critical result to the ``Notifier`` the moment it
lands. Delivery is at-least-once: each (event, channel) pair is a row in the state database that
survives restarts, is retried with exponential backoff and jitter, and ends either ``sent`` or
``failed`` (and ``failed`` is loud: ERROR log and a state event). Receivers de-duplicate with the
event id (webhook header / JSON) or the MSH-10 control id, which stay the same across retries.

Patient identifiers go only into the HL7 PID segment (RIS/EMR needs them to file the result); the
webhook body carries UIDs and the accession number, and nothing here logs patient name or ID at INFO.

The package: ``config`` (the ``notify:`` section), ``events`` (a result's critical findings as events),
``webhook`` and ``hl7v2`` (what each channel sends), ``notifier`` (the delivery log and its loop).
"""

from node.notify.config import HL7Channel, NotifyConfig, WebhookChannel
from node.notify.events import REVIEW_NOTE, UNVERIFIED_NOTE, CriticalEvent, events_from_result, iso_utc
from node.notify.hl7v2 import build_oru, mllp_exchange
from node.notify.notifier import SCHEMA, DeliveryError, Notifier, notification_log
from node.notify.webhook import sign, webhook_body

__all__ = [
    "REVIEW_NOTE", "SCHEMA", "UNVERIFIED_NOTE", "CriticalEvent", "DeliveryError", "HL7Channel", "Notifier",
    "NotifyConfig", "WebhookChannel", "build_oru", "events_from_result", "iso_utc", "mllp_exchange",
    "notification_log", "sign", "webhook_body",
]
