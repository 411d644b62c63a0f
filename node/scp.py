"""DICOM listener: association policy, C-ECHO, and the C-STORE hot path.

The hot path writes the bytes as received (no decode / re-encode), fsyncs, indexes, and only then
answers 0x0000. Anything wrong with one instance gets a failure status for that instance; the
association and the node carry on.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
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
from pynetdicom import AE, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification

from node.config import Config
from node.spool import PREAMBLE, DiskFull, Spool, valid_uid
from node.state import State

log = logging.getLogger(__name__)

TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless,
    JPEG2000Lossless, JPEG2000, RLELossless,
]

# C-STORE failure statuses (PS3.4 B.2.3)
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


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


def series_tags(ds: Dataset, extra: set[str]) -> dict[str, Any]:
    tags: dict[str, Any] = {}
    for kw in set(SERIES_KEYWORDS) | extra:
        try:
            elem = ds.data_element(kw)
        except Exception:
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


def expected_count(ds: Dataset) -> int | None:
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


class StorageSCP:
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
        self.server: Any = None
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.cfg.node.ae_title)
        ae.maximum_pdu_size = self.cfg.node.max_pdu
        ae.maximum_associations = self.cfg.node.max_associations
        ae.require_called_aet = True
        ae.network_timeout = 60
        ae.acse_timeout = 30
        ae.dimse_timeout = 60
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian])
        return ae

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_C_ECHO, lambda event: 0x0000),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, lambda event: self._on_end(event, "released")),
            (evt.EVT_ABORTED, lambda event: self._on_end(event, "aborted")),
            (evt.EVT_CONN_CLOSE, lambda event: self._on_end(event, "lost")),
        ]
        self.server = self.ae.start_server((self.cfg.node.host, self.cfg.node.port), block=False,
                                           evt_handlers=handlers, ssl_context=tls_context(self.cfg))
        log.info("listening as %s on %s:%d%s", self.cfg.node.ae_title, self.cfg.node.host, self.port,
                 " (TLS)" if self.cfg.node.tls else "")

    @property
    def port(self) -> int:
        return int(self.server.server_address[1]) if self.server else self.cfg.node.port

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    # ------------------------------------------------------------------ association policy
    @staticmethod
    def _on_conn_open(event: evt.Event) -> None:
        try:
            sock = event.assoc.dul.socket.socket
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (AttributeError, OSError):
            pass

    def _peer_allowed(self, calling: str, host: str) -> bool:
        if self.cfg.node.accept_any_peer:
            return True
        for p in self.cfg.peers:
            if p.ae_title == calling and (p.host is None or p.host == host):
                return True
        return False

    @staticmethod
    def _reject(event: evt.Event, rsd: tuple[int, int, int]) -> None:
        """As pynetdicom's own ACSE rejects: send A-ASSOCIATE-RJ, mark rejected, end the association."""
        event.assoc.acse.send_reject(*rsd)
        event.assoc.is_rejected = True
        evt.trigger(event.assoc, evt.EVT_REJECTED, {})
        event.assoc.kill()

    def _on_requested(self, event: evt.Event) -> None:
        rq = event.assoc.requestor
        calling = str(rq.primitive.calling_ae_title).strip()
        called = str(rq.primitive.called_ae_title).strip()
        host = str(rq.address)
        if called != self.cfg.node.ae_title:
            log.warning("rejected association from %s@%s: called AE %r is not ours (%s)", calling, host, called,
                        self.cfg.node.ae_title)
            self._reject(event, REJECT_CALLED_AE)
        elif not self._peer_allowed(calling, host):
            log.warning("rejected association from %s@%s: calling AE not a configured peer", calling, host)
            self._reject(event, REJECT_CALLING_AE)

    def _on_accepted(self, event: evt.Event) -> None:
        assoc_id = uuid.uuid4().hex
        event.assoc.ainode_id = assoc_id  # type: ignore[attr-defined]
        rq = event.assoc.requestor
        self.state.association_started(assoc_id, str(rq.ae_title).strip(), str(rq.address))
        with self._lock:
            self._assoc_studies[assoc_id] = set()

    def _on_end(self, event: evt.Event, how: str) -> None:
        assoc_id = getattr(event.assoc, "ainode_id", None)
        if assoc_id is None:
            return
        with self._lock:
            studies = self._assoc_studies.pop(assoc_id, None)
        if studies is None:  # already handled (released, then connection closed)
            return
        self.state.association_ended(assoc_id, how)
        if self.on_association_end:
            self.on_association_end(sorted(studies))

    # ------------------------------------------------------------------ C-STORE
    def _on_store(self, event: evt.Event) -> Dataset | int:
        calling = str(event.assoc.requestor.ae_title).strip()
        assoc_id = getattr(event.assoc, "ainode_id", "")
        sop_uid = str(event.request.AffectedSOPInstanceUID or "")
        try:
            ds = event.dataset
            study_uid = str(ds.get("StudyInstanceUID", "") or "")
            series_uid = str(ds.get("SeriesInstanceUID", "") or "")
            ds_sop = str(ds.get("SOPInstanceUID", "") or "")
            modality = str(ds.get("Modality", "") or "")
        except Exception as exc:
            log.warning("C-STORE from %s: dataset cannot be parsed (%s): %s", calling, sop_uid[:64],
                        type(exc).__name__)
            return _status(CANNOT_UNDERSTAND, "dataset cannot be parsed")
        bad = [name for name, uid in (("SOPInstanceUID", sop_uid), ("StudyInstanceUID", study_uid),
                                       ("SeriesInstanceUID", series_uid)) if not valid_uid(uid)]
        if bad:
            log.warning("C-STORE from %s: invalid %s, nothing stored", calling, " and ".join(bad))
            return _status(CANNOT_UNDERSTAND, f"invalid {bad[0]}")
        if ds_sop != sop_uid:
            log.warning("C-STORE from %s: SOPInstanceUID in dataset differs from the request", calling)
            return _status(DATASET_MISMATCH, "SOPInstanceUID differs from request")
        try:
            meta = DicomBytesIO()
            write_file_meta_info(meta, event.file_meta, enforce_standard=True)
            stored = self.spool.store(study_uid, series_uid, sop_uid,
                                      [PREAMBLE, meta.getvalue(), event.encoded_dataset(include_meta=False)])
        except DiskFull as exc:
            log.error("C-STORE from %s refused: %s (node.min_free_disk_mb)", calling, exc)
            return _status(OUT_OF_RESOURCES, "insufficient disk space")
        except OSError as exc:
            log.error("C-STORE from %s: cannot write instance: %s", calling, exc)
            return _status(OUT_OF_RESOURCES, "cannot write instance")
        new_series = False
        tags: dict[str, Any] = {}
        with self._lock:
            if series_uid not in self._known_series:
                self._known_series.add(series_uid)
                new_series = True
            if assoc_id in self._assoc_studies:
                self._assoc_studies[assoc_id].add(study_uid)
        if new_series:
            try:
                tags = series_tags(ds, self.route_keywords)
            except Exception:  # an odd element must not lose an instance that is already on disk
                tags = {"Modality": modality}
        try:
            expected = expected_count(ds)
        except Exception:
            expected = None
        new = self.state.record_instance(
            study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid, path=str(stored.path), size=stored.size,
            calling_ae=calling, assoc_id=assoc_id, modality=modality,
            sop_class_uid=str(event.request.AffectedSOPClassUID), expected=expected, series_tags=tags)
        if self.on_instance:
            self.on_instance(InstanceEvent(study_uid, series_uid, sop_uid, new_series, not new or stored.duplicate))
        return 0x0000
