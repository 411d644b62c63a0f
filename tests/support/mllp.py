"""A small MLLP listener for tests: a real TCP server that unwraps frames, parses HL7 and answers an ACK.

It plays the RIS / interface engine side, so notification tests exercise real sockets and framing.
The ACK codes it answers can be scripted (``acks=["AE", "AA"]``: first a negative ACK, then accept),
``silent=True`` accepts connections but never answers (a hung receiver), and ``ssl_context`` (a
server-side context) makes it an MLLP/S listener.
"""

from __future__ import annotations

import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Iterable

import hl7

SB, EB, CR = b"\x0b", b"\x1c", b"\x0d"


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        buf = b""
        sock: socket.socket = self.request
        sock.settimeout(10)
        while True:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, OSError):
                return
            if not chunk:
                return
            buf += chunk
            while EB in buf:
                frame, _, buf = buf.partition(EB)
                buf = buf.removeprefix(CR)
                start = frame.find(SB)
                raw = frame[start + 1:] if start >= 0 else frame
                self.server.listener._received(raw, sock)


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    listener: MLLPListener

    def get_request(self) -> tuple[socket.socket, object]:
        sock, addr = super().get_request()
        ctx = self.listener.ssl_context
        if ctx is not None:  # MLLP/S: the handshake happens here, before the handler sees the stream
            sock.settimeout(5)
            sock = ctx.wrap_socket(sock, server_side=True)
        return sock, addr


class MLLPListener:
    """``with MLLPListener() as rx: ...`` then ``rx.port``, ``rx.messages`` (parsed), ``rx.raw`` (bytes)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, acks: Iterable[str] = (), default_ack: str = "AA",
                 silent: bool = False, ssl_context: ssl.SSLContext | None = None):
        self.ssl_context = ssl_context
        self._server = _Server((host, port), _Handler)
        self._server.listener = self
        self.host, self.port = self._server.server_address[:2]
        self._acks = list(acks)
        self.default_ack = default_ack
        self.silent = silent
        self.messages: list[hl7.Message] = []
        self.raw: list[bytes] = []
        self.received_at: list[float] = []  # time.time() of each message, for latency measurements
        self.answered: list[str] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def _received(self, raw: bytes, sock: socket.socket) -> None:
        msg = hl7.parse(raw.decode("utf-8").strip("\r\n"))
        with self._cond:
            self.received_at.append(time.time())
            self.raw.append(raw)
            self.messages.append(msg)
            code = self._acks.pop(0) if self._acks else self.default_ack
            self.answered.append(code)
            self._cond.notify_all()
        if self.silent:
            return
        ack = msg.create_ack(code, application="TESTRIS", facility="TEST")
        sock.sendall(SB + str(ack).encode("utf-8") + EB + CR)

    def wait_for(self, n: int, timeout: float = 10.0) -> list[hl7.Message]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.messages) >= n, timeout):
                raise TimeoutError(f"expected {n} HL7 message(s), got {len(self.messages)}")
            return list(self.messages)

    def start(self) -> MLLPListener:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> MLLPListener:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
