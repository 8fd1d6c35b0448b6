"""Handlers: typed protocol messages in, typed replies out. No sockets here.

Payments (top-up, advice, reversal) go through the committer; reads (lookup, float inquiry,
reprint, end-of-day totals) go straight to the database. Every handler checks the terminal's
status and permissions at the time of the request, so a terminal blocked mid-session is
refused on its next request.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime

import asyncpg

from gateway import registry, sql
from gateway.committer import Committer, CommitterBusy
from gateway.jsonlog import get_logger, redact_token
from gateway.keystore import KeyStore
from gateway.metrics import GatewayMetrics
from gateway.vending import VendOutcome, VendRequest, stored_outcome
from protocol import limits
from protocol.codes import ResponseCode
from protocol.messages import (
    AdviceBatchRequest,
    AdviceBatchResult,
    AdviceOutcome,
    ClientTransactionId,
    Customer,
    EndOfDayRequest,
    EndOfDayResult,
    ErrorReply,
    FloatInquiryRequest,
    FloatInquiryResult,
    HeartbeatReply,
    HeartbeatRequest,
    LastPurchase,
    LogoffReply,
    LogoffRequest,
    LookupRequest,
    LookupResult,
    ReprintRequest,
    ReprintResult,
    ReversalRequest,
    ReversalResult,
    ServerMessage,
    SupplyMode,
    SupplyState,
    TerminalMessage,
    TopUpRequest,
    TopUpResult,
)

log = get_logger("vendgate.txn")
db_timeout_s = 10.0
# Key lookups for logons not yet proven, at once. Anyone who can connect can ask for one, so a flood
# of them must not take the pool's connections from payments: the rest wait (within the logon
# deadline) without holding a connection. A lookup is one indexed read, so 4 serve thousands a second.
logon_lookups_max = 4
# A payment that found its terminal blocked since logon: the session ends (docs/protocol.md).
_BLOCKED_MID_SESSION = ErrorReply(response_code=ResponseCode.TERMINAL_BLOCKED, detail="terminal blocked",
                                  connection_closing=True)
WH_PER_DECI_KWH = 100

# With the currency of the meter's tariff in force (NULL: none) and of the customer's accounts: a
# top-up is paid in both. Of an account's meters, one payable in the terminal's currency ($3) first.
SQL_LOOKUP = """
SELECT m.meter_number, m.supply_mode, m.supply_state, m.last_purchase_at, m.last_purchase_minor,
       c.account_number, c.name, c.address, d.balance_minor AS debt_balance_minor, d.currency AS account_currency,
       t.currency AS tariff_currency
FROM meters m JOIN customers c USING (customer_id)
JOIN ledger_accounts d ON d.id = c.debt_account_id
LEFT JOIN LATERAL (
    SELECT t.currency FROM tariffs t WHERE t.tariff_code = m.tariff_code AND t.valid_from <= now()
    ORDER BY t.valid_from DESC LIMIT 1
) t ON true
WHERE ($1::text IS NOT NULL AND m.meter_number = $1) OR ($2::text IS NOT NULL AND c.account_number = $2)
ORDER BY (t.currency IS NOT DISTINCT FROM $3 AND d.currency = $3) DESC, m.meter_number LIMIT 1"""
SQL_FLOAT = """
SELECT a.currency, a.low_float_threshold_minor, l.balance_minor
FROM terminals t JOIN agents a USING (agent_id) JOIN ledger_accounts l ON l.id = a.float_account_id
WHERE t.terminal_id = $1"""
# Each approved transaction on the business date it was processed on: a reversal (its own record,
# kind 'reversal', approved only when it undid a payment) on its own date, not its original's.
SQL_EOD = """
SELECT kind, count(*) FILTER (WHERE response_code = 0) AS n,
       coalesce(sum(amount_minor) FILTER (WHERE response_code = 0), 0) AS total
