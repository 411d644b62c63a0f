"""DICOM upper layer, acceptor side: association negotiation, P-DATA, C-ECHO and C-STORE.

Why not pynetdicom's ``AE.start_server`` here: its acceptor runs two threads per association that
poll each other through queues with a 1 ms sleep in every loop, and it holds each whole data set in
memory. On two cores that alone held ingest to about a quarter of DCMTK's ``storescp``. This module
runs one blocking thread per association and streams data set fragments to the spool file as they
arrive, so memory stays flat whatever the instance size. The protocol knowledge that is easy to get
wrong (A-ASSOCIATE PDU codecs, presentation context and role negotiation) is still pynetdicom's,
and pynetdicom remains our SCU for delivery and echo.

Scope (PS3.7, PS3.8): one outstanding operation (an asynchronous operations window request is
answered 1/1), C-ECHO and C-STORE served, any other request answered "unrecognised operation".
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Protocol

from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from node import __version__
from node.admission import Admission, Limits
from node.dimse import (
    ABORT_UNEXPECTED_PDU,
    C_ECHO_RQ,
    C_STORE_RQ,
    NO_DATASET,
    TAG_AFFECTED_SOP_CLASS,
    TAG_AFFECTED_SOP_INSTANCE,
    TAG_COMMAND_FIELD,
    TAG_DATASET_TYPE,
    TAG_MESSAGE_ID,
    TAG_PRIORITY,
    UNRECOGNISED_OPERATION,
    ProtocolError,
    _answerable,
    decode_command,
    encode_response,
)

log = logging.getLogger(__name__)

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
# A stable, registered-free UID (PS3.5 B.2) that names this implementation in every association
IMPLEMENTATION_UID = "2.25." + str(uuid.uuid5(uuid.NAMESPACE_OID, "ainode.implementation").int)
IMPLEMENTATION_VERSION = f"AINODE_{__version__}"[:16]

# PDU types (PS3.8 9.3)
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA, RELEASE_RQ, RELEASE_RP, ABORT = range(1, 8)
# Longest PDU bodies accepted (PS3.8 9.3): a peer that declares more is aborted before anything is
# allocated for it. An A-ASSOCIATE-RQ with every storage class and 13 transfer syntaxes is ~40 kB.
MAX_ASSOCIATE_PDU = 64 << 10
FIXED_PDU_LENGTH = {RELEASE_RQ: 4, RELEASE_RP: 4, ABORT: 4}
MAX_COMMAND_SET = 1 << 16     # command sets are a few hundred bytes
CHUNK = 1 << 20               # data set fragments are streamed in pieces of at most this

# A-ASSOCIATE-RJ (result, source, reason) and A-ABORT reasons (PS3.8 9.3.4, 9.3.8)
REJECT_APPLICATION_CONTEXT = (0x01, 0x01, 0x02)
REJECT_PROTOCOL_VERSION = (0x01, 0x02, 0x02)
REJECT_TOO_MANY = (0x02, 0x03, 0x02)


class PeerGone(Exception):
    """The connection closed, or went silent past the network timeout."""


@dataclass
class Association:
    calling_ae: str
    called_ae: str
    host: str
    port: int
    peer_max_pdu: int = 0
    contexts: dict[int, tuple[str, str]] = field(default_factory=dict)  # id -> (abstract, transfer syntax)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass(frozen=True)
class StoreRequest:
    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    priority: int


class DatasetSink(Protocol):
    """Receives one C-STORE data set fragment by fragment; must not raise."""

    def write(self, data: memoryview) -> None: ...

    def finish(self) -> tuple[int, str]:
        """All fragments are in: store durably and return (status, error comment)."""
        ...

    def discard(self) -> None:
        """The association ended before the last fragment: nothing of this instance may remain."""
        ...


class ServiceHandler(Protocol):
    def policy(self, assoc: Association) -> tuple[int, int, int] | None:
        """None accepts; a (result, source, reason) triple rejects."""
        ...

    def accepted(self, assoc: Association) -> None: ...

    def begin_store(self, assoc: Association, request: StoreRequest) -> DatasetSink: ...

    def ended(self, assoc: Association, how: str) -> None:
        """``how`` is released, aborted or lost."""
        ...


class _Discard:
    """Drains the data set of an operation we do not serve."""

    def write(self, data: memoryview) -> None:
        pass

    def finish(self) -> tuple[int, str]:
        return UNRECOGNISED_OPERATION, ""

    def discard(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------- one association
class _Connection:
    def __init__(self, server: AcceptorServer, sock: socket.socket, address: tuple[str, int]):
        self.server = server
        self.sock = sock
        self.address = address
        self.assoc: Association | None = None
        self.deadline: float | None = None  # until the A-ASSOCIATE-RQ is complete (node.handshake_timeout_s)
        self.buf = bytearray(CHUNK)
        self.view = memoryview(self.buf)

    # ------------------------------------------------------------------ socket
    def _recv_into(self, view: memoryview) -> None:
        got, n = 0, len(view)
        while got < n:
            if self.deadline is not None:  # the whole handshake has one deadline, however slow the bytes
                left = self.deadline - time.monotonic()
                if left <= 0:
                    self._handshake_too_slow()
                self.sock.settimeout(min(left, self.server.acse_timeout))
            try:
                k = self.sock.recv_into(view[got:], n - got)
            except TimeoutError as exc:
                if self.deadline is not None and time.monotonic() >= self.deadline:
                    self._handshake_too_slow()
                raise PeerGone(str(exc) or type(exc).__name__) from exc
            except OSError as exc:
                raise PeerGone(str(exc) or type(exc).__name__) from exc
            if k == 0:
                raise PeerGone("connection closed by peer")
            got += k

    def _handshake_too_slow(self) -> None:
        log.info("closing connection from %s: no A-ASSOCIATE-RQ within %.0f s (node.handshake_timeout_s)",
                 self.address[0], self.server.admission.limits.handshake_timeout_s)
        raise PeerGone("no complete A-ASSOCIATE-RQ in time")

    def _recv(self, n: int) -> bytes:
        if n <= CHUNK:
            self._recv_into(self.view[:n])
            return bytes(self.view[:n])
        out = bytearray(n)
        self._recv_into(memoryview(out))
        return bytes(out)

    def _send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise PeerGone(str(exc)) from exc

    def _abort(self, reason: int) -> None:
        pdu = A_ABORT_RQ()
        pdu.source, pdu.reason_diagnostic = 0x02, reason
        try:
            self.sock.sendall(pdu.encode())
        except OSError:
            pass

    def _pdu_header(self) -> tuple[int, int]:
        """Type and length of the next PDU, its length checked against what that type may carry."""
        pdu_type, _, length = struct.unpack(">BBI", self._recv(6))
        fixed = FIXED_PDU_LENGTH.get(pdu_type)
        if fixed is not None and length != fixed:
            raise ProtocolError(f"PDU type 0x{pdu_type:02X} declares {length} bytes ({fixed} allowed)")
        if pdu_type == ASSOCIATE_RQ and length > MAX_ASSOCIATE_PDU:
            raise ProtocolError(f"A-ASSOCIATE-RQ declares {length} bytes ({MAX_ASSOCIATE_PDU} allowed)")
        if pdu_type == P_DATA and self.server.max_pdu and length > self.server.max_pdu:
            raise ProtocolError(f"P-DATA-TF declares {length} bytes (we announced {self.server.max_pdu})")
        return pdu_type, length

    # ------------------------------------------------------------------ lifecycle
    def run(self) -> None:
        how = "lost"
        try:
            self._setup_socket()
            if self._negotiate():
                how = self._serve()
        except PeerGone as exc:
            log.debug("association from %s ended: %s", self.address[0], exc)
        except ProtocolError as exc:
            log.warning("aborting association from %s port %d: %s", self.address[0], self.address[1], exc)
            self._abort(exc.reason)
            how = "aborted"
        except Exception:
            log.exception("association from %s failed", self.address[0])
            self._abort(0x00)
            how = "aborted"
        finally:
            try:
                self.sock.close()
            except OSError:
                pass
            self.server._forget(self)
            if self.assoc is not None:
                try:
                    self.server.handler.ended(self.assoc, how)
                except Exception:
                    log.exception("association end handler failed")

    def close(self) -> None:
        """From another thread (shutdown): the blocked recv returns and the thread ends."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _setup_socket(self) -> None:
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(self.server.acse_timeout)
        if self.server.ssl_context is not None:
            try:
                self.sock = self.server.ssl_context.wrap_socket(self.sock, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                log.warning("TLS handshake with %s failed: %s", self.address[0], exc)
                raise PeerGone("TLS handshake failed") from exc

    # ------------------------------------------------------------------ association establishment
    def _negotiate(self) -> bool:
        pdu_type, length = self._pdu_header()
        if pdu_type != ASSOCIATE_RQ:
            raise ProtocolError(f"expected A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02X}", ABORT_UNEXPECTED_PDU)
        raw = struct.pack(">BBI", pdu_type, 0, length) + self._recv(length)
        self.deadline = None
        self.sock.settimeout(self.server.acse_timeout)
        rq = A_ASSOCIATE_RQ()
        try:
            rq.decode(raw)
            primitive = rq.to_primitive()
        except Exception as exc:
            raise ProtocolError(f"A-ASSOCIATE-RQ cannot be decoded: {exc}") from exc
        assoc = Association(calling_ae=str(primitive.calling_ae_title).strip(),
                            called_ae=str(primitive.called_ae_title).strip(),
                            host=self.address[0], port=self.address[1],
                            peer_max_pdu=int(primitive.maximum_length_received or 0))
        reject = self._check(rq, primitive, assoc)
        if reject is not None:
            rj_primitive = A_ASSOCIATE()
            rj_primitive.result, rj_primitive.result_source, rj_primitive.diagnostic = reject
            rj = A_ASSOCIATE_RJ()
            rj.from_primitive(rj_primitive)
            self._send(rj.encode())
            return False
        self._send(self._accept(primitive, assoc))
        self.assoc = assoc
        self.sock.settimeout(self.server.network_timeout)
        self.server.handler.accepted(assoc)
        return True

    def _check(self, rq: A_ASSOCIATE_RQ, primitive: A_ASSOCIATE, assoc: Association) -> tuple[int, int, int] | None:
        if not rq.protocol_version & 0x01:
            return REJECT_PROTOCOL_VERSION
        if str(primitive.application_context_name) != APPLICATION_CONTEXT:
            return REJECT_APPLICATION_CONTEXT
        reject = self.server.handler.policy(assoc)
        if reject is not None:
            return reject
        if not self.server.admission.admit(self):
            log.warning("rejected association from %s@%s: %d associations already open (node.max_associations)",
                        assoc.calling_ae, assoc.host, self.server.max_associations)
            return REJECT_TOO_MANY
        return None

    def _accept(self, rq: A_ASSOCIATE, assoc: Association) -> bytes:
        roles = {item.sop_class_uid: (item.scu_role, item.scp_role) for item in rq.user_information
                 if isinstance(item, SCP_SCU_RoleSelectionNegotiation)}
        results, role_items = negotiate_as_acceptor(rq.presentation_context_definition_list,
                                                    self.server.contexts, roles)
        assoc.contexts = {int(cx.context_id): (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                          for cx in results if cx.result == 0x00}
        ac = A_ASSOCIATE()
        ac.application_context_name = APPLICATION_CONTEXT
        ac.calling_ae_title = rq.calling_ae_title
        ac.called_ae_title = rq.called_ae_title
        ac.result, ac.result_source = 0x00, 0x01
        ac.presentation_context_definition_results_list = results
        max_len = MaximumLengthNotification()
        max_len.maximum_length_received = self.server.max_pdu
        impl_uid = ImplementationClassUIDNotification()
        impl_uid.implementation_class_uid = IMPLEMENTATION_UID
        impl_version = ImplementationVersionNameNotification()
        impl_version.implementation_version_name = IMPLEMENTATION_VERSION
        info: list = [max_len, impl_uid, impl_version, *role_items]
        if any(isinstance(i, AsynchronousOperationsWindowNegotiation) for i in rq.user_information):
            window = AsynchronousOperationsWindowNegotiation()
            window.maximum_number_operations_invoked = window.maximum_number_operations_performed = 1
            info.append(window)
        ac.user_information = info
        pdu = A_ASSOCIATE_AC()
        pdu.from_primitive(ac)
        return pdu.encode()

    # ------------------------------------------------------------------ data transfer
    def _serve(self) -> str:
        assert self.assoc is not None
        command = bytearray()
        pending: tuple[dict[int, int | str], int, DatasetSink] | None = None  # awaiting its data set
        try:
            while True:
                pdu_type, length = self._pdu_header()
                if pdu_type == P_DATA:
                    pending = self._p_data(length, command, pending)
                elif pdu_type == RELEASE_RQ:
                    self._recv(length)  # 4 bytes: checked by _pdu_header
                    self._send(struct.pack(">BBI", RELEASE_RP, 0, 4) + b"\x00" * 4)
                    return "released"
                elif pdu_type == ABORT:
                    self._recv(length)
                    return "aborted"
                else:
                    raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02X}", ABORT_UNEXPECTED_PDU)
        finally:
            if pending is not None:
                pending[2].discard()

    def _p_data(self, length: int, command: bytearray,
                pending: tuple[dict[int, int | str], int, DatasetSink] | None
                ) -> tuple[dict[int, int | str], int, DatasetSink] | None:
        assert self.assoc is not None
        remaining = length
        while remaining > 0:
            item_len, context_id, control = struct.unpack(">IBB", self._recv(6))
            remaining -= 4 + item_len
            if item_len < 2 or remaining < 0:
                raise ProtocolError("PDV item length does not fit its P-DATA-TF")
            if context_id not in self.assoc.contexts:
                raise ProtocolError(f"presentation context {context_id} was not accepted")
            size = item_len - 2
            if control & 0x01:  # command fragment
                if pending is not None:
                    raise ProtocolError("command fragment while a data set was expected", ABORT_UNEXPECTED_PDU)
                if len(command) + size > MAX_COMMAND_SET:
                    raise ProtocolError("command set too long")
                command += self._recv(size)
                if control & 0x02:
                    pending = self._command(decode_command(bytes(command)), context_id)
                    command.clear()
            else:
                if pending is None or pending[1] != context_id:
                    raise ProtocolError("data set fragment without its command", ABORT_UNEXPECTED_PDU)
                sink = pending[2]
                while size > 0:
                    n = min(size, CHUNK)
                    self._recv_into(self.view[:n])
                    sink.write(self.view[:n])
                    size -= n
                if control & 0x02:
                    request = pending[0]
                    pending = None  # from here on the sink owns the outcome; never discard it
                    status, comment = sink.finish()
                    if _answerable(int(request.get(TAG_COMMAND_FIELD, 0))):
                        self._respond(request, context_id, status, comment)
        return pending

    def _command(self, cmd: dict[int, int | str], context_id: int
                 ) -> tuple[dict[int, int | str], int, DatasetSink] | None:
        assert self.assoc is not None
        field_ = int(cmd.get(TAG_COMMAND_FIELD, 0))
        has_dataset = int(cmd.get(TAG_DATASET_TYPE, NO_DATASET)) != NO_DATASET
        if field_ == C_STORE_RQ and has_dataset:
            request = StoreRequest(message_id=int(cmd.get(TAG_MESSAGE_ID, 0)),
                                   sop_class_uid=str(cmd.get(TAG_AFFECTED_SOP_CLASS, "")),
                                   sop_instance_uid=str(cmd.get(TAG_AFFECTED_SOP_INSTANCE, "")),
                                   transfer_syntax=self.assoc.contexts[context_id][1],
                                   priority=int(cmd.get(TAG_PRIORITY, 0)))
            return cmd, context_id, self.server.handler.begin_store(self.assoc, request)
        if field_ == C_ECHO_RQ and not has_dataset:
            self._respond(cmd, context_id, 0x0000)
            return None
        if not _answerable(field_):
            return (cmd, context_id, _Discard()) if has_dataset else None
        log.warning("%s@%s sent DIMSE command 0x%04X, which this node does not serve", self.assoc.calling_ae,
                    self.assoc.host, field_)
        if has_dataset:
            return cmd, context_id, _Discard()
        self._respond(cmd, context_id, UNRECOGNISED_OPERATION)
        return None

    def _respond(self, request: dict[int, int | str], context_id: int, status: int, comment: str = "") -> None:
        assert self.assoc is not None
        data = encode_response(int(request.get(TAG_COMMAND_FIELD, 0)), request, status, comment)
        limit = self.assoc.peer_max_pdu - 6 if self.assoc.peer_max_pdu else len(data)
        limit = max(limit, 1)
        pdus = []
        for start in range(0, len(data), limit):
            frag = data[start:start + limit]
            control = 0x03 if start + limit >= len(data) else 0x01
            pdus.append(struct.pack(">BBIIBB", P_DATA, 0, len(frag) + 6, len(frag) + 2, context_id, control) + frag)
        self._send(b"".join(pdus))


# ---------------------------------------------------------------------------------------------- the server
class AcceptorServer:
    def __init__(self, address: tuple[str, int], handler: ServiceHandler, contexts: list[PresentationContext], *,
                 max_pdu: int = 0, max_associations: int = 32, ssl_context: ssl.SSLContext | None = None,
                 acse_timeout: float = 30, network_timeout: float = 60, limits: Limits | None = None):
        self.handler = handler
        self.contexts = contexts
        self.max_pdu = max_pdu
        self.max_associations = max_associations
        self.admission = Admission(limits or Limits(max_associations=max_associations))
        self.ssl_context = ssl_context
        self.acse_timeout = acse_timeout
        self.network_timeout = network_timeout
        self._stopping = False
        self._listener = socket.create_server(address, reuse_port=False, backlog=64)
        self.server_address = self._listener.getsockname()
        self._thread = threading.Thread(target=self._accept_loop, name="ainode-acceptor", daemon=True)

    def start(self) -> None:
        self._thread.start()
        threading.Thread(target=self._artim, name="ainode-artim", daemon=True).start()

    def _artim(self) -> None:
        """Closes connections past their handshake deadline even while blocked outside ``_recv_into``
        (a TLS handshake that trickles in)."""
        while not self._stopping:
            time.sleep(0.5)
            for conn in self.admission.overdue():
                if conn.deadline is not None:  # type: ignore[attr-defined]
                    log.info("closing connection from %s: no A-ASSOCIATE-RQ within %.0f s (node.handshake_timeout_s)",
                             conn.address[0], self.admission.limits.handshake_timeout_s)
                    conn.close()

    def active_count(self) -> int:
        """Accepted associations (connections still negotiating are not counted)."""
        return self.admission.associations()

    def _accept_loop(self) -> None:
        while not self._stopping:
            try:
                sock, address = self._listener.accept()
            except OSError as exc:
                if self._stopping:
                    return
                log.error("cannot accept a connection: %s", exc)  # e.g. out of file descriptors
                time.sleep(0.1)
                continue
            conn = _Connection(self, sock, address[:2])
            conn.deadline = self.admission.arrived(conn)
            threading.Thread(target=conn.run, name=f"ainode-assoc-{address[0]}:{address[1]}", daemon=True).start()

    def _forget(self, conn: _Connection) -> None:
        self.admission.gone(conn)

    def shutdown(self, timeout: float = 5) -> None:
        """Stop accepting, then cut open associations: an instance not yet acknowledged was never ours."""
        self._stopping = True
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        self._thread.join(timeout)
        for conn in self.admission.everyone():
            conn.close()
