"""Deposits (maker/checker), reversals, commission, accounts, statements, balance as of, reconciliation."""

from __future__ import annotations

import uuid
from datetime import date, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from float_ledger import sql
from float_ledger.deposits import (
    approve_deposit,
    deposit_id_for_ref,
    get_deposit,
    operator_identity,
    pending_deposits,
    reject_deposit,
    request_deposit,
)
from float_ledger.errors import (
    AccountNotFound,
    CheckerIsMaker,
    DepositConflict,
    DepositNotFound,
    InvalidAccount,
    InvalidTransfer,
)
from float_ledger.ledger import (
    accrue_commission,
    apply_transfers,
    balance,
    balance_as_of,
    events_after,
    find_accounts,
    get_account,
    get_transfer,
    post_transfers,
    reverse_group,
    set_account_blocked,
    set_low_threshold,
    set_lower_bound,
    statement,
)
from float_ledger.model import (
    AccountKind,
    DepositStatus,
    EventKind,
    PostStatus,
    TopUpAccounts,
    TransferKind,
    derived_id,
    reversal_group_id_for,
    top_up_transfers,
)
from float_ledger.reconciliation import reconcile_agent_day
from tests.ledger.conftest import CURRENCY, account, transfer, visible_events

S = PostStatus
THRESHOLD = 100_000


async def top_up_accounts(conn: Any, agent: str) -> TopUpAccounts:
    return TopUpAccounts(
        float_account_id=await account(conn, AccountKind.agent_float, agent),
        customer_credit_account_id=await account(conn, AccountKind.customer_credit),
        customer_debt_account_id=await account(conn, AccountKind.customer_debt, lower_bound_minor=None),
        collections_account_id=await account(conn, AccountKind.utility_collections, lower_bound_minor=None),
        commission_expense_account_id=await account(conn, AccountKind.commission_expense, lower_bound_minor=None),
        commission_payable_account_id=await account(conn, AccountKind.commission_payable, agent))


def deposit_request(float_id: int, source: int, amount: int, **overrides: Any) -> dict[str, Any]:
    return {"deposit_id": uuid.uuid4(), "float_account_id": float_id, "source_account_id": source,
            "amount_minor": amount, "currency": CURRENCY, "external_ref": f"BANK-{uuid.uuid4()}", "maker": "alice",
            "approval_threshold_minor": THRESHOLD, "metadata": {"agent_id": "A-1"}} | overrides


# -- deposits ---------------------------------------------------------------------------------------


async def test_a_deposit_at_or_below_the_threshold_posts_at_once(db_conn: Any, source: int) -> None:
    float_id = await account(db_conn, AccountKind.agent_float)
    request = deposit_request(float_id, source, THRESHOLD)
    result = await request_deposit(db_conn, **request)
    assert result.deposit.status is DepositStatus.posted and result.post is not None
    assert result.post.status is S.ok and await balance(db_conn, float_id) == THRESHOLD
    posted = await get_transfer(db_conn, request["deposit_id"])
    assert posted is not None and posted.kind == TransferKind.deposit
    assert posted.metadata == {"agent_id": "A-1", "external_ref": request["external_ref"], "maker": "alice"}
    again = await request_deposit(db_conn, **request)
    assert again.deposit == result.deposit and again.post is not None and again.post.status is S.exists
    assert await balance(db_conn, float_id) == THRESHOLD


async def test_an_external_reference_credits_a_float_once(db_conn: Any, source: int) -> None:
    float_id = await account(db_conn, AccountKind.agent_float)
    request = deposit_request(float_id, source, 500)
    first = await request_deposit(db_conn, **request)
    with pytest.raises(DepositConflict, match=str(first.deposit.id)):
        await request_deposit(db_conn, **(request | {"deposit_id": uuid.uuid4()}))
    with pytest.raises(DepositConflict, match="other content"):
        await request_deposit(db_conn, **(request | {"amount_minor": 501}))
    assert await balance(db_conn, float_id) == 500


@pytest.mark.parametrize("spelling", ["bank-2026-0042", "BANK-2026-0042 ", " BANK-2026-0042", "BANK-2026-0042\u00a0",
                                      "\uff22ANK-2026-0042", "Bank-2026-\uff10\uff10\uff14\uff12"])
