"""Posting on a real PostgreSQL: statuses, order, linked groups, idempotency, concurrency, retries."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import pytest

from float_ledger import sql
from float_ledger.errors import InvalidTransfer, LedgerError, RetriesExhausted
from float_ledger.ledger import (
    apply_transfers,
    balance,
    events_after,
    get_transfer,
    group_transfers,
    post_transfers,
    reverse_group,
    set_account_blocked,
)
from float_ledger.model import AccountKind, EventKind, PostStatus, Transfer
from tests.ledger.conftest import account, transfer, visible_events

S = PostStatus
DEADLOCKS = "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"


async def funded_float(conn: Any, source: int, amount: int, **kwargs: Any) -> int:
    float_id = await account(conn, AccountKind.agent_float, **kwargs)
    [result] = await post_transfers(conn, [transfer(source, float_id, amount, kind="deposit")])
    assert result.status is S.ok
    return float_id


async def transfers_with(conn: Any, *ids: uuid.UUID) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM ledger_transfers WHERE id = ANY($1::uuid[])", list(ids)))


async def disjoint_routes(conn: Any, source: int) -> tuple[int, int, int, int]:
    """Two floats of 10 and two customers: posts from a to a and from b to b share no account."""
    float_a, float_b = await funded_float(conn, source, 10), await funded_float(conn, source, 10)
    return (float_a, float_b, await account(conn, AccountKind.customer_credit),
            await account(conn, AccountKind.customer_credit))


async def test_each_refusal_has_its_status(db_conn: Any, source: int) -> None:
    float_id = await funded_float(db_conn, source, 100)
    customer = await account(db_conn, AccountKind.customer_credit)
    dollars = await account(db_conn, AccountKind.customer_credit, currency="USD")
    blocked = await account(db_conn, AccountKind.customer_credit)
    await set_account_blocked(db_conn, blocked, blocked=True)
    batch = [
        transfer(float_id, 10**9, 1),
        transfer(float_id, dollars, 1),
        transfer(float_id, blocked, 1),
        transfer(float_id, customer, 101),
        transfer(float_id, customer, 100),
    ]
    results = await post_transfers(db_conn, batch)
    assert [r.status for r in results] == [S.account_missing, S.currency_mismatch, S.account_blocked,
                                           S.insufficient_balance, S.ok]
    assert [r.transfer is None for r in results] == [True, True, True, True, False]
    assert await transfers_with(db_conn, *(t.id for t in batch)) == 1
    assert (await balance(db_conn, float_id), await balance(db_conn, customer)) == (0, 100)


async def test_batch_is_applied_in_order_against_the_running_balance(db_conn: Any, source: int) -> None:
    float_id = await funded_float(db_conn, source, 100)
    customer = await account(db_conn, AccountKind.customer_credit)
    results = await post_transfers(db_conn, [transfer(float_id, customer, amount) for amount in (60, 60, 40, 1)])
    assert [r.status for r in results] == [S.ok, S.insufficient_balance, S.ok, S.insufficient_balance]
    first, third = results[0].transfer, results[2].transfer
    assert first is not None and third is not None
    assert (first.debit_balance_after_minor, third.debit_balance_after_minor) == (40, 0)
    assert first.seq < third.seq and first.created_at.utcoffset() is not None
    assert await balance(db_conn, float_id) == 0


async def test_a_linked_group_posts_all_or_nothing(db_conn: Any, source: int) -> None:
    float_id = await funded_float(db_conn, source, 100, low_threshold_minor=50)
    customer = await account(db_conn, AccountKind.customer_credit)
    events_before = len(await events_after(db_conn, limit=1000))
    failing, passing = uuid.uuid4(), uuid.uuid4()
    batch = [
        transfer(float_id, customer, 70, group_id=failing),  # would cross the threshold: event rolled back
        transfer(float_id, customer, 40, group_id=failing),  # insufficient: 30 left
        transfer(float_id, customer, 1, group_id=failing),  # not evaluated
        transfer(float_id, customer, 30, group_id=passing),
        transfer(customer, float_id, 5, group_id=passing),
    ]
    results = await post_transfers(db_conn, batch)
    assert [r.status for r in results] == [S.linked_failed, S.insufficient_balance, S.linked_failed, S.ok, S.ok]
    assert await transfers_with(db_conn, *(t.id for t in batch[:3])) == 0
    assert await balance(db_conn, float_id) == 75
    assert len(await events_after(db_conn, limit=1000)) == events_before


async def test_a_refusal_leaves_the_callers_transaction_usable(db_conn: Any, source: int) -> None:
    float_id = await funded_float(db_conn, source, 10)
    customer = await account(db_conn, AccountKind.customer_credit)
    async with db_conn.transaction():
        refused = await apply_transfers(db_conn, [transfer(float_id, customer, 11), transfer(float_id, 10**9, 1)])
        assert [r.status for r in refused] == [S.insufficient_balance, S.account_missing]
        assert await db_conn.fetchval("SELECT 41 + 1") == 42
        [ok] = await apply_transfers(db_conn, [transfer(float_id, customer, 10)])
        assert ok.status is S.ok
    assert await balance(db_conn, customer) == 10


async def test_a_rolled_back_caller_transaction_posts_nothing(db_conn: Any, source: int) -> None:
    float_id = await funded_float(db_conn, source, 10, low_threshold_minor=5)
    customer = await account(db_conn, AccountKind.customer_credit)
    events_before = len(await events_after(db_conn, limit=1000))
    t = transfer(float_id, customer, 10)
    with pytest.raises(RuntimeError):
        async with db_conn.transaction():
            [ok] = await apply_transfers(db_conn, [t])
            # Written in this transaction (a reader sees it only once the transaction has ended).
            assert ok.status is S.ok
            assert await db_conn.fetchval("SELECT count(*) FROM ledger_events WHERE transfer_id = $1", t.id) == 1
            raise RuntimeError("the gateway failed to write its receipt")
    assert await get_transfer(db_conn, t.id) is None
    assert await balance(db_conn, float_id) == 10
    assert len(await events_after(db_conn, limit=1000)) == events_before


async def test_a_replay_returns_the_stored_original(db_conn: Any, source: int) -> None:
    float_id = await funded_float(db_conn, source, 100)
    customer = await account(db_conn, AccountKind.customer_credit)
    t = transfer(float_id, customer, 30, terminal_id="T-1", receipt_number=7)
    [first] = await post_transfers(db_conn, [t])
    [again] = await post_transfers(db_conn, [t])
    assert first.status is S.ok and again.status is S.exists
    assert again.transfer == first.transfer
    assert await get_transfer(db_conn, t.id) == first.transfer
    assert await transfers_with(db_conn, t.id) == 1
    assert await balance(db_conn, float_id) == 70


@pytest.mark.parametrize("change", [
    {"amount_minor": 31}, {"kind": "deposit"}, {"metadata": {"terminal_id": "T-2"}}, {"group_id": uuid.uuid4()},
    {"credit_account_id": "other"},
])
async def test_the_same_id_with_other_content_posts_nothing(db_conn: Any, source: int, change: dict[str, Any]) -> None:
    float_id = await funded_float(db_conn, source, 100)
    customer = await account(db_conn, AccountKind.customer_credit)
    t = transfer(float_id, customer, 30, terminal_id="T-1")
    await post_transfers(db_conn, [t])
    if change.get("credit_account_id") == "other":
        change = {"credit_account_id": await account(db_conn, AccountKind.customer_credit)}
    fields = {name: getattr(t, name) for name in t.__struct_fields__} | change
    [result] = await post_transfers(db_conn, [Transfer(**fields)])
    assert result.status is S.exists_with_different_content and result.transfer is None
    assert await transfers_with(db_conn, t.id) == 1
    assert await balance(db_conn, float_id) == 70


async def test_a_known_id_with_other_content_fails_its_group(db_conn: Any, source: int) -> None:
    float_id = await funded_float(db_conn, source, 100)
    customer = await account(db_conn, AccountKind.customer_credit)
    t = transfer(float_id, customer, 30)
    await post_transfers(db_conn, [t])
    group = uuid.uuid4()
    results = await post_transfers(db_conn, [transfer(float_id, customer, 5, group_id=group),
                                             transfer(float_id, customer, 31, id=t.id, group_id=group)])
    assert [r.status for r in results] == [S.linked_failed, S.exists_with_different_content]
    assert await balance(db_conn, float_id) == 70


async def test_a_replayed_group_reports_exists_for_every_transfer(db_conn: Any, source: int) -> None:
    float_id = await funded_float(db_conn, source, 100)
    customer = await account(db_conn, AccountKind.customer_credit)
    group = uuid.uuid4()
    batch = [transfer(float_id, customer, 30, group_id=group), transfer(customer, float_id, 10, group_id=group)]
    first = await post_transfers(db_conn, batch)
    again = await post_transfers(db_conn, batch)
    assert [r.status for r in first] == [S.ok, S.ok] and [r.status for r in again] == [S.exists, S.exists]
    assert [r.transfer for r in again] == [r.transfer for r in first]
    assert await balance(db_conn, float_id) == 80


async def test_a_new_transfer_cannot_join_a_posted_group(db_conn: Any, source: int) -> None:
    float_id = await funded_float(db_conn, source, 100)
    customer = await account(db_conn, AccountKind.customer_credit)
    group = uuid.uuid4()
    posted = [transfer(float_id, customer, 30, group_id=group), transfer(customer, float_id, 10, group_id=group)]
    assert [r.status for r in await post_transfers(db_conn, posted)] == [S.ok, S.ok]
    openers = await db_conn.fetch("SELECT id FROM ledger_transfers WHERE group_id = $1 AND opens_group", group)
    assert [r["id"] for r in openers] == [posted[0].id]  # the group's first transfer opens it
    # A later batch: the posted group's id on new transfers (with a replay of one of its own
    # among them), and a group of its own that is fine.
    joiner = transfer(float_id, customer, 5, group_id=group)
    unrelated = transfer(float_id, customer, 7, group_id=uuid.uuid4())
    results = await post_transfers(db_conn, [posted[0], joiner, transfer(customer, float_id, 1, group_id=group),
                                             unrelated])
    assert [r.status for r in results] == [S.exists, S.exists_with_different_content, S.linked_failed, S.ok]
    assert results[0].transfer is not None and results[0].transfer.amount_minor == 30
    assert [t.id for t in await group_transfers(db_conn, group)] == [t.id for t in posted]
    assert await balance(db_conn, float_id) == 100 - 30 + 10 - 7
    # Alone, in a transaction of the caller's, and as a first attempt that reads nothing: the same.
    async with db_conn.transaction():
        [alone] = await apply_transfers(db_conn, [transfer(source, float_id, 3, group_id=group, kind="deposit")])
    assert alone.status is S.exists_with_different_content and alone.transfer is None
    assert len(await group_transfers(db_conn, group)) == 2 and await balance(db_conn, float_id) == 73


async def test_a_reversal_repeated_after_a_refused_join_moves_nothing(db_conn: Any, source: int) -> None:
    float_id = await funded_float(db_conn, source, 100)
    customer = await account(db_conn, AccountKind.customer_credit)
    group = uuid.uuid4()
    await post_transfers(db_conn, [transfer(float_id, customer, 40, group_id=group)])
    async with db_conn.transaction():
        first = await reverse_group(db_conn, group, reason="lost reply")
    assert [r.status for r in first] == [S.ok] and await balance(db_conn, float_id) == 100
    [joined] = await post_transfers(db_conn, [transfer(float_id, customer, 25, group_id=group)])
    assert joined.status is S.exists_with_different_content
    async with db_conn.transaction():
        again = await reverse_group(db_conn, group, reason="lost reply")
    assert [r.status for r in again] == [S.exists]
    assert (await balance(db_conn, float_id), await balance(db_conn, customer)) == (100, 0)


async def test_one_new_group_raced_under_other_ids_posts_once(db_pool: Any, source: int) -> None:
    """Two transactions post one new group id with different transfers and disjoint accounts: no
    account lock is shared; the later one's first transfer meets the earlier's on the index of
    groups' first transfers, waits for it to commit, and is refused."""
    async with db_pool.acquire() as first, db_pool.acquire() as second:
        float_a, float_b, customer_a, customer_b = await disjoint_routes(first, source)
        group = uuid.uuid4()
        holder = first.transaction()
        await holder.start()
        [held] = await apply_transfers(first, [transfer(float_a, customer_a, 3, group_id=group)])
        assert held.status is S.ok
        racer = asyncio.create_task(post_transfers(second, [transfer(float_b, customer_b, 4, group_id=group)]))
        await waiting_for_a_lock(first, second)
        assert not racer.done()
        await holder.commit()
        [raced] = await racer
        assert raced.status is S.exists_with_different_content
        assert (await balance(first, float_a), await balance(first, float_b)) == (7, 10)
        assert [t.credit_account_id for t in await group_transfers(first, group)] == [customer_a]


