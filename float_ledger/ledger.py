"""Posting, balances, statements, reversals and events of the float ledger (asyncpg).

Rules:
- apply_transfers() runs inside the caller's open transaction, so the gateway can post a batch of
  top-ups together with its own rows and commit once. It costs one round trip, locks the batch's
  accounts in id order, applies transfers in the given order against running balances and never
  raises for a refusal: a refusal is a PostStatus and the transaction stays usable.
- post_transfers() posts a batch as one statement outside a transaction block (PostgreSQL makes
  it a transaction of its own: one round trip) and retries it on serialization failure (40001)
  and deadlock (40P01) only, at most retries_max times.
- A transfer id is the idempotency key: a replay gets `exists` with the stored original, other
  content under a known id gets `exists_with_different_content` and posts nothing.
- A linked group is posted once: a new transfer under the group id of posted transfers gets
  `exists_with_different_content` (the group exists, with other content) and its group in the
  batch fails as one, so what reverse_group() compensates is what succeeded as one.
- The database enforces each lower bound too (a CHECK); meeting it would be a bug here, so it
  propagates as an error instead of becoming a status.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec

from float_ledger import sql
from float_ledger.errors import (
    AccountNotFound,
    InvalidAccount,
    InvalidTransfer,
    LedgerError,
    PostingsInFlight,
    RetriesExhausted,
)
from float_ledger.model import (
    Account,
    AccountKind,
    EventCursor,
    EventKind,
    LedgerEvent,
    Metadata,
    PostedTransfer,
    PostResult,
    PostStatus,
    StatementCursor,
    StatementEntry,
    StatementPage,
    Transfer,
    TransferColumns,
    TransferKind,
    amount_minor_max,
    batch_columns,
    check_account,
    check_float_bound,
    commission_transfer,
    events_page_size_max,
    reversal_group_id_for,
    reversal_transfers,
    statement_page_size_max,
)

post_retries_max = 8
retry_backoff_s_first = 0.002
retry_backoff_s_max = 0.2
# How long a read as of a time waits for postings begun by then that are still open.
postings_settle_timeout_s = 10.0
# Retry these SQLSTATEs and no other: serialization_failure, deadlock_detected.
RETRY_SQLSTATES = frozenset({"40001", "40P01"})
# Before every posted transfer: the first page of a statement.
_STATEMENT_START = StatementCursor(created_at=datetime(1, 1, 2, tzinfo=UTC), seq=0)

_metadata_decoder = msgspec.json.Decoder(Metadata)

# asyncpg ships no type information: connections and pools are Any here.
Connection = Any
PoolOrConnection = Any


def _metadata(raw: str | None) -> Metadata:
    return _metadata_decoder.decode(raw) if raw else {}


def _posted_from_record(record: Any) -> PostedTransfer:
    return PostedTransfer(
        id=record["id"], debit_account_id=record["debit_account_id"], credit_account_id=record["credit_account_id"],
        amount_minor=record["amount_minor"], currency=record["currency"], kind=record["kind"],
        group_id=record["group_id"], metadata=_metadata(record["metadata"]), seq=record["seq"],
        created_at=record["created_at"], debit_balance_after_minor=record["debit_balance_after_minor"],
        credit_balance_after_minor=record["credit_balance_after_minor"])


def _account_from_record(record: Any) -> Account:
    return Account(id=record["id"], kind=AccountKind(record["kind"]), currency=record["currency"],
                   owner_ref=record["owner_ref"], balance_minor=record["balance_minor"],
                   lower_bound_minor=record["lower_bound_minor"], low_threshold_minor=record["low_threshold_minor"],
                   blocked=record["blocked"], created_at=record["created_at"])


# -- accounts ---------------------------------------------------------------------------------------


async def create_account(conn: Connection, *, kind: AccountKind, currency: str, owner_ref: str,
                         lower_bound_minor: int | None = 0, low_threshold_minor: int | None = None) -> int:
    """A new account at balance 0. lower_bound_minor None: unbounded (may go negative without limit)."""
    check_account(currency=currency, owner_ref=owner_ref, lower_bound_minor=lower_bound_minor,
                  low_threshold_minor=low_threshold_minor, kind=AccountKind(kind))
    account_id = await conn.fetchval(sql.SQL_CREATE_ACCOUNT, AccountKind(kind).value, currency, owner_ref,
                                     lower_bound_minor, low_threshold_minor)
    return int(account_id)


async def get_account(conn: Connection, account_id: int) -> Account:
    record = await conn.fetchrow(sql.SQL_GET_ACCOUNT, account_id)
    if record is None:
        raise AccountNotFound(f"no ledger account {account_id}")
    return _account_from_record(record)


async def find_accounts(conn: Connection, *, owner_ref: str, kind: AccountKind | None = None) -> list[Account]:
    records = await conn.fetch(sql.SQL_FIND_ACCOUNTS, owner_ref, None if kind is None else AccountKind(kind).value)
    return [_account_from_record(record) for record in records]


async def set_account_blocked(conn: Connection, account_id: int, *, blocked: bool) -> None:
    """A blocked account takes no transfer except a reversal."""
    if await conn.fetchval(sql.SQL_SET_BLOCKED, account_id, blocked) is None:
        raise AccountNotFound(f"no ledger account {account_id}")


async def set_low_threshold(conn: Connection, account_id: int, *, low_threshold_minor: int | None) -> None:
    """Set (None: remove) the account's low threshold. A change that puts the balance below it, or
    no longer below it, writes that event (float_below_threshold, float_restored) as a posting
    crossing it does, naming no transfer."""
    if low_threshold_minor is not None and abs(low_threshold_minor) > amount_minor_max:
        raise InvalidAccount(f"low_threshold_minor {low_threshold_minor} beyond ±{amount_minor_max}")
    if await conn.fetchval(sql.SQL_SET_LOW_THRESHOLD, account_id, low_threshold_minor) is None:
        raise AccountNotFound(f"no ledger account {account_id}")


async def set_lower_bound(conn: Connection, account_id: int, *, lower_bound_minor: int | None) -> None:
    """Change a bound (e.g. grant a credit limit: -limit). Refused when the balance is already below
    it, and for an agent's float, whose bound stays 0."""
    record = await conn.fetchrow(sql.SQL_SET_LOWER_BOUND, account_id, lower_bound_minor)
    if record is None:
        raise AccountNotFound(f"no ledger account {account_id}")
    check_float_bound(record["kind"], lower_bound_minor)
    if not record["ok"]:
        raise InvalidAccount(f"account {account_id} balance {record['balance_minor']} is below {lower_bound_minor}")