async def test_one_reference_spelled_another_way_does_not_credit_again(db_conn: Any, source: int,
                                                                        spelling: str) -> None:
    float_id = await account(db_conn, AccountKind.agent_float)
    request = deposit_request(float_id, source, 500, external_ref="BANK-2026-0042")
    first = await request_deposit(db_conn, **request)
    assert first.deposit.status is DepositStatus.posted
    respelled = request | {"external_ref": spelling}
    for asked in (respelled | {"deposit_id": uuid.uuid4()},
                  respelled | {"deposit_id": await deposit_id_for_ref(db_conn, source_account_id=source,
                                                                      external_ref=spelling)}):
        with pytest.raises(DepositConflict, match=str(first.deposit.id)):
            await request_deposit(db_conn, **asked)
    assert await balance(db_conn, float_id) == 500


@pytest.mark.parametrize("spelling", ["BANK-2026-0042\u2029", "BANK-2026-0042\u2028", "\u1680BANK-2026-0042",
                                      "BANK-2026\u2028-0042"])
async def test_a_reference_with_white_space_its_key_cannot_trim_is_refused(db_conn: Any, source: int,
                                                                          spelling: str) -> None:
    # The key trims and joins only what PostgreSQL's \s matches once NFKC-normalised: a line
    # separator at the end made "BANK-2026-0042" a second reference, and credited the float twice.
    float_id = await account(db_conn, AccountKind.agent_float)
    request = deposit_request(float_id, source, 500, external_ref="BANK-2026-0042")
    await request_deposit(db_conn, **request)
    with pytest.raises(InvalidTransfer, match="separators"):
        await deposit_id_for_ref(db_conn, source_account_id=source, external_ref=spelling)
    with pytest.raises(InvalidTransfer, match="separators"):
        await request_deposit(db_conn, **(request | {"deposit_id": uuid.uuid4(), "external_ref": spelling}))
    assert await balance(db_conn, float_id) == 500


async def test_a_reference_freed_by_a_rejection_is_freed_in_every_spelling(db_conn: Any, source: int) -> None:
    float_id = await account(db_conn, AccountKind.agent_float)
    request = deposit_request(float_id, source, THRESHOLD + 1, external_ref="CASH-77")
    await request_deposit(db_conn, **request)
    await reject_deposit(db_conn, deposit_id=request["deposit_id"], checker="bob", reason="keyed wrong")
    again = deposit_request(float_id, source, 700, external_ref="cash-77",
                            deposit_id=await deposit_id_for_ref(db_conn, source_account_id=source,
                                                                external_ref="cash-77"))
    assert again["deposit_id"] != request["deposit_id"]
    assert (await request_deposit(db_conn, **again)).deposit.status is DepositStatus.posted
    assert await balance(db_conn, float_id) == 700


async def test_the_dead_deposits_of_a_reference_are_counted_by_their_key_index(db_conn: Any, source: int) -> None:
    # deposit_id_for_ref counts them on every call: a walk of every deposit of the source account
    # (computing each one's key) would grow with the account's whole history.
    async with db_conn.transaction():
        await db_conn.execute("SET LOCAL enable_seqscan = off")
        plan = await db_conn.fetchval(f"EXPLAIN (FORMAT JSON) {sql.SQL_DEAD_DEPOSITS_OF_REF}", source, "bank-7")
    assert "ledger_deposits_dead_ref_key" in plan
    assert "Seq Scan" not in plan


async def test_a_deposit_that_a_checker_could_not_post_is_refused_when_requested(db_conn: Any, source: int) -> None:
    # Reference and maker at their 200-character bound in 4-byte characters: the longest checker's
    # name would take the transfer's metadata past its bound, so the request is refused now
    # rather than left pending for an approval that would fail.
    float_id = await account(db_conn, AccountKind.agent_float)
    wide = "\U0001f600" * 200
    with pytest.raises(InvalidTransfer, match="metadata"):
        await request_deposit(db_conn, **deposit_request(float_id, source, THRESHOLD + 1, external_ref=wide,
                                                         maker=wide))
    pending = await request_deposit(db_conn, **deposit_request(float_id, source, THRESHOLD + 1,
                                                               external_ref="R" * 200, maker="m" * 200))
    approved = await approve_deposit(db_conn, deposit_id=pending.deposit.id, checker=wide)
    assert approved.deposit.status is DepositStatus.posted