async def test_a_replay_that_would_be_refused_now_still_reports_exists(db_conn: Any, source: int) -> None:
    # Posting first takes every id to be new; a refusal must not hide that an id is stored.
    float_id = await funded_float(db_conn, source, 100)
    customer = await account(db_conn, AccountKind.customer_credit)
    group = uuid.uuid4()
    batch = [transfer(float_id, customer, 100, group_id=group), transfer(customer, source, 40, group_id=group)]
    first = await post_transfers(db_conn, batch)
    assert [r.status for r in first] == [S.ok, S.ok] and await balance(db_conn, float_id) == 0
    # The float is empty now, so the group's float debit would be refused if it were new.
    fresh = transfer(source, float_id, 5, kind="deposit")
    again = await post_transfers(db_conn, [*batch, fresh])
    assert [r.status for r in again] == [S.exists, S.exists, S.ok]
    assert [r.transfer for r in again[:2]] == [r.transfer for r in first]
    await set_account_blocked(db_conn, float_id, blocked=True)
    [blocked_replay] = await post_transfers(db_conn, [batch[0]])
    assert blocked_replay.status is S.exists
    assert await transfers_with(db_conn, *(t.id for t in batch)) == 2
    assert await balance(db_conn, float_id) == 5


async def test_an_id_twice_in_one_batch_posts_once(db_conn: Any, source: int) -> None:
    float_id = await funded_float(db_conn, source, 100)
    customer = await account(db_conn, AccountKind.customer_credit)
    t = transfer(float_id, customer, 30)
    other = Transfer(id=t.id, debit_account_id=float_id, credit_account_id=customer, amount_minor=1,
                     currency=t.currency, kind=t.kind)
    results = await post_transfers(db_conn, [t, t, other])
    assert [r.status for r in results] == [S.ok, S.exists, S.exists_with_different_content]
    assert results[1].transfer == results[0].transfer
    assert await transfers_with(db_conn, t.id) == 1 and await balance(db_conn, float_id) == 70


