"""Edges of the money paths: deposit references (blank, pasted dashes, freed mid-request), deposit
metadata, reversing large metadata, reconciling inside a caller's transaction, and low-float events
read while postings commit."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from float_ledger import sql
from float_ledger.deposits import approve_deposit, reject_deposit, request_deposit
from float_ledger.errors import InvalidTransfer, ReconciliationNeedsSnapshot
from float_ledger.ledger import (
    apply_transfers,
    balance,
    events_after,
    get_transfer,
    post_transfers,
    reverse_group,
    set_account_blocked,
)
from float_ledger.model import AccountKind, DepositStatus, EventKind, PostStatus
from float_ledger.reconciliation import reconcile_agent_day
from tests.ledger.conftest import CURRENCY, account, transfer, visible_events

THRESHOLD = 100_000


def deposit_request(float_id: int, source: int, amount: int, **overrides: Any) -> dict[str, Any]:
    return {"deposit_id": uuid.uuid4(), "float_account_id": float_id, "source_account_id": source,
            "amount_minor": amount, "currency": CURRENCY, "external_ref": f"BANK-{uuid.uuid4()}", "maker": "alice",
            "approval_threshold_minor": THRESHOLD, "metadata": {"agent_id": "A-1"}} | overrides


async def test_a_rejected_deposit_does_not_burn_its_external_reference(db_conn: Any, source: int) -> None:
    """The maker keyed 1,000,000 instead of 100,001; the checker rejects; the maker re-keys the bank
    transfer with the right amount under its (unique) bank reference. It must be creditable."""
    float_id = await account(db_conn, AccountKind.agent_float)
    wrong = deposit_request(float_id, source, 1_000_000, external_ref="BANK-REF-42")
    await request_deposit(db_conn, **wrong)
    rejected = await reject_deposit(db_conn, deposit_id=wrong["deposit_id"], checker="bob", reason="wrong amount")
    assert rejected.deposit.status is DepositStatus.rejected
    corrected = deposit_request(float_id, source, 100_001, external_ref="BANK-REF-42")
    pending = await request_deposit(db_conn, **corrected)  # raises DepositConflict today
    approved = await approve_deposit(db_conn, deposit_id=pending.deposit.id, checker="bob")
    assert approved.deposit.status is DepositStatus.posted
    assert await balance(db_conn, float_id) == 100_001


async def test_a_refused_deposit_can_be_credited_once_the_float_is_unblocked(db_conn: Any, source: int) -> None:
    """The agent paid in at the bank while its float was blocked: the posting was refused. Once the
    float is unblocked, that payment must still reach the float (exactly once)."""
    float_id = await account(db_conn, AccountKind.agent_float)
    await set_account_blocked(db_conn, float_id, blocked=True)
    request = deposit_request(float_id, source, 5_000, external_ref="BANK-REF-43")
    first = await request_deposit(db_conn, **request)
    assert first.deposit.status is DepositStatus.refused
    await set_account_blocked(db_conn, float_id, blocked=False)
    again = await request_deposit(db_conn, **(request | {"deposit_id": uuid.uuid4()}))  # DepositConflict today
    assert again.deposit.status is DepositStatus.posted
    assert await balance(db_conn, float_id) == 5_000


async def test_a_maker_cannot_name_a_checker_on_a_deposit_nobody_checked(db_conn: Any, source: int) -> None:
    float_id = await account(db_conn, AccountKind.agent_float)
    for key in ("checker", "maker", "external_ref"):
        request = deposit_request(float_id, source, 500, metadata={"agent_id": "A-1", key: "bob"})
        with pytest.raises(InvalidTransfer, match=key):
            await request_deposit(db_conn, **request)
        assert await get_transfer(db_conn, request["deposit_id"]) is None
    assert await balance(db_conn, float_id) == 0
    # Below the approval threshold it posts at once, and its transfer names no checker.
    request = deposit_request(float_id, source, 500)
    result = await request_deposit(db_conn, **request)
    assert result.deposit.status is DepositStatus.posted and result.deposit.checker is None
    posted = await get_transfer(db_conn, request["deposit_id"])
    assert posted is not None and "checker" not in posted.metadata and posted.metadata["maker"] == "alice"


async def test_a_posted_group_with_large_metadata_can_be_reversed(db_conn: Any, source: int) -> None:
    float_id = await account(db_conn, AccountKind.agent_float)
    customer = await account(db_conn, AccountKind.customer_credit)
    await post_transfers(db_conn, [transfer(source, float_id, 1_000, kind="deposit")])
    group = uuid.uuid4()
    # 1,990 bytes of metadata: within metadata_bytes_max (2,048), so it posts.
    [posted] = await post_transfers(db_conn, [transfer(float_id, customer, 300, group_id=group, note="x" * 1_970)])
    assert posted.status is PostStatus.ok
    async with db_conn.transaction():
        results = await reverse_group(db_conn, group, reason="terminal never got the reply")  # InvalidTransfer today
    assert [r.status for r in results] == [PostStatus.ok]
    assert await balance(db_conn, float_id) == 1_000


class _PostsBetweenReads:
    """The caller's connection, with another connection committing a payment after the day's closing
    balance was read and before its movements are: what a concurrent poster does."""

    def __init__(self, conn: Any, post: Any) -> None:
        self._conn, self._post, self._reads = conn, post, 0
        self.posted = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    async def fetchval(self, *args: Any) -> Any:
        value = await self._conn.fetchval(*args)
        self._reads += 1
        if self._reads == 2:
            await self._post()
            self.posted = True
        return value


async def test_reconciling_inside_a_callers_transaction_sees_one_ledger(db_pool: Any, db_conn: Any,
                                                                        source: int) -> None:
    float_id = await account(db_conn, AccountKind.agent_float, "A-R")
    customer = await account(db_conn, AccountKind.customer_credit)
    await post_transfers(db_conn, [transfer(source, float_id, 10_000, kind="deposit")])
    zone = "Africa/Nairobi"
    today = datetime.now(UTC).astimezone(ZoneInfo(zone)).date()

    async def concurrent_payment() -> None:
        async with db_pool.acquire() as other:
            [r] = await post_transfers(other, [transfer(float_id, customer, 700, terminal_id="T-1")])
            assert r.status is PostStatus.ok

    # In a READ COMMITTED transaction (asyncpg's default) each read would see a later ledger: refused.
    read_committed = _PostsBetweenReads(db_conn, concurrent_payment)
    with pytest.raises(ReconciliationNeedsSnapshot):
        async with db_conn.transaction():
            await reconcile_agent_day(read_committed, float_account_id=float_id, business_day=today, time_zone=zone)
    assert not read_committed.posted  # refused up front, before reading anything
    snapshot = _PostsBetweenReads(db_conn, concurrent_payment)
    async with db_conn.transaction(isolation="repeatable_read"):
        day = await reconcile_agent_day(snapshot, float_account_id=float_id, business_day=today,
                                        time_zone=zone)  # AssertionError today
    assert snapshot.posted
    assert day.closing_float_minor == (day.opening_float_minor + day.deposits_minor - day.collections_minor
                                       + day.reversals_minor + day.other_net_minor)
    # One ledger, the snapshot's: without the payment committed while the day was read.
    assert day.closing_float_minor == 10_000 and day.collections_minor == 0
    assert await balance(db_conn, float_id) == 10_000 - 700


async def test_a_reader_going_on_from_its_cursor_misses_no_low_float_event(db_pool: Any, db_conn: Any,
                                                                             source: int) -> None:
    """Gateway A's batch takes an event id and is still open when gateway B's posting, with a
    higher event id, commits; the low-float notifier reads in between. A's event must still
    reach it, exactly once, once A commits."""
    slow_float = await account(db_conn, AccountKind.agent_float, low_threshold_minor=1_000)
    fast_float = await account(db_conn, AccountKind.agent_float, low_threshold_minor=1_000)
    customer_a = await account(db_conn, AccountKind.customer_credit)
    customer_b = await account(db_conn, AccountKind.customer_credit)
    await post_transfers(db_conn, [transfer(source, slow_float, 1_500, kind="deposit"),
                                   transfer(source, fast_float, 1_500, kind="deposit")])
    before = await events_after(db_conn, limit=1000)
    cursor = before[-1].cursor if before else None

    gateway_a = await db_pool.acquire()
    gateway_b = await db_pool.acquire()
    tx = gateway_a.transaction()
    committed = False
    seen = []
    try:
        await tx.start()
        [slow] = await apply_transfers(gateway_a, [transfer(slow_float, customer_a, 600)])
        assert slow.status is PostStatus.ok
        [fast] = await post_transfers(gateway_b, [transfer(fast_float, customer_b, 600)])
        assert fast.status is PostStatus.ok
        # B's event, written after A began, waits until A has ended: nothing can slip behind it.
        seen += await events_after(db_conn, cursor)
        assert seen == []
        await tx.commit()
        committed = True
    finally:
        if not committed:
            await tx.rollback()
        await db_pool.release(gateway_a)
        await db_pool.release(gateway_b)
    seen += await visible_events(db_conn, cursor, at_least=2)
    below = [e.account_id for e in seen if e.kind is EventKind.float_below_threshold]
    assert sorted(below) == sorted([slow_float, fast_float])
    assert await events_after(db_conn, seen[-1].cursor) == []


async def test_an_event_of_a_transaction_older_than_the_cursor_is_not_skipped(db_pool: Any, db_conn: Any,
                                                                               source: int) -> None:
    """The other order: the transaction that began first commits last, and the reader read the
    later one's event meanwhile. Going on from that cursor still finds the earlier one's event."""
    first_float = await account(db_conn, AccountKind.agent_float, low_threshold_minor=1_000)
    second_float = await account(db_conn, AccountKind.agent_float, low_threshold_minor=1_000)
    customer_a = await account(db_conn, AccountKind.customer_credit)
    customer_b = await account(db_conn, AccountKind.customer_credit)
    await post_transfers(db_conn, [transfer(source, first_float, 1_500, kind="deposit"),
                                   transfer(source, second_float, 1_500, kind="deposit")])
    before = await events_after(db_conn, limit=1000)
    cursor = before[-1].cursor if before else None
    early, late = await db_pool.acquire(), await db_pool.acquire()
    early_tx, late_tx = early.transaction(), late.transaction()
    try:
        await early_tx.start()
        await late_tx.start()
        await late.execute("SELECT pg_current_xact_id()")  # the later one has the lower txid
        await early.execute("SELECT pg_current_xact_id()")
        [a] = await apply_transfers(early, [transfer(first_float, customer_a, 600)])
        [b] = await apply_transfers(late, [transfer(second_float, customer_b, 600)])
        assert a.status is PostStatus.ok and b.status is PostStatus.ok
        await late_tx.commit()
        seen = await visible_events(db_conn, cursor, at_least=1)
        assert [e.account_id for e in seen] == [second_float]
        await early_tx.commit()
    finally:
        for conn in (early, late):
            if conn.is_in_transaction():
                await conn.execute("ROLLBACK")
            await db_pool.release(conn)
    rest = await visible_events(db_conn, seen[-1].cursor, at_least=1)
    assert [e.account_id for e in rest] == [first_float]


class _RejectsAfterTheInsert:
    """The requesting connection, with a checker on another connection rejecting the deposit that
    holds the reference just after this request's INSERT ... ON CONFLICT DO NOTHING met it."""

    def __init__(self, conn: Any, reject: Any) -> None:
        self._conn, self._reject = conn, reject
        self.rejected = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    async def fetchrow(self, query: str, *args: Any) -> Any:
        record = await self._conn.fetchrow(query, *args)
        if query == sql.SQL_INSERT_DEPOSIT and record is None and not self.rejected:
            await self._reject()
            self.rejected = True
        return record