# -- posting ----------------------------------------------------------------------------------------


async def apply_transfers(conn: Connection, transfers: Sequence[Transfer]) -> list[PostResult]:
    """Post a batch inside the caller's (READ COMMITTED) transaction; one PostResult per transfer, in order.

    Raises InvalidTransfer (before any SQL) for a structural error: amount not positive, debit =
    credit, bad currency or kind, group not consecutive, metadata too large, batch too long.
    """
    return await _apply_columns(conn, transfers, batch_columns(transfers))


async def _apply_columns(conn: Connection, transfers: Sequence[Transfer], columns: TransferColumns) -> list[PostResult]:
    if not transfers:
        return []
    record = await conn.fetchrow(
        sql.SQL_APPLY_TRANSFERS, columns.ids, columns.debit_account_ids, columns.credit_account_ids,
        columns.amounts_minor, columns.currencies, columns.kinds, columns.group_ids, columns.metadata_json)
    statuses, seqs, created_ats = record["statuses"], record["seqs"], record["created_ats"]
    debit_afters, credit_afters, posted_at = record["debit_afters"], record["credit_afters"], record["posted_at"]
    assert len(statuses) == len(transfers)
    results = []
    for index, transfer in enumerate(transfers):
        status = PostStatus(statuses[index])
        posted = None
        if status.posted:
            # ok: the content is what was sent; exists: the stored content equals what was sent.
            posted = PostedTransfer(
                id=transfer.id, debit_account_id=transfer.debit_account_id,
                credit_account_id=transfer.credit_account_id, amount_minor=transfer.amount_minor,
                currency=transfer.currency, kind=transfer.kind, group_id=transfer.group_id,
                metadata=transfer.metadata, seq=seqs[index],
                created_at=posted_at if status is PostStatus.ok else created_ats[index],
                debit_balance_after_minor=debit_afters[index], credit_balance_after_minor=credit_afters[index])
        results.append(PostResult(transfer.id, status, posted))
    return results


def _is_retryable(exc: BaseException) -> bool:
    return getattr(exc, "sqlstate", None) in RETRY_SQLSTATES


async def post_transfers(pool_or_conn: PoolOrConnection, transfers: Sequence[Transfer], *,
                         retries_max: int = post_retries_max) -> list[PostResult]:
    """Post a batch as a transaction of its own, retrying only on 40001/40P01, at most retries_max times.

    The batch is one statement outside any transaction block, so PostgreSQL runs it as its own
    transaction (at the session's isolation level, READ COMMITTED by default): one round trip.
    """
    if isinstance(pool_or_conn, asyncpg.Pool):
        async with pool_or_conn.acquire() as conn:
            return await _post_own_transaction(conn, transfers, retries_max)
    return await _post_own_transaction(pool_or_conn, transfers, retries_max)