async def test_a_large_deposit_waits_for_a_second_operator(db_conn: Any, source: int) -> None:
    float_id = await account(db_conn, AccountKind.agent_float)
    request = deposit_request(float_id, source, THRESHOLD + 1)
    pending = await request_deposit(db_conn, **request)
    assert pending.deposit.status is DepositStatus.pending_approval and pending.post is None
    assert await balance(db_conn, float_id) == 0
    assert request["deposit_id"] in {d.id for d in await pending_deposits(db_conn)}
    with pytest.raises(CheckerIsMaker):
        await approve_deposit(db_conn, deposit_id=request["deposit_id"], checker="alice")
    approved = await approve_deposit(db_conn, deposit_id=request["deposit_id"], checker="bob")
    assert approved.deposit.status is DepositStatus.posted and approved.deposit.checker == "bob"
    assert approved.post is not None and approved.post.status is S.ok
    assert approved.post.transfer is not None and approved.post.transfer.metadata["checker"] == "bob"
    assert await balance(db_conn, float_id) == THRESHOLD + 1
    again = await approve_deposit(db_conn, deposit_id=request["deposit_id"], checker="carol")
    assert again.deposit.checker == "bob" and again.post is not None and again.post.status is S.exists
    late_reject = await reject_deposit(db_conn, deposit_id=request["deposit_id"], checker="carol", reason="late")
    assert late_reject.deposit.status is DepositStatus.posted
    assert request["deposit_id"] not in {d.id for d in await pending_deposits(db_conn)}
    assert await balance(db_conn, float_id) == THRESHOLD + 1


@pytest.mark.parametrize("spelling", ["ALICE", " alice", "alice ", "Alice", "\uff41\uff4c\uff49\uff43\uff45",
                                      "ALICE\u3000"])
async def test_the_maker_cannot_decide_under_another_spelling_of_their_name(db_conn: Any, source: int,
                                                                           spelling: str) -> None:
    float_id = await account(db_conn, AccountKind.agent_float)
    request = deposit_request(float_id, source, THRESHOLD + 1)
    assert request["maker"] == "alice"
    await request_deposit(db_conn, **request)
    with pytest.raises(CheckerIsMaker):
        await approve_deposit(db_conn, deposit_id=request["deposit_id"], checker=spelling)
    with pytest.raises(CheckerIsMaker):
        await reject_deposit(db_conn, deposit_id=request["deposit_id"], checker=spelling, reason="typo")
    assert (await get_deposit(db_conn, request["deposit_id"])).status is DepositStatus.pending_approval
    assert await balance(db_conn, float_id) == 0
    approved = await approve_deposit(db_conn, deposit_id=request["deposit_id"], checker="alicia")
    assert approved.deposit.status is DepositStatus.posted and await balance(db_conn, float_id) == THRESHOLD + 1


@pytest.mark.parametrize(("maker", "checker"), [("alice", "alice\u034f"), ("alice", "alice\ufe0f"),
                                               ("alice", "alice\u3164"), ("jos\u00e9", "jose\u200b\u0301"),
                                               ("jos\u00e9", "JOSE\u0301"), ("alice", "ali\u200bce"),
                                               ("alice\tsmith", "alice smith"), ("alice\nsmith", "Alice Smith"),
                                               ("alice\x85smith", "alice  smith")])
def test_an_operator_is_known_through_invisible_characters_and_decomposed_letters(maker: str, checker: str) -> None:
    assert operator_identity(maker) == operator_identity(checker)


@pytest.mark.parametrize("name", ["ali\u200bce", "alice\u034f", "alice\ufe0f", "\u3164", "alice\x00", "al\tice",
                                  "alice\U000e0041"])
async def test_an_operator_name_with_invisible_characters_is_refused(db_conn: Any, source: int, name: str) -> None:
    float_id = await account(db_conn, AccountKind.agent_float)
    request = deposit_request(float_id, source, THRESHOLD + 1)
    with pytest.raises(InvalidTransfer, match="invisible"):
        await request_deposit(db_conn, **{**request, "maker": name})
    await request_deposit(db_conn, **request)
    with pytest.raises(InvalidTransfer, match="invisible"):
        await approve_deposit(db_conn, deposit_id=request["deposit_id"], checker=name)
    # A reference or a reason is text an operator reads back: it may not hide characters either.
    with pytest.raises(InvalidTransfer, match="invisible"):
        await request_deposit(db_conn, **{**request, "deposit_id": uuid.uuid4(), "external_ref": f"REF-{name}"})
    with pytest.raises(InvalidTransfer, match="invisible"):
        await reject_deposit(db_conn, deposit_id=request["deposit_id"], checker="bob", reason=f"see {name}")
    assert (await get_deposit(db_conn, request["deposit_id"])).status is DepositStatus.pending_approval