async def test_a_reference_freed_while_a_request_meets_it_is_no_crash(db_pool: Any, db_conn: Any,
                                                                      source: int) -> None:
    """Operator A's deposit of BANK-R is pending; operator C asks for BANK-R again (under another id:
    another spelling, or the id an API caller chose). C's INSERT meets A's deposit in the live-
    reference index and inserts nothing; before C reads which deposit holds the reference, a checker
    rejects A's deposit (it was keyed wrong). The request is then made again and C's deposit waits
    for its checker. Before, it found no deposit holding the reference and failed with a TypeError
    (a traceback from the CLI)."""
    float_id = await account(db_conn, AccountKind.agent_float)
    first = deposit_request(float_id, source, THRESHOLD + 1, external_ref="BANK-RACE-1")
    await request_deposit(db_conn, **first)

    async def checker_rejects() -> None:
        async with db_pool.acquire() as checker:
            rejected = await reject_deposit(checker, deposit_id=first["deposit_id"], checker="bob",
                                            reason="keyed wrong")
            assert rejected.deposit.status is DepositStatus.rejected

    requester = _RejectsAfterTheInsert(db_conn, checker_rejects)
    again = deposit_request(float_id, source, THRESHOLD + 1, external_ref="bank-race-1", maker="carol")
    result = await request_deposit(requester, **again)
    assert requester.rejected
    assert result.deposit.status is DepositStatus.pending_approval and result.deposit.maker == "carol"
    assert await balance(db_conn, float_id) == 0


