"""The DICOM upper layer of ``node.acceptor``, driven byte by byte over a real socket to a real ``ainode run``.

pynetdicom and DCMTK peers (test_scp, test_node_e2e) cover the well-behaved paths; here a raw client
sends what well-behaved peers never do (PDUs out of order, unknown contexts, cut-off data sets), and
checks that only that association suffers.
"""

from __future__ import annotations

import hashlib
import socket
import sqlite3
import struct
import subprocess
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_role
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification
from support.dicomgen import ct_series
from support.node import STORESCU, NodeProcess, storescu, wait_for
from support.node import spool_files as support_spool_files

from node import scu
from node.acceptor import IMPLEMENTATION_UID

ABORT = 0x07


class RawPeer:
    """Speaks PS3.8 by hand, so it can also speak it wrongly."""

    def __init__(self, port: int, calling: str = "MODALITY1", associate: bool = True):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        if associate:
            self.send(self._associate_rq(calling))
            pdu_type, _ = self.read_pdu()
            assert pdu_type == 0x02, f"expected A-ASSOCIATE-AC, got {pdu_type}"

    @staticmethod
    def _associate_rq(calling: str) -> bytes:
        p = A_ASSOCIATE()
        p.application_context_name = "1.2.840.10008.3.1.1.1"
        p.calling_ae_title, p.called_ae_title = calling, "AINODE"
        contexts = [build_context(CTImageStorage, [ExplicitVRLittleEndian]), build_context(Verification)]
        for i, cx in enumerate(contexts):
            cx.context_id = 2 * i + 1
        p.presentation_context_definition_list = contexts
        m = MaximumLengthNotification()
        m.maximum_length_received = 16384
        p.user_information = [m]
        rq = A_ASSOCIATE_RQ()
        rq.from_primitive(p)
        return rq.encode()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _recv(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("closed")
            out += chunk
        return out

    def read_pdu(self) -> tuple[int, bytes]:
        pdu_type, _, length = struct.unpack(">BBI", self._recv(6))
        return pdu_type, self._recv(length)

    def pdata(self, context_id: int, control: int, data: bytes) -> None:
        self.send(struct.pack(">BBIIBB", 0x04, 0, len(data) + 6, len(data) + 2, context_id, control) + data)

    def command(self, context_id: int, **elements: object) -> None:
        ds = Dataset()
        for k, v in elements.items():
            setattr(ds, k, v)
        body = encode(ds, True, True)
        ds.CommandGroupLength = len(body)
        self.pdata(context_id, 0x03, encode(ds, True, True))

    def response(self) -> Dataset:
        pdu_type, body = self.read_pdu()
        assert pdu_type == 0x04, f"expected P-DATA-TF, got {pdu_type}"
        (length,) = struct.unpack(">I", body[:4])
        assert body[5] & 0x03 == 0x03, "response command in one fragment"
        return decode(BytesIO(body[6:4 + length]), True, True)

    def release(self) -> None:
        self.send(struct.pack(">BBI", 0x05, 0, 4) + b"\x00" * 4)
        assert self.read_pdu()[0] == 0x06

    def close(self) -> None:
        self.sock.close()


def spool_files(node: NodeProcess) -> list[Path]:
    return support_spool_files(node.storage)


def n_aborted(node: NodeProcess) -> int:
    with sqlite3.connect(f"file:{node.storage / 'state.db'}?mode=ro", uri=True) as conn:
        return conn.execute("SELECT COUNT(*) FROM associations WHERE how='aborted'").fetchone()[0]


def node_still_serves(node: NodeProcess, tmp: Path) -> bool:
    files = ct_series(tmp, 1, size=16)
    return storescu(node.port, files).returncode == 0


def test_pdus_out_of_order_abort_only_that_connection(node: NodeProcess, tmp_path: Path) -> None:
    peer = RawPeer(node.port, associate=False)  # data before any association
    peer.pdata(1, 0x03, b"\x00" * 8)
    assert peer.read_pdu()[0] == ABORT
    peer.close()

    peer = RawPeer(node.port)  # a data set fragment with no command before it
    peer.pdata(1, 0x02, b"\x08\x00\x18\x00")
    assert peer.read_pdu()[0] == ABORT
    peer.close()

    peer = RawPeer(node.port)  # a presentation context that was never accepted
    peer.command(99, CommandField=0x0030, MessageID=1, CommandDataSetType=0x0101,
                 AffectedSOPClassUID=Verification)
    assert peer.read_pdu()[0] == ABORT
    peer.close()

    wait_for(lambda: node.log_text().count("aborting association from 127.0.0.1") >= 3, 5)
    assert node_still_serves(node, tmp_path)


def test_echo_and_an_unserved_command_on_one_association(node: NodeProcess) -> None:
    peer = RawPeer(node.port)
    peer.command(1, CommandField=0x0020, MessageID=7, CommandDataSetType=0x0101, Priority=0,
                 AffectedSOPClassUID=CTImageStorage)  # C-FIND-RQ: not a service of this node
    rsp = peer.response()
    assert (rsp.CommandField, rsp.MessageIDBeingRespondedTo, rsp.Status) == (0x8020, 7, 0x0211)
    peer.command(3, CommandField=0x0030, MessageID=8, CommandDataSetType=0x0101, AffectedSOPClassUID=Verification)
    rsp = peer.response()
    assert (rsp.CommandField, rsp.MessageIDBeingRespondedTo, rsp.Status) == (0x8030, 8, 0x0000)
    peer.release()
    peer.close()


def test_data_set_cut_off_by_abort_leaves_nothing_and_can_be_sent_again(node: NodeProcess, tmp_path: Path) -> None:
    (f,) = ct_series(tmp_path, 1, size=256)
    ds = pydicom.dcmread(f)
    body = encode(ds, False, True)
    before, aborted_before = spool_files(node), n_aborted(node)
    peer = RawPeer(node.port)
    peer.command(1, CommandField=0x0001, MessageID=1, Priority=0, CommandDataSetType=0x0000,
                 AffectedSOPClassUID=CTImageStorage, AffectedSOPInstanceUID=ds.SOPInstanceUID)
    half = len(body) // 2
    for i in range(0, half, 16000):
        peer.pdata(1, 0x00, body[i:min(i + 16000, half)])
    peer.send(struct.pack(">BBI", ABORT, 0, 4) + b"\x00\x00\x00\x00")
    peer.close()
    wait_for(lambda: n_aborted(node) == aborted_before + 1, 5)  # the node has seen the abort
    assert spool_files(node) == before, "an instance that was never acknowledged must leave no file"
    assert storescu(node.port, [f]).returncode == 0
    stored = [p for p in spool_files(node) if p.name == f"{ds.SOPInstanceUID}.dcm"]
    assert len(stored) == 1
    assert pydicom.dcmread(stored[0]).PixelData == ds.PixelData


def test_async_window_and_role_selection_are_answered(node: NodeProcess, tmp_path: Path) -> None:
    ae = AE(ae_title="MODALITY1")
    ae.add_requested_context(CTImageStorage, ImplicitVRLittleEndian)
    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked = window.maximum_number_operations_performed = 5
    assoc = ae.associate("127.0.0.1", node.port, ae_title="AINODE",
                         ext_neg=[window, build_role(CTImageStorage, scu_role=True, scp_role=False)])
    assert assoc.is_established
    assert assoc.acceptor.asynchronous_operations == (1, 1)
    assert str(assoc.acceptor.implementation_class_uid) == IMPLEMENTATION_UID
    (f,) = ct_series(tmp_path, 1, size=16)
    assert assoc.send_c_store(pydicom.dcmread(f)).Status == 0x0000
    assoc.release()
    stored = [p for p in spool_files(node) if p.name == f"{pydicom.dcmread(f).SOPInstanceUID}.dcm"]
    assert pydicom.dcmread(stored[0]).file_meta.TransferSyntaxUID == ImplicitVRLittleEndian


def test_association_limit_rejects_transiently_and_recovers(node_factory, tmp_path: Path) -> None:
    n = node_factory(max_associations=1)
    ae = AE(ae_title="MODALITY1")
    ae.add_requested_context(Verification)
    first = ae.associate("127.0.0.1", n.port, ae_title="AINODE")
    assert first.is_established
    second = scu.associate(ae, "127.0.0.1", n.port, ae_title="AINODE")
    assert second.is_rejected
    rj = second.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)
    first.release()
    wait_for(lambda: (a := ae.associate("127.0.0.1", n.port, ae_title="AINODE")).is_established and (
        a.release() or True), 5)
    wait_for(lambda: "node.max_associations" in n.log_text(), 5)


