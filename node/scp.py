"""DICOM listener: association policy, C-ECHO, and the C-STORE hot path.

The hot path writes the bytes as received (no decode / re-encode), fsyncs, indexes, and only then
answers 0x0000. Anything wrong with one instance gets a failure status for that instance; the
association and the node carry on.
"""

from __future__ import annotations

import logging
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom.presentation import AllStoragePresentationContexts, PresentationContext, build_context
from pynetdicom.sop_class import Verification

from node.acceptor import (
    IMPLEMENTATION_UID,
    IMPLEMENTATION_VERSION,
    AcceptorServer,
    Association,
    StoreRequest,
)
from node.admission import Limits
from node.config import Config
from node.duplicates import Duplicates
from node.integrity import StructureCheck
from node.spool import PREAMBLE, DiskFull, IncomingFile, Spool, Stored, valid_uid
from node.state import State

log = logging.getLogger(__name__)

TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless,
    JPEG2000Lossless, JPEG2000, RLELossless,
]

# C-STORE failure statuses (PS3.4 B.2.3, PS3.7 C.4.2)
PROCESSING_FAILURE = 0x0110
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000

# A-ASSOCIATE-RJ reasons (PS3.8 9.3.4): result 1 = permanent, source 1 = service user
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)

SERIES_KEYWORDS = (
    "Modality", "BodyPartExamined", "StudyDescription", "SeriesDescription", "ProtocolName", "SOPClassUID",
    "ImageType", "ViewPosition", "Manufacturer", "ManufacturerModelName", "StationName", "InstitutionName",
    "ImagesInAcquisition", "NumberOfFrames", "SeriesNumber", "ConvolutionKernel", "KVP", "SliceThickness",
    "PatientAge", "PatientSex", "AccessionNumber", "StudyID", "Laterality", "ImageLaterality",
    "FrameOfReferenceUID", "AcquisitionNumber", "ReferringPhysicianName",
)


@dataclass(frozen=True)
class InstanceEvent:
    study_uid: str
    series_uid: str
    sop_uid: str
    new_series: bool
    duplicate: bool


def _meta_element(elem: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2s2xI", 0x0002, elem, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, elem, vr, len(value)) + value


def _text(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii", "replace")
    return raw + pad if len(raw) % 2 else raw


def file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, source_ae: str) -> bytes:
    """Preamble and File Meta Information (PS3.10 7.1), written before the data set streams in."""
    ae = "".join(c for c in source_ae if c.isprintable() and c != "\\")[:16]
    body = b"".join([
        _meta_element(0x0001, b"OB", b"\x00\x01"),
        _meta_element(0x0002, b"UI", _text(sop_class_uid, b"\x00")),
        _meta_element(0x0003, b"UI", _text(sop_instance_uid, b"\x00")),
        _meta_element(0x0010, b"UI", _text(transfer_syntax, b"\x00")),
        _meta_element(0x0012, b"UI", _text(IMPLEMENTATION_UID, b"\x00")),
        _meta_element(0x0013, b"SH", _text(IMPLEMENTATION_VERSION, b" ")),
        *([_meta_element(0x0016, b"AE", _text(ae, b" "))] if ae else []),
    ])
    return PREAMBLE + _meta_element(0x0000, b"UL", struct.pack("<I", len(body))) + body


def _nested(ds: Dataset, kw: str) -> Any:
    """A route keyword missing at the top level, from the items of top-level sequences: modalities copy
    worklist attributes such as RequestedProcedurePriority into RequestAttributesSequence. All values found."""
    found: list[str] = []
    for elem in ds:
        if elem.VR != "SQ" or elem.keyword == "PixelData":
            continue
        for item in elem.value or []:
            try:
                inner = item.data_element(kw)
            except Exception:
                continue
            if inner is not None and inner.VR != "SQ" and inner.value not in (None, ""):
                v = inner.value
                found += [str(x) for x in v] if type(v).__name__ == "MultiValue" else [str(v)]
    return found or None


def series_tags(ds: Dataset, extra: set[str]) -> dict[str, Any]:
    tags: dict[str, Any] = {}
    for kw in set(SERIES_KEYWORDS) | extra:
        try:
            elem = ds.data_element(kw)
        except Exception:
            elem = None
        if elem is None and kw in extra and (nested := _nested(ds, kw)) is not None:
            tags[kw] = nested
            continue
        if elem is None or elem.VR == "SQ":
            continue
        v = elem.value
        if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
            tags[kw] = [str(x) for x in v]
        elif isinstance(v, (int, float)):
            tags[kw] = v
        elif v is not None and not isinstance(v, bytes):
            tags[kw] = str(v)
    return tags


def expected_count(ds: Dataset | dict[str, str]) -> int | None:
    """From a Dataset, or from the quick header reader's attributes (same keywords)."""
    modality = str(ds.get("Modality", ""))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if modality in ("CR", "DX", "MG", "IO") and frames == 1:
        return 1
    try:
        n = int(ds.get("ImagesInAcquisition") or 0)
    except (TypeError, ValueError):
        return None
    return n if n > 0 else None


def tls_context(cfg: Config) -> ssl.SSLContext | None:
    tls = cfg.node.tls
    if tls is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    if tls.ca is not None:
        ctx.load_verify_locations(str(tls.ca))
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else (
        ssl.CERT_OPTIONAL if tls.ca is not None else ssl.CERT_NONE)
    return ctx


def supported_contexts() -> list[PresentationContext]:
    contexts = [build_context(cx.abstract_syntax, TRANSFER_SYNTAXES) for cx in AllStoragePresentationContexts]
    contexts.append(build_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]))
    return contexts


