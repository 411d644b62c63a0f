"""HL7 v2.5 ORU^R01 for a critical finding, and one MLLP exchange with its ACK."""

from __future__ import annotations

import socket
import ssl
import time
from datetime import UTC, datetime
from typing import Any

import hl7

from node.notify.config import HL7Channel
from node.notify.events import REVIEW_NOTE, UNVERIFIED_NOTE, CriticalEvent

#: DICOM coding scheme designators as HL7 v2 coding systems (SNOMED's old SRT is SCT there)
HL7_SCHEMES = {"SRT": "SCT", "SCT": "SCT", "DCM": "DCM", "LN": "LN", "UCUM": "UCUM"}


def hl7_ts(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y%m%d%H%M%S+0000")


def hl7_escape(value: Any) -> str:
    """Escape HL7 delimiters; non-ASCII text stays as is (the message declares UTF-8 in MSH-18)."""
    out = []
    for c in str(value or ""):
        if c == "\\":
            out.append("\\E\\")
        elif c == "|":
            out.append("\\F\\")
        elif c == "^":
            out.append("\\S\\")
        elif c == "&":
            out.append("\\T\\")
        elif c == "~":
            out.append("\\R\\")
        elif c in "\r\n":
            out.append("\\.br\\")
        else:
            out.append(c)
    return "".join(out)


def cwe(code: str, text: str, scheme: str) -> str:
    return "^".join([hl7_escape(code), hl7_escape(text), hl7_escape(HL7_SCHEMES.get(scheme, scheme))])


def xpn(dicom_pn: str) -> str:
    """DICOM PN (family^given^middle^prefix^suffix, '=' groups) -> HL7 XPN (family^given^middle^suffix^prefix)."""
    groups = dicom_pn.split("=")
    alpha = groups[0] if groups[0] else next((g for g in groups[1:] if g), "")
    parts = (alpha.split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = parts
    return "^".join(hl7_escape(p) for p in (family, given, middle, suffix, prefix)).rstrip("^")


def build_oru(event: CriticalEvent, channel: HL7Channel, control_id: str, now: float | None = None) -> hl7.Message:
    """An ORU^R01 (v2.5) with one OBR for the study and OBX lines for the finding and its provenance."""
    now = time.time() if now is None else now
    msh = ["MSH", "^~\\&", hl7_escape(channel.sending_application), hl7_escape(channel.sending_facility),
           hl7_escape(channel.receiving_application), hl7_escape(channel.receiving_facility), hl7_ts(now), "",
           "ORU^R01^ORU_R01", hl7_escape(control_id), channel.processing_id, "2.5", "", "", "", "", "", "UNICODE UTF-8"]
    issuer = event.patient_id_issuer or channel.patient_id_authority
    sex = event.patient_sex if event.patient_sex in ("M", "F", "O") else ("U" if event.patient_sex else "")
    cx = f"{hl7_escape(event.patient_id)}^^^{hl7_escape(issuer)}".rstrip("^")
    pid = ["PID", "1", "", cx, "", xpn(event.patient_name), "", hl7_escape(event.patient_birth_date), sex]
    placer = hl7_escape(event.accession_number) if channel.accession_in in ("placer", "both") else ""
    filler = hl7_escape(event.accession_number) if channel.accession_in in ("filler", "both") else ""
    obr = ["OBR", "1", placer, filler, cwe(channel.service_code, channel.service_text, channel.service_scheme)]
    obr += [""] * 2 + [hl7_escape(event.study_datetime) or hl7_ts(event.received_at)]  # OBR-7 observation date/time
    obr += [""] * 14 + [hl7_ts(event.detected_at), "", "", "P"]  # OBR-22 status change, OBR-25 result status
    obs_time = hl7_ts(event.detected_at)

    def obx(i: int, vtype: str, ident: str, sub: str, value: str, units: str = "", flag: str = "") -> list[str]:
        return ["OBX", str(i), vtype, ident, sub, value, units, "", flag, "", "", "P", "", "", obs_time]

    finding = cwe(event.code.value, event.code.meaning or event.finding, event.code.scheme)
    rows = [obx(1, "CWE", "121071^Finding^DCM", "1", finding, flag="AA")]
    if event.probability is not None:
        rows.append(obx(len(rows) + 1, "NM", "122157^Probability^DCM", "1", f"{event.probability:.4f}",
                        units="1^no units^UCUM"))
    rows.append(obx(len(rows) + 1, "ST", "111001^Algorithm Name^DCM", "1", hl7_escape(event.model_name)))
    rows.append(obx(len(rows) + 1, "ST", "111003^Algorithm Version^DCM", "1", hl7_escape(event.model_version)))
    rows.append(obx(len(rows) + 1, "ST", "110180^Study Instance UID^DCM", "1", hl7_escape(event.study_uid)))
    rows.append(obx(len(rows) + 1, "TX", "121106^Comment^DCM", "1", hl7_escape(REVIEW_NOTE)))
    if event.unverified:
        rows.append(obx(len(rows) + 1, "TX", "121106^Comment^DCM", "2", hl7_escape(UNVERIFIED_NOTE)))
    # MSH-1 is the field separator itself, so joining gives "MSH|^~\&|..." with MSH-2 as the second item.
    return hl7.parse("\r".join("|".join(seg).rstrip("|") for seg in [msh, pid, obr, *rows]))


# =========================================================================== MLLP transport
SB, EB, CR = b"\x0b", b"\x1c", b"\x0d"


def mllp_exchange(host: str, port: int, message: bytes, timeout_s: float,
                  ssl_context: ssl.SSLContext | None = None) -> bytes:
    """Send one framed message and return the first framed reply (the ACK), within ``timeout_s`` overall.

    ``hl7.client.MLLPClient`` returns whatever one ``recv`` yields, which may be half an ACK, and has
    no timeout; a RIS that accepts the connection and never answers must not hold a delivery forever.
    """
    deadline = time.monotonic() + timeout_s
    with socket.create_connection((host, port), timeout=timeout_s) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock = ssl_context.wrap_socket(raw, server_hostname=host) if ssl_context is not None else raw
        sock.sendall(SB + message + EB + CR)
        buf = b""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no ACK within {timeout_s:g} s")
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except TimeoutError as exc:
                raise TimeoutError(f"no ACK within {timeout_s:g} s") from exc
            if not chunk:
                raise ConnectionError("connection closed before a complete ACK arrived")
            buf += chunk
            end = buf.find(EB)
            if end >= 0:
                start = buf.find(SB)
                return buf[start + 1 if start >= 0 else 0:end]