async def test_an_operator_name_of_spaces_alone_is_refused(db_conn: Any, source: int) -> None:
    float_id = await account(db_conn, AccountKind.agent_float)
    request = deposit_request(float_id, source, THRESHOLD + 1)
    with pytest.raises(InvalidTransfer):
        await request_deposit(db_conn, **{**request, "maker": "   "})
    await request_deposit(db_conn, **request)
    with pytest.raises(InvalidTransfer):
        await approve_deposit(db_conn, deposit_id=request["deposit_id"], checker="\u3000 ")
    assert (await get_deposit(db_conn, request["deposit_id"])).status is DepositStatus.pending_approval


async def test_a_rejected_deposit_posts_nothing(db_conn: Any, source: int) -> None:
    float_id = await account(db_conn, AccountKind.agent_float)
    request = deposit_request(float_id, source, THRESHOLD * 5)
    await request_deposit(db_conn, **request)
    with pytest.raises(CheckerIsMaker):
        await reject_deposit(db_conn, deposit_id=request["deposit_id"], checker="alice", reason="typo")
    # The maker asking again, spelt otherwise, is a repeat of their request, not another one.
    again = await request_deposit(db_conn, **{**request, "maker": " ALICE "})
    assert again.deposit.id == request["deposit_id"] and again.deposit.maker == request["maker"]
    rejected = await reject_deposit(db_conn, deposit_id=request["deposit_id"], checker="bob", reason="no such payment")
    assert rejected.deposit.status is DepositStatus.rejected and rejected.deposit.reason == "no such payment"
    after = await approve_deposit(db_conn, deposit_id=request["deposit_id"], checker="carol")
    assert after.deposit.status is DepositStatus.rejected and after.post is None
    assert await get_transfer(db_conn, request["deposit_id"]) is None and await balance(db_conn, float_id) == 0
    assert (await get_deposit(db_conn, request["deposit_id"])).status is DepositStatus.rejected


async def test_a_deposit_to_a_blocked_float_is_refused(db_conn: Any, source: int) -> None:
    float_id = await account(db_conn, AccountKind.agent_float)
    await set_account_blocked(db_conn, float_id, blocked=True)
    result = await request_deposit(db_conn, **deposit_request(float_id, source, 10))
    assert result.deposit.status is DepositStatus.refused and result.deposit.reason == "account_blocked"
    assert result.post is not None and result.post.status is S.account_blocked


async def test_deposit_errors(db_conn: Any, source: int) -> None:
    with pytest.raises(AccountNotFound):
        await request_deposit(db_conn, **deposit_request(10**9, source, 10))
    with pytest.raises(DepositNotFound):
        await approve_deposit(db_conn, deposit_id=uuid.uuid4(), checker="bob")
    with pytest.raises(DepositNotFound):
        await get_deposit(db_conn, uuid.uuid4())


# -- reversals and commission -----------------------------------------------------------------------