class StorageSCP:
    """Association policy and the C-STORE hot path, on top of ``node.acceptor``."""

    def __init__(self, cfg: Config, state: State, spool: Spool,
                 on_instance: Callable[[InstanceEvent], None] | None = None,
                 on_association_end: Callable[[list[str]], None] | None = None,
                 route_keywords: set[str] | None = None):
        self.cfg = cfg
        self.state = state
        self.spool = spool
        self.on_instance = on_instance
        self.on_association_end = on_association_end
        self.route_keywords = route_keywords or set()
        self._known_series: set[str] = set()
        self._assoc_studies: dict[str, set[str]] = {}
        self._lock = threading.Lock()
        self.duplicates = Duplicates(state, cfg.node.duplicates)
        self.server: AcceptorServer | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.server = AcceptorServer((self.cfg.node.host, self.cfg.node.port), self, supported_contexts(),
                                     max_pdu=self.cfg.node.max_pdu, max_associations=self.cfg.node.max_associations,
                                     ssl_context=tls_context(self.cfg), acse_timeout=30, network_timeout=60,
                                     limits=self._limits())
        self.server.start()
        log.info("listening as %s on %s:%d%s", self.cfg.node.ae_title, self.cfg.node.host, self.port,
                 " (TLS)" if self.cfg.node.tls else "")

    def _limits(self) -> Limits:
        n = self.cfg.node
        return Limits(n.max_associations, n.max_pending_associations, n.max_pending_per_host, n.handshake_timeout_s)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1]) if self.server else self.cfg.node.port

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    # ------------------------------------------------------------------ association policy
    def _peer_allowed(self, calling: str, host: str) -> bool:
        if self.cfg.node.accept_any_peer:
            return True
        for p in self.cfg.peers:
            if p.ae_title == calling and (p.host is None or p.host == host):
                return True
        return False

    def policy(self, assoc: Association) -> tuple[int, int, int] | None:
        if assoc.called_ae != self.cfg.node.ae_title:
            log.warning("rejected association from %s@%s: called AE %r is not ours (%s)", assoc.calling_ae,
                        assoc.host, assoc.called_ae, self.cfg.node.ae_title)
            return REJECT_CALLED_AE
        if not self._peer_allowed(assoc.calling_ae, assoc.host):
            log.warning("rejected association from %s@%s: calling AE not a configured peer", assoc.calling_ae,
                        assoc.host)
            return REJECT_CALLING_AE
        return None

    def accepted(self, assoc: Association) -> None:
        self.state.association_started(assoc.id, assoc.calling_ae, assoc.host)
        with self._lock:
            self._assoc_studies[assoc.id] = set()

    def ended(self, assoc: Association, how: str) -> None:
        with self._lock:
            studies = self._assoc_studies.pop(assoc.id, None)
        if studies is None:
            return
        self.state.association_ended(assoc.id, how)
        if self.on_association_end:
            self.on_association_end(sorted(studies))

    # ------------------------------------------------------------------ C-STORE
    def begin_store(self, assoc: Association, request: StoreRequest) -> InstanceSink:
        return InstanceSink(self, assoc, request)

    @staticmethod
    def _parse(calling: str, request: StoreRequest, attrs: dict[str, str]) -> tuple[int, str] | None:
        """The hot-path attributes (collected by the structure check), checked: None, or (status, comment)
        to refuse the instance with."""
        bad = [kw for kw in ("StudyInstanceUID", "SeriesInstanceUID") if not valid_uid(attrs.get(kw, ""))]
        if bad:
            log.warning("C-STORE from %s: invalid %s, nothing stored", calling, " and ".join(bad))
            return CANNOT_UNDERSTAND, f"invalid {bad[0]}"
        if attrs.get("SOPInstanceUID", "") != request.sop_instance_uid:
            log.warning("C-STORE from %s: SOPInstanceUID in dataset differs from the request", calling)
            return DATASET_MISMATCH, "SOPInstanceUID differs from request"
        if attrs.get("SOPClassUID") and attrs["SOPClassUID"] != request.sop_class_uid:
            log.warning("C-STORE from %s: SOPClassUID in dataset differs from the request", calling)
            return DATASET_MISMATCH, "SOPClassUID differs from request"
        return None

    def _series_tags(self, path: Path, modality: str) -> dict[str, Any]:
        try:
            return series_tags(pydicom.dcmread(path, stop_before_pixels=True), self.route_keywords)
        except Exception:  # an odd element must not lose an instance that is already on disk
            return {"Modality": modality}

    def store_received(self, assoc: Association, request: StoreRequest, incoming: IncomingFile,
                       attrs: dict[str, str]) -> tuple[int, str]:
        """The whole data set is in ``incoming`` and structurally whole: check its identity, make it durable,
        index it; only then succeed."""
        calling = assoc.calling_ae
        sop_uid = request.sop_instance_uid
        refused = self._parse(calling, request, attrs)
        if refused is not None:
            incoming.abandon()
            return refused
        study_uid, series_uid = attrs["StudyInstanceUID"], attrs["SeriesInstanceUID"]
        with self.duplicates.lock(sop_uid):  # look-up, link and index as one step per SOP Instance UID
            decision = self.duplicates.decide(sop_uid, study_uid, series_uid, incoming.path)
            if decision.kind == "refuse":
                incoming.abandon()
                self.duplicates.record(decision, sop_uid, study_uid, series_uid, calling)
                return CANNOT_UNDERSTAND, decision.comment
            try:
                if decision.kind == "new":
                    stored = self.spool.commit(incoming, study_uid, series_uid, sop_uid)
                elif decision.kind == "replace":
                    stored = self.spool.replace(incoming, study_uid, series_uid, sop_uid)
                else:  # identical, or keep_first: the stored copy stays
                    incoming.abandon()
                    assert decision.path is not None
                    stored = Stored(decision.path, decision.path.stat().st_size, duplicate=True)
            except DiskFull as exc:
                log.error("C-STORE from %s refused: %s", calling, exc)
                return OUT_OF_RESOURCES, "insufficient disk space"
            except OSError as exc:
                log.error("C-STORE from %s: cannot write instance: %s", calling, exc)
                return OUT_OF_RESOURCES, "cannot write instance"
            new, new_series = self._index(assoc, request, attrs, stored)
            if decision.kind == "replace":
                self.state.execute("UPDATE instances SET size=?, received=? WHERE sop_uid=?",
                                   (stored.size, time.time(), sop_uid))
            self.duplicates.record(decision, sop_uid, study_uid, series_uid, calling)
        if self.on_instance:
            self.on_instance(InstanceEvent(study_uid, series_uid, sop_uid, new_series,
                                           not new or stored.duplicate or decision.kind == "replace"))
        return 0x0000, ""

    def _index(self, assoc: Association, request: StoreRequest, attrs: dict[str, str],
               stored: Stored) -> tuple[bool, bool]:
        """(new instance, new series) once the instance is in the state database."""
        study_uid, series_uid = attrs["StudyInstanceUID"], attrs["SeriesInstanceUID"]
        modality = attrs.get("Modality", "")
        new_series = False
        with self._lock:
            if series_uid not in self._known_series:
                self._known_series.add(series_uid)
                new_series = True
            if assoc.id in self._assoc_studies:
                self._assoc_studies[assoc.id].add(study_uid)
        tags = self._series_tags(stored.path, modality) if new_series else {}
        try:
            expected = expected_count(attrs)
        except Exception:
            expected = None
        new = self.state.record_instance(
            study_uid=study_uid, series_uid=series_uid, sop_uid=request.sop_instance_uid, path=str(stored.path),
            size=stored.size, calling_ae=assoc.calling_ae, assoc_id=assoc.id, modality=modality,
            sop_class_uid=request.sop_class_uid, expected=expected, series_tags=tags)
        return new, new_series


