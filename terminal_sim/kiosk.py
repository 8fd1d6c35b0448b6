"""A self-service kiosk client: HTTPS with its client certificate, JSON messages (protocol.kiosk)."""

from __future__ import annotations

import asyncio
import random
import ssl
import time
from datetime import date
from typing import TypeGuard

import aiohttp
import msgspec

from protocol.codes import ResponseCode
from protocol.errors import ProtocolError
from protocol.kiosk import CONTENT_TYPE, KIOSK_PATH, decode_kiosk_reply, encode_kiosk_message
from protocol.messages import (
    ClientTransactionId,
    ErrorReply,
    ServerMessage,
    TenderType,
    TerminalMessage,
    TopUpRequest,
    TopUpResult,
)

# Longer than the gateway lets a payment wait for its commit (30 s, then SYSTEM_BUSY): a kiosk
# that gave up first would not learn the answer the gateway was about to give.
request_timeout_s = 45.0
# A payment whose answer did not come (no answer, SYSTEM_BUSY, SYSTEM_ERROR, a page that is no
# reply) is asked again under the same id this many times in all, a growing pause between: it
# may have been committed, and only its own id can learn that without paying twice.
attempts_max = 4
retry_pause_s = 0.2
_UNSETTLED_CODES = frozenset({ResponseCode.SYSTEM_BUSY, ResponseCode.SYSTEM_ERROR})