async def test_a_reversal_restores_every_balance_once(db_conn: Any, source: int) -> None:
    accounts = await top_up_accounts(db_conn, "A-7")
    await post_transfers(db_conn, [transfer(source, accounts.float_account_id, 10_000, kind="deposit")])
    ids = [getattr(accounts, name) for name in accounts.__struct_fields__]
    before = [await balance(db_conn, i) for i in ids]
    top_up = uuid.uuid4()
    group = top_up_transfers(top_up_id=top_up, accounts=accounts, amount_minor=3_000, debt_recovery_minor=500,
                             commission_rate_ppm=20_000, currency=CURRENCY, metadata={"agent_id": "A-7"})
    assert all(r.status is S.ok for r in await post_transfers(db_conn, group))
    await set_account_blocked(db_conn, accounts.float_account_id, blocked=True)
    async with db_conn.transaction():
        reversed_ = await reverse_group(db_conn, top_up, reason="terminal never got the reply")
        assert await db_conn.fetchval("SELECT 1") == 1
    assert [r.status for r in reversed_] == [S.ok] * 4
    assert [r.id for r in reversed_] == [derived_id(t.id, "reversal") for t in group[::-1]]
    assert all(r.transfer is not None and r.transfer.group_id == reversal_group_id_for(top_up) for r in reversed_)
    assert [await balance(db_conn, i) for i in ids] == before
    async with db_conn.transaction():
        again = await reverse_group(db_conn, top_up, reason="terminal never got the reply")
        other_reason = await reverse_group(db_conn, top_up, reason="duplicate")
    assert [r.status for r in again] == [S.exists] * 4
    assert [r.status for r in other_reason] == [S.exists_with_different_content] + [S.linked_failed] * 3
    assert [await balance(db_conn, i) for i in ids] == before
    with pytest.raises(InvalidTransfer, match="a reversal is not reversed"):
        async with db_conn.transaction():
            await reverse_group(db_conn, reversal_group_id_for(top_up), reason="undo the undo")
    assert [await balance(db_conn, i) for i in ids] == before
    async with db_conn.transaction():
        assert await reverse_group(db_conn, uuid.uuid4(), reason="unknown") == []


async def test_a_reversal_that_cannot_be_posted_posts_nothing(db_conn: Any, source: int) -> None:
    accounts = await top_up_accounts(db_conn, "A-8")
    await post_transfers(db_conn, [transfer(source, accounts.float_account_id, 10_000, kind="deposit")])
    top_up = uuid.uuid4()
    await post_transfers(db_conn, top_up_transfers(
        top_up_id=top_up, accounts=accounts, amount_minor=5_000, debt_recovery_minor=0, commission_rate_ppm=10_000,
        currency=CURRENCY, metadata={}))
    # The agent was paid its commission: the payable account cannot give it back.
    await post_transfers(db_conn, [transfer(accounts.commission_payable_account_id, source, 50, kind="remittance")])
    async with db_conn.transaction():
        results = await reverse_group(db_conn, top_up, reason="disputed")
    assert [r.status for r in results] == [S.insufficient_balance, S.linked_failed, S.linked_failed]
    assert await balance(db_conn, accounts.float_account_id) == 5_000


async def test_commission_accrues_rounded_down(db_conn: Any) -> None:
    expense = await account(db_conn, AccountKind.commission_expense, lower_bound_minor=None)
    payable = await account(db_conn, AccountKind.commission_payable, "A-9")
    kwargs: dict[str, Any] = {"expense_account_id": expense, "payable_account_id": payable, "rate_ppm": 15_000,
                              "currency": CURRENCY, "metadata": {"agent_id": "A-9"}}
    async with db_conn.transaction():
        assert await accrue_commission(db_conn, transfer_id=uuid.uuid4(), collected_minor=66, **kwargs) is None
        result = await accrue_commission(db_conn, transfer_id=uuid.uuid4(), collected_minor=1_999, **kwargs)
    assert result is not None and result.status is S.ok
    assert result.transfer is not None and result.transfer.amount_minor == 29
    assert await balance(db_conn, payable) == 29


# -- accounts ---------------------------------------------------------------------------------------