async def _post_own_transaction(conn: Connection, transfers: Sequence[Transfer],
                                retries_max: int) -> list[PostResult]:
    if conn.is_in_transaction():
        raise LedgerError("post_transfers runs its own transaction: inside yours, call apply_transfers")
    columns = batch_columns(transfers)
    backoff_s = retry_backoff_s_first
    for attempt in range(retries_max + 1):
        try:
            return await _apply_columns(conn, transfers, columns)
        except asyncpg.PostgresError as exc:
            if not _is_retryable(exc):
                raise
            if attempt == retries_max:
                raise RetriesExhausted(
                    f"batch of {len(transfers)} transfers: {exc.sqlstate} on {retries_max + 1} attempts") from exc
        # Jittered exponential backoff keeps the retrying transactions from meeting again.
        await asyncio.sleep(random.uniform(0, backoff_s))
        backoff_s = min(backoff_s * 2, retry_backoff_s_max)
    raise AssertionError("unreachable: the loop returns or raises")


async def get_transfer(conn: Connection, transfer_id: uuid.UUID) -> PostedTransfer | None:
    record = await conn.fetchrow(sql.SQL_GET_TRANSFER, transfer_id)
    return None if record is None else _posted_from_record(record)


async def group_transfers(conn: Connection, group_id: uuid.UUID) -> list[PostedTransfer]:
    """The posted transfers of a group, in posting order."""
    return [_posted_from_record(record) for record in await conn.fetch(sql.SQL_GROUP_TRANSFERS, group_id)]


async def reverse_group(conn: Connection, group_id: uuid.UUID, *, reason: str,
                        reversal_group_id: uuid.UUID | None = None) -> list[PostResult]:
    """Compensate every posted transfer of a group with a linked group of reversals, in the caller's transaction.

    Idempotent: the compensating ids derive from the originals' ids, so a second call reports
    `exists` (or `exists_with_different_content` when the reason differs). A group with no posted
    transfer has nothing to reverse: []. The reversals are refused as one (e.g. insufficient_balance
    when the customer's credit was already spent) and then nothing is posted. A group of reversals
    is not reversed in turn (InvalidTransfer): that would apply the payment again under ids no
    idempotency key covers; a payment to be made again is posted again, under its own ids.
    A `reversal_group_id` of a group posted already gets `exists_with_different_content` for
    transfers that are not its own: a group posts once.
    """
    originals = await group_transfers(conn, group_id)
    if not originals:
        return []
    if any(t.kind == TransferKind.reversal for t in originals):
        raise InvalidTransfer(f"group {group_id} holds reversals: a reversal is not reversed")
    compensations = reversal_transfers(
        originals, reversal_group_id=reversal_group_id or reversal_group_id_for(group_id), reason=reason)
    return await apply_transfers(conn, compensations)


async def accrue_commission(conn: Connection, *, transfer_id: uuid.UUID, expense_account_id: int,
                            payable_account_id: int, collected_minor: int, rate_ppm: int, currency: str,
                            metadata: Metadata, group_id: uuid.UUID | None = None) -> PostResult | None:
    """Accrue commission on a collected amount (rounded down) in the caller's transaction; None when 0.

    A top-up usually carries its commission inside its linked group (model.top_up_transfers); this
    posts it on its own, e.g. for payments collected before the agent's rate was set. With the
    `group_id` of a posted group it is refused `exists_with_different_content`: a group posts once.
    """
    transfer = commission_transfer(transfer_id=transfer_id, expense_account_id=expense_account_id,
                                   payable_account_id=payable_account_id, collected_minor=collected_minor,
                                   rate_ppm=rate_ppm, currency=currency, metadata=metadata, group_id=group_id)
    if transfer is None:
        return None
    [result] = await apply_transfers(conn, [transfer])
    return result


# -- balances, statements, events -------------------------------------------------------------------


async def balance(conn: Connection, account_id: int) -> int:
    value = await conn.fetchval(sql.SQL_BALANCE, account_id)
    if value is None:
        raise AccountNotFound(f"no ledger account {account_id}")
    return int(value)


