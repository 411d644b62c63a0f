"""Hostile peers (issue 10, items 2 and 3): PDU lengths that would eat the listener's memory, and strangers
who open connections and never associate. A real ``ainode run`` is attacked over real sockets; a real
modality (DCMTK ``storescu``) must still get its study in.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from pathlib import Path

import pydicom
from support.dicomgen import ct_series
from support.node import NodeProcess, storescu, wait_for
from test_acceptor import RawPeer, node_still_serves

GIB = 1 << 30


def peak_rss_mb(node: NodeProcess) -> float:
    status = Path(f"/proc/{node.proc.pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) / 1024


def _attack(port: int, associate: bool, header: bytes, out: dict[str, bytes | None], key: str) -> None:
    """Send one PDU header declaring a huge body; if nothing comes back, send 96 MiB of that body."""
    peer = RawPeer(port, associate=associate)
    peer.send(header)
    peer.sock.settimeout(3)
    try:
        out[key] = peer._recv(10)
    except (TimeoutError, ConnectionError, OSError):
        out[key] = None
        block = b"\x00" * (1 << 20)
        try:
            peer.sock.settimeout(30)
            for _ in range(96):
                peer.send(block)
        except OSError:
            pass
    peer.close()


def test_pdu_lengths_over_their_caps_are_aborted_before_anything_is_allocated(node_factory, tmp_path: Path) -> None:
    node = node_factory(max_pdu=65536)
    before = peak_rss_mb(node)
    cases = {
        "release-1": (True, struct.pack(">BBI", 0x05, 0, GIB)),
        "release-2": (True, struct.pack(">BBI", 0x05, 0, GIB)),
        "abort": (True, struct.pack(">BBI", 0x07, 0, GIB)),
        "p-data": (True, struct.pack(">BBI", 0x04, 0, 65536 + 6 + 1)),
        "associate": (False, struct.pack(">BBI", 0x01, 0, GIB)),
    }
    answers: dict[str, bytes | None] = {}
    threads = [threading.Thread(target=_attack, args=(node.port, assoc, header, answers, key))
               for key, (assoc, header) in cases.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    grew = peak_rss_mb(node) - before
    assert grew < 64, f"listener peak memory grew {grew:.0f} MiB under hostile PDU lengths"
    for key, answer in answers.items():
        assert answer is not None, f"{key}: no A-ABORT came back"
        pdu_type, _, length, source, reason = struct.unpack(">BBI2xBB", answer)
        assert (pdu_type, length, source, reason) == (0x07, 4, 0x02, 0x06), key
    log = wait_for(lambda: (t := node.log_text()).count("aborting association from 127.0.0.1 port") >= 5 and t, 10)
    assert "PDU type 0x05 declares 1073741824 bytes (4 allowed)" in log
    assert "P-DATA-TF declares 65543 bytes (we announced 65536)" in log
    assert "A-ASSOCIATE-RQ declares 1073741824 bytes (65536 allowed)" in log
    assert node_still_serves(node, tmp_path)


def _trickle(socks: list[socket.socket], stop: threading.Event, payload: bytes, every: float) -> None:
    """Slow loris: one byte of a real A-ASSOCIATE-RQ per socket per ``every`` seconds, never the whole PDU."""
    i = 0
    while not stop.wait(every) and i < len(payload) - 1:
        for s in socks:
            try:
                s.send(payload[i:i + 1])
            except OSError:
                pass
        i += 1


def test_idle_and_slow_loris_strangers_do_not_lock_out_a_modality(node_factory, tmp_path: Path) -> None:
    node = node_factory()  # default limits: 32 associations, handshake 10 s
    rq = RawPeer._associate_rq("STRANGER")
    idle = [socket.create_connection(("127.0.0.1", node.port), timeout=10) for _ in range(100)]
    loris = [socket.create_connection(("127.0.0.1", node.port), timeout=10) for _ in range(100)]
    stop = threading.Event()
    trickler = threading.Thread(target=_trickle, args=(loris, stop, rq, 0.5))
    trickler.start()
    try:
        time.sleep(1.0)  # the listener has accepted them all and they are trickling
        files = ct_series(tmp_path / "ct", 3, size=16)
        t0 = time.monotonic()
        r = storescu(node.port, files, check=False)
        took = time.monotonic() - t0
        assert r.returncode == 0, f"the modality was locked out: {r.stderr[-1000:]}"
        assert took < 2.0, f"storing 3 instances took {took:.1f} s while strangers held sockets"
    finally:
        stop.set()
        trickler.join(10)
        for s in idle + loris:
            s.close()
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    assert node.wait_study(study_uid, ("DONE",))["instances"] == 3
    wait_for(lambda: "too many connections without an association" in node.log_text(), 5)


def test_a_slow_loris_is_cut_at_the_handshake_deadline(node_factory) -> None:
    node = node_factory(handshake_timeout_s=2)
    rq = RawPeer._associate_rq("MODALITY1")
    sock = socket.create_connection(("127.0.0.1", node.port), timeout=10)
    t0 = time.monotonic()
    closed_after = None
    for i in range(len(rq) - 1):  # one byte every 0.25 s: each recv is quick, the handshake never ends
        try:
            sock.send(rq[i:i + 1])
        except OSError:
            closed_after = time.monotonic() - t0
            break
        sock.settimeout(0.25)
        try:
            if sock.recv(1) == b"":
                closed_after = time.monotonic() - t0
                break
        except TimeoutError:
            pass
        except OSError:
            closed_after = time.monotonic() - t0
            break
        if time.monotonic() - t0 > 12:
            break
    sock.close()
    assert closed_after is not None, "a connection trickling its A-ASSOCIATE-RQ was held for 12 s"
    assert 1.5 < closed_after < 8, closed_after
    wait_for(lambda: "node.handshake_timeout_s" in node.log_text(), 5)