async def test_account_settings(db_conn: Any, source: int) -> None:
    float_id = await account(db_conn, AccountKind.agent_float, "A-10")
    customer = await account(db_conn, AccountKind.customer_credit)
    got = await get_account(db_conn, float_id)
    assert (got.kind, got.owner_ref, got.lower_bound_minor, got.blocked) == (AccountKind.agent_float, "A-10", 0, False)
    assert [a.id for a in await find_accounts(db_conn, owner_ref="A-10", kind=AccountKind.agent_float)] == [float_id]
    # A float's bound stays 0: a prepaid float never goes negative.
    for bound in (-50, None):
        with pytest.raises(InvalidAccount, match="float is never below 0"):
            await set_lower_bound(db_conn, float_id, lower_bound_minor=bound)
        with pytest.raises(InvalidAccount, match="float is never below 0"):
            await account(db_conn, AccountKind.agent_float, lower_bound_minor=bound)
    assert (await get_account(db_conn, float_id)).lower_bound_minor == 0
    # A credit limit of 50 lets another account go to -50 and no further.
    other = await account(db_conn, AccountKind.customer_credit, "C-10")
    await set_lower_bound(db_conn, other, lower_bound_minor=-50)
    results = await post_transfers(db_conn, [transfer(other, customer, 50), transfer(other, customer, 1)])
    assert [r.status for r in results] == [S.ok, S.insufficient_balance]
    with pytest.raises(InvalidAccount, match="below"):
        await set_lower_bound(db_conn, other, lower_bound_minor=0)
    await post_transfers(db_conn, [transfer(source, other, 50, kind="deposit")])
    await set_lower_bound(db_conn, other, lower_bound_minor=0)
    await set_low_threshold(db_conn, float_id, low_threshold_minor=20)
    assert (await get_account(db_conn, float_id)).low_threshold_minor == 20
    for missing in (set_account_blocked(db_conn, 10**9, blocked=True),
                    set_low_threshold(db_conn, 10**9, low_threshold_minor=1),
                    set_lower_bound(db_conn, 10**9, lower_bound_minor=0), get_account(db_conn, 10**9),
                    balance(db_conn, 10**9)):
        with pytest.raises(AccountNotFound):
            await missing
    with pytest.raises(InvalidAccount):
        await account(db_conn, AccountKind.agent_float, lower_bound_minor=5)


# -- statements, balance as of, events -------------------------------------------------------------


async def test_a_statement_pages_in_posting_order_and_stays_stable(db_conn: Any, source: int) -> None:
    float_id = await account(db_conn, AccountKind.agent_float)
    customer = await account(db_conn, AccountKind.customer_credit)
    await post_transfers(db_conn, [transfer(source, float_id, 1_000, kind="deposit")])
    for amount in (10, 20, 30, 40, 50, 60):
        await post_transfers(db_conn, [transfer(float_id, customer, amount, terminal_id="T-1")])
    first = await statement(db_conn, float_id, limit=3)
    assert [e.amount_minor for e in first.entries] == [1_000, -10, -20]
    assert [e.balance_after_minor for e in first.entries] == [1_000, 990, 970]
    assert first.entries[1].counterparty_account_id == customer and first.entries[1].metadata == {"terminal_id": "T-1"}
    assert first.next_cursor is not None
    await post_transfers(db_conn, [transfer(customer, float_id, 5)])  # arrives while the reader pages
    second = await statement(db_conn, float_id, after=first.next_cursor, limit=3)
    assert [e.amount_minor for e in second.entries] == [-30, -40, -50]
    assert second.next_cursor is not None
    third = await statement(db_conn, float_id, after=second.next_cursor, limit=3)
    assert [e.amount_minor for e in third.entries] == [-60, 5] and third.next_cursor is None
    seqs = [e.seq for page in (first, second, third) for e in page.entries]
    assert seqs == sorted(seqs)
    with pytest.raises(AccountNotFound):
        await statement(db_conn, 10**9)
    with pytest.raises(ValueError):
        await statement(db_conn, float_id, limit=0)


async def test_balance_as_of_a_time(db_conn: Any, source: int) -> None:
    float_id = await account(db_conn, AccountKind.agent_float)
    customer = await account(db_conn, AccountKind.customer_credit)
    times = []
    for batch in ([transfer(source, float_id, 100, kind="deposit")], [transfer(float_id, customer, 30)],
                  [transfer(float_id, customer, 20), transfer(customer, float_id, 5)]):
        results = await post_transfers(db_conn, batch)
        assert results[0].transfer is not None
        times.append(results[0].transfer.created_at)
    assert await balance_as_of(db_conn, float_id, times[0] - timedelta(microseconds=1)) == 0
    assert [await balance_as_of(db_conn, float_id, at) for at in times] == [100, 70, 55]
    assert await balance_as_of(db_conn, float_id, times[-1] + timedelta(days=1)) == 55
    with pytest.raises(AccountNotFound):
        await balance_as_of(db_conn, 10**9, times[0])
    with pytest.raises(ValueError, match="timezone"):
        await balance_as_of(db_conn, float_id, times[0].replace(tzinfo=None))