@pytest.mark.parametrize("blank", [" ", "   ", "\u3000", "\u00a0"])
async def test_a_reference_of_spaces_alone_is_refused(db_conn: Any, source: int, blank: str) -> None:
    """As a name of spaces alone is. Before, it was taken: its key (0020) trims it to '', and the
    float was credited against no bank or cash-office reference at all (`vendgate float deposit
    --ref " "`, a script's empty variable quoted)."""
    float_id = await account(db_conn, AccountKind.agent_float)
    request = deposit_request(float_id, source, 500, external_ref=blank)
    with pytest.raises(InvalidTransfer, match="external_ref must say something"):
        await request_deposit(db_conn, **request)
    assert await balance(db_conn, float_id) == 0


@pytest.mark.parametrize("dash", ["\u2010", "\u2011", "\u2012", "\u2013", "\u2014", "\u2212", "\u02d7", "\u2043",
                                  "\u2796", "\u207b", "\ufe58"])
async def test_a_reference_pasted_with_a_typographic_dash_does_not_credit_again(db_conn: Any, source: int,
                                                                                dash: str) -> None:
    """The reference key folds case, width and spaces, but not the dashes a bank statement (PDF,
    word processor) gives when the reference is copied from it: "BANK\u20102026\u20100042" reads as
    "BANK-2026-0042". Before, it was a second reference and one bank payment credited the float
    twice; now such a dash is refused, to be typed as '-'."""
    float_id = await account(db_conn, AccountKind.agent_float)
    typed = deposit_request(float_id, source, 500, external_ref="BANK-2026-0042")
    assert (await request_deposit(db_conn, **typed)).deposit.status is DepositStatus.posted
    pasted = deposit_request(float_id, source, 500, external_ref="BANK-2026-0042".replace("-", dash))
    with pytest.raises(InvalidTransfer, match="dashes only as '-'"):
        await request_deposit(db_conn, **pasted)
    assert await balance(db_conn, float_id) == 500