class InstanceSink:
    """One C-STORE data set on its way to the spool. Refusals decided before the data arrive (bad SOP
    Instance UID, low disk) still drain the fragments, so the association carries on."""

    def __init__(self, scp: StorageSCP, assoc: Association, request: StoreRequest):
        self.scp = scp
        self.assoc = assoc
        self.request = request
        self.file: IncomingFile | None = None
        self.failure: tuple[int, str] | None = None
        self.check = StructureCheck(request.transfer_syntax)  # fed what the spool writes: no second read
        if not valid_uid(request.sop_instance_uid):
            log.warning("C-STORE from %s: invalid SOPInstanceUID, nothing stored", assoc.calling_ae)
            self.failure = (CANNOT_UNDERSTAND, "invalid SOPInstanceUID")
        elif scp.spool.low_on_space():
            log.error("C-STORE from %s refused: %s", assoc.calling_ae, scp.spool.refusal())
            self.failure = (OUT_OF_RESOURCES, "insufficient disk space")
        else:
            try:
                self.file = scp.spool.incoming(file_meta(request.sop_class_uid, request.sop_instance_uid,
                                                         request.transfer_syntax, assoc.calling_ae))
            except OSError as exc:
                self._fail(exc)

    def _fail(self, exc: OSError) -> None:
        log.error("C-STORE from %s: cannot write instance: %s", self.assoc.calling_ae, exc)
        self.failure = (OUT_OF_RESOURCES, "cannot write instance")
        self.discard()

    def write(self, data: memoryview) -> None:
        if self.file is not None:
            self.check.feed(data)
            try:
                self.file.write(data)
            except OSError as exc:
                self._fail(exc)

    def discard(self) -> None:
        if self.file is not None:
            file, self.file = self.file, None
            file.abandon()

    def finish(self) -> tuple[int, str]:
        if self.failure is not None or self.file is None:
            return self.failure or (PROCESSING_FAILURE, "instance not stored")
        file, self.file = self.file, None
        problem = self.check.finish()
        if problem is not None:
            log.warning("C-STORE from %s: data set not whole, nothing stored: %s", self.assoc.calling_ae, problem)
            file.abandon()
            return CANNOT_UNDERSTAND, problem
        try:
            return self.scp.store_received(self.assoc, self.request, file, self.check.attributes)
        except Exception:
            log.exception("C-STORE from %s: instance not stored", self.assoc.calling_ae)
            file.abandon()
            return PROCESSING_FAILURE, "instance not stored"