async def wait_for_postings_until(conn: Connection, at: datetime, *,
                                  timeout_s: float = postings_settle_timeout_s) -> None:
    """Return once every transfer dated at or before `at` is committed or rolled back, so a
    balance or a day read as of `at` is final (for a time still to come: as of now).

    A posting dates its transfers once it holds its accounts' locks, and commits a moment later:
    a read just after `at` could miss one dated before it that commits after the read, and the
    same question asked again would get another answer. So this waits for every transaction open
    now that began by `at`; PostingsInFlight after `timeout_s`, naming one that is still open. Call
    it outside a transaction or in a READ COMMITTED one (a REPEATABLE READ transaction's snapshot
    is taken already: what it waited for would stay unseen).
    """
    if at.tzinfo is None:
        raise ValueError("wait_for_postings_until needs a timezone-aware time")
    xids = await conn.fetchval(sql.SQL_OPEN_BEFORE, at)
    if not xids:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    pause_s = 0.002
    while True:
        still_open = await conn.fetch(sql.SQL_STILL_OPEN, xids)
        if not still_open:
            return
        if loop.time() >= deadline:
            raise PostingsInFlight(
                f"a transaction begun by {at.isoformat()} is still open after {timeout_s:g} s "
                f"({still_open[0]['holder']}): figures as of that time are not final until it ends")
        await asyncio.sleep(pause_s)
        pause_s = min(pause_s * 2, 0.05)


async def balance_as_of(conn: Connection, account_id: int, at: datetime, *,
                        settle_timeout_s: float = postings_settle_timeout_s) -> int:
    """The balance after every transfer posted at or before `at` (timezone-aware).

    Final: it first waits for postings still open that began by `at` (wait_for_postings_until, at
    most `settle_timeout_s`), but in a caller's REPEATABLE READ or SERIALIZABLE transaction, whose
    snapshot decides what is seen (it was taken already). Under READ COMMITTED each statement
    takes a snapshot of its own, so the wait works inside a transaction too.
    """
    if at.tzinfo is None:
        raise ValueError("balance_as_of needs a timezone-aware time")
    if not conn.is_in_transaction() or await conn.fetchval(sql.SQL_ISOLATION) == "read committed":
        await wait_for_postings_until(conn, at, timeout_s=settle_timeout_s)
    record = await conn.fetchrow(sql.SQL_BALANCE_AS_OF, account_id, at)
    if record is None:
        raise AccountNotFound(f"no ledger account {account_id}")
    return int(record["balance_minor"])


async def statement(conn: Connection, account_id: int, *, after: StatementCursor | None = None,
                    limit: int = 100) -> StatementPage:
    """One page of an account's transfers in posting order, each with the balance after it.

    Pass the page's next_cursor as `after` for the next page; new transfers never shift a page.
    """
    if not 0 < limit <= statement_page_size_max:
        raise ValueError(f"limit {limit} not in 1..{statement_page_size_max}")
    await get_account(conn, account_id)
    cursor = after or _STATEMENT_START
    records = await conn.fetch(sql.SQL_STATEMENT, account_id, cursor.created_at, cursor.seq, limit + 1)
    entries = [
        StatementEntry(transfer_id=r["id"], seq=r["seq"], created_at=r["created_at"], kind=r["kind"],
                       amount_minor=r["amount_minor"], balance_after_minor=r["balance_after_minor"],
                       counterparty_account_id=r["counterparty_account_id"], group_id=r["group_id"],
                       metadata=_metadata(r["metadata"]))
        for r in records[:limit]
    ]
    next_cursor = None
    if len(records) > limit:
        last = entries[-1]
        next_cursor = StatementCursor(created_at=last.created_at, seq=last.seq)
    return StatementPage(account_id=account_id, entries=entries, next_cursor=next_cursor)


async def events_after(conn: Connection, after: EventCursor | None = None, *, limit: int = 100
                       ) -> list[LedgerEvent]:
    """Low-float events after `after` (from the first when None), in the order a reader takes
    them: a reader keeps the `cursor` of the last event it handled and goes on from there.

    An event shows once the transaction that wrote it, and every transaction older than that one,
    has ended; so no event can turn up behind a cursor later (an event's id is taken before its
    transaction commits, so ids alone would let one slip behind). A transaction left open holds
    back the events of those that began after it until it ends."""
    if not 0 < limit <= events_page_size_max:
        raise ValueError(f"limit {limit} not in 1..{events_page_size_max}")
    start = after or EventCursor(0, 0)
    return [
        LedgerEvent(id=r["id"], kind=EventKind(r["kind"]), account_id=r["account_id"], transfer_id=r["transfer_id"],
                    balance_minor=r["balance_minor"], threshold_minor=r["threshold_minor"],
                    created_at=r["created_at"], txid=int(r["txid"]))
        for r in await conn.fetch(sql.SQL_EVENTS_AFTER, str(start.txid), start.id, limit)
    ]
