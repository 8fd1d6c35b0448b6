"""An asyncio POS terminal over protocol v1, with a model of a slow, lossy GPRS link.

Depends on protocol/ only: this is what a terminal vendor writes. A payment whose reply is
lost (its connection drops, the whole reply is not in within reply_timeout_s, or it fails the
protocol's checks) is retried on a new connection with the SAME client transaction id, a bounded
number of times; the gateway answers a retry with the stored reply. A reply that ends the session
(a goodbye read with it) closes the connection: the next request logs on again.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
from dataclasses import dataclass
from datetime import date
from typing import TypeVar

from protocol.codes import ResponseCode
from protocol.errors import ProtocolError
from protocol.messages import (
    Advice,
    AdviceBatchRequest,
    AdviceBatchResult,
    ClientTransactionId,
    EndOfDayRequest,
    EndOfDayResult,
    ErrorReply,
    FloatInquiryRequest,
    FloatInquiryResult,
    LogoffReply,
    LogoffRequest,
    LogonAccepted,
    LogonChallenge,
    LogonProof,
    LogonRequest,
    LookupRequest,
    LookupResult,
    ReprintRequest,
    ReprintResult,
    ReversalReason,
    ReversalRequest,
    ReversalResult,
    ServerMessage,
    TenderType,
    TerminalMessage,
    TopUpRequest,
    TopUpResult,
)
from protocol.session import MessageReceived, TerminalSession, TerminalState

# Longer than the gateway lets a payment wait for its commit (30 s, then SYSTEM_BUSY), so the
# answer it was about to give is heard rather than taken for a lost reply.
reply_timeout_s = 45.0
connect_timeout_s = 10.0
# A gateway that stops reading must not hold the simulator: a write waits for the link this long,
# a close for its last bytes this long, then the connection is cut.
write_timeout_s = 30.0
close_timeout_s = 5.0
retries_max = 5
busy_pause_s = 0.2  # after SYSTEM_BUSY, growing with each attempt
read_chunk_bytes = 16_384
R = TypeVar("R", bound=ServerMessage)


@dataclass(frozen=True, slots=True)
class LinkModel:
    """One-way delay per message plus jitter; chance a reply is lost after the server sent it;
    chance the link drops before a request is sent."""

    one_way_s: float = 0.0
    jitter_s: float = 0.0
    reply_loss_probability: float = 0.0
    disconnect_probability: float = 0.0

    def delay(self, rng: random.Random) -> float:
        return max(0.0, self.one_way_s + rng.uniform(-self.jitter_s, self.jitter_s))


LAN = LinkModel()
# GPRS round trips of 300-2,000 ms; a lost reply now and then; a dropped link now and then.
GPRS = LinkModel(one_way_s=0.5, jitter_s=0.35, reply_loss_probability=0.02, disconnect_probability=0.01)
LINKS = {"lan": LAN, "gprs": GPRS}


class LinkLost(Exception):
    """The connection dropped or the reply never came: retry with the same transaction id."""


class TerminalRefused(Exception):
    """The gateway closed the session with an error (blocked, bad key, protocol error)."""

    def __init__(self, response_code: ResponseCode, detail: str, *, closing: bool = False) -> None:
        super().__init__(f"{response_code.name}: {detail}")
        self.response_code = response_code
        self.closing = closing  # the gateway closed the connection with it


class PosTerminal:
    def __init__(self, terminal_id: str, terminal_key: bytes, host: str, port: int, *,
                 link: LinkModel = LAN, rng: random.Random | None = None, last_sequence: int = 0) -> None:
        self.terminal_id = terminal_id
        self._key = terminal_key
        self.host = host
        self.port = port
        self.link = link
        self.rng = rng or random.Random()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._session: TerminalSession | None = None
        self.business_date: date | None = None
        # A real terminal keeps its sequence across restarts; a simulator is told where it stopped.
        self._sequence = last_sequence
        self.retries = 0
        # Frames from the gateway that failed the protocol's checks (a MAC, a sequence number):
        # each is taken for a lost link and its request repeated, but is counted, and the last one
        # kept: a MAC failure is no noise.
        self.protocol_errors = 0
        self.last_protocol_error: ProtocolError | None = None

    # -- connection --------------------------------------------------------------------------

    async def logon(self) -> LogonAccepted:
        await self.close()
        self._reader, self._writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port), connect_timeout_s)
        self._session = TerminalSession(self.terminal_id, self._key)
        challenge = await self._exchange(LogonRequest(terminal_nonce=secrets.token_bytes(16)), LogonChallenge)
        assert challenge.server_nonce
        accepted = await self._exchange(LogonProof(software_version="vendgate-sim 1"), LogonAccepted)
        self.business_date = accepted.business_date
        return accepted

    async def close(self) -> None:
        """Close the connection, waiting at most close_timeout_s for unsent bytes to go."""
        writer = self._writer
        self._reader = self._writer = self._session = None
        if writer is None:
            return
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), close_timeout_s)
        except (TimeoutError, OSError):  # a peer not reading, or the link already broken
            writer.transport.abort()

    async def connect(self) -> LogonAccepted:
        """Log on, again after a lost link (up to retries_max times), as a terminal on GPRS does."""
        for attempt in range(retries_max + 1):
            try:
                return await self.logon()
            except (LinkLost, ConnectionError, TimeoutError):
                await self.close()
                if attempt == retries_max:
                    raise
                self.retries += 1
        raise AssertionError("unreachable")

    async def logoff(self) -> None:
        """Say goodbye when the session is still good; close the connection whatever happened."""
        session = self._session
        if session is not None and session.state is TerminalState.READY:
            with contextlib.suppress(LinkLost, TerminalRefused, ConnectionError, TimeoutError, ProtocolError):
                await self._exchange(LogoffRequest(), LogoffReply)
        await self.close()

    async def _exchange(self, message: TerminalMessage, expected: type[R]) -> R:
        if self._session is None or self._writer is None or self._reader is None:
            # Closed since the last reply (a goodbye read with it, a lost link): log on again.
            raise LinkLost("not connected")
        await asyncio.sleep(self.link.delay(self.rng))
        if self.link.disconnect_probability and self.rng.random() < self.link.disconnect_probability:
            await self.close()
            raise LinkLost("link dropped before sending")
        self._writer.write(self._session.send(message))
        try:
            await asyncio.wait_for(self._writer.drain(), write_timeout_s)
        except (TimeoutError, ConnectionError) as exc:
            await self.close()
            raise LinkLost(f"{type(exc).__name__} while sending") from None
        reply = await self._read_reply()
        await asyncio.sleep(self.link.delay(self.rng))
        if isinstance(reply, ErrorReply):
            if reply.connection_closing:
                await self.close()
            raise TerminalRefused(reply.response_code, reply.detail, closing=reply.connection_closing)
        if self.link.reply_loss_probability and self.rng.random() < self.link.reply_loss_probability:
            await self.close()
            raise LinkLost("reply lost")
        if not isinstance(reply, expected):
            raise TerminalRefused(ResponseCode.FORMAT_ERROR, f"unexpected {type(reply).__name__}")
        return reply

    async def _read_reply(self) -> ServerMessage:
        """The next frame from the gateway, all of it within reply_timeout_s (one deadline for the
        whole reply, not per read: a peer sending a byte now and then must not hold the terminal).

        A reply that ends the session (a goodbye read with it, a logoff reply) closes the
        connection, the reply still returned: the next request logs on again. A frame the session
        cannot accept closes it too, as docs/protocol.md asks, and is a lost link: the request is
        repeated on a new session with the same transaction id.
        """
        session, reader = self._session, self._reader
        assert session is not None and reader is not None
        try:
            async with asyncio.timeout(reply_timeout_s):
                reply = await _next_message(session, reader)
        except ProtocolError as error:
            await self.close()
            self.protocol_errors += 1
            self.last_protocol_error = error
            raise LinkLost(f"reply refused: {error!r}") from None
        except (TimeoutError, ConnectionError) as exc:
            await self.close()
            raise LinkLost(type(exc).__name__) from None
        except LinkLost:
            await self.close()
            raise
        if session.state in (TerminalState.CLOSED, TerminalState.FAILED):
            await self.close()
        return reply

    async def _request(self, message: TerminalMessage, expected: type[R]) -> R:
        """Send with reconnect-and-retry on a lost link, and again after a pause on SYSTEM_BUSY
        (docs/protocol.md: repeat it with the same client transaction id); the same message (same
        id) every time."""
        for attempt in range(retries_max + 1):
            try:
                if self._session is None or self._session.state is not TerminalState.READY:
                    await self.logon()
                return await self._exchange(message, expected)
            except (LinkLost, ConnectionError, TimeoutError):
                await self.close()
                if attempt == retries_max:
                    raise
                self.retries += 1
            except TerminalRefused as refused:
                # A closing SYSTEM_BUSY (replaced by a newer logon, a shutdown) ends the session:
                # what to do next is the caller's.
                if refused.response_code is not ResponseCode.SYSTEM_BUSY or refused.closing or attempt == retries_max:
                    raise
                self.retries += 1
                await asyncio.sleep(busy_pause_s * (attempt + 1))
        raise AssertionError("unreachable")

    # -- operations ----------------------------------------------------------------------------

    @property
    def last_sequence(self) -> int:
        """The sequence of the last transaction id this terminal made."""
        return self._sequence

    def next_transaction_id(self) -> ClientTransactionId:
        assert self.business_date is not None, "log on first"
        self._sequence += 1
        return ClientTransactionId(terminal_id=self.terminal_id, terminal_sequence=self._sequence,
                                   business_date=self.business_date)

    async def top_up(self, meter_number: str, amount_minor: int, currency: str,
                     txn: ClientTransactionId | None = None) -> TopUpResult:
        if self.business_date is None:
            await self.logon()
        request = TopUpRequest(client_transaction_id=txn or self.next_transaction_id(), meter_number=meter_number,
                               amount_minor=amount_minor, currency=currency, tender_type=TenderType.CASH)
        return await self._request(request, TopUpResult)

    async def lookup(self, meter_number: str | None = None, account_number: str | None = None) -> LookupResult:
        return await self._request(LookupRequest(meter_number=meter_number, account_number=account_number),
                                   LookupResult)

    async def send_advices(self, advices: list[Advice]) -> AdviceBatchResult:
        return await self._request(AdviceBatchRequest(advices=advices), AdviceBatchResult)

    async def end_of_day(self, request: EndOfDayRequest) -> EndOfDayResult:
        return await self._request(request, EndOfDayResult)

    async def float_inquiry(self) -> FloatInquiryResult:
        return await self._request(FloatInquiryRequest(), FloatInquiryResult)

    async def reprint(self, txn: ClientTransactionId) -> ReprintResult:
        return await self._request(ReprintRequest(client_transaction_id=txn), ReprintResult)

    async def reverse(self, txn: ClientTransactionId, amount_minor: int, currency: str,
                      reason: ReversalReason = ReversalReason.NO_REPLY) -> ReversalResult:
        return await self._request(ReversalRequest(original_transaction_id=txn, amount_minor=amount_minor,
                                                   currency=currency, reason=reason), ReversalResult)


async def _next_message(session: TerminalSession, reader: asyncio.StreamReader) -> ServerMessage:
    """Read until a whole frame is in; the first message of what was read (a frame after it in
    the same read, a goodbye, leaves the session in the state that frame put it)."""
    while True:
        data = await reader.read(read_chunk_bytes)
        if not data:
            raise LinkLost("connection closed")
        for event in session.receive_data(data):
            if isinstance(event, MessageReceived):
                return event.message