async def test_events_are_read_in_pages(db_conn: Any, source: int) -> None:
    float_id = await account(db_conn, AccountKind.agent_float, low_threshold_minor=10)
    customer = await account(db_conn, AccountKind.customer_credit)
    seen = await events_after(db_conn, limit=1000)
    start = seen[-1].cursor if seen else None
    async with db_conn.transaction():
        for _ in range(3):
            await apply_transfers(db_conn, [transfer(source, float_id, 10, kind="deposit")])
            await apply_transfers(db_conn, [transfer(float_id, customer, 10)])
    events = await events_after(db_conn, start, limit=4)
    assert [e.kind for e in events] == [EventKind.float_restored, EventKind.float_below_threshold] * 2
    rest = await events_after(db_conn, events[-1].cursor, limit=4)
    assert [e.kind for e in rest] == [EventKind.float_restored, EventKind.float_below_threshold]
    with pytest.raises(ValueError):
        await events_after(db_conn, limit=0)


async def test_a_threshold_changed_across_the_balance_is_a_crossing(db_conn: Any, source: int) -> None:
    # Raised above the float, the agent is warned at once rather than after the next deposit and
    # payment; lowered under it (or removed), the warning is lifted; a change on one side, nothing.
    float_id = await account(db_conn, AccountKind.agent_float, low_threshold_minor=1_000)
    customer = await account(db_conn, AccountKind.customer_credit)
    mine = lambda e: e.account_id == float_id  # noqa: E731
    await post_transfers(db_conn, [transfer(source, float_id, 5_000, kind="deposit")])
    [restored] = await visible_events(db_conn, None, wanted=mine, at_least=1)  # the deposit's crossing
    assert restored.kind is EventKind.float_restored and restored.transfer_id is not None
    start = restored.cursor
    await set_low_threshold(db_conn, float_id, low_threshold_minor=2_000)  # still below the float: nothing
    await set_low_threshold(db_conn, float_id, low_threshold_minor=10_000)
    [below] = await visible_events(db_conn, start, wanted=mine, at_least=1)
    assert (below.kind, below.transfer_id, below.balance_minor, below.threshold_minor) == (
        EventKind.float_below_threshold, None, 5_000, 10_000)
    await post_transfers(db_conn, [transfer(float_id, customer, 100)])  # below before and after: no crossing
    await set_low_threshold(db_conn, float_id, low_threshold_minor=9_000)  # still above the float: nothing
    await set_low_threshold(db_conn, float_id, low_threshold_minor=None)
    events = await visible_events(db_conn, start, wanted=mine, at_least=2)
    assert [(e.kind, e.transfer_id, e.balance_minor, e.threshold_minor) for e in events] == [
        (EventKind.float_below_threshold, None, 5_000, 10_000), (EventKind.float_restored, None, 4_900, 9_000)]
    await set_low_threshold(db_conn, float_id, low_threshold_minor=4_900)  # at the threshold is not below it
    await set_low_threshold(db_conn, float_id, low_threshold_minor=4_901)
    events = await visible_events(db_conn, start, wanted=mine, at_least=3)
    assert [e.kind for e in events][2:] == [EventKind.float_below_threshold]
    with pytest.raises(InvalidAccount):
        await set_low_threshold(db_conn, float_id, low_threshold_minor=10**16)


# -- reconciliation ---------------------------------------------------------------------------------