async def test_an_id_whose_first_attempt_in_the_batch_failed_is_tried_again(db_conn: Any, source: int) -> None:
    float_id = await funded_float(db_conn, source, 100)
    customer = await account(db_conn, AccountKind.customer_credit)
    t = transfer(float_id, customer, 60)
    results = await post_transfers(db_conn, [transfer(float_id, customer, 50), t, transfer(customer, float_id, 20), t])
    assert [r.status for r in results] == [S.ok, S.insufficient_balance, S.ok, S.ok]
    assert await transfers_with(db_conn, t.id) == 1 and await balance(db_conn, float_id) == 10


@pytest.mark.parametrize(("bad", "message"), [
    ({"amount_minor": 0}, "amount_minor"),
    ({"amount_minor": -5}, "amount_minor"),
    ({"amount_minor": 10**16}, "amount_minor"),
    ({"credit_account_id": 1}, "debit and credit"),
    ({"currency": "kes"}, "currency"),
    ({"kind": "Top-Up"}, "kind"),
    ({"metadata": {"flag": True}}, "metadata"),
    ({"metadata": {"blob": "x" * 3000}}, "metadata"),
])
async def test_a_malformed_transfer_raises_before_any_sql(db_conn: Any, bad: dict[str, Any], message: str) -> None:
    fields: dict[str, Any] = {"id": uuid.uuid4(), "debit_account_id": 1, "credit_account_id": 2, "amount_minor": 5,
                              "currency": "KES", "kind": "collection"} | bad
    async with db_conn.transaction():
        with pytest.raises(InvalidTransfer, match=message):
            await apply_transfers(db_conn, [Transfer(**fields)])
        assert await db_conn.fetchval("SELECT 1") == 1


