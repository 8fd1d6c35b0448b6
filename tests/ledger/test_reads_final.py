"""A balance or a day read as of a time is final: a posting dated by then that is still committing
is waited for, not missed (and then seen by the same question asked again)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from float_ledger.errors import PostingsInFlight
from float_ledger.ledger import apply_transfers, balance_as_of, post_transfers, wait_for_postings_until
from float_ledger.model import AccountKind, PostStatus
from float_ledger.reconciliation import reconcile_agent_day
from gateway import pgcluster
from gateway.database import with_database
from gateway.migrate import migrate
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
            with pytest.raises(PostingsInFlight, match=f"backend pid {pid}\\)"):
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


@pytest.fixture(scope="module")
def two_phase_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pgcluster.LocalCluster]:
    """A throw-away cluster like the session's, with two-phase commit enabled
    (max_prepared_transactions > 0, as a deployment behind a transaction manager has it)."""
    saved = dict(pgcluster.COMMON_OPTIONS)
    pgcluster.COMMON_OPTIONS["max_prepared_transactions"] = "8"
    try:
        cluster = pgcluster.LocalCluster(tmp_path_factory.mktemp("pg2pc") / "pgdata", ephemeral=True)
        cluster.init()
        cluster.start()
    finally:
        pgcluster.COMMON_OPTIONS.clear()
        pgcluster.COMMON_OPTIONS.update(saved)
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture(scope="module")
async def two_phase_url(two_phase_cluster: pgcluster.LocalCluster) -> str:
    server = await asyncpg.connect(two_phase_cluster.url("postgres"))
    try:
        await server.execute('CREATE DATABASE "ledger2pc"')
    finally:
        await server.close()
    url = with_database(two_phase_cluster.url("postgres"), "ledger2pc")
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    return url


async def test_a_prepared_posting_dated_before_the_time_is_waited_for(two_phase_url: str) -> None:
    """A posting dated its transfer, then PREPARE TRANSACTION: it is still open (COMMIT PREPARED may
    come at any time) but it has no backend (pg_locks shows its lock with pid NULL). Before, it was
    left out: the read answered at once without it, and after COMMIT PREPARED with it."""
    reader = await asyncpg.connect(two_phase_url)
    posting = await asyncpg.connect(two_phase_url)
    try:
        assert int(await reader.fetchval("SHOW max_prepared_transactions")) > 0
        source = await account(reader, AccountKind.float_deposits, "utility", lower_bound_minor=None)
        float_id = await account(reader, AccountKind.agent_float, "A-2PC")
        [funded] = await post_transfers(reader, [transfer(source, float_id, 1_000, kind="deposit")])
        assert funded.status is PostStatus.ok

        await posting.execute("BEGIN")
        [r] = await apply_transfers(posting, [transfer(source, float_id, 250, kind="deposit")])
        assert r.status is PostStatus.ok
        await posting.execute("PREPARE TRANSACTION 'posting-2pc'")
        at = datetime.now(UTC)
        with pytest.raises(PostingsInFlight, match="prepared transaction 'posting-2pc'"):
            await asyncio.wait_for(balance_as_of(reader, float_id, at, settle_timeout_s=0.5), 5)
        reading = asyncio.create_task(balance_as_of(reader, float_id, at))
        await asyncio.sleep(0.2)
        assert not reading.done()
        await posting.execute("COMMIT PREPARED 'posting-2pc'")
        assert await asyncio.wait_for(reading, 5) == 1_250
    finally:
        await posting.execute("ROLLBACK PREPARED 'posting-2pc'") if await posting.fetchval(
            "SELECT count(*) FROM pg_prepared_xacts WHERE gid = 'posting-2pc'") else None
        await reader.close()
        await posting.close()


async def test_a_balance_as_of_in_a_read_committed_transaction_is_final(db_pool: Any, db_conn: Any) -> None:
    """In READ COMMITTED every statement takes a snapshot of its own, so the wait works inside a
    transaction. Before, it was skipped in any transaction: the same question twice in one
    transaction got two answers."""
    source = await account(db_conn, AccountKind.float_deposits, "utility", lower_bound_minor=None)
    float_id = await account(db_conn, AccountKind.agent_float, "A-RC")
    await post_transfers(db_conn, [transfer(source, float_id, 1_000, kind="deposit")])
    async with db_pool.acquire() as posting:
        tx = posting.transaction()
        await tx.start()
        await apply_transfers(posting, [transfer(source, float_id, 250, kind="deposit")])
        at = datetime.now(UTC)
        async with db_conn.transaction():  # READ COMMITTED, asyncpg's default
            reading = asyncio.create_task(balance_as_of(db_conn, float_id, at, settle_timeout_s=2))
            await asyncio.sleep(0.2)
            await tx.commit()
            first = await reading
            again = await balance_as_of(db_conn, float_id, at)
    assert first == again, f"one transaction, one question as of {at.isoformat()}: {first} then {again}"
