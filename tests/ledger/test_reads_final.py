"""A balance or a day read as of a time is final: a posting dated by then that is still committing
is waited for, not missed (and then seen by the same question asked again)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from float_ledger.errors import PostingsInFlight
from float_ledger.ledger import apply_transfers, balance_as_of, post_transfers, wait_for_postings_until
from float_ledger.model import AccountKind, PostStatus
from float_ledger.reconciliation import reconcile_agent_day
from tests.ledger.conftest import account, transfer

ZONE = "Africa/Nairobi"


async def funded_float(conn: Any, source: int, owner: str, amount_minor: int) -> int:
    float_id = await account(conn, AccountKind.agent_float, owner)
    [funded] = await post_transfers(conn, [transfer(source, float_id, amount_minor, kind="deposit")])
    assert funded.status is PostStatus.ok
    return float_id


async def test_a_balance_as_of_now_waits_for_a_posting_dated_before_it(db_pool: Any, db_conn: Any,
                                                                       source: int) -> None:
    """The posting holds its locks and has dated its transfer; it commits 0.3 s after the read
    began. Before, the read answered at once without it (1,000), and the same question asked a
    moment later answered 1,250."""
    float_id = await funded_float(db_conn, source, "A-FINAL-1", 1_000)
    async with db_pool.acquire() as posting:
        async with posting.transaction():
            [r] = await apply_transfers(posting, [transfer(source, float_id, 250, kind="deposit")])
            assert r.status is PostStatus.ok
            at = datetime.now(UTC)
            read = asyncio.create_task(balance_as_of(db_conn, float_id, at))
            await asyncio.sleep(0.3)
            assert not read.done()  # waiting for the posting to end
        assert await asyncio.wait_for(read, 5) == 1_250
    assert await balance_as_of(db_conn, float_id, at) == 1_250


async def test_a_posting_rolled_back_is_waited_for_then_not_counted(db_pool: Any, db_conn: Any,
                                                                    source: int) -> None:
    float_id = await funded_float(db_conn, source, "A-FINAL-2", 1_000)
    async with db_pool.acquire() as posting:
        tx = posting.transaction()
        await tx.start()
        await apply_transfers(posting, [transfer(source, float_id, 400, kind="deposit")])
        read = asyncio.create_task(balance_as_of(db_conn, float_id, datetime.now(UTC)))
        await asyncio.sleep(0.2)
        assert not read.done()
        await tx.rollback()
        assert await asyncio.wait_for(read, 5) == 1_000


async def test_a_posting_left_open_is_named_not_waited_for_without_end(db_pool: Any, db_conn: Any,
                                                                       source: int) -> None:
    """A transaction that never ends (a session left open in a transaction) bounds the wait: the
    read is refused with the backend to look at, never answered with a figure that may change."""
    float_id = await funded_float(db_conn, source, "A-FINAL-3", 1_000)
    zone_today = datetime.now(UTC).astimezone(ZoneInfo(ZONE)).date()
    async with db_pool.acquire() as posting:
        async with posting.transaction():
            await apply_transfers(posting, [transfer(source, float_id, 500, kind="deposit")])
            pid = await posting.fetchval("SELECT pg_backend_pid()")
            with pytest.raises(PostingsInFlight, match=f"backend pid {pid}"):
                await balance_as_of(db_conn, float_id, datetime.now(UTC), settle_timeout_s=0.3)
            with pytest.raises(PostingsInFlight):
                await reconcile_agent_day(db_conn, float_account_id=float_id, business_day=zone_today,
                                          time_zone=ZONE, settle_timeout_s=0.3)
    day = await reconcile_agent_day(db_conn, float_account_id=float_id, business_day=zone_today, time_zone=ZONE)
    assert (day.deposits_count, day.deposits_minor, day.closing_float_minor) == (2, 1_500, 1_500)


async def test_a_transaction_begun_after_the_time_is_not_waited_for(db_pool: Any, db_conn: Any,
                                                                    source: int) -> None:
    """Its transfers are dated after the time it began, so it cannot change the figure: a busy
    ledger does not hold up a read of the past."""
    float_id = await funded_float(db_conn, source, "A-FINAL-4", 1_000)
    at = datetime.now(UTC)
    await asyncio.sleep(0.01)
    async with db_pool.acquire() as posting:
        async with posting.transaction():
            await apply_transfers(posting, [transfer(source, float_id, 600, kind="deposit")])
            assert await asyncio.wait_for(balance_as_of(db_conn, float_id, at, settle_timeout_s=5), 1) == 1_000
            await asyncio.wait_for(wait_for_postings_until(db_conn, at, timeout_s=5), 1)


async def test_the_wait_needs_a_timezone_aware_time(db_conn: Any) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        await wait_for_postings_until(db_conn, datetime.now())


async def test_a_transaction_in_another_database_of_the_server_is_not_waited_for(
        pg_server_url: str, db_conn: Any, source: int) -> None:
    """It cannot post to this ledger. Before, one left open in a neighbouring database held up
    every balance as of a time and every reconciliation of this one, then refused them."""
    import asyncpg

    float_id = await funded_float(db_conn, source, "A-FINAL-5", 1_000)
    elsewhere = await asyncpg.connect(pg_server_url)
    try:
        async with elsewhere.transaction():
            await elsewhere.execute("CREATE TEMP TABLE busy (n int)")
            await elsewhere.execute("INSERT INTO busy VALUES (1)")
            assert await elsewhere.fetchval("SELECT pg_current_xact_id_if_assigned() IS NOT NULL")
            assert await balance_as_of(db_conn, float_id, datetime.now(UTC), settle_timeout_s=0.5) == 1_000
    finally:
        await elsewhere.close()
