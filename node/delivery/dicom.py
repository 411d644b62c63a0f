"""C-STORE (and storage commitment N-ACTION) to a DICOM destination, one association per batch."""


from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext

from node import scu
from node.config import DestinationConfig, TLSConfig
from node.delivery.model import (
    MAX_CONTEXTS,
    PRIORITY,
    STORAGE_COMMITMENT_INSTANCE,
    STORAGE_COMMITMENT_PUSH,
    WARNINGS,
    Item,
    Outcome,
    Record,
    all_outcomes,
    is_transient_status,
    status_text,
)

log = logging.getLogger("ainode.delivery")

def tls_context(tls: TLSConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca) if tls.ca else None)
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    return ctx


def propose_contexts(items: Sequence[Item]) -> tuple[list[PresentationContext], list[Item]]:
    """Contexts for the batch: each file's own syntax, then explicit and implicit little endian as separate
    contexts (so the peer can refuse one and accept another).  Items whose SOP class does not fit in the
    128-context limit are returned unproposed, to go on the next association."""
    by_class: dict[str, set[str]] = {}
    fitting: list[Item] = []
    used = 0
    for it in items:
        tss = by_class.get(it.sop_class_uid)
        if tss is not None and it.transfer_syntax in tss | {ExplicitVRLittleEndian, ImplicitVRLittleEndian}:
            tss.add(it.transfer_syntax)
            fitting.append(it)
            continue
        extra = 0 if tss is not None else 2
        native = it.transfer_syntax not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
        need = extra + (1 if native else 0)
        if used + need > MAX_CONTEXTS:
            continue
        used += need
        by_class.setdefault(it.sop_class_uid, set()).add(it.transfer_syntax)
        fitting.append(it)
    contexts: list[PresentationContext] = []
    for sop_class, tss in by_class.items():
        for ts in sorted(tss - {ExplicitVRLittleEndian, ImplicitVRLittleEndian}):
            contexts.append(build_context(sop_class, [ts]))
        contexts.append(build_context(sop_class, [ExplicitVRLittleEndian]))
        contexts.append(build_context(sop_class, [ImplicitVRLittleEndian]))
    return contexts, fitting


def association_failure(assoc: Association, dest: DestinationConfig) -> Outcome:
    """Why an association did not come up, and whether asking again later can help."""
    where = f"{dest.ae_title}@{dest.host}:{dest.port}"
    if assoc.is_rejected:
        rsp = assoc.acceptor.primitive
        kind = scu.rejection_kind(rsp)
        return Outcome(kind, f"association rejected {kind}ly by {where}: {scu.rejection_reason(rsp)}")
    if assoc.rejected_contexts and not assoc.accepted_contexts:
        classes = sorted({str(cx.abstract_syntax) for cx in assoc.rejected_contexts})
        return Outcome("permanent", f"{where} accepted no presentation context (SOP classes not supported: "
                                    f"{', '.join(UID(c).name for c in classes)})")
    if assoc.is_aborted and getattr(assoc, "ainode_connected", False):
        return Outcome("transient", f"association with {where} aborted during negotiation")
    return Outcome("transient", f"could not connect to {where}: {probe(dest)}")


def probe(dest: DestinationConfig, timeout: float = 3.0) -> str:
    """pynetdicom only logs why connect() failed; one plain TCP probe recovers the reason for the status page
    (refused, timed out, no route) or shows that TCP works and the TLS handshake was the problem."""
    try:
        with socket.create_connection((str(dest.host), int(dest.port or 104)), timeout=timeout):
            pass
    except OSError as exc:
        if isinstance(exc, TimeoutError):
            return "timed out"
        return exc.strerror or type(exc).__name__
    return "TLS handshake failed" if dest.tls else "connection closed before the association was negotiated"