async def test_a_group_split_within_a_batch_is_refused(db_conn: Any) -> None:
    group = uuid.uuid4()
    batch = [transfer(1, 2, 1, group_id=group), transfer(1, 2, 1), transfer(1, 2, 1, group_id=group)]
    with pytest.raises(InvalidTransfer, match="not consecutive"):
        await post_transfers(db_conn, batch)


async def test_the_posting_function_refuses_a_split_group_itself(db_conn: Any, source: int) -> None:
    """Called without the Python API's check: a group in two runs would have two first transfers."""
    float_id = await funded_float(db_conn, source, 100)
    customer = await account(db_conn, AccountKind.customer_credit)
    group = uuid.uuid4()
    batch = [transfer(float_id, customer, 1, group_id=group), transfer(float_id, customer, 1),
             transfer(float_id, customer, 1, group_id=group)]
    with pytest.raises(asyncpg.InvalidParameterValueError, match="consecutive"):
        await db_conn.fetchrow(sql.SQL_APPLY_TRANSFERS, [t.id for t in batch], [float_id] * 3, [customer] * 3,
                               [1] * 3, ["KES"] * 3, ["collection"] * 3, [t.group_id for t in batch], ["{}"] * 3)
    assert await transfers_with(db_conn, *(t.id for t in batch)) == 0 and await balance(db_conn, float_id) == 100


