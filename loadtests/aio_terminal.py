"""A lean asyncio POS terminal for benchmarks and the soak: protocol v1's TerminalSession on a transport.

Unlike terminal_sim's PosTerminal it models no link (no delays, no losses, no retries): a load
generator measures the gateway, so every cost on this side is kept small, and a failure is
reported, never hidden by a retry. It sits on an asyncio Protocol rather than on streams: a
reply resolves the waiting request's future straight from data_received, with one timer per
request and no task per read. Every wait has a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from datetime import date
from typing import TypeVar, cast

from protocol import limits
from protocol.codes import ResponseCode
from protocol.errors import ProtocolError
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
software_version = "vendgate-bench 1"
R = TypeVar("R", bound=ServerMessage)


class _Link(asyncio.Protocol):
    """One connection: hands each reply (or the reason there is none) to the waiting request."""

    __slots__ = ("_session", "_waiter", "closed", "transport")

    def __init__(self, session: TerminalSession) -> None:
        self._session = session
        self._waiter: asyncio.Future[ServerMessage] | None = None
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass

    def expect(self, waiter: asyncio.Future[ServerMessage]) -> None:
        self._waiter = waiter

    def data_received(self, data: bytes) -> None:
        try:
            events = self._session.receive_data(data)
        except ProtocolError as exc:
            # The session is FAILED: hang up (the next request logs on afresh), and tell the
            # request waiting, if any, why.
            self._fail(exc)
            self.closed = True
            if self.transport is not None:
                self.transport.close()
            return
        waiter = self._waiter
        if events and waiter is not None and not waiter.done():
            event = events[0]
            assert isinstance(event, MessageReceived)
            self._waiter = None
            waiter.set_result(event.message)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(LinkLost("connection closed by the gateway"))

    def _fail(self, exc: BaseException) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)


class AioTerminal:
    __slots__ = ("_key", "_link", "_sequence", "_session", "business_date", "host", "port", "terminal_id")

    def __init__(self, terminal_id: str, terminal_key: bytes, host: str, port: int, *, first_sequence: int = 0) -> None:
        self.terminal_id = terminal_id
        self._key = terminal_key
        self.host = host
        self.port = port
        self._link: _Link | None = None
        self._session: TerminalSession | None = None
        self.business_date: date | None = None
        self._sequence = first_sequence

    @property
    def connected(self) -> bool:
        return self._session is not None

    async def logon(self) -> LogonAccepted:
        self.close()
        session = TerminalSession(self.terminal_id, self._key)
        loop = asyncio.get_running_loop()
        try:
            _, link = await asyncio.wait_for(
                loop.create_connection(lambda: _Link(session), self.host, self.port), connect_timeout_s)
        except (OSError, TimeoutError) as exc:
            raise LinkLost(f"connect: {type(exc).__name__}") from None
        self._link, self._session = link, session
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

    async def request(self, message: TerminalMessage, expected: type[R], *,
                      timeout_s: float = reply_timeout_s) -> R:
        """One exchange; raises LinkLost, TerminalRefused (an ErrorReply) or the session's ProtocolError."""
        session, link = self._session, self._link
        if session is None or link is None or link.closed or link.transport is None:
            self.close()
            raise LinkLost("not connected")
        try:
            frame = session.send(message)
        except ProtocolError:
            self.close()
            raise
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[ServerMessage] = loop.create_future()
        link.expect(waiter)
        link.transport.write(frame)
        timer = loop.call_later(timeout_s, _time_out, waiter)
        try:
            reply = await waiter
        except (OSError, TimeoutError, LinkLost) as exc:
            self.close()
            raise exc if isinstance(exc, LinkLost) else LinkLost(type(exc).__name__) from None
        except BaseException:
            self.close()
            raise
        finally:
            timer.cancel()
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
            with contextlib.suppress(LinkLost, TerminalRefused, ProtocolError, TimeoutError, OSError):
                await self.request(LogoffRequest(), LogoffReply, timeout_s=logoff_timeout_s)
        self.close()

    def close(self) -> None:
        if self._link is not None and self._link.transport is not None:
            self._link.transport.close()
        self._link = self._session = None


def _time_out(waiter: asyncio.Future[ServerMessage]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())