@dataclass
class DimseSender:
    """C-STORE SCU: one association per batch."""

    ae_title: str
    connection_timeout: float = 10.0
    acse_timeout: float = 30.0
    dimse_timeout: float = 120.0
    network_timeout: float = 60.0

    def _ae(self) -> AE:
        ae = AE(ae_title=self.ae_title)
        ae.connection_timeout = self.connection_timeout
        ae.acse_timeout = self.acse_timeout
        ae.dimse_timeout = self.dimse_timeout
        ae.network_timeout = self.network_timeout
        return ae

    def associate(self, dest: DestinationConfig, contexts: list[PresentationContext],
                  handlers: list[Any] | None = None) -> Association:
        tls_args = (tls_context(dest.tls), dest.host) if dest.tls else None
        return scu.associate(self._ae(), dest.host, int(dest.port or 104), contexts=contexts,
                             ae_title=dest.ae_title or "", tls_args=tls_args, handlers=handlers or ())

    def send(self, dest: DestinationConfig, items: Sequence[Item], record: Record | None = None) -> dict[int, Outcome]:
        contexts, fitting = propose_contexts(items)
        if not fitting:
            return {}
        try:
            assoc = self.associate(dest, contexts)
        except Exception as exc:  # bad TLS files, DNS failure: the config's fault, but it may be fixed later
            return all_outcomes(fitting, Outcome("transient", f"cannot start association with {dest.name}: {exc}"))
        if not assoc.is_established:
            return all_outcomes(fitting, association_failure(assoc, dest))
        out: dict[int, Outcome] = {}
        try:
            for n, it in enumerate(fitting):
                if not assoc.is_established:
                    lost = Outcome("transient", f"association with {dest.name} was lost")
                    out.update(all_outcomes(fitting[n:], lost))
                    break
                out[it.id] = self._store_one(assoc, dest, it, msg_id=n + 1)
                if record is not None:
                    record({it.id: out[it.id]})
        finally:
            if assoc.is_established:
                assoc.release()
        return out

    def _store_one(self, assoc: Association, dest: DestinationConfig, it: Item, msg_id: int) -> Outcome:
        accepted = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == it.sop_class_uid]
        if not accepted:
            return Outcome("permanent", f"{dest.name} rejected the presentation context for SOP class "
                                        f"{UID(it.sop_class_uid).name} ({it.sop_class_uid})")
        try:
            ds = dcmread(it.path)
        except Exception as exc:  # the file was validated when enqueued; if it is gone, no retry brings it back
            return Outcome("permanent", f"cannot read outbox file {it.path}: {exc}")
        ts = UID(ds.file_meta.TransferSyntaxUID)
        accepted_ts = {UID(cx.transfer_syntax[0]) for cx in accepted}
        if ts not in accepted_ts and ts.is_compressed:
            if not any(not t.is_compressed for t in accepted_ts):
                return Outcome("permanent", f"{dest.name} accepts none of our transfer syntaxes for {it.sop_uid}")
            try:
                # pydicom 3 would mint a new SOP Instance UID by default; a re-encoding is the same instance,
                # and a new UID would defeat the PACS's duplicate detection on re-sends.
                ds.decompress(generate_instance_uid=False)  # pynetdicom then encodes as explicit/implicit VR LE
            except Exception as exc:
                return Outcome("permanent", f"cannot decompress {it.sop_uid} for {dest.name}: {exc}")
            log.info("delivery %s: %s re-encoded from %s (peer refused it)", dest.name, it.sop_uid, ts.name)
        prio = 1 if it.priority == PRIORITY["stat"] else 0  # C-STORE priority HIGH / MEDIUM
        try:
            status = assoc.send_c_store(ds, msg_id=msg_id, priority=prio)
        except ValueError as exc:  # no usable context or unencodable dataset
            return Outcome("permanent", f"cannot send {it.sop_uid} to {dest.name}: {exc}")
        except Exception as exc:
            return Outcome("transient", f"C-STORE of {it.sop_uid} to {dest.name} broke: {exc}")
        return self._classify(dest, it, status)

    def request_commitment(self, dest: DestinationConfig, txn_uid: str, items: Sequence[Item],
                           on_report: Any, wait_s: float = 2.0, resolved: threading.Event | None = None) -> Outcome:
        """N-ACTION (Storage Commitment Push Model, action 1) for ``items`` under ``txn_uid``.

        The answer (N-EVENT-REPORT) may come on this association, so ``on_report`` is bound here and the
        association is held up to ``wait_s`` (or until ``resolved`` is set); most PACS, Orthanc included,
        answer later on an association of their own, which the node's SCP hands to the same handler."""
        contexts = [build_context(STORAGE_COMMITMENT_PUSH, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]
        try:
            assoc = self.associate(dest, contexts, handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
        except Exception as exc:
            return Outcome("transient", f"cannot start association with {dest.name}: {exc}")
        if not assoc.is_established:
            failure = association_failure(assoc, dest)
            if failure.kind == "permanent":
                return Outcome("permanent", f"stored, but storage commitment refused: {failure.error}")
            return failure
        try:
            req = Dataset()
            req.TransactionUID = txn_uid
            req.ReferencedSOPSequence = []
            for it in items:
                ref = Dataset()
                ref.ReferencedSOPClassUID = it.sop_class_uid
                ref.ReferencedSOPInstanceUID = it.sop_uid
                req.ReferencedSOPSequence.append(ref)
            status, _ = assoc.send_n_action(req, 1, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE)
            if "Status" not in status:
                return Outcome("transient", f"no N-ACTION response from {dest.name}")
            code = int(status.Status)
            if code != 0x0000:
                kind: Literal["transient", "permanent"] = "transient" if is_transient_status(code) else "permanent"
                return Outcome(kind, f"storage commitment request refused by {dest.name}: status 0x{code:04X}")
            if resolved is not None:
                resolved.wait(wait_s)
            return Outcome("sent")
        except Exception as exc:
            return Outcome("transient", f"storage commitment request to {dest.name} broke: {exc}")
        finally:
            if assoc.is_established:
                assoc.release()

    @staticmethod
    def _classify(dest: DestinationConfig, it: Item, status: Dataset) -> Outcome:
        if "Status" not in status:
            return Outcome("transient", f"no C-STORE response from {dest.name} (timeout or abort)")
        code = int(status.Status)
        comment = f": {status.ErrorComment}" if "ErrorComment" in status else ""
        if code == 0x0000:
            return Outcome("sent")
        if code in WARNINGS:
            log.warning("delivery %s: %s stored with warning 0x%04X (%s)", dest.name, it.sop_uid, code,
                        WARNINGS[code])
            return Outcome("sent")
        text = f"C-STORE status 0x{code:04X} ({status_text(code)}){comment} from {dest.name}"
        return Outcome("transient" if is_transient_status(code) else "permanent", text)
