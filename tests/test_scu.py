"""Associations we request (node.scu) against a real DCMTK peer: a response taken by pynetdicom's
reactor thread still reaches the sender.

The race (node/scu.py, point 3) needs a loaded machine to happen by itself; it showed twice in the suite
under load as "Received unexpected C-STORE service message", a closed association and, once, the object
stored twice. Here its interleaving is played with real messages: the request goes out, the peer's
response is handed to the handler the reactor calls, and only then does the sender wait for it.
"""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, build_context
from pynetdicom.dimse_primitives import C_ECHO
from pynetdicom.sop_class import CTImageStorage, Verification
from support.dcmtk import StoreSCP
from support.dicomgen import ct_series

from node import scu


def test_a_response_the_reactor_takes_reaches_the_sender(tmp_path: Path) -> None:
    files = ct_series(tmp_path / "ct", 1, size=16)
    with StoreSCP(tmp_path / "pacs", aet="PACS") as pacs:
        ae = AE(ae_title="AINODE")
        ae.dimse_timeout = 5
        contexts = [build_context(Verification), build_context(CTImageStorage, ExplicitVRLittleEndian)]
        assoc = scu.associate(ae, "127.0.0.1", pacs.port, ae_title="PACS", contexts=contexts)
        assert assoc.is_established
        try:
            assoc._reactor_checkpoint.clear()  # keep the real reactor out of the way: we play its part
            while not assoc._is_paused:
                time.sleep(0.001)
            time.sleep(0.05)
            req = C_ECHO()
            req.MessageID = 7
            req.AffectedSOPClassUID = Verification
            cx = next(c for c in assoc.accepted_contexts if c.abstract_syntax == Verification)
            assoc.dimse.send_msg(req, cx.context_id)
            deadline = time.monotonic() + 5
            while assoc.dimse.msg_queue.empty() and time.monotonic() < deadline:
                time.sleep(0.001)
            context_id, rsp = assoc.dimse.get_msg(block=False)  # what the reactor's get_msg takes...
            assert rsp is not None and rsp.MessageIDBeingRespondedTo == 7
            assoc._serve_request(rsp, context_id)  # ...and hands to its handler
            _, got = assoc.dimse.get_msg(block=True)  # the sender, waiting as send_c_echo does
            assert got is not None, "the response the reactor took never reached the sender"
            assert got.MessageIDBeingRespondedTo == 7 and got.Status == 0x0000
            assoc._reactor_checkpoint.set()
            status = assoc.send_c_store(pydicom.dcmread(files[0]))  # nothing stale left behind
            assert status.Status == 0x0000
        finally:
            assoc._reactor_checkpoint.set()
            assoc.release()
        assert len(pacs.files()) == 1
