"""Vending: turn a batch of top-ups, offline advices and reversals into money, receipts and tokens.

A batch is ONE database transaction (for top-ups, one statement: vend_commit_topups; decided by
`prepare_batch`, written by `commit_prepared`, or both by `process_batch`). For each request,
in arrival order, it decides (replay, guard, limit, split), then posts every approved payment's
linked transfer group with one ledger call, numbers receipts without gaps per terminal, issues
STS tokens (never two with one TID for one meter), records the reply under the client
transaction id (the idempotency key) and writes the engine's outbox events. The reply leaves
only after the transaction commits; a retry of the same id gets the stored reply byte for byte.

A refused guard declines that request alone; the others in the batch go on.
"""

from __future__ import annotations

import hashlib
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal, cast
from zoneinfo import ZoneInfo

import asyncpg
import msgspec

from float_ledger.currency import format_minor
from float_ledger.ledger import reverse_group
from float_ledger.model import AccountKind, PostStatus, Transfer, TransferKind, batch_columns
from float_ledger.split import DECI_KWH_PER_MWH, AmountTooSmall, Tariff, commission_minor, split_payment
from gateway import sql
from gateway.keystore import KeyStore
from gateway.registry import vending_key_record
from protocol import sts
from protocol.codes import ResponseCode

Row = dict[str, Any]  # a row read for a batch, by column name
GROUP_NAMESPACE = uuid.UUID("6b1c7a52-4f0e-4a43-9a55-0f3c2d8e9b10")
sts_units_max = sts.UNITS_MAX  # largest amount an STS class-0 token carries, in 0.1 kWh
receipt_line_chars_max = 32
decoder_key_cache_max = 100_000
# A reversal undoes a payment whose outcome the terminal did not learn: it follows soon after.
reversal_window_s = 24 * 3600


class VendRequest(msgspec.Struct, frozen=True, kw_only=True):
    kind: Literal["topup", "advice", "reversal"]
    client_txn_id: str
    terminal_id: str
    meter_number: str = ""
    amount_minor: int = 0
    currency: str = ""
    tender: str = "cash"
    original_txn_id: str = ""
    reason: str = ""
    taken_at: datetime | None = None

    def content_sha256(self) -> bytes:
        """What identifies the request's content: a replay with other content is refused.

        A reversal's reason is not part of it: a repeated reversal is the same reversal.
        """
        subject = msgspec.structs.replace(self, reason="") if self.kind == "reversal" else self
        return hashlib.sha256(_request_encoder.encode(subject)).digest()


class VendOutcome(msgspec.Struct, frozen=True, kw_only=True):
    client_txn_id: str
    response_code: int
    message: str = ""
    meter_number: str = ""
    amount_minor: int = 0
    currency: str = ""
    receipt_number: int | None = None
    receipt_lines: list[str] = []
    tokens: list[str] = []
    units_deci_kwh: int = 0
    debt_recovery_minor: int = 0
    energy_minor: int = 0
    fees_minor: int = 0
    vat_minor: int = 0
    commission_minor: int = 0
    float_remaining_minor: int | None = None
    issued_at: datetime | None = None
    tariff_code: str = ""

    @property
    def approved(self) -> bool:
        return self.response_code == ResponseCode.APPROVED


_request_encoder = msgspec.msgpack.Encoder()
_outcome_encoder = msgspec.msgpack.Encoder()
_outcome_decoder = msgspec.msgpack.Decoder(VendOutcome)


def seal_outcome(keystore: KeyStore, outcome: VendOutcome) -> bytes:
    # The stored reply may hold a token (bearer value): it is sealed like a key.
    return keystore.seal(_outcome_encoder.encode(outcome), f"reply:{outcome.client_txn_id}")


def open_outcome(keystore: KeyStore, client_txn_id: str, sealed: bytes) -> VendOutcome:
    return _outcome_decoder.decode(keystore.open(sealed, f"reply:{client_txn_id}"))


def stored_outcome(keystore: KeyStore, row: asyncpg.Record) -> VendOutcome:
    """A stored reply as it was sent: the sealed outcome, with the float remaining after the
    payment read from its collection transfer (immutable, on the float's hash chain); a reply with
    no collection (a decline, a reversal) holds what it said inside the seal."""
    outcome = open_outcome(keystore, row["client_txn_id"], bytes(row["reply"]))
    float_remaining = row["float_remaining_minor"]
    if float_remaining is None:
        return outcome
    return msgspec.structs.replace(outcome, float_remaining_minor=int(float_remaining))


def decline(request: VendRequest, code: ResponseCode, message: str) -> VendOutcome:
    return VendOutcome(client_txn_id=request.client_txn_id, response_code=int(code), message=message,
                       meter_number=request.meter_number, amount_minor=request.amount_minor,
                       currency=request.currency)


TOPUP_PARTS = ("collection", "debt_recovery", "energy_sale", "vat", "commission")


_GROUP_NAMESPACE_BYTES = GROUP_NAMESPACE.bytes


def _uuid_from_bytes() -> Callable[[bytes], uuid.UUID]:
    """The C UUID asyncpg decodes uuid columns into (a uuid.UUID subclass, built from 16 bytes at
    a fraction of uuid.UUID's cost); should asyncpg move it, the standard one, same values."""
    try:
        from asyncpg.pgproto.pgproto import UUID
    except ImportError:  # pragma: no cover - present in every asyncpg release vendgate supports
        return lambda value: uuid.UUID(bytes=value)
    return cast(Callable[[bytes], uuid.UUID], UUID)


FastUUID = _uuid_from_bytes()
_PART_BYTES = {part: bytes([number]) for number, part in enumerate(TOPUP_PARTS, start=1)}


