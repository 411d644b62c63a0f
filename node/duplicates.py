"""One SOP Instance UID is one object, as a PACS sees it (issue 10, item 5).

Why: the spool path is ``<Study>/<Series>/<SOP>.dcm`` and the index is keyed by SOP Instance UID, so
the same UID arriving under another study used to be written to a second path the index never
knew (``INSERT OR IGNORE``): another patient's file, never processed nor purged. Now, before anything
is linked, the index is asked:

- unknown UID: stored as usual;
- same study and series, identical data set: success, stored once (a re-send);
- same study and series, different data set: ``node.duplicates`` decides. ``keep_first`` (default,
  as Orthanc) answers success and keeps the first copy; ``replace`` swaps the file atomically and
  re-opens the study like a late instance, so the new content is processed again. Either way the
  conflict is recorded (``instance_conflicts``) and shown by ``ainode status``;
- another study or series: refused with 0xC000 and an Error Comment, nothing written, recorded.

A striped lock per UID makes the look-up and the link one step, so two associations racing with the
same UID cannot both write.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.state import State

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS instance_conflicts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    sop_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL, series_uid TEXT,          -- where the UID is stored
    sent_study_uid TEXT, sent_series_uid TEXT,         -- where the sender put it this time
    calling_ae TEXT,
    action TEXT NOT NULL                               -- kept_first | replaced | refused
);
CREATE INDEX IF NOT EXISTS instance_conflicts_study ON instance_conflicts(study_uid);
"""
STRIPES = 64


@dataclass(frozen=True)
class Decision:
    kind: str                 # new | identical | kept_first | replace | refuse
    path: Path | None = None  # the stored copy, when the UID is known
    comment: str = ""


def data_set_offset(head: bytes) -> int:
    """Where the data set starts in a Part 10 file: after the preamble and the File Meta group, whose
    length (0002,0000) is the first element after ``DICM`` (ainode writes every spool file so)."""
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:136] != b"\x02\x00\x00\x00":
        raise ValueError("not a Part 10 file with a File Meta group length")
    (meta_len,) = struct.unpack_from("<I", head, 140)
    return 144 + meta_len


def _digest(path: Path) -> tuple[int, int]:
    """(size, CRC-32) of the data set only: the File Meta differs between senders of the same object."""
    with open(path, "rb") as f:
        f.seek(data_set_offset(f.read(144)))
        size = crc = 0
        while chunk := f.read(1 << 20):
            size += len(chunk)
            crc = zlib.crc32(chunk, crc)
    return size, crc


def same_data_set(a: Path, b: Path) -> bool:
    try:
        return _digest(a) == _digest(b)
    except (OSError, ValueError):
        return False


class Duplicates:
    def __init__(self, state: State, policy: str = "keep_first"):
        self.state = state
        self.policy = policy
        self._locks = [threading.Lock() for _ in range(STRIPES)]
        state.ensure_schema(SCHEMA)

    def lock(self, sop_uid: str) -> threading.Lock:
        return self._locks[zlib.crc32(sop_uid.encode()) % STRIPES]

    def decide(self, sop_uid: str, study_uid: str, series_uid: str, received: Path) -> Decision:
        """Call with ``lock(sop_uid)`` held, before the received file is linked anywhere."""
        known = self.state.one("SELECT study_uid, series_uid, path FROM instances WHERE sop_uid=?", (sop_uid,))
        if known is None:
            return Decision("new")
        if known["study_uid"] != study_uid:
            return Decision("refuse", Path(known["path"]), "SOPInstanceUID already stored in another study")
        if known["series_uid"] != series_uid:
            return Decision("refuse", Path(known["path"]), "SOPInstanceUID already stored in another series")
        if same_data_set(Path(known["path"]), received):
            return Decision("identical", Path(known["path"]))
        return Decision("replace" if self.policy == "replace" else "kept_first", Path(known["path"]))

    def record(self, decision: Decision, sop_uid: str, study_uid: str, series_uid: str, calling_ae: str) -> None:
        """A conflict (not a plain re-send): logged, kept for ``ainode status``; a replacement re-opens the study."""
        if decision.kind not in ("kept_first", "replace", "refuse"):
            return
        known = self.state.one("SELECT study_uid, series_uid FROM instances WHERE sop_uid=?", (sop_uid,))
        if known is None:
            return
        action = {"kept_first": "kept_first", "replace": "replaced", "refuse": "refused"}[decision.kind]
        now = time.time()
        with self.state.tx() as c:
            c.execute("INSERT INTO instance_conflicts(at, sop_uid, study_uid, series_uid, sent_study_uid,"
                      " sent_series_uid, calling_ae, action) VALUES (?,?,?,?,?,?,?,?)",
                      (now, sop_uid, known["study_uid"], known["series_uid"], study_uid, series_uid, calling_ae,
                       action))
            if action == "replaced":  # like a late instance: the study is received again, then re-run
                c.execute("UPDATE studies SET state='receiving', last_received=?, updated=? WHERE study_uid=?",
                          (now, now, study_uid))
        if action == "refused":
            log.warning("C-STORE from %s refused: SOP Instance UID %s is already stored in study %s, series %s; "
                        "nothing written", calling_ae, sop_uid, known["study_uid"], known["series_uid"])
        else:
            log.warning("C-STORE from %s: SOP Instance UID %s sent again with different content: %s "
                        "(node.duplicates: %s)", calling_ae, sop_uid,
                        "first copy kept" if action == "kept_first" else "replaced, study re-opened", self.policy)
        self.state.event("instance_conflict", f"SOP Instance UID {sop_uid}: {action}", known["study_uid"])


def replaced_counts(state: State, study_uid: str) -> dict[str, int]:
    """How often each instance of the study was replaced: part of the job key, so new content runs again."""
    try:
        rows = state.query("SELECT sop_uid, COUNT(*) n FROM instance_conflicts WHERE study_uid=? AND"
                           " action='replaced' GROUP BY sop_uid", (study_uid,))
    except Exception:  # no conflicts table yet: nothing was ever replaced
        return {}
    return {r["sop_uid"]: int(r["n"]) for r in rows}


def conflicts(conn: Any, study_uid: str) -> list[dict[str, Any]]:
    """For ``ainode status`` (read-only connection)."""
    try:
        rows = conn.execute("SELECT at, sop_uid, sent_study_uid, sent_series_uid, calling_ae, action FROM"
                            " instance_conflicts WHERE study_uid=? ORDER BY at", (study_uid,)).fetchall()
    except Exception:
        return []
    return [dict(r) for r in rows]
