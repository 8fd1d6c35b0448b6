"""A lean asyncio POS terminal for benchmarks and the soak: protocol v1's TerminalSession on a stream.

Unlike terminal_sim's PosTerminal it models no link (no delays, no losses, no retries): a load
generator measures the gateway, so every cost on this side is kept small, and a failure is
reported, never hidden by a retry. Every wait has a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
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
logoff_timeout_s = 5.0
read_chunk_bytes = 16_384
software_version = "vendgate-bench 1"
R = TypeVar("R", bound=ServerMessage)


class AioTerminal:
    __slots__ = ("_key", "_reader", "_sequence", "_session", "_writer", "business_date", "host", "port",
                 "terminal_id")

    def __init__(self, terminal_id: str, terminal_key: bytes, host: str, port: int, *, first_sequence: int = 0) -> None:
        self.terminal_id = terminal_id
        self._key = terminal_key
        self.host = host
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._session: TerminalSession | None = None
        self.business_date: date | None = None
        self._sequence = first_sequence

    @property
    def connected(self) -> bool:
        return self._session is not None

    async def logon(self) -> LogonAccepted:
        self.close()
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), connect_timeout_s)
        except (OSError, TimeoutError) as exc:
            raise LinkLost(f"connect: {type(exc).__name__}") from None
        self._session = TerminalSession(self.terminal_id, self._key)
        await self.request(LogonRequest(terminal_nonce=secrets.token_bytes(limits.nonce_bytes)), LogonChallenge)
        accepted = await self.request(LogonProof(software_version=software_version), LogonAccepted)
        self.business_date = accepted.business_date
        return accepted

    def next_transaction_id(self) -> ClientTransactionId:
        assert self.business_date is not None, "log on first"
        self._sequence += 1
        assert self._sequence <= limits.terminal_sequence_max, "a benchmark never needs more in one day"
        return ClientTransactionId(terminal_id=self.terminal_id, terminal_sequence=self._sequence,
                                   business_date=self.business_date)

    async def request(self, message: TerminalMessage, expected: type[R]) -> R:
        """One exchange; raises LinkLost, TerminalRefused (an ErrorReply) or the session's ProtocolError."""
        session, reader, writer = self._session, self._reader, self._writer
        if session is None or reader is None or writer is None:
            raise LinkLost("not connected")
        writer.write(session.send(message))
        try:
            while True:
                data = await asyncio.wait_for(reader.read(read_chunk_bytes), reply_timeout_s)
                if not data:
                    raise LinkLost("connection closed by the gateway")
                events = session.receive_data(data)
                if events:
                    break
        except (OSError, TimeoutError) as exc:
            self.close()
            raise LinkLost(type(exc).__name__) from None
        except Exception:
            self.close()
            raise
        event = events[0]
        assert isinstance(event, MessageReceived)
        reply = event.message
        if isinstance(reply, ErrorReply):
            if reply.connection_closing:
                self.close()
            raise TerminalRefused(reply.response_code, reply.detail)
        if not isinstance(reply, expected):
            self.close()
            raise TerminalRefused(ResponseCode.FORMAT_ERROR, f"unexpected {type(reply).__name__}")
        return reply

    async def logoff(self) -> None:
        if self._session is not None and self._session.state is TerminalState.READY:
            with contextlib.suppress(LinkLost, TerminalRefused, TimeoutError, OSError):
                await asyncio.wait_for(self.request(LogoffRequest(), LogoffReply), logoff_timeout_s)
        self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = self._session = None