def client_ssl_context(ca_file: str, cert_file: str, key_file: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context


class UnreadableReply(ProtocolError):
    """An HTTP answer whose body is no kiosk reply: aiohttp's own plain-text pages (a 408 for a
    body that came too slowly, a 413, a 404 for a wrong path), a proxy's 502 or 504, or JSON that
    does not decode as a message. It keeps the status, often all there is to tell what happened,
    and is a ProtocolError like the decoding error it stands for, for callers that catch those."""

    def __init__(self, status: int, error: ProtocolError) -> None:
        super().__init__(f"HTTP {status}: {error.detail}", response_code=error.response_code,
                         close_connection=error.close_connection)
        self.status = status
        self.error = error


class Kiosk:
    def __init__(self, kiosk_id: str, base_url: str, ssl_context: ssl.SSLContext | None, business_date: date,
                 last_sequence: int = 0) -> None:
        self.kiosk_id = kiosk_id
        self.base_url = base_url.rstrip("/")
        self.ssl_context = ssl_context
        self.business_date = business_date
        self._sequence = last_sequence

    def next_transaction_id(self) -> ClientTransactionId:
        self._sequence += 1
        return ClientTransactionId(terminal_id=self.kiosk_id, terminal_sequence=self._sequence,
                                   business_date=self.business_date)

    async def send(self, message: TerminalMessage) -> tuple[int, ServerMessage]:
        timeout = aiohttp.ClientTimeout(total=request_timeout_s)
        connector = aiohttp.TCPConnector(ssl=self.ssl_context if self.ssl_context is not None else False)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session, session.post(
                self.base_url + KIOSK_PATH, data=encode_kiosk_message(message),
                headers={"Content-Type": CONTENT_TYPE}) as response:
            body = await response.read()
            try:
                return response.status, decode_kiosk_reply(body)
            except ProtocolError as error:
                raise UnreadableReply(response.status, error) from None

    async def top_up(self, meter_number: str, amount_minor: int, currency: str,
                     txn: ClientTransactionId | None = None) -> tuple[int, ServerMessage]:
        return await self.send(TopUpRequest(client_transaction_id=txn or self.next_transaction_id(),
                                            meter_number=meter_number, amount_minor=amount_minor,
                                            currency=currency, tender_type=TenderType.CASH))

    async def settled_top_up(self, meter_number: str, amount_minor: int, currency: str,
                             txn: ClientTransactionId, *, deadline: float | None = None
                             ) -> tuple[int, ServerMessage, int]:
        """top_up, asked again under the same id while its answer does not come (attempts_max in
        all, none begun after `deadline`, a time.monotonic() reading): the answer and how many
        times it was asked. The last failure is raised."""
        for attempt in range(1, attempts_max + 1):
            last = attempt == attempts_max
            try:
                status, reply = await self.top_up(meter_number, amount_minor, currency, txn)
                if not _unsettled(reply):
                    return status, reply, attempt
            except (UnreadableReply, aiohttp.ClientError, ssl.SSLError, ConnectionError, TimeoutError):
                pause_s = retry_pause_s * 2 ** (attempt - 1)
                if last or (deadline is not None and time.monotonic() + pause_s >= deadline):
                    raise
            else:
                pause_s = retry_pause_s * 2 ** (attempt - 1)
                if last or (deadline is not None and time.monotonic() + pause_s >= deadline):
                    return status, reply, attempt
            await asyncio.sleep(pause_s)
        raise AssertionError("unreachable: the last attempt returns or raises")


def _unsettled(reply: ServerMessage) -> TypeGuard[ErrorReply]:
    """An answer that says nothing of the payment: it may or may not have been made."""
    return isinstance(reply, ErrorReply) and reply.response_code in _UNSETTLED_CODES


class KioskSummary(msgspec.Struct, kw_only=True):
    kiosks: int
    approved: int = 0
    declined: int = 0
    errors: int = 0
    repeated: int = 0  # payments asked again under their id because no answer came
    inconsistencies: int = 0
    notes: list[str] = []

    @property
    def ok(self) -> bool:
        """No inconsistent reply, and the gateway answered at least one payment."""
        return self.inconsistencies == 0 and self.approved + self.declined > 0


async def run_kiosks(kiosks: list[Kiosk], meters: list[str], currency: str, duration_s: float, *,
                     amount_minor: int = 2_000, retry_every: int = 4, seed: int = 1) -> KioskSummary:
    """Each kiosk tops up until duration_s has passed, one payment at a time. Every retry_every-th
    payment is sent a second time with the same transaction id, as a kiosk does when its reply
    is lost: the second reply must be the first one again (same receipt, same token). An approved
    reply without a receipt, a receipt given to two payments or a retry answered differently
    counts as an inconsistency. A payment that gets no answer, an answer that is no kiosk reply
    (UnreadableReply), SYSTEM_BUSY or SYSTEM_ERROR is asked again under its id (settled_top_up):
    only after attempts_max tries it counts as an error, with a note, and the kiosk goes on."""
    summary = KioskSummary(kiosks=len(kiosks))
    receipts: dict[str, str] = {}
    deadline = time.monotonic() + duration_s

    def inconsistent(note: str) -> None:
        summary.inconsistencies += 1
        summary.notes.append(note)

    async def run(kiosk: Kiosk, rng: random.Random) -> None:
        payments = 0
        while time.monotonic() < deadline:
            payments += 1
            txn, meter = kiosk.next_transaction_id(), rng.choice(meters)
            try:
                status, reply, asked = await kiosk.settled_top_up(meter, amount_minor, currency, txn,
                                                                  deadline=deadline)
                summary.repeated += asked - 1
            except UnreadableReply as error:
                summary.errors += 1
                summary.notes.append(f"{kiosk.kiosk_id}: HTTP {error.status} answered with no kiosk reply "
                                     f"({type(error.error).__name__})")
                continue
            except (aiohttp.ClientError, ssl.SSLError, ConnectionError, TimeoutError) as error:
                summary.errors += 1
                summary.notes.append(f"{kiosk.kiosk_id}: {type(error).__name__}")
                continue
            if _unsettled(reply):
                summary.errors += 1  # asked attempts_max times: its outcome is not known
                summary.notes.append(f"{kiosk.kiosk_id}: sequence {txn.terminal_sequence} still "
                                     f"{reply.response_code.name} after {attempts_max} attempts")
            elif not isinstance(reply, TopUpResult):
                inconsistent(f"{kiosk.kiosk_id}: HTTP {status} answered with {type(reply).__name__}")
            elif reply.response_code is ResponseCode.APPROVED:
                summary.approved += 1
                key = f"{txn.terminal_id}/{txn.business_date}/{txn.terminal_sequence}"
                if (reply.client_transaction_id, reply.amount_minor, reply.currency) != (txn, amount_minor, currency):
                    inconsistent(f"{kiosk.kiosk_id}: sequence {txn.terminal_sequence} approved as "
                                 f"{reply.client_transaction_id.terminal_sequence} for {reply.amount_minor} "
                                 f"{reply.currency}, {amount_minor} {currency} paid")
                elif not reply.receipt_number:
                    inconsistent(f"{kiosk.kiosk_id}: approved without a receipt")
                elif receipts.setdefault(reply.receipt_number, key) != key:
                    inconsistent(f"{kiosk.kiosk_id}: receipt {reply.receipt_number} given to two payments")
            else:
                summary.declined += 1
            if payments % retry_every == 0 and not _unsettled(reply):
                await repeat(kiosk, meter, txn, status, reply)

    async def repeat(kiosk: Kiosk, meter: str, txn: ClientTransactionId, status: int, reply: ServerMessage) -> None:
        """Ask a settled payment again under its id: the answer must be the first one again. An
        answer that does not come is no inconsistency (the payment is counted already)."""
        try:
            again_status, again, asked = await kiosk.settled_top_up(meter, amount_minor, currency, txn,
                                                                    deadline=deadline)
        except (UnreadableReply, aiohttp.ClientError, ssl.SSLError, ConnectionError, TimeoutError) as error:
            summary.notes.append(f"{kiosk.kiosk_id}: the repeat of sequence {txn.terminal_sequence} "
                                 f"got no answer ({type(error).__name__})")
            return
        summary.repeated += asked - 1
        if _unsettled(again):
            summary.notes.append(f"{kiosk.kiosk_id}: the repeat of sequence {txn.terminal_sequence} got no answer")
        elif (again_status, again) != (status, reply):
            inconsistent(f"{kiosk.kiosk_id}: a retry of sequence {txn.terminal_sequence} was answered differently")

    await asyncio.gather(*(run(kiosk, random.Random(seed * 7_919 + i)) for i, kiosk in enumerate(kiosks)))
    return summary
