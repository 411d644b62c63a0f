"""The webhook body and its HMAC signature (README: how a receiver verifies it)."""

from __future__ import annotations

import hashlib
import hmac
import json

from node.notify.events import REVIEW_NOTE, UNVERIFIED_NOTE, CriticalEvent, iso_utc


def webhook_body(event: CriticalEvent, event_id: str, attempt: int, sent_at: float) -> bytes:
    """The JSON the webhook receives; ``sent_at`` is inside the signed body so receivers can reject replays."""
    body = {
        "type": "critical_finding",
        "event_id": event_id,
        "attempt": attempt,
        "study_instance_uid": event.study_uid,
        "series_instance_uids": list(event.series_uids),
        "accession_number": event.accession_number,
        "finding": event.finding,
        "code": {"value": event.code.value, "scheme": event.code.scheme, "meaning": event.code.meaning},
        "probability": event.probability,
        "model": {"name": event.model_name, "version": event.model_version},
        "unverified": event.unverified,
        "note": REVIEW_NOTE + (". " + UNVERIFIED_NOTE if event.unverified else ""),
        "received_at": iso_utc(event.received_at),
        "completed_at": iso_utc(event.completed_at),
        "detected_at": iso_utc(event.detected_at),
        "sent_at": iso_utc(sent_at),
    }
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def sign(body: bytes, secret: str) -> str:
    """``sha256=<hex>``: HMAC-SHA256 of the exact bytes sent, as GitHub-style receivers verify it."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()