def test_a_large_instance_streams_to_disk_without_being_held_in_memory(node: NodeProcess) -> None:
    frames, size = 200, 512  # 100 MiB of pixel data in one instance
    ds = pydicom.dcmread(ct_series(node.tmp / "big", 1, size=size)[0])
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT: multi-frame
    ds.SOPInstanceUID = generate_uid()
    ds.NumberOfFrames = frames
    pixels = np.random.default_rng(3).integers(0, 4000, (frames, size, size), dtype=np.uint16)
    ds.PixelData = pixels.tobytes()
    digest = hashlib.sha256(ds.PixelData).hexdigest()

    def peak_rss_mb() -> float:
        status = Path(f"/proc/{node.proc.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) / 1024

    before = peak_rss_mb()
    ae = AE(ae_title="MODALITY1")
    ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="AINODE")
    assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()
    grew = peak_rss_mb() - before
    assert grew < 40, f"listener peak memory grew {grew:.0f} MB for a 100 MB instance"
    (stored,) = [p for p in spool_files(node) if p.name == f"{ds.SOPInstanceUID}.dcm"]
    assert hashlib.sha256(pydicom.dcmread(stored).PixelData).hexdigest() == digest


def test_parallel_associations_racing_on_the_same_instances_store_each_once(node: NodeProcess, tmp_path: Path) -> None:
    study = generate_uid()
    series = [ct_series(tmp_path / f"s{i}", 30, size=64, study_uid=study, seed=i) for i in range(3)]
    senders = [subprocess.Popen([STORESCU, "-aet", "MODALITY1", "-aec", "AINODE", "127.0.0.1", str(node.port),
                                 *map(str, files)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
               for files in (*series, series[0], series[0])]  # series 0 three times at once
    assert all(s.wait(120) == 0 for s in senders)
    stored = [p for p in spool_files(node) if p.parts[-3] == study]
    assert len(stored) == 90
    sent = {pydicom.dcmread(f).SOPInstanceUID: pydicom.dcmread(f).PixelData for files in series for f in files}
    assert {p.stem for p in stored} == set(sent)
    assert all(pydicom.dcmread(p).PixelData == sent[p.stem] for p in stored)
    assert node.study(study)["instances"] == 90, "each instance indexed once"


def test_a_stray_response_with_a_data_set_is_drained_not_answered(node: NodeProcess) -> None:
    peer = RawPeer(node.port)
    peer.command(1, CommandField=0x8001, MessageIDBeingRespondedTo=5, CommandDataSetType=0x0000, Status=0,
                 AffectedSOPClassUID=CTImageStorage)  # a C-STORE-RSP, as if we had asked for something
    peer.pdata(1, 0x02, b"\x08\x00\x60\x00CS\x02\x00CT")
    peer.command(3, CommandField=0x0030, MessageID=9, CommandDataSetType=0x0101, AffectedSOPClassUID=Verification)
    rsp = peer.response()  # the first thing back answers the echo: nothing answered the stray response
    assert (rsp.CommandField, rsp.MessageIDBeingRespondedTo, rsp.Status) == (0x8030, 9, 0x0000)
    peer.release()
    peer.close()


@pytest.mark.parametrize("sop_uid", ["../../etc/passwd", "1.2.03", "1." + "9" * 70])
def test_hostile_sop_instance_uid_in_the_request_is_refused_and_drained(node: NodeProcess, tmp_path: Path,
                                                                        sop_uid: str) -> None:
    (f,) = ct_series(tmp_path, 1, size=64)
    ds = pydicom.dcmread(f)
    ds.SOPInstanceUID = sop_uid
    body = encode(ds, False, True)
    before = spool_files(node)
    peer = RawPeer(node.port)
    peer.command(1, CommandField=0x0001, MessageID=3, Priority=0, CommandDataSetType=0x0000,
                 AffectedSOPClassUID=CTImageStorage, AffectedSOPInstanceUID=sop_uid)
    for i in range(0, len(body), 16000):
        peer.pdata(1, 0x02 if i + 16000 >= len(body) else 0x00, body[i:i + 16000])
    rsp = peer.response()
    assert (rsp.Status, rsp.ErrorComment) == (0xC000, "invalid SOPInstanceUID")
    peer.command(3, CommandField=0x0030, MessageID=4, CommandDataSetType=0x0101, AffectedSOPClassUID=Verification)
    assert peer.response().Status == 0x0000, "the association carries on"
    peer.release()
    peer.close()
    assert spool_files(node) == before


def test_a_malformed_command_set_aborts_the_association(node: NodeProcess) -> None:
    peer = RawPeer(node.port)
    peer.pdata(1, 0x03, struct.pack("<HHI", 0x0000, 0x0100, 2) + b"\x01\x00" + struct.pack("<HHI", 0, 0x0110, 400))
    assert peer.read_pdu()[0] == ABORT
    peer.close()
    wait_for(lambda: "command element runs past the command set" in node.log_text(), 5)