def group_id_for(client_txn_id: str) -> uuid.UUID:
    """uuid.uuid5(GROUP_NAMESPACE, client_txn_id) (RFC 9562 section 5.5: SHA-1 of the namespace
    and the name, version 5, variant 10), built as asyncpg's C UUID, a uuid.UUID that equals and
    hashes as the standard one: a fraction of uuid.uuid5's cost, on every payment."""
    # SHA-1 because uuid5 is defined on it: an identifier, not a security boundary.
    name = _GROUP_NAMESPACE_BYTES + client_txn_id.encode()
    digest = bytearray(hashlib.sha1(name, usedforsecurity=False).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50
    digest[8] = (digest[8] & 0x3F) | 0x80
    return FastUUID(bytes(digest))


def transfer_id_for(group_id: uuid.UUID, part: str) -> uuid.UUID:
    """A transfer's id within its top-up's group: the group id with its last byte set to the
    part's number (1-5). Deterministic, so a retry derives the same ids, and far cheaper than a
    fresh uuid5 per leg; two groups differing only in their last byte are 2^-112 unlikely."""
    return FastUUID(group_id.bytes[:15] + _PART_BYTES[part])


def business_date(now: datetime, time_zone: str) -> date:
    return now.astimezone(ZoneInfo(time_zone)).date()


class _Pending:
    """A top-up that passed every guard and waits for the ledger's verdict."""

    __slots__ = ("float_after", "group_status", "index", "meter", "request", "split", "tariff", "terminal", "tid",
                 "transfers")

    def __init__(self, index: int, request: VendRequest, terminal: asyncpg.Record, meter: asyncpg.Record,
                 tariff: Tariff, split: Any, transfers: list[Transfer], tid: tuple[int, int] | None = None) -> None:
        self.index = index
        self.tid = tid  # a token meter's: (TID allotted, its base year)
        self.request = request
        self.terminal = terminal
        self.meter = meter
        self.tariff = tariff
        self.split = split
        self.transfers = transfers
        self.group_status: PostStatus | None = None
        self.float_after: int | None = None


class BatchEffects(msgspec.Struct, frozen=True, kw_only=True):
    """What a batch of top-ups writes that the next batch's decisions read: receipt counters and
    daily totals per terminal, TIDs per meter, debt per customer; and the ids it records."""

    new_txn_ids: frozenset[str]
    receipts: dict[str, int]  # terminal -> receipts issued
    approved: dict[tuple[str, date], int]  # (terminal, business date) -> amount approved
    tids: dict[str, tuple[int, int]]  # meter -> (last TID issued, its base year)
    debt_recovered: dict[int, int]  # debt account -> amount recovered

    @property
    def probe_txn_id(self) -> str | None:
        """One id the batch records: visible to a read once the batch committed (None: it writes nothing)."""
        return next(iter(self.new_txn_ids), None)

    def apply(self, terminals: list[Row], meters: list[Row]) -> None:
        """Add these effects to rows read before the batch committed (in place)."""
        for row in terminals:
            terminal = row["terminal_id"]
            row["receipt_seq"] = int(row["receipt_seq"]) + self.receipts.get(terminal, 0)
            row["approved_today_minor"] = (int(row["approved_today_minor"])
                                           + self.approved.get((terminal, row["business_date"]), 0))
        for row in meters:
            issued = self.tids.get(row["meter_number"])
            if issued is not None:
                # As the commit statement moves it: forward only (another gateway may have issued
                # a later TID, already in what was read), or onto a new base year.
                tid, base_year = issued
                last = row["last_token_id"]
                if last is None or row["last_token_base_year"] != base_year or tid > int(last):
                    row["last_token_id"], row["last_token_base_year"] = tid, base_year
            recovered = self.debt_recovered.get(int(row["debt_account_id"]), 0)
            row["debt_balance_minor"] = int(row["debt_balance_minor"]) + recovered


class PreparedTopUps:
    """A decided batch of top-ups: its outcomes (approved ones completed by the commit), the
    payments to post, the writing statement's arguments and what it will change."""

    __slots__ = ("arguments", "effects", "outcomes", "pending")

    def __init__(self, *, outcomes: list[Any], pending: list[_Pending], arguments: list[Any] | None,
                 effects: BatchEffects) -> None:
        self.outcomes = outcomes
        self.pending = pending
        self.arguments = arguments
        self.effects = effects


class VendingService:
    """Stateless apart from caches of system account ids and decoder keys."""

    def __init__(self, keystore: KeyStore) -> None:
        self.keystore = keystore
        self._system_accounts: dict[tuple[AccountKind, str], int] = {}
        self._decoder_keys: dict[tuple[object, ...], bytes] = {}
        self._read_columns: tuple[tuple[str, ...], ...] | None = None

    async def _system(self, conn: asyncpg.Connection, kind: AccountKind, currency: str) -> int:
        """A system account id. Never created here: an id made inside a batch that then rolls
        back must not be cached. Agents' registration opens them (registry.add_agent)."""
        key = (kind, currency)
        if key not in self._system_accounts:
            account_id = await conn.fetchval(sql.SYSTEM_ACCOUNT_GET, kind.value, currency)
            if account_id is None:
                raise LookupError(f"no {kind.value} account in {currency}: register an agent in {currency} first")
            self._system_accounts[key] = int(account_id)
        return self._system_accounts[key]

    # -- the batch ---------------------------------------------------------------------------

    async def process_batch(self, conn: asyncpg.Connection, requests: Sequence[VendRequest], now: datetime,
                            refused: Refusals | None = None) -> list[VendOutcome]:
        """Decide every request as one transaction. Results are in request order.

        Outside a transaction block, a batch of top-ups is its reads and then one statement that
        commits (vend_commit_topups); a batch holding a reversal opens a transaction block of its
        own. Inside the caller's transaction block, it runs there and the caller commits.

        When the ledger refuses some payments' transfer groups (insufficient float), nothing is
        written and this raises RefusedByLedger naming them: the caller (inside a block, after
        rolling it back) calls again with them in `refused`, declined up front. So no in-memory
        bookkeeping of the batch (daily totals, debt left) is ever based on a payment that did not
        happen, and the common case, no refusal, pays for no savepoint. Should a payment approved
        when those were refused not be approved now (reversed meanwhile through another gateway,
        say), the refusals may no longer hold: this raises StaleRefusals, writing nothing, and the
        caller calls again with none.
        """
        assert now.tzinfo is not None
        if not conn.is_in_transaction() and any(r.kind == "reversal" for r in requests):
            async with conn.transaction(isolation="read_committed"):  # it reads what committed while it waited
                return await self._process(conn, requests, now, refused or Refusals())
        return await self._process(conn, requests, now, refused or Refusals())

    async def prepare_batch(self, conn: asyncpg.Connection, requests: Sequence[VendRequest], now: datetime,
                            after: BatchEffects | None = None) -> PreparedTopUps | None:
        """Read and decide a batch of top-ups and advices, for commit_prepared() to write; None for
        a batch holding a reversal (process_batch decides it). Reads only: `conn` may be another
        connection than the one that commits, and `after` the effects of the batch committing
        there now (see _prepare)."""
        assert now.tzinfo is not None
        if any(r.kind == "reversal" for r in requests):
            return None
        outcomes: list[Any] = [None] * len(requests)
        return await self._prepare(conn, requests, list(range(len(requests))), outcomes, now, Refusals(), after)

    async def commit_prepared(self, conn: asyncpg.Connection, prepared: PreparedTopUps) -> list[VendOutcome]:
        """The prepared batch's one statement, outside a transaction block: a transaction of its
        own. A ledger refusal writes nothing and raises RefusedByLedger: the batch is then decided
        again (process_batch with those declined)."""
        assert not conn.is_in_transaction()
        await self._post_prepared(conn, prepared)
        assert all(isinstance(o, VendOutcome) for o in prepared.outcomes)
        return list(prepared.outcomes)

    async def _process(self, conn: asyncpg.Connection, requests: Sequence[VendRequest], now: datetime,
                       refused: Refusals) -> list[VendOutcome]:
        outcomes: list[Any] = [None] * len(requests)
        segment: list[int] = []
        # The payments earlier segments posted in this attempt: a refusal in a later segment may
        # rest on them as much as on those approved beside it (see Refusals).
        posted: set[int] = set()
        # Reversals cut the batch into segments, so a reversal sees every top-up before it.
        try:
            for index, request in enumerate(requests):
                if request.kind == "reversal":
                    if segment:
                        posted |= await self._topups(conn, requests, segment, outcomes, now, refused)
                        segment = []
                    outcomes[index] = await self._reversal(conn, request, now)
                else:
                    segment.append(index)
            if segment:
                await self._topups(conn, requests, segment, outcomes, now, refused)
        except RefusedByLedger as refusal:
            refusal.approved |= posted
            raise
        assert all(o is not None for o in outcomes)
        return [o for o in outcomes if o is not None]

    async def _topups(self, conn: asyncpg.Connection, requests: Sequence[VendRequest], indexes: list[int],
                      outcomes: list[Any], now: datetime, refused: Refusals) -> set[int]:
        """Decide and post the top-ups at `indexes`; the indexes of those posted."""
        prepared = await self._prepare(conn, requests, indexes, outcomes, now, refused, None)
        await self._post_prepared(conn, prepared)
        return {p.index for p in prepared.pending}

    async def _prepare(self, conn: asyncpg.Connection, requests: Sequence[VendRequest], indexes: list[int],
                       outcomes: list[Any], now: datetime, refused: Refusals,
                       after: BatchEffects | None) -> PreparedTopUps:
        """Read and decide the top-ups at `indexes`: everything but the writing statement.

        `after`: the effects of a batch whose commit may still be running on another connection.
        The read shows that batch's writes or none of them (one statement, one snapshot, one
        committed transaction); when it shows none, the batch's effects are added to what was read,
        so this batch numbers, tokens and splits on from it. Its ids must not be in this batch."""
        batch = [requests[i] for i in indexes]
        ids = [r.client_txn_id for r in batch]
        if after is not None:
            assert after.probe_txn_id is not None and not after.new_txn_ids & set(ids)
            ids.append(after.probe_txn_id)
        known, terminal_rows, meter_rows = await self._read(
            conn, ids, list({r.terminal_id for r in batch}), list({r.meter_number for r in batch}), now)
        stored = {row["client_txn_id"]: row for row in known if row["stored"]}
        if after is not None and stored.pop(after.probe_txn_id, None) is None:
            after.apply(terminal_rows, meter_rows)
        reversed_ids = {row["client_txn_id"] for row in known if row["reversed"]}
        terminals = {row["terminal_id"]: row for row in terminal_rows}
        meters = {row["meter_number"]: row for row in meter_rows}
        dates = {tid: row["business_date"] for tid, row in terminals.items()}
        daily = {tid: int(row["approved_today_minor"]) for tid, row in terminals.items()}

        batch_tids: dict[str, tuple[int, int]] = {}  # meter -> (last TID allotted in this batch, its base year)
        seen_in_batch: dict[str, tuple[bytes, int]] = {}
        digests: dict[int, bytes] = {}  # computed once: the replay check and the stored record both need it
        pending: list[_Pending] = []
        # Debt belongs to the customer (one debt account), whichever of their meters is paid.
        debt_left = {int(row["debt_account_id"]): -int(row["debt_balance_minor"]) for row in meters.values()}
        for index, request in zip(indexes, batch, strict=True):
            digest = digests[index] = request.content_sha256()
            if request.client_txn_id in seen_in_batch:
                first_digest, first_index = seen_in_batch[request.client_txn_id]
                outcomes[index] = _Alias(first_index) if first_digest == digest else decline(
                    request, ResponseCode.DUPLICATE_DIFFERENT_CONTENT, "transaction id reused with other content")
                continue
            seen_in_batch[request.client_txn_id] = (digest, index)
            row = stored.get(request.client_txn_id)
            if row is not None:
                if bytes(row["request_sha256"]) != digest:
                    outcomes[index] = decline(request, ResponseCode.DUPLICATE_DIFFERENT_CONTENT,
                                              "transaction id reused with other content")
                elif request.client_txn_id in reversed_ids and row["response_code"] == ResponseCode.APPROVED:
                    outcomes[index] = decline(request, ResponseCode.ALREADY_REVERSED, "payment was reversed")
                else:
                    outcomes[index] = stored_outcome(self.keystore, row)
                continue
            if index in refused:
                outcomes[index] = _New(ledger_decline(request, refused[index]))
                continue
            verdict = self._guard(request, terminals.get(request.terminal_id), meters.get(request.meter_number),
                                  request.client_txn_id in reversed_ids, daily, debt_left)
            if isinstance(verdict, VendOutcome):
                outcomes[index] = _New(verdict)
                continue
            terminal, meter, tariff, split = verdict
            tid: tuple[int, int] | None = None
            if meter["supply_mode"] == "sts":
                try:
                    await self._decoder_key(conn, meter)
                    tid = _next_tid(meter, now, batch_tids)
                except (sts.StsError, LookupError):
                    # No usable key, or no TID left on the meter's base date (it needs a key
                    # change): a stored decline, not an error the terminal would retry forever.
                    outcomes[index] = _New(decline(request, ResponseCode.UNKNOWN_METER,
                                                   "the meter's token parameters are not usable"))
                    continue
                batch_tids[request.meter_number] = tid
            # Provisional: a refusal by the ledger re-runs the pass without this payment (_topups).
            daily[request.terminal_id] = daily.get(request.terminal_id, 0) + request.amount_minor
            debt_key = int(meter["debt_account_id"])
            debt_left[debt_key] = debt_left.get(debt_key, 0) - split.debt_recovery_minor
            transfers = await self._transfers(conn, request, terminal, meter, split)
            pending.append(_Pending(index, request, terminal, meter, tariff, split, transfers, tid))

        if refused.approved_ahead and refused.approved_ahead.intersection(indexes).difference(
                p.index for p in pending):
            raise StaleRefusals(f"{len(refused)} refusals were decided beside payments not approved now")
        return await self._prepare_commit(conn, requests, pending, outcomes, terminals, dates, digests,
                                          reversed_ids, batch_tids, now)

    async def _read(self, conn: asyncpg.Connection, ids: list[str], terminal_ids: list[str],
                    meter_numbers: list[str], now: datetime) -> tuple[list[Row], list[Row], list[Row]]:
        """The batch's stored records with reversals, its terminals and its meters: one round trip."""
        row = await conn.fetchrow(sql.VEND_BATCH_READ, ids, terminal_ids, meter_numbers, now)
        assert row is not None
        groups = (row["known"], row["terminals"], row["meters"])
        # The records carry no names: they come from the statements VEND_BATCH_READ wraps, read
        # once, and again should a record's width no longer match (a migration while running).
        if self._read_columns is None or any(
                len(records[0]) != len(names) for records, names in zip(groups, self._read_columns, strict=True)
                if records):
            self._read_columns = tuple([
                tuple(a.name for a in (await conn.prepare(statement)).get_attributes())
                for statement in (sql.TXNS_AND_REVERSALS_GET_MANY, sql.TERMINALS_FOR_VEND_WITH_TOTALS,
                                  sql.METERS_FOR_VEND)])
        known, terminals, meters = (
            [dict(zip(names, values, strict=True)) for values in records]
            for names, records in zip(self._read_columns, groups, strict=True))
        for row in terminals:
            # The agent's business day, and what the terminal approved on it (read for the days around it).
            day = row["business_date"] = business_date(now, row["time_zone"])
            around = (row.pop("approved_day_before_minor"), row.pop("approved_utc_day_minor"),
                      row.pop("approved_day_after_minor"))
            row["approved_today_minor"] = around[(day - row.pop("utc_date")).days + 1]
        return known, terminals, meters

    def _guard(self, request: VendRequest, terminal: asyncpg.Record | None, meter: asyncpg.Record | None,
               reversed_first: bool, daily: dict[str, int], debt_left: dict[int, int]
               ) -> VendOutcome | tuple[asyncpg.Record, asyncpg.Record, Tariff, Any]:
        if terminal is None:
            return decline(request, ResponseCode.UNKNOWN_TERMINAL, "unknown terminal")
        if terminal["status"] != "active":
            return decline(request, ResponseCode.TERMINAL_BLOCKED, f"terminal {terminal['status']}")
        operation = "advice" if request.kind == "advice" else "topup"
        if operation not in terminal["allowed_operations"]:
            return decline(request, ResponseCode.NOT_PERMITTED, f"{operation} not permitted for this terminal")
        if reversed_first:
            return decline(request, ResponseCode.ALREADY_REVERSED, "a reversal for this payment came first")
        if request.currency != terminal["currency"]:
            return decline(request, ResponseCode.CURRENCY_MISMATCH, f"agent's float is in {terminal['currency']}")
        if not terminal["txn_min_minor"] <= request.amount_minor <= terminal["txn_max_minor"]:
            return decline(request, ResponseCode.LIMIT_EXCEEDED,
                           f"amount outside {terminal['txn_min_minor']}..{terminal['txn_max_minor']}")
        spent = daily.get(request.terminal_id, 0)
        if spent + request.amount_minor > terminal["daily_limit_minor"]:
            return decline(request, ResponseCode.LIMIT_EXCEEDED, "daily limit reached")
        if meter is None:
            return decline(request, ResponseCode.UNKNOWN_METER, "unknown meter")
        if meter["tariff_valid_from"] is None or meter["tariff_currency"] != request.currency:
            return decline(request, ResponseCode.UNKNOWN_METER, "no tariff in force for this meter")
        tariff = Tariff(tariff_code=meter["tariff_code"], currency=meter["tariff_currency"],
                        energy_price_minor_per_mwh=meter["energy_price_minor_per_mwh"],
                        energy_vat_rate_bp=meter["energy_vat_rate_bp"],
                        fee_per_purchase_minor=meter["fee_per_purchase_minor"],
                        fee_vat_rate_bp=meter["fee_vat_rate_bp"])
        try:
            split = split_payment(amount_minor=request.amount_minor,
                                  debt_outstanding_minor=max(0, debt_left.get(int(meter["debt_account_id"]), 0)),
                                  debt_recovery_share_bp=meter["debt_recovery_share_bp"], tariff=tariff)
        except AmountTooSmall:
            return decline(request, ResponseCode.INVALID_AMOUNT, "amount buys no energy beyond the purchase fee")
        if meter["supply_mode"] == "sts":
            if not 0 < split.units_deci_kwh <= sts_units_max:
                return decline(request, ResponseCode.INVALID_AMOUNT, "amount buys no whole token unit or too many")
            # A token carries only representable amounts; sell the one at or below what was paid for.
            split = msgspec.structs.replace(split, units_deci_kwh=token_units(split.units_deci_kwh))
        return terminal, meter, tariff, split

    async def _transfers(self, conn: asyncpg.Connection, request: VendRequest, terminal: asyncpg.Record,
                         meter: asyncpg.Record, split: Any) -> list[Transfer]:
        currency = request.currency
        group = group_id_for(request.client_txn_id)
        meta: dict[str, str | int] = {"client_txn_id": request.client_txn_id, "terminal_id": request.terminal_id,
                                      "agent_id": int(terminal["agent_id"]), "meter_number": request.meter_number,
                                      "kind": request.kind}
        float_account = int(terminal["float_account_id"])
        credit_account = int(meter["credit_account_id"])
        collections = await self._system(conn, AccountKind.utility_collections, currency)
        # Energy for a token meter is sold now (the token carries it); a smart meter's energy
        # stays as the customer's prepayment balance, which the engine draws down.
        sold_energy = 0
        if meter["supply_mode"] == "sts":
            # Sell what the token carries (units were rounded down to a representable amount);
            # the money for the part-unit stays on the customer's credit account (see Known gaps
            # in docs/THREAT_MODEL.md: no later purchase spends it yet).
            price = int(meter["energy_price_minor_per_mwh"])
            sold_energy = min(split.energy_minor, -(-split.units_deci_kwh * price // DECI_KWH_PER_MWH))
        parts: list[tuple[str, int, int, int]] = [
            (TransferKind.collection, float_account, credit_account, request.amount_minor),
            (TransferKind.debt_recovery, credit_account, int(meter["debt_account_id"]), split.debt_recovery_minor),
            (TransferKind.energy_sale, credit_account, collections, split.fees_minor + sold_energy),
            ("vat", credit_account, await self._system(conn, AccountKind.vat_payable, currency), split.vat_minor),
            (TransferKind.commission, await self._system(conn, AccountKind.commission_expense, currency),
             int(terminal["commission_account_id"]),
             commission_minor(request.amount_minor, int(terminal["commission_rate_bp"]))),
        ]
        return [
            Transfer(id=transfer_id_for(group, str(name)), debit_account_id=debit,
                     credit_account_id=credit, amount_minor=amount, currency=currency, kind=str(name),
                     group_id=group, metadata=meta)
            for name, debit, credit, amount in parts if amount > 0
        ]

    async def _post(self, conn: asyncpg.Connection, pending: list[_Pending], arguments: list[Any]) -> None:
        """The batch's one writing statement; sets each pending payment's group status and float after.

        A ledger refusal rolls the statement back (V0001): the statuses of the transfers not
        posted then come from its DETAIL, and nothing was written."""
        transfers = sum(len(p.transfers) for p in pending)
        try:
            row = await conn.fetchrow(sql.VEND_COMMIT_TOPUPS, *arguments)
        except asyncpg.PostgresError as exc:
            if exc.sqlstate != sql.STATE_LEDGER_REFUSED:
                raise
            statuses = refused_statuses(exc.detail, transfers)
            debit_afters: list[int] | None = None
        else:
            assert row is not None
            statuses, debit_afters = list(row["o_statuses"] or []), row["o_debit_afters"]
        if len(statuses) != transfers:
            raise RuntimeError(f"{len(statuses)} ledger statuses for {transfers} transfers")
        # One status per transfer, in the order posted: each group's follow one another, its float
        # debit (the collection) first.
        position = 0
        for p in pending:
            group = [PostStatus(status) for status in statuses[position:position + len(p.transfers)]]
            if debit_afters is not None and group[0].posted:
                assert p.transfers[0].debit_account_id == int(p.terminal["float_account_id"])
                p.float_after = int(debit_afters[position])
            position += len(p.transfers)
            failed = [s for s in group if s not in (PostStatus.ok, PostStatus.exists)]
            # The first real reason wins over the linked_failed of its siblings.
            reasons = [s for s in failed if s != PostStatus.linked_failed]
            p.group_status = reasons[0] if reasons else (failed[0] if failed else PostStatus.ok)

    async def _prepare_commit(self, conn: asyncpg.Connection, requests: Sequence[VendRequest],
                              pending: list[_Pending], outcomes: list[Any], terminals: dict[str, asyncpg.Record],
                              dates: dict[str, date], digests: dict[int, bytes], reversed_ids: set[str],
                              batch_tids: dict[str, tuple[int, int]], now: datetime) -> PreparedTopUps:
        """Number, token and seal every payment as approved, and build the statement that records
        them and posts them all (_post_prepared). `batch_tids`: each token meter's last TID allotted
        to `pending` and its base year."""
        approved = pending
        # Receipt numbers: in arrival order per terminal, on from the counter the batch read;
        # the commit statement moves each counter by the receipts its terminal issued.
        receipt_numbers: dict[int, int] = {}
        issued: dict[str, int] = {}
        for p in approved:
            terminal_id = p.request.terminal_id
            count = issued[terminal_id] = issued.get(terminal_id, 0) + 1
            receipt_numbers[p.index] = int(terminals[terminal_id]["receipt_seq"]) + count
        counter_rows = sorted(issued.items())
        token_rows: list[tuple[Any, ...]] = []
        outbox_rows: list[tuple[Any, ...]] = []
        receipt_rows: list[tuple[Any, ...]] = []
        for p in pending:
            request = p.request
            tokens: list[str] = []
            if p.meter["supply_mode"] == "sts":
                token, tid = await self._issue_token(conn, p)
                tokens.append(token)
                token_rows.append((request.client_txn_id, request.meter_number, tid,  # issued at `now`
                                   0, 0, p.split.units_deci_kwh,
                                   self.keystore.seal(token.encode(), f"token:{request.client_txn_id}"),
                                   token[-4:]))
            receipt_number = receipt_numbers[p.index]
            outcome = VendOutcome(
                client_txn_id=request.client_txn_id, response_code=int(ResponseCode.APPROVED), message="approved",
                meter_number=request.meter_number, amount_minor=request.amount_minor, currency=request.currency,
                receipt_number=receipt_number, tokens=tokens, units_deci_kwh=p.split.units_deci_kwh,
                debt_recovery_minor=p.split.debt_recovery_minor, energy_minor=p.split.energy_minor,
                fees_minor=p.split.fees_minor, vat_minor=p.split.vat_minor,
                commission_minor=sum(t.amount_minor for t in p.transfers if t.kind == TransferKind.commission),
                # The float remaining is known once posted: it is added after the commit.
                issued_at=now, tariff_code=p.tariff.tariff_code,
                receipt_lines=receipt_lines(request, p, receipt_number, now),
            )
            outcomes[p.index] = _New(outcome)
            receipt_rows.append((request.terminal_id, receipt_number, request.client_txn_id,  # issued at `now`
                                 p.tariff.tariff_code, p.meter["tariff_valid_from"]))
            outbox_rows.append(("payment_received", request.client_txn_id, request.meter_number, msgspec.json.encode({
                "client_txn_id": request.client_txn_id, "meter_number": request.meter_number,
                "supply_mode": p.meter["supply_mode"], "amount_minor": request.amount_minor,
                "currency": request.currency, "debt_recovery_minor": p.split.debt_recovery_minor,
                "energy_minor": p.split.energy_minor, "units_deci_kwh": p.split.units_deci_kwh,
                "paid_at": now.isoformat(), "taken_at": (request.taken_at or now).astimezone(UTC).isoformat(),
            }).decode()))

        txn_rows: list[tuple[Any, ...]] = []
        groups = {p.index: p.transfers[0].group_id for p in approved}
        for i, value in enumerate(outcomes):
            if not isinstance(value, _New):
                continue
            outcome, request = value.outcome, requests[i]
            terminal = terminals.get(request.terminal_id)
            if terminal is None:
                continue  # an unknown terminal has no record to hang a transaction on
            if outcome.response_code in NOT_FINAL_DECLINES:
                continue  # decided afresh when repeated, as a reversal refused the same way is
            txn_rows.append((request.client_txn_id, request.kind, request.terminal_id, int(terminal["agent_id"]),
                             digests[i], outcome.response_code, request.meter_number or None,
                             request.amount_minor, request.currency or terminal["currency"], groups.get(i),
                             outcome.receipt_number, dates[request.terminal_id], seal_outcome(self.keystore, outcome)))
        totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for p in approved:
            totals[p.request.terminal_id][0] += 1
            totals[p.request.terminal_id][1] += p.request.amount_minor
        total_rows = [(t, dates[t], n, amount) for t, (n, amount) in totals.items()]
        # One row per meter touched: its last purchase and, for a token meter, its last TID.
        meter_updates: dict[str, list[Any]] = {}
        for p in approved:
            meter_updates[p.request.meter_number] = [p.request.amount_minor, None, None]
        for number, (tid, base_year) in batch_tids.items():
            meter_updates.setdefault(number, [None, None, None])[1:] = [tid, base_year]
        meter_rows = [(number, *values) for number, values in sorted(meter_updates.items())]
        arguments: list[Any] | None = None
        new_ids = [row[0] for row in txn_rows]
        if txn_rows or meter_rows:
            columns = batch_columns([t for p in approved for t in p.transfers])
            # A group's legs share one metadata text (batch_columns encodes each dict once): sent once.
            group_metadata: list[str] = []
            metadata_of: list[int] = []
            for encoded in columns.metadata_json:
                if not group_metadata or encoded is not group_metadata[-1]:
                    group_metadata.append(encoded)
                metadata_of.append(len(group_metadata))
            arguments = [
                columns.ids, columns.debit_account_ids, columns.credit_account_ids, columns.amounts_minor,
                columns.currencies, columns.kinds, columns.group_ids, group_metadata, metadata_of,
                *_columns(txn_rows, 13), [i for i in new_ids if i in reversed_ids],
                *_columns(receipt_rows, 5), *_columns(token_rows, 8),
                *_columns(outbox_rows, 4), *_columns(total_rows, 4), *_columns(meter_rows, 4), now,
                *_columns(counter_rows, 2)]
        debt_recovered: dict[int, int] = defaultdict(int)
        for p in approved:
            debt_recovered[int(p.meter["debt_account_id"])] += p.split.debt_recovery_minor
        effects = BatchEffects(
            new_txn_ids=frozenset(new_ids),
            receipts=dict(issued), approved={(t, dates[t]): amount for t, (_, amount) in totals.items()},
            tids=dict(batch_tids), debt_recovered=dict(debt_recovered))
        return PreparedTopUps(outcomes=outcomes, pending=approved, arguments=arguments, effects=effects)

    async def _post_prepared(self, conn: asyncpg.Connection, prepared: PreparedTopUps) -> None:
        """Post and record a prepared batch in its one statement. Should the ledger refuse any
        payment, nothing is written and RefusedByLedger names the refused payments, for the batch
        to be decided again without them, and those approved beside them."""
        approved, outcomes = prepared.pending, prepared.outcomes
        if prepared.arguments is not None:
            await self._post(conn, approved, prepared.arguments)
            failed: dict[int, PostStatus] = {p.index: p.group_status for p in approved
                                             if p.group_status is not None and p.group_status != PostStatus.ok}
            if failed:
                raise RefusedByLedger(failed, {p.index for p in approved} - failed.keys())
        for p in approved:
            value = outcomes[p.index]
            assert isinstance(value, _New) and p.float_after is not None
            value.outcome = msgspec.structs.replace(value.outcome, float_remaining_minor=p.float_after)
        # Resolve in-batch repeats now that their first occurrence has its outcome.
        for index, value in enumerate(outcomes):
            if isinstance(value, _Alias):
                first = outcomes[value.index]
                outcomes[index] = first.outcome if isinstance(first, _New) else first
        for i, value in enumerate(outcomes):
            if isinstance(value, _New):
                outcomes[i] = value.outcome

    # -- tokens ------------------------------------------------------------------------------

    async def _issue_token(self, conn: asyncpg.Connection, p: _Pending) -> tuple[str, int]:
        """A class-0 credit token with the TID allotted when the payment was decided (_next_tid):
        newer than any this meter has had; persisted with the batch."""
        assert p.tid is not None
        tid = p.tid[0]
        decoder_key = await self._decoder_key(conn, p.meter)
        token = sts.credit_token(decoder_key, 0, tid, p.split.units_deci_kwh, _token_random(p.request.client_txn_id))
        return token, tid

    async def _decoder_key(self, conn: asyncpg.Connection, meter: asyncpg.Record) -> bytes:
        """The meter's decoder key. The vending key row comes with the meter's row in every batch,
        so a re-key or a new vending key takes effect at once; the derivation is what is cached,
        keyed by everything it depends on."""
        if meter["vending_key_ciphertext"] is None:
            raise LookupError(f"no vending key for supply group {meter['sts_supply_group_code']}")
        sealed = bytes(meter["vending_key_ciphertext"])
        number = meter["meter_number"]
        group, revision, key_type = meter["sts_supply_group_code"], int(meter["sts_key_revision"]), \
            int(meter["vending_key_type"])
        cache_key = (number, group, meter["sts_tariff_index"], revision, key_type, hashlib.sha256(sealed).digest())
        cached = self._decoder_keys.get(cache_key)
        if cached is not None:
            return cached
        vending_key = self.keystore.open(sealed, vending_key_record(group, revision))
        key = sts.derive_decoder_key_dkga02(vending_key, key_type, group, meter["sts_tariff_index"], revision, number)
        if len(self._decoder_keys) >= decoder_key_cache_max:
            self._decoder_keys.clear()
        self._decoder_keys[cache_key] = key
        return key

    # -- reversals ---------------------------------------------------------------------------

    async def _reversal(self, conn: asyncpg.Connection, request: VendRequest, now: datetime) -> VendOutcome:
        """Undo an approved payment whose outcome its terminal did not learn (idempotent)."""
        digest = request.content_sha256()
        if (repeat := await self._stored_reversal(conn, request, digest)) is not None:
            return repeat
        terminals = await conn.fetch(sql.TERMINALS_FOR_VEND, [request.terminal_id])
        if not terminals:
            return decline(request, ResponseCode.UNKNOWN_TERMINAL, "unknown terminal")
        terminal = terminals[0]
        if terminal["status"] != "active":
            return decline(request, ResponseCode.TERMINAL_BLOCKED, f"terminal {terminal['status']}")
        if "reversal" not in terminal["allowed_operations"]:
            return decline(request, ResponseCode.NOT_PERMITTED, "reversal not permitted for this terminal")
        await conn.execute(sql.LOCK_TXN_IDS, [request.original_txn_id])
        # The same reversal, sent again to another gateway, may have committed while this one
        # waited for the lock: its answer is this one's.
        if (repeat := await self._stored_reversal(conn, request, digest)) is not None:
            return repeat
        outcome = await self._reverse(conn, request, terminal, now)
        # Only final answers are recorded: a reversal refused for a wrong amount, a blocked
        # terminal or a ledger refusal may be sent again, corrected, under the same id.
        if outcome.response_code in (ResponseCode.APPROVED, ResponseCode.ORIGINAL_NOT_FOUND):
            await self._store(conn, request, terminal, outcome, now, group_id=None)
        return outcome

    async def _stored_reversal(self, conn: asyncpg.Connection, request: VendRequest,
                               digest: bytes) -> VendOutcome | None:
        stored = await conn.fetchrow(sql.TXN_GET, request.client_txn_id)
        if stored is None:
            return None
        if bytes(stored["request_sha256"]) != digest:
            return decline(request, ResponseCode.DUPLICATE_DIFFERENT_CONTENT, "transaction id reused")
        return stored_outcome(self.keystore, stored)

    async def _reverse(self, conn: asyncpg.Connection, request: VendRequest, terminal: asyncpg.Record,
                       now: datetime) -> VendOutcome:
        original_id = request.original_txn_id
        if await conn.fetch(sql.REVERSALS_GET_MANY, [original_id]):
            return decline(request, ResponseCode.ALREADY_REVERSED, "already reversed")
        original = await conn.fetchrow(sql.TXN_GET, original_id)
        if original is not None and original["kind"] not in ("topup", "advice"):
            # A reversal's own id is no payment's: nothing to undo, no tombstone (no payment can carry it).
            return decline(request, ResponseCode.ORIGINAL_NOT_FOUND, "no approved payment with that id")
        if original is None or original["response_code"] != ResponseCode.APPROVED:
            # Unknown (or declined) original: acknowledge and leave a tombstone, so an original
            # that arrives later is refused and never applied.
            await conn.execute(sql.REVERSAL_INSERT, original_id, request.client_txn_id, request.terminal_id,
                               request.reason, False)
            return decline(request, ResponseCode.ORIGINAL_NOT_FOUND, "no approved payment with that id")
        if original["terminal_id"] != request.terminal_id:
            return decline(request, ResponseCode.NOT_PERMITTED, "a payment of another terminal")
        if (int(original["amount_minor"]), original["currency"]) != (request.amount_minor, request.currency):
            return decline(request, ResponseCode.INVALID_AMOUNT, "amount or currency differs from the original")
        if now - original["created_at"] > timedelta(seconds=reversal_window_s):
            return decline(request, ResponseCode.NOT_PERMITTED, "too late to reverse: ask the back office")
        if original["reprints"]:
            # A reprinted receipt (and token) reached the customer: not a payment whose outcome was lost.
            return decline(request, ResponseCode.NOT_PERMITTED, "the receipt was reprinted: ask the back office")
        results = await reverse_group(conn, original["group_id"], reason=request.reason or "reversal")
        refused = [r.status for r in results if r.status not in (PostStatus.ok, PostStatus.exists)]
        if refused:
            return decline(request, ResponseCode.NOT_PERMITTED, f"cannot reverse: {refused[0]}")
        await conn.execute(sql.REVERSAL_INSERT, original_id, request.client_txn_id, request.terminal_id,
                           request.reason, True)
        await conn.execute(sql.TOKEN_VOID, original_id)
        await conn.execute(sql.OUTBOX_INSERT_MANY, ["payment_reversed"], [original_id], [original["meter_number"]],
                           [msgspec.json.encode({"client_txn_id": original_id,
                                                 "reversal_txn_id": request.client_txn_id,
                                                 "amount_minor": request.amount_minor,
                                                 "currency": request.currency, "reason": request.reason,
                                                 "reversed_at": now.isoformat()}).decode()])
        float_id = int(terminal["float_account_id"])
        balances = await self._balances(conn, [float_id])
        return VendOutcome(client_txn_id=request.client_txn_id, response_code=int(ResponseCode.APPROVED),
                           message="reversed", meter_number=original["meter_number"] or "",
                           amount_minor=request.amount_minor, currency=request.currency,
                           float_remaining_minor=balances.get(float_id), issued_at=now)

    async def _store(self, conn: asyncpg.Connection, request: VendRequest, terminal: asyncpg.Record,
                     outcome: VendOutcome, now: datetime, group_id: uuid.UUID | None) -> None:
        await conn.execute(sql.TXN_INSERT_MANY, [request.client_txn_id], [request.kind], [request.terminal_id],
                           [int(terminal["agent_id"])], [request.content_sha256()], [outcome.response_code],
                           [request.meter_number or None], [request.amount_minor],
                           [request.currency or terminal["currency"]], [group_id], [outcome.receipt_number],
                           [business_date(now, terminal["time_zone"])], [seal_outcome(self.keystore, outcome)])

    async def _balances(self, conn: asyncpg.Connection, account_ids: list[int]) -> dict[int, int]:
        if not account_ids:
            return {}
        rows = await conn.fetch(sql.ACCOUNT_BALANCES, list(set(account_ids)))
        return {int(r["account_id"]): int(r["balance_minor"]) for r in rows}


def refused_statuses(detail: str | None, transfers: int) -> list[str]:
    """Every transfer's status from a V0001 DETAIL, which names those not posted as position:status
    (1-based, comma separated); the others would have posted."""
    statuses = ["ok"] * transfers
    for item in (detail or "").split(","):
        position, _, status = item.partition(":")
        if not position.isdigit() or not 1 <= int(position) <= transfers or status not in PostStatus.__members__:
            raise RuntimeError(f"unreadable ledger refusal {item[:40]!r}")
        statuses[int(position) - 1] = status
    return statuses


# Declines that hold only while they last: a terminal blocked or not granted the operation, a
# float account blocked, an error of vendgate's own. None is recorded under the payment's id, so
# the terminal's repeat once the block is lifted (an advice it must forward, a top-up whose
# outcome it never learnt) is decided afresh rather than answered the stale decline for ever.
NOT_FINAL_DECLINES: frozenset[int] = frozenset(
    {ResponseCode.TERMINAL_BLOCKED, ResponseCode.NOT_PERMITTED, ResponseCode.SYSTEM_ERROR})


def ledger_decline(request: VendRequest, status: PostStatus) -> VendOutcome:
    code = {PostStatus.insufficient_balance: ResponseCode.INSUFFICIENT_FLOAT,
            PostStatus.account_blocked: ResponseCode.NOT_PERMITTED,
            PostStatus.currency_mismatch: ResponseCode.CURRENCY_MISMATCH}.get(status, ResponseCode.SYSTEM_ERROR)
    return decline(request, code, "insufficient float" if code == ResponseCode.INSUFFICIENT_FLOAT else str(status))


class RefusedByLedger(Exception):
    """Some groups were refused: roll back and process the batch again with them declined."""

    def __init__(self, failed: dict[int, PostStatus], approved: set[int]) -> None:
        super().__init__(f"{len(failed)} groups refused")
        self.failed = failed
        self.approved = approved  # the payments whose groups the same attempt would have posted


class Refusals(dict[int, PostStatus]):
    """The payments the ledger refused in earlier attempts of a batch, by index, declined up front
    in later ones, and the payments approved in those attempts: a refusal holds while they are."""

    def __init__(self) -> None:
        super().__init__()
        self.approved_ahead: set[int] = set()

    def add(self, refusal: RefusedByLedger) -> None:
        self.update(refusal.failed)
        self.approved_ahead |= refusal.approved


class StaleRefusals(Exception):
    """A payment approved beside earlier refusals is not approved now: decide again with none."""


class _New:
    """A decision made in this batch, to be stored."""

    __slots__ = ("outcome",)

    def __init__(self, outcome: VendOutcome) -> None:
        self.outcome = outcome


class _Alias:
    """A repeat, within one batch, of an earlier request with the same id and content."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


def _columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows as column lists for unnest (empty lists for no rows)."""
    if not rows:
        return [[] for _ in range(width)]
    columns = [list(column) for column in zip(*rows, strict=True)]
    assert len(columns) == width
    return columns


def _next_tid(meter: Row, now: datetime, batch_tids: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """The TID for a token meter's next token, on from the last one stored for its base date or
    allotted earlier in this batch; raises sts.StsError when its base date has none left."""
    base_year = int(meter["sts_base_year"])
    stored = meter["last_token_id"] if meter["last_token_base_year"] == base_year else None
    allotted = batch_tids.get(meter["meter_number"])  # one meter row per batch: the same base year
    previous = allotted[0] if allotted is not None else stored
    return sts.next_token_id(now, None if previous is None else int(previous), base_year), base_year


def token_units(units: int) -> int:
    """The largest amount an STS token can carry that is not more than `units` (tenths of kWh)."""
    field = sts.encode_amount(units)
    if sts.decode_amount(field) > units:
        field -= 1  # the previous representable value, also across an exponent boundary
    result = sts.decode_amount(field)
    assert 0 < result <= units
    return result


def _token_random(client_txn_id: str) -> int:
    # Deterministic per transaction: a rebuilt token for the same payment is the same token.
    return hashlib.sha256(client_txn_id.encode()).digest()[0] & 0x0F


def receipt_lines(request: VendRequest, p: _Pending, receipt_number: int, now: datetime) -> list[str]:
    """The receipt, receipt_line_chars_max wide (a terminal's printer): a longer line goes on over
    the next lines, never cut."""
    s = p.split

    def money(minor: int) -> str:
        return format_minor(minor, request.currency)

    lines = [
        f"RECEIPT {request.terminal_id}-{receipt_number:06d}",
        now.strftime("%Y-%m-%d %H:%M UTC"),
        f"METER {request.meter_number}",
        f"PAID {money(request.amount_minor)}",
        f"DEBT {money(s.debt_recovery_minor)}",
        f"ENERGY {money(s.energy_minor)}",
        f"FEES {money(s.fees_minor)}",
        f"VAT {money(s.vat_minor)}",
        f"UNITS {s.units_deci_kwh // 10}.{s.units_deci_kwh % 10} kWh",
        f"TARIFF {p.tariff.tariff_code}",
    ]
    width = receipt_line_chars_max
    return [line[start:start + width] for line in lines for start in range(0, max(len(line), 1), width)]


def now_utc() -> datetime:
    return datetime.now(UTC)