async def test_post_transfers_refuses_to_run_inside_a_transaction(db_conn: Any) -> None:
    async with db_conn.transaction():
        with pytest.raises(LedgerError, match="apply_transfers"):
            await post_transfers(db_conn, [transfer(1, 2, 1)])


async def test_the_database_refuses_a_balance_below_its_bound(db_conn: Any, source: int) -> None:
    float_id = await funded_float(db_conn, source, 5)
    with pytest.raises(asyncpg.CheckViolationError):
        await db_conn.execute("UPDATE ledger_accounts SET balance_minor = -1 WHERE id = $1", float_id)


async def test_posted_transfers_cannot_be_changed_or_deleted(db_conn: Any, source: int) -> None:
    float_id = await funded_float(db_conn, source, 5)
    for statement in ("UPDATE ledger_transfers SET amount_minor = 6 WHERE credit_account_id = $1",
                      "DELETE FROM ledger_transfers WHERE credit_account_id = $1"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="immutable"):
            await db_conn.execute(statement, float_id)
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="immutable"):
        await db_conn.execute("TRUNCATE ledger_transfers CASCADE")


async def test_1000_concurrent_debits_of_one_unit_over_50_connections(db_url: str, db_conn: Any, source: int) -> None:
    float_id = await funded_float(db_conn, source, 100)
    customer = await account(db_conn, AccountKind.customer_credit)
    lowest = 100
    done = asyncio.Event()

    async def watch() -> None:
        nonlocal lowest
        conn = await asyncpg.connect(db_url)
        try:
            while not done.is_set():
                lowest = min(lowest, await conn.fetchval("SELECT balance_minor FROM ledger_accounts WHERE id = $1",
                                                         float_id))
        finally:
            await conn.close()

    pool = await asyncpg.create_pool(db_url, min_size=50, max_size=50)
    try:
        watcher = asyncio.create_task(watch())
        # No return_exceptions: any error reaching a caller fails the test.
        results = await asyncio.gather(*(post_transfers(pool, [transfer(float_id, customer, 1)]) for _ in range(1000)))
        done.set()
        await watcher
    finally:
        await pool.close()
    statuses = [status for [result] in results for status in [result.status]]
    assert statuses.count(S.ok) == 100 and statuses.count(S.insufficient_balance) == 900
    assert await balance(db_conn, float_id) == 0 and await balance(db_conn, customer) == 100
    assert lowest >= 0
    assert await db_conn.fetchval("SELECT min(debit_balance_after_minor) FROM ledger_transfers "
                                  "WHERE debit_account_id = $1", float_id) == 0


