"""A POS terminal over a blocking socket: protocol v1's sans-IO TerminalSession, nothing else.

Written for locust, whose gevent patches the socket module so that this blocking code yields to
other users while it waits; it works unpatched too (one terminal per thread). Every wait has a
timeout and every read is bounded. A reply that never comes or a dropped connection is LinkLost;
an ErrorReply is TerminalRefused (closing or not, as it said); a bad frame is a ProtocolError
from the session, after which the terminal hangs up, as a real one would.
"""

from __future__ import annotations

import secrets
import socket
import time
from datetime import date
from typing import TypeVar

from protocol import limits
from protocol.codes import ResponseCode
from protocol.messages import (
    ClientTransactionId,
    ErrorReply,
    LogoffReply,
    LogoffRequest,
    LogonAccepted,
    LogonChallenge,
    LogonProof,
    LogonRequest,
    ServerMessage,
    TerminalMessage,
)
from protocol.session import MessageReceived, TerminalSession, TerminalState
from terminal_sim.client import LinkLost, TerminalRefused

connect_timeout_s = 10.0
reply_timeout_s = 30.0
read_chunk_bytes = 16_384
software_version = "vendgate-locust 1"
R = TypeVar("R", bound=ServerMessage)


class PosClient:
    """One terminal, one connection at a time, one request in flight (lock step)."""

    def __init__(self, terminal_id: str, terminal_key: bytes, host: str, port: int, *,
                 reply_timeout: float = reply_timeout_s, first_sequence: int = 0) -> None:
        self.terminal_id = terminal_id
        self._key = terminal_key
        self.host = host
        self.port = port
        self.reply_timeout = reply_timeout
        self._socket: socket.socket | None = None
        self._session: TerminalSession | None = None
        self.business_date: date | None = None
        self._sequence = first_sequence
        self.bytes_received = 0

    @property
    def connected(self) -> bool:
        return self._session is not None

    def logon(self) -> LogonAccepted:
        self.close()
        try:
            self._socket = socket.create_connection((self.host, self.port), timeout=connect_timeout_s)
        except OSError as exc:
            raise LinkLost(f"connect: {type(exc).__name__}") from None
        self._socket.settimeout(self.reply_timeout)
        self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._session = TerminalSession(self.terminal_id, self._key)
        self.request(LogonRequest(terminal_nonce=secrets.token_bytes(limits.nonce_bytes)), LogonChallenge)
        accepted = self.request(LogonProof(software_version=software_version), LogonAccepted)
        self.business_date = accepted.business_date
        return accepted

    def logoff(self) -> None:
        # A user stopped mid-request (locust ends a run by killing its greenlets) just hangs up.
        if self._session is not None and self._session.state is TerminalState.READY:
            try:
                self.request(LogoffRequest(), LogoffReply)
            except (LinkLost, TerminalRefused):
                pass
        self.close()

    def close(self) -> None:
        if self._socket is not None:
            try:
                self._socket.close()
            except OSError:
                pass
        self._socket = self._session = None

    def next_transaction_id(self) -> ClientTransactionId:
        assert self.business_date is not None, "log on first"
        if self._sequence >= limits.terminal_sequence_max:
            raise TerminalRefused(ResponseCode.FORMAT_ERROR, "terminal sequence exhausted for this business day")
        self._sequence += 1
        return ClientTransactionId(terminal_id=self.terminal_id, terminal_sequence=self._sequence,
                                   business_date=self.business_date)

    def request(self, message: TerminalMessage, expected: type[R]) -> R:
        """Send one message and wait for its reply; raises LinkLost, TerminalRefused or ProtocolError."""
        if self._session is None or self._socket is None:
            raise LinkLost("not connected")
        frame = self._session.send(message)
        try:
            self._socket.sendall(frame)
        except OSError as exc:
            self.close()
            raise LinkLost(f"send: {type(exc).__name__}") from None
        reply = self._read_reply()
        if isinstance(reply, ErrorReply):
            if reply.connection_closing:
                self.close()
            raise TerminalRefused(reply.response_code, reply.detail)
        if not isinstance(reply, expected):
            self.close()
            raise TerminalRefused(ResponseCode.FORMAT_ERROR, f"unexpected {type(reply).__name__}")
        return reply

    def _read_reply(self) -> ServerMessage:
        assert self._session is not None and self._socket is not None
        deadline = time.monotonic() + self.reply_timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.close()
                raise LinkLost("reply timeout")
            try:
                self._socket.settimeout(remaining)
                data = self._socket.recv(read_chunk_bytes)
            except TimeoutError:
                self.close()
                raise LinkLost("reply timeout") from None
            except OSError as exc:
                self.close()
                raise LinkLost(f"receive: {type(exc).__name__}") from None
            if not data:
                self.close()
                raise LinkLost("connection closed by the gateway")
            self.bytes_received += len(data)
            try:
                events = self._session.receive_data(data)
            except Exception:
                self.close()
                raise
            for event in events:
                if isinstance(event, MessageReceived):
                    return event.message
