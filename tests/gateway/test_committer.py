"""The batching committer: many sessions' payments share transactions, guards decline one at a time."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from float_ledger.check import check_ledger
from gateway.committer import Committer
from gateway.seeding import meter_number, seed, terminal_id
from gateway.vending import VendingService, VendRequest
from protocol.codes import ResponseCode
from tests.gateway.conftest import Running


async def test_hot_agent_batches_and_never_overdraws(running: Running) -> None:
    async with running.pool.acquire() as conn:
        first = int(await conn.fetchval("SELECT count(*) FROM terminals")) + 1
        # One agent with a float of 10,000 minor units and ten terminals.
        await seed(conn, running.keystore, agents=1, terminals=10, meters=1, seed_secret=running.seed_secret,
                   float_each_minor=10_000)
    sizes: list[int] = []
    committer = Committer(running.pool, VendingService(running.keystore),
                          on_batch=lambda size, _: sizes.append(size))
    committer.start()
    today = datetime.now(UTC).strftime("%Y%m%d")
    requests = [
        VendRequest(kind="topup", client_txn_id=f"{terminal_id(first + n % 10)}-{today}-{n + 1:06d}",
                    terminal_id=terminal_id(first + n % 10), meter_number=meter_number(1), amount_minor=1_000,
                    currency="EUR")
        for n in range(50)
    ]
    try:
        outcomes = await asyncio.gather(*(committer.submit(r) for r in requests))
    finally:
        await committer.stop()
    approved = [o for o in outcomes if o.response_code == ResponseCode.APPROVED]
    declined = [o for o in outcomes if o.response_code == ResponseCode.INSUFFICIENT_FLOAT]
    assert len(approved) == 10 and len(declined) == 40
    # Arrival order is kept: the first ten submitted are the ten approved.
    assert [o.client_txn_id for o in approved] == [r.client_txn_id for r in requests[:10]]
    assert sorted(o.float_remaining_minor for o in approved) == list(range(0, 10_000, 1_000))
    assert max(sizes) > 1, sizes  # requests that arrived together were committed together
    assert sum(sizes) == 50
    async with running.pool.acquire() as conn:
        report = await check_ledger(conn)
    assert report.holds, report.broken


async def test_duplicate_ids_in_one_batch_are_applied_once(running: Running) -> None:
    committer = Committer(running.pool, VendingService(running.keystore))
    committer.start()
    today = datetime.now(UTC).strftime("%Y%m%d")
    request = VendRequest(kind="topup", client_txn_id=f"{terminal_id(1)}-{today}-555555", terminal_id=terminal_id(1),
                          meter_number=meter_number(2), amount_minor=800, currency="EUR")
    other = VendRequest(kind="topup", client_txn_id=request.client_txn_id, terminal_id=terminal_id(1),
                        meter_number=meter_number(2), amount_minor=900, currency="EUR")
    try:
        outcomes = await asyncio.gather(*(committer.submit(r) for r in [request] * 20 + [other]))
    finally:
        await committer.stop()
    assert len({o.receipt_number for o in outcomes[:20]}) == 1
    assert outcomes[0].response_code == ResponseCode.APPROVED
    assert outcomes[20].response_code == ResponseCode.DUPLICATE_DIFFERENT_CONTENT
    async with running.pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT count(DISTINCT group_id) AS groups, count(*) FILTER (WHERE kind = 'collection') AS debits,"
            " sum(amount_minor) FILTER (WHERE kind = 'collection') AS debited"
            " FROM ledger_transfers WHERE metadata->>'client_txn_id' = $1", request.client_txn_id)
    assert (row["groups"], row["debits"], row["debited"]) == (1, 1, 800)
