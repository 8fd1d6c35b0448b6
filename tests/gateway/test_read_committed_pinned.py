"""The id locks (payment against reversal) work only if every statement after the lock sees what
committed while it waited: READ COMMITTED. vendgate pins it on its connections, whatever the
database's or role's default_transaction_isolation; under a REPEATABLE READ default the
tombstone race was lost (a reversal answered "nothing was charged" beside a charged payment)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest

from gateway import database
from gateway.committer import Committer
from gateway.settings import load_settings
from gateway.vending import VendingService, VendOutcome, VendRequest
from protocol.codes import ResponseCode
from tests.conftest import create_fresh_database
from tests.gateway.conftest import Running
from tests.gateway.test_pipelining import new_shop, topup


@pytest.fixture
async def rr_pool(running: Running) -> AsyncIterator[asyncpg.Pool]:
    """Connections whose default is REPEATABLE READ, as `ALTER DATABASE ... SET
    default_transaction_isolation` would make every session's."""
    pool = await asyncpg.create_pool(running.db_url, min_size=1, max_size=4,
                                     server_settings={"default_transaction_isolation": "repeatable read"})
    assert pool is not None
    try:
        yield pool
    finally:
        await pool.close()


async def _commit_one(pool: asyncpg.Pool, running: Running, request: VendRequest) -> VendOutcome:
    committer = Committer(pool, VendingService(running.keystore))
    committer.start()
    try:
        return await committer.submit(request)
    finally:
        await committer.stop()


async def _lock_waiters(running: Running, at_least: int) -> None:
    deadline = asyncio.get_running_loop().time() + 10
    while await running.pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
    ) < at_least:
        assert asyncio.get_running_loop().time() < deadline, "nobody waited"
        await asyncio.sleep(0.01)


async def test_a_reversal_waiting_for_the_payments_lock_sees_the_payment_under_repeatable_read(
        running: Running, rr_pool: asyncpg.Pool) -> None:
    """The payment commits while its reversal waits for the id's lock. The reversal must then
    find it and undo it; under a REPEATABLE READ default it answers ORIGINAL_NOT_FOUND ("nothing
    was charged") for a payment that was charged and stays charged."""
    shop = await new_shop(running, float_minor=100_000)
    paid = topup(shop, 1, shop.smart_meter, 5_000)
    reversal = VendRequest(kind="reversal", client_txn_id=f"{paid.client_txn_id}/R", terminal_id=shop.terminal,
                           amount_minor=5_000, currency=paid.currency, original_txn_id=paid.client_txn_id,
                           reason="no_reply")
    float_id = await running.pool.fetchval(
        "SELECT a.float_account_id FROM terminals t JOIN agents a USING (agent_id) WHERE t.terminal_id = $1",
        shop.terminal)
    async with running.pool.acquire() as holder:
        async with holder.transaction():
            # Hold the float: the payment's statement takes the id's lock, then waits here.
            await holder.execute("SELECT 1 FROM ledger_accounts WHERE id = $1 FOR UPDATE", float_id)
            payment = asyncio.create_task(_commit_one(running.pool, running, paid))
            await _lock_waiters(running, 1)
            undo = asyncio.create_task(_commit_one(rr_pool, running, reversal))
            await _lock_waiters(running, 2)  # the reversal waits for the payment's id lock
    paid_out, undo_out = await payment, await undo
    assert paid_out.response_code == ResponseCode.APPROVED
    balance = await running.pool.fetchval("SELECT balance_minor FROM ledger_accounts WHERE id = $1", float_id)
    found = await running.pool.fetchval("SELECT original_found FROM reversals WHERE original_txn_id = $1",
                                        paid.client_txn_id)
    # Either the reversal undid the payment, or it was not told "not found" while the money stayed taken.
    assert (undo_out.response_code, balance, found) == (ResponseCode.APPROVED, 100_000, True), (
        ResponseCode(undo_out.response_code).name, balance, found)


async def test_a_payment_waiting_for_its_reversals_lock_sees_the_tombstone_under_repeatable_read(
        running: Running, rr_pool: asyncpg.Pool) -> None:
    """The reversal of a payment not seen yet (unknown original: tombstone, ORIGINAL_NOT_FOUND)
    commits while the payment's commit waits for the id's lock: the payment must be refused."""
    shop = await new_shop(running, float_minor=100_000)
    late = topup(shop, 2, shop.smart_meter, 5_000)
    reversal = VendRequest(kind="reversal", client_txn_id=f"{late.client_txn_id}/R", terminal_id=shop.terminal,
                           amount_minor=5_000, currency=late.currency, original_txn_id=late.client_txn_id,
                           reason="no_reply")
    async with running.pool.acquire() as other_gateway:
        async with other_gateway.transaction():
            [acknowledged] = await VendingService(running.keystore).process_batch(
                other_gateway, [reversal], datetime.now(UTC))
            payment = asyncio.create_task(_commit_one(rr_pool, running, late))
            await _lock_waiters(running, 1)  # the payment's commit waits for the id's lock
    outcome = await payment
    assert acknowledged.response_code == ResponseCode.ORIGINAL_NOT_FOUND  # "nothing was charged"
    moved = await running.pool.fetchval(
        "SELECT count(*) FROM ledger_transfers WHERE kind = 'collection' AND metadata->>'client_txn_id' = $1",
        late.client_txn_id)
    assert (ResponseCode(outcome.response_code), moved) == (ResponseCode.ALREADY_REVERSED, 0)


async def test_vendgates_connections_are_read_committed_whatever_the_databases_default(
        pg_server_url: str, template_db: str) -> None:
    url = await create_fresh_database(pg_server_url, template_db, "repeatable_read_default")
    name = url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(pg_server_url)
    try:
        await admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_isolation = \'repeatable read\'')
    finally:
        await admin.close()
    plain = await asyncpg.connect(url)
    try:
        assert await plain.fetchval("SHOW transaction_isolation") == "repeatable read"  # the default took
    finally:
        await plain.close()
    conn = await database.connect(url, timeout_s=10)
    try:
        assert await conn.fetchval("SHOW transaction_isolation") == "read committed"
    finally:
        await conn.close()
    pool = await database.create_pool(url, load_settings(environ={}))
    try:
        assert await pool.fetchval("SHOW transaction_isolation") == "read committed"
    finally:
        await pool.close()