async def test_an_agent_day_reconciles_per_agent_and_terminal(db_conn: Any, source: int) -> None:
    accounts = await top_up_accounts(db_conn, "A-11")
    zone = "Africa/Nairobi"
    [deposit] = await post_transfers(db_conn, [transfer(source, accounts.float_account_id, 50_000, kind="deposit")])
    groups = []
    for terminal, amount in (("T-1", 1_000), ("T-1", 2_000), ("T-2", 4_000)):
        group = uuid.uuid4()
        groups.append(group)
        await post_transfers(db_conn, top_up_transfers(
            top_up_id=group, accounts=accounts, amount_minor=amount, debt_recovery_minor=0, commission_rate_ppm=10_000,
            currency=CURRENCY, metadata={"agent_id": "A-11", "terminal_id": terminal}))
    async with db_conn.transaction():
        await reverse_group(db_conn, groups[1], reason="no reply")
    await post_transfers(db_conn, [transfer(accounts.float_account_id, source, 500, kind="remittance")])
    assert deposit.transfer is not None
    day = deposit.transfer.created_at.astimezone(ZoneInfo(zone)).date()

    report = await reconcile_agent_day(db_conn, float_account_id=accounts.float_account_id, business_day=day,
                                       time_zone=zone)
    assert (report.agent_ref, report.currency, report.opening_float_minor) == ("A-11", CURRENCY, 0)
    assert (report.deposits_count, report.deposits_minor) == (1, 50_000)
    assert (report.collections_count, report.collections_minor) == (3, 7_000)
    assert (report.reversals_count, report.reversals_minor) == (1, 2_000)
    assert report.commission_minor == 10 + 20 + 40 - 20
    assert (report.other_count, report.other_net_minor) == (1, -500)
    assert report.closing_float_minor == 50_000 - 7_000 + 2_000 - 500 == await balance(db_conn,
                                                                                       accounts.float_account_id)
    assert [(t.terminal_id, t.collections_count, t.collections_minor, t.reversals_count, t.reversals_minor,
             t.commission_minor) for t in report.terminals] == [
        ("T-1", 2, 3_000, 1, 2_000, 10), ("T-2", 1, 4_000, 0, 0, 40)]

    before = await reconcile_agent_day(db_conn, float_account_id=accounts.float_account_id,
                                       business_day=day - timedelta(days=1), time_zone=zone)
    after = await reconcile_agent_day(db_conn, float_account_id=accounts.float_account_id,
                                      business_day=day + timedelta(days=1), time_zone=zone)
    assert (before.opening_float_minor, before.closing_float_minor, before.collections_count) == (0, 0, 0)
    assert after.opening_float_minor == after.closing_float_minor == report.closing_float_minor
    assert after.collections_count == 0 and after.terminals == []
    with pytest.raises(AccountNotFound):
        await reconcile_agent_day(db_conn, float_account_id=10**9, business_day=day, time_zone=zone)


async def test_an_agent_paid_in_two_currencies_reconciles_each_float_in_its_own(db_conn: Any) -> None:
    agent, zone = f"A-{uuid.uuid4()}", "Africa/Nairobi"
    floats: dict[str, tuple[int, date]] = {}
    for currency, amount in ((CURRENCY, 3_000), ("UGX", 700_000)):
        source = await account(db_conn, AccountKind.float_deposits, lower_bound_minor=None, currency=currency)

        async def new(kind: AccountKind, owner: str | None = None, bound: int | None = 0,
                      currency: str = currency) -> int:
            return await account(db_conn, kind, owner, lower_bound_minor=bound, currency=currency)

        accounts = TopUpAccounts(
            float_account_id=await new(AccountKind.agent_float, agent),
            customer_credit_account_id=await new(AccountKind.customer_credit),
            customer_debt_account_id=await new(AccountKind.customer_debt, bound=None),
            collections_account_id=await new(AccountKind.utility_collections, bound=None),
            commission_expense_account_id=await new(AccountKind.commission_expense, bound=None),
            commission_payable_account_id=await new(AccountKind.commission_payable, agent))
        [deposit] = await post_transfers(db_conn, [transfer(source, accounts.float_account_id, amount * 10,
                                                            kind="deposit", currency=currency)])
        assert deposit.status is S.ok
        results = await post_transfers(db_conn, top_up_transfers(
            top_up_id=uuid.uuid4(), accounts=accounts, amount_minor=amount, debt_recovery_minor=0,
            commission_rate_ppm=10_000, currency=currency, metadata={"agent_id": agent, "terminal_id": "T-1"}))
        assert all(r.status is S.ok for r in results) and results[0].transfer is not None
        floats[currency] = (accounts.float_account_id, results[0].transfer.created_at.astimezone(ZoneInfo(zone)).date())
    first_day, second_day = [
        await reconcile_agent_day(db_conn, float_account_id=float_id, business_day=day, time_zone=zone)
        for float_id, day in (floats[CURRENCY], floats["UGX"])]
    assert (first_day.currency, first_day.collections_minor, first_day.commission_minor) == (CURRENCY, 3_000, 30)
    assert (second_day.currency, second_day.collections_minor, second_day.commission_minor) == ("UGX", 700_000, 7_000)
    assert [t.commission_minor for t in first_day.terminals] == [30]
    assert [t.commission_minor for t in second_day.terminals] == [7_000]