async def test_50_concurrent_posts_of_one_id_post_once(db_pool: Any, db_conn: Any, source: int) -> None:
    float_id = await funded_float(db_conn, source, 100)
    customer = await account(db_conn, AccountKind.customer_credit)
    t = transfer(float_id, customer, 7)
    results = await asyncio.gather(*(post_transfers(db_pool, [t]) for _ in range(50)))
    statuses = [result.status for [result] in results]
    assert statuses.count(S.ok) == 1 and statuses.count(S.exists) == 49
    assert all(result.transfer == results[0][0].transfer for [result] in results)
    assert await transfers_with(db_conn, t.id) == 1 and await balance(db_conn, float_id) == 93


async def test_one_id_raced_with_other_accounts_reports_different_content(db_pool: Any, source: int) -> None:
    """Two posts of one id touching disjoint accounts share no lock: the later meets the earlier's row."""
    async with db_pool.acquire() as first, db_pool.acquire() as second:
        float_a, float_b, customer_a, customer_b = await disjoint_routes(first, source)
        shared_id = uuid.uuid4()
        holder = first.transaction()
        await holder.start()
        [held] = await apply_transfers(first, [transfer(float_a, customer_a, 3, id=shared_id)])
        assert held.status is S.ok
        racer = asyncio.create_task(post_transfers(second, [transfer(float_b, customer_b, 4, id=shared_id)]))
        for _ in range(200):
            waiting = await db_pool.fetchval("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                             "AND query LIKE '%ledger_apply_transfers%'")
            if waiting:
                break
            await asyncio.sleep(0.01)
        assert waiting == 1 and not racer.done()
        await holder.commit()
        [raced] = await racer
        assert raced.status is S.exists_with_different_content
        assert (await balance(first, float_a), await balance(first, float_b)) == (7, 10)


async def waiting_for_a_lock(observer: Any, waiter: Any, timeout_s: float = 10.0) -> None:
    """Until `waiter`'s backend waits for a lock (seen from `observer`'s connection)."""
    pid = waiter.get_server_pid()
    deadline = asyncio.get_running_loop().time() + timeout_s
    while await observer.fetchval("SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1", pid) != "Lock":
        assert asyncio.get_running_loop().time() < deadline, "the post never waited for a lock"
        await asyncio.sleep(0.01)


async def test_a_deadlock_is_retried(db_url: str, db_pool: Any, source: int) -> None:
    """Another transaction locks B then A while the post locks A then B: the post is chosen, retried, posts."""
    async with db_pool.acquire() as conn:
        float_id = await funded_float(conn, source, 10)
        customer = await account(conn, AccountKind.customer_credit)
        deadlocks_before = await conn.fetchval(DEADLOCKS)
    other = await asyncpg.connect(db_url)
    poster = await asyncpg.connect(db_url)
    try:
        await other.execute("SET deadlock_timeout = '10s'")
        # The check runs once, deadlock_timeout after a wait starts: the cycle must exist by then.
        await poster.execute("SET deadlock_timeout = '400ms'")
        lock = "SELECT id FROM ledger_accounts WHERE id = $1 FOR UPDATE"
        transaction = other.transaction()
        await transaction.start()
        await other.fetchval(lock, customer)  # B (the higher id)
        post = asyncio.create_task(post_transfers(poster, [transfer(float_id, customer, 4)]))
        await waiting_for_a_lock(other, poster)  # the post holds A and waits for B
        relock = asyncio.create_task(other.fetchval(lock, float_id))  # waits for A: the post is the victim
        await relock
        await transaction.rollback()
        [result] = await post
    finally:
        await other.close()
        await poster.close()
    assert result.status is S.ok
    async with db_pool.acquire() as conn:
        assert await conn.fetchval(DEADLOCKS) > deadlocks_before
        assert await balance(conn, float_id) == 6


async def test_retries_are_bounded(db_url: str, db_pool: Any, source: int) -> None:
    async with db_pool.acquire() as conn:
        float_id = await funded_float(conn, source, 10)
        customer = await account(conn, AccountKind.customer_credit)
    other = await asyncpg.connect(db_url)
    poster = await asyncpg.connect(db_url)
    try:
        await other.execute("SET deadlock_timeout = '10s'")
        # The check runs once, deadlock_timeout after a wait starts: the cycle must exist by then.
        await poster.execute("SET deadlock_timeout = '400ms'")
        lock = "SELECT id FROM ledger_accounts WHERE id = $1 FOR UPDATE"
        transaction = other.transaction()
        await transaction.start()
        await other.fetchval(lock, customer)
        post = asyncio.create_task(post_transfers(poster, [transfer(float_id, customer, 4)], retries_max=0))
        await waiting_for_a_lock(other, poster)
        await other.fetchval(lock, float_id)
        with pytest.raises(RetriesExhausted, match="40P01"):
            await post
        await transaction.rollback()
    finally:
        await other.close()
        await poster.close()


async def test_crossing_the_low_threshold_writes_an_event(db_conn: Any, source: int) -> None:
    float_id = await funded_float(db_conn, source, 100, low_threshold_minor=50)
    customer = await account(db_conn, AccountKind.customer_credit)
    batch = [transfer(float_id, customer, 40), transfer(float_id, customer, 20), transfer(float_id, customer, 10),
             transfer(customer, float_id, 50)]
    results = await post_transfers(db_conn, batch)
    assert all(r.status is S.ok for r in results)
    events = await visible_events(db_conn, wanted=lambda e: e.transfer_id in {t.id for t in batch}, at_least=2)
    assert [(e.kind, e.balance_minor, e.threshold_minor, e.transfer_id) for e in events] == [
        (EventKind.float_below_threshold, 40, 50, batch[1].id),
        (EventKind.float_restored, 80, 50, batch[3].id),
    ]


_DIRECT_TRANSFER = """
INSERT INTO ledger_transfers (id, seq, debit_account_id, credit_account_id, amount_minor, currency, kind,
                              debit_balance_after_minor, credit_balance_after_minor, created_at, hash)
VALUES (gen_random_uuid(), nextval('ledger_transfer_seq'), 1, 2, 5, $1, $2, 0, 5, now(), '\\x00')"""
_DIRECT_ACCOUNT = "INSERT INTO ledger_accounts (kind, currency, owner_ref) VALUES ('suspense', $1, 'probe')"


async def accepted_by_the_table(conn: Any, statement: str, *args: Any) -> bool:
    """Run a direct INSERT in a transaction that is rolled back; False when a CHECK refuses it."""
    transaction = conn.transaction()
    await transaction.start()
    try:
        await conn.execute(statement, *args)
        return True
    except asyncpg.CheckViolationError:
        return False
    finally:
        await transaction.rollback()


@pytest.mark.parametrize(("currency", "kind", "accepted"), [
    ("KES", "collection", True), ("USD", "a", True), ("KES", "debt_recovery_2", True), ("KES", "a" * 40, True),
    ("kes", "collection", False), ("KE", "collection", False), ("KESS", "collection", False),
    ("K1S", "collection", False), ("KÉS", "collection", False), ("KES\n", "collection", False),
    ("KES", "Collection", False), ("KES", "9lives", False), ("KES", "_x", False), ("KES", "", False),
    ("KES", "a" * 41, False), ("KES", "débit", False), ("KES", "has space", False), ("KES", "dash-ed", False),
])
async def test_the_table_itself_refuses_a_malformed_currency_or_kind(db_conn: Any, currency: str, kind: str,
                                                                    accepted: bool) -> None:
    # The posting function validates first; these CHECKs hold the table to the same rules for any writer.
    assert await accepted_by_the_table(db_conn, _DIRECT_TRANSFER, currency, kind) is accepted


@pytest.mark.parametrize(("currency", "accepted"), [("KES", True), ("kes", False), ("KE", False), ("K3S", False)])
async def test_an_account_with_a_malformed_currency_is_refused_by_the_table(db_conn: Any, currency: str,
                                                                          accepted: bool) -> None:
    assert await accepted_by_the_table(db_conn, _DIRECT_ACCOUNT, currency) is accepted