FROM vend_transactions WHERE terminal_id = $1 AND business_date = $2 GROUP BY kind"""


def wire_amount(value: int | None) -> int:
    """An amount as the protocol can carry it (0..amount_minor_max): a float beyond the wire's
    range is shown at the top of the range rather than making the whole reply undecodable."""
    return min(max(0, value or 0), limits.amount_minor_max)


def mask_name(name: str) -> str:
    """'Jane Doe' -> 'J*** D**': enough for the agent to confirm, too little to harvest."""
    return " ".join(part[0] + "*" * min(len(part) - 1, 3) for part in name.split() if part) or "*"


def receipt_text(terminal_id: str, receipt_number: int | None) -> str | None:
    return None if receipt_number is None else f"{terminal_id}-{receipt_number:06d}"


def top_up_result(txn: ClientTransactionId, outcome: VendOutcome, currency: str) -> TopUpResult:
    code = ResponseCode(outcome.response_code)
    if code is not ResponseCode.APPROVED:
        return TopUpResult(client_transaction_id=txn, response_code=code, currency=currency,
                           amount_minor=outcome.amount_minor)
    return TopUpResult(
        client_transaction_id=txn, response_code=code, currency=outcome.currency,
        amount_minor=outcome.amount_minor, receipt_number=receipt_text(txn.terminal_id, outcome.receipt_number),
        receipt_lines=outcome.receipt_lines, tokens=outcome.tokens,
        units_wh=outcome.units_deci_kwh * WH_PER_DECI_KWH, debt_recovery_minor=outcome.debt_recovery_minor,
        energy_minor=outcome.energy_minor, fees_minor=outcome.fees_minor, vat_minor=outcome.vat_minor,
        float_remaining_minor=wire_amount(outcome.float_remaining_minor), issued_at=outcome.issued_at)


class Handlers:
    def __init__(self, pool: asyncpg.Pool, keystore: KeyStore, committer: Committer,
                 metrics: GatewayMetrics) -> None:
        self.pool = pool
        self.keystore = keystore
        self.committer = committer
        self.metrics = metrics
        self.logon_lookups = asyncio.Semaphore(logon_lookups_max)

    async def terminal_key(self, terminal_id: str, key_version: int) -> tuple[bytes, str] | None:
        """The key of a POS terminal asking to log on (None for a kiosk's id, as for an unknown
        one): at most logon_lookups_max such reads at once."""
        async with self.logon_lookups, self.pool.acquire(timeout=db_timeout_s) as conn:
            return await registry.terminal_key(conn, self.keystore, terminal_id)

    async def terminal_context(self, terminal_id: str) -> registry.TerminalContext | None:
        async with self.pool.acquire(timeout=db_timeout_s) as conn:
            return await registry.terminal_context(conn, terminal_id)

    async def handle(self, terminal_id: str, message: TerminalMessage,
                     session_context: registry.TerminalContext | None = None, *,
                     answer_by: float | None = None) -> ServerMessage:
        """One reply for one request. `session_context` (read at logon) spares payments a read:
        the payment batch itself checks the terminal's current status. A payment's batch is waited
        for until `answer_by` (time.monotonic()), or submit_timeout_s without it."""
        try:
            return await self._dispatch(terminal_id, message, session_context, answer_by)
        except CommitterBusy:
            return ErrorReply(response_code=ResponseCode.SYSTEM_BUSY, detail="busy, retry with the same id",
                              connection_closing=False)
        except (asyncpg.PostgresError, OSError, TimeoutError) as exc:
            log.error("request_failed", terminal_id=terminal_id, message_type=type(message).__name__,
                      error=type(exc).__name__)
            return ErrorReply(response_code=ResponseCode.SYSTEM_ERROR, detail="system error, retry",
                              connection_closing=False)

    async def _dispatch(self, terminal_id: str, message: TerminalMessage,
                        session_context: registry.TerminalContext | None, answer_by: float | None) -> ServerMessage:
        if isinstance(message, HeartbeatRequest):
            return HeartbeatReply(server_time=datetime.now(UTC))
        if isinstance(message, LogoffRequest):
            return LogoffReply()
        payment = isinstance(message, TopUpRequest | AdviceBatchRequest | ReversalRequest)
        context = session_context if payment and session_context is not None else \
            await self.terminal_context(terminal_id)
        if context is None or context.status != "active":
            return ErrorReply(response_code=ResponseCode.TERMINAL_BLOCKED,
                              detail=f"terminal {context.status if context else 'unknown'}", connection_closing=True)
        if isinstance(message, TopUpRequest):
            result = await self._top_up(context, message, answer_by)
            if result.response_code is ResponseCode.TERMINAL_BLOCKED:
                return _BLOCKED_MID_SESSION
            return result
        if isinstance(message, LookupRequest):
            return await self._lookup(context, message)
        if isinstance(message, FloatInquiryRequest):
            return await self._float(context)
        if isinstance(message, ReversalRequest):
            reversal = await self._reversal(context, message, answer_by)
            if reversal.response_code is ResponseCode.TERMINAL_BLOCKED:
                return _BLOCKED_MID_SESSION
            return reversal
        if isinstance(message, ReprintRequest):
            return await self._reprint(context, message)
        if isinstance(message, AdviceBatchRequest):
            advices = await self._advices(context, message, answer_by)
            # Blocked before any of them was recorded: refused as a whole, and the session ends. An
            # advice recorded before the block is reported with the rest; the next request ends it.
            if advices.outcomes and all(o.response_code is ResponseCode.TERMINAL_BLOCKED for o in advices.outcomes):
                return _BLOCKED_MID_SESSION
            return advices
        if isinstance(message, EndOfDayRequest):
            return await self._end_of_day(context, message)
        return ErrorReply(response_code=ResponseCode.STATE_ERROR, detail="unexpected message",
                          connection_closing=False)

    async def _top_up(self, context: registry.TerminalContext, message: TopUpRequest,
                      answer_by: float | None) -> TopUpResult:
        txn = message.client_transaction_id
        request = VendRequest(kind="topup", client_txn_id=txn.as_key(), terminal_id=context.terminal_id,
                              meter_number=message.meter_number, amount_minor=message.amount_minor,
                              currency=message.currency, tender=str(message.tender_type))
        outcome = await self.committer.submit(request, answer_by=answer_by)
        log.info("top_up", terminal_id=context.terminal_id, agent_id=context.agent_id,
                 client_txn_id=request.client_txn_id, meter_number=message.meter_number,
                 amount_minor=message.amount_minor, currency=message.currency,
                 response_code=ResponseCode(outcome.response_code).name, receipt_number=outcome.receipt_number,
                 token=redact_token(outcome.tokens[0]) if outcome.tokens else None)
        return top_up_result(txn, outcome, message.currency)

    async def _reversal(self, context: registry.TerminalContext, message: ReversalRequest,
                        answer_by: float | None) -> ReversalResult:
        original = message.original_transaction_id.as_key()
        request = VendRequest(kind="reversal", client_txn_id=f"{original}/R", terminal_id=context.terminal_id,
                              amount_minor=message.amount_minor, currency=message.currency,
                              original_txn_id=original, reason=str(message.reason))
        outcome = await self.committer.submit(request, answer_by=answer_by)
        log.info("reversal", terminal_id=context.terminal_id, original_txn_id=original,
                 response_code=ResponseCode(outcome.response_code).name)
        code = ResponseCode(outcome.response_code)
        return ReversalResult(original_transaction_id=message.original_transaction_id, response_code=code,
                              currency=message.currency,
                              reversed_amount_minor=outcome.amount_minor if code is ResponseCode.APPROVED else 0,
                              float_remaining_minor=wire_amount(outcome.float_remaining_minor))

    async def _advices(self, context: registry.TerminalContext, message: AdviceBatchRequest,
                       answer_by: float | None) -> AdviceBatchResult:
        requests = [VendRequest(kind="advice", client_txn_id=a.client_transaction_id.as_key(),
                                terminal_id=context.terminal_id, meter_number=a.meter_number,
                                amount_minor=a.amount_minor, currency=a.currency, tender=str(a.tender_type),
                                taken_at=a.taken_at) for a in message.advices]
        outcomes = await asyncio.gather(*(self.committer.submit(r, answer_by=answer_by) for r in requests))
        for request, outcome in zip(requests, outcomes, strict=True):  # one line per payment, as for a top-up
            log.info("advice", terminal_id=context.terminal_id, agent_id=context.agent_id,
                     client_txn_id=request.client_txn_id, meter_number=request.meter_number,
                     amount_minor=request.amount_minor, currency=request.currency,
                     taken_at=request.taken_at.isoformat() if request.taken_at else None,
                     response_code=ResponseCode(outcome.response_code).name, receipt_number=outcome.receipt_number,
                     token=redact_token(outcome.tokens[0]) if outcome.tokens else None)
        results = [
            AdviceOutcome(client_transaction_id=a.client_transaction_id, response_code=ResponseCode(o.response_code),
                          receipt_number=receipt_text(context.terminal_id, o.receipt_number)
                          if o.response_code == ResponseCode.APPROVED else None,
                          tokens=o.tokens if o.response_code == ResponseCode.APPROVED else [])
            for a, o in zip(message.advices, outcomes, strict=True)
        ]
        return AdviceBatchResult(response_code=ResponseCode.APPROVED, outcomes=results)

    async def _lookup(self, context: registry.TerminalContext, message: LookupRequest) -> LookupResult:
        if "lookup" not in context.allowed_operations:
            return LookupResult(response_code=ResponseCode.NOT_PERMITTED)
        async with self.pool.acquire(timeout=db_timeout_s) as conn:
            row = await conn.fetchrow(SQL_LOOKUP, message.meter_number, message.account_number, context.currency)
        if row is None:
            code = ResponseCode.UNKNOWN_METER if message.meter_number else ResponseCode.UNKNOWN_ACCOUNT
            return LookupResult(response_code=code)
        if row["tariff_currency"] != context.currency or row["account_currency"] != context.currency:
            # No tariff in force in this terminal's currency, or the customer's accounts are in
            # another: its top-up would be refused, so the lookup says so before the agent takes
            # the customer's money (and never shows the customer's amounts under another code).
            return LookupResult(response_code=ResponseCode.UNKNOWN_METER)
        last = None
        if row["last_purchase_at"] is not None:
            last = LastPurchase(amount_minor=int(row["last_purchase_minor"]), purchased_at=row["last_purchase_at"])
        state = {"on": SupplyState.CONNECTED, "limited": SupplyState.LIMITED, "off": SupplyState.DISCONNECTED}
        return LookupResult(response_code=ResponseCode.APPROVED, customer=Customer(
            meter_number=row["meter_number"], account_number=row["account_number"],
            masked_name=mask_name(row["name"])[:64], address=row["address"][:128],
            supply_mode=SupplyMode.TOKEN if row["supply_mode"] == "sts" else SupplyMode.SMART,
            supply_state=state.get(row["supply_state"], SupplyState.UNKNOWN),
            debt_minor=wire_amount(-int(row["debt_balance_minor"])), currency=context.currency, last_purchase=last))

    async def _float(self, context: registry.TerminalContext) -> FloatInquiryResult:
        if "float" not in context.allowed_operations:
            return FloatInquiryResult(response_code=ResponseCode.NOT_PERMITTED, currency=context.currency)
        async with self.pool.acquire(timeout=db_timeout_s) as conn:
            row = await conn.fetchrow(SQL_FLOAT, context.terminal_id)
        assert row is not None
        return FloatInquiryResult(response_code=ResponseCode.APPROVED, currency=row["currency"],
                                  float_remaining_minor=wire_amount(int(row["balance_minor"])),
                                  low_float_threshold_minor=wire_amount(int(row["low_float_threshold_minor"])))

    async def _reprint(self, context: registry.TerminalContext, message: ReprintRequest) -> ReprintResult:
        if "reprint" not in context.allowed_operations:
            # A reprint hands out the payment's token again: only where the back office allows it.
            return ReprintResult(response_code=ResponseCode.NOT_PERMITTED)
        async with self.pool.acquire(timeout=db_timeout_s) as conn:
            if message.client_transaction_id is not None:
                key = message.client_transaction_id.as_key()
                row = await conn.fetchrow(sql.TXN_GET, key)
            else:
                assert message.receipt_number is not None
                terminal, _, number = message.receipt_number.rpartition("-")
                # Only the form vendgate prints (receipt_text): "T0000001-1" or "T0000001-0000001"
                # is not a receipt number, so no two spellings name one receipt.
                if (terminal != context.terminal_id or not number.isascii() or not number.isdigit()
                        or len(number) > 18 or receipt_text(terminal, int(number)) != message.receipt_number):
                    return ReprintResult(response_code=ResponseCode.ORIGINAL_NOT_FOUND)
                row = await conn.fetchrow(sql.TXN_GET_BY_RECEIPT, terminal, int(number))
            if row is None or row["terminal_id"] != context.terminal_id or row["receipt_number"] is None:
                return ReprintResult(response_code=ResponseCode.ORIGINAL_NOT_FOUND)
            async with conn.transaction(isolation="read_committed"):
                # Same lock as a reversal of this payment: a reprint and a reversal never cross
                # (READ COMMITTED: the check after the lock sees a reversal that committed meanwhile).
                await conn.execute(sql.LOCK_TXN_IDS, [row["client_txn_id"]])
                if await conn.fetchval(sql.TXN_IS_REVERSED, row["client_txn_id"]):
                    # The payment was undone: its receipt and token are void.
                    return ReprintResult(response_code=ResponseCode.ALREADY_REVERSED)
                await conn.execute(sql.TXN_COUNT_REPRINT, row["client_txn_id"])
        outcome = stored_outcome(self.keystore, row)
        log.info("reprint", terminal_id=context.terminal_id, client_txn_id=row["client_txn_id"],
                 token=redact_token(outcome.tokens[0]) if outcome.tokens else None)
        return ReprintResult(response_code=ResponseCode.APPROVED,
                             client_transaction_id=ClientTransactionId.from_key(row["client_txn_id"]),
                             receipt_number=receipt_text(context.terminal_id, outcome.receipt_number),
                             receipt_lines=["** REPRINT **", *outcome.receipt_lines][:40], tokens=outcome.tokens)

    async def _end_of_day(self, context: registry.TerminalContext, message: EndOfDayRequest) -> EndOfDayResult:
        day: date = message.business_date
        if "eod" not in context.allowed_operations:
            return EndOfDayResult(response_code=ResponseCode.NOT_PERMITTED, business_date=day,
                                  currency=context.currency)
        async with self.pool.acquire(timeout=db_timeout_s) as conn:
            rows = {r["kind"]: r for r in await conn.fetch(SQL_EOD, context.terminal_id, day)}

        def totals(kind: str) -> tuple[int, int]:
            row = rows.get(kind)
            return (int(row["n"]), int(row["total"])) if row else (0, 0)

        top_ups, reversals, advices = totals("topup"), totals("reversal"), totals("advice")
        server = (top_ups, reversals, advices)
        terminal = ((message.top_up_count, message.top_up_total_minor),
                    (message.reversal_count, message.reversal_total_minor),
                    (message.advice_count, message.advice_total_minor))
        if message.currency != context.currency:
            # Totals in another currency agree with nothing, whatever their figures.
            code = ResponseCode.CURRENCY_MISMATCH
        else:
            code = ResponseCode.APPROVED if server == terminal else ResponseCode.TOTALS_MISMATCH
        return EndOfDayResult(response_code=code, business_date=day, currency=context.currency,
                              top_up_count=top_ups[0], top_up_total_minor=top_ups[1],
                              reversal_count=reversals[0], reversal_total_minor=reversals[1],
                              advice_count=advices[0], advice_total_minor=advices[1])
