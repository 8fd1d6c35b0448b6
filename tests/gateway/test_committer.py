"""The batching committer: many sessions' payments share transactions, guards decline one at a time."""

from __future__ import annotations

import asyncio
import json
import string
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from float_ledger import sql as ledger_sql
from float_ledger.ledger import create_account, post_transfers
from float_ledger.model import AccountKind, PostStatus, Transfer
from gateway import committer as committer_module
from gateway.committer import Committer, CommitterBusy
from gateway.records_check import check_all
from gateway.seeding import meter_number, seed, terminal_id
from gateway.vending import VendingService, VendOutcome, VendRequest, group_id_for, refused_statuses
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
        report = await check_all(conn)
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


class _SlowVending(VendingService):
    """Holds every batch open a while: long enough for a session's wait to run out."""

    async def _prepare(self, *args):  # type: ignore[no-untyped-def]
        await asyncio.sleep(0.3)
        return await super()._prepare(*args)


async def test_a_wait_that_runs_out_answers_busy_and_the_payment_still_commits(
        running: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(committer_module, "submit_timeout_s", 0.05)
    committer = Committer(running.pool, _SlowVending(running.keystore))
    committer.start()
    today = datetime.now(UTC).strftime("%Y%m%d")
    waited_out = VendRequest(kind="topup", client_txn_id=f"{terminal_id(3)}-{today}-777001",
                             terminal_id=terminal_id(3), meter_number=meter_number(3), amount_minor=700,
                             currency="EUR")
    abandoned = VendRequest(kind="topup", client_txn_id=f"{terminal_id(5)}-{today}-777002",
                            terminal_id=terminal_id(5), meter_number=meter_number(5), amount_minor=700,
                            currency="EUR")
    try:
        with pytest.raises(CommitterBusy):
            await committer.submit(waited_out)
        # A session that goes away mid-wait (its task cancelled) does not cancel its queued payment.
        task = asyncio.create_task(committer.submit(abandoned))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        await committer.stop()  # commits everything queued
    ids = [waited_out.client_txn_id, abandoned.client_txn_id]
    async with running.pool.acquire() as conn:
        stored = await conn.fetchval("SELECT count(*) FROM vend_transactions WHERE client_txn_id = ANY($1::text[])"
                                     " AND response_code = 0", ids)
    assert stored == 2  # both committed although neither session was there to hear it
    monkeypatch.setattr(committer_module, "submit_timeout_s", 30.0)
    retry = Committer(running.pool, VendingService(running.keystore))
    retry.start()
    try:
        # The retries with the same ids replay what committed, byte for byte the same outcome.
        replays = [await retry.submit(waited_out), await retry.submit(abandoned)]
    finally:
        await retry.stop()
    assert [o.response_code for o in replays] == [ResponseCode.APPROVED] * 2
    async with running.pool.acquire() as conn:
        collections = await conn.fetchval(
            "SELECT count(*) FROM ledger_transfers WHERE kind = 'collection' AND metadata->>'client_txn_id' = ANY($1)",
            ids)
    assert collections == 2  # one debit each: the retries replayed, they did not pay again


async def test_raced_constraints_are_the_schemas(running: Running) -> None:
    async with running.pool.acquire() as conn:
        rows = await conn.fetch("SELECT conname FROM pg_constraint WHERE contype IN ('p', 'u')")
    names = {r["conname"] for r in rows}
    assert committer_module._RACED_CONSTRAINTS <= names


async def commit_one(running: Running, service: VendingService, request: VendRequest) -> VendOutcome:
    """Submit one request through a committer of its own, stopped once the request is answered."""
    committer = Committer(running.pool, service)
    committer.start()
    try:
        return await committer.submit(request)
    finally:
        await committer.stop()


class _RacedVending(VendingService):
    """Between its first batch's reads and its posting (whose float lock would make the other
    wait), another transaction pays and commits, its clock `ahead` of this one's: on the same
    terminal, the receipt number this batch takes from the counter it read is then taken; on the
    same STS meter with a clock minutes ahead, it issues a later TID first."""

    def __init__(self, keystore, rival: VendRequest, pool,  # type: ignore[no-untyped-def]
                 ahead: timedelta = timedelta(0)) -> None:
        super().__init__(keystore)
        self.rival = rival
        self.pool = pool
        self.ahead = ahead
        self.raced = 0
        self.rival_outcomes: list[VendOutcome] = []

    async def _post(self, conn, pending, arguments):  # type: ignore[no-untyped-def]
        if not self.raced:
            self.raced += 1
            async with self.pool.acquire() as other, other.transaction():
                self.rival_outcomes = await VendingService(self.keystore).process_batch(
                    other, [self.rival], datetime.now(UTC) + self.ahead)
        return await super()._post(conn, pending, arguments)


async def test_a_receipt_number_taken_meanwhile_redoes_the_batch_gap_free(running: Running) -> None:
    today = datetime.now(UTC).strftime("%Y%m%d")
    terminal = terminal_id(6)
    ours = VendRequest(kind="topup", client_txn_id=f"{terminal}-{today}-888001", terminal_id=terminal,
                       meter_number=meter_number(6), amount_minor=600, currency="EUR")
    rival = VendRequest(kind="topup", client_txn_id=f"{terminal}-{today}-888002", terminal_id=terminal,
                        meter_number=meter_number(8), amount_minor=600, currency="EUR")
    async with running.pool.acquire() as conn:
        before = int(await conn.fetchval("SELECT receipt_seq FROM terminals WHERE terminal_id = $1", terminal))
    service = _RacedVending(running.keystore, rival, running.pool)
    outcome = await commit_one(running, service, ours)
    assert service.raced == 1
    assert outcome.response_code == ResponseCode.APPROVED
    async with running.pool.acquire() as conn:
        after = int(await conn.fetchval("SELECT receipt_seq FROM terminals WHERE terminal_id = $1", terminal))
        numbers = {r["client_txn_id"]: r["receipt_number"] for r in await conn.fetch(
            "SELECT client_txn_id, receipt_number FROM receipts WHERE terminal_id = $1 AND receipt_number > $2",
            terminal, before)}
    # The rival committed first and took the next number; ours was redone and took the one after.
    assert numbers == {rival.client_txn_id: before + 1, ours.client_txn_id: before + 2}
    assert outcome.receipt_number == before + 2 and after == before + 2


async def test_a_meter_keeps_its_highest_tid_when_a_later_one_commits_first(running: Running) -> None:
    async with running.pool.acquire() as conn:
        meter = await conn.fetchval(
            "SELECT meter_number FROM meters WHERE supply_mode = 'sts' AND meter_number = ANY($1) ORDER BY 1 LIMIT 1",
            [meter_number(n) for n in range(12)])
    assert meter is not None
    today = datetime.now(UTC).strftime("%Y%m%d")
    ours = VendRequest(kind="topup", client_txn_id=f"{terminal_id(4)}-{today}-889001", terminal_id=terminal_id(4),
                       meter_number=meter, amount_minor=700, currency="EUR")
    rival = VendRequest(kind="topup", client_txn_id=f"{terminal_id(5)}-{today}-889002", terminal_id=terminal_id(5),
                        meter_number=meter, amount_minor=700, currency="EUR")
    service = _RacedVending(running.keystore, rival, running.pool, ahead=timedelta(minutes=10))
    outcome = await commit_one(running, service, ours)
    assert service.raced == 1 and outcome.response_code == ResponseCode.APPROVED
    async with running.pool.acquire() as conn:
        tids = {r["client_txn_id"]: r["token_id"] for r in await conn.fetch(
            "SELECT client_txn_id, token_id FROM tokens WHERE client_txn_id = ANY($1)",
            [ours.client_txn_id, rival.client_txn_id])}
        last = await conn.fetchval("SELECT last_token_id FROM meters WHERE meter_number = $1", meter)
    # Ours was issued from the meter as first read, so earlier than the rival's; both are unique,
    # and the meter remembers the later one, so the next token is issued after both.
    assert tids[ours.client_txn_id] < tids[rival.client_txn_id]
    assert last == tids[rival.client_txn_id]


async def test_a_reversal_committed_between_the_reads_and_the_commit_declines_the_payment(running: Running) -> None:
    """The reversal's tombstone lands after the batch read the payment as unreversed: the batch's
    commit finds it under the id's lock, writes nothing, and the batch is decided again."""
    today = datetime.now(UTC).strftime("%Y%m%d")
    ours = VendRequest(kind="topup", client_txn_id=f"{terminal_id(7)}-{today}-890001", terminal_id=terminal_id(7),
                       meter_number=meter_number(7), amount_minor=700, currency="EUR")
    reversal = VendRequest(kind="reversal", client_txn_id=f"{ours.client_txn_id}/R", terminal_id=terminal_id(7),
                           amount_minor=700, currency="EUR", original_txn_id=ours.client_txn_id, reason="lost")
    service = _RacedVending(running.keystore, reversal, running.pool)
    outcome = await commit_one(running, service, ours)
    assert service.raced == 1
    assert [o.response_code for o in service.rival_outcomes] == [ResponseCode.ORIGINAL_NOT_FOUND]
    assert outcome.response_code == ResponseCode.ALREADY_REVERSED
    async with running.pool.acquire() as conn:
        moved = await conn.fetchval("SELECT count(*) FROM ledger_transfers WHERE metadata->>'client_txn_id' = $1",
                                    ours.client_txn_id)
        code = await conn.fetchval("SELECT response_code FROM vend_transactions WHERE client_txn_id = $1",
                                   ours.client_txn_id)
    assert moved == 0 and code == ResponseCode.ALREADY_REVERSED


async def test_a_reversal_sent_again_to_another_gateway_while_the_first_commits_gets_the_first_answer(
        running: Running) -> None:
    """The terminal sends its reversal again over another connection (another gateway) while the
    first is still committing: the second waits for the original's lock, then finds the first's
    stored answer and returns it, the same reversal, not ALREADY_REVERSED."""
    today = datetime.now(UTC).strftime("%Y%m%d")
    paid = VendRequest(kind="topup", client_txn_id=f"{terminal_id(6)}-{today}-890003", terminal_id=terminal_id(6),
                       meter_number=meter_number(6), amount_minor=600, currency="EUR")
    assert (await commit_one(running, VendingService(running.keystore), paid)).response_code == ResponseCode.APPROVED
    reversal = VendRequest(kind="reversal", client_txn_id=f"{paid.client_txn_id}/R", terminal_id=terminal_id(6),
                           amount_minor=600, currency="EUR", original_txn_id=paid.client_txn_id, reason="lost")
    async with running.pool.acquire() as first_gateway:
        async with first_gateway.transaction():
            [first] = await VendingService(running.keystore).process_batch(first_gateway, [reversal],
                                                                           datetime.now(UTC))
            again = asyncio.create_task(commit_one(running, VendingService(running.keystore), reversal))
            # The second has read no stored answer and waits for the lock.
            deadline = asyncio.get_running_loop().time() + 10
            while not await running.pool.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"):
                assert asyncio.get_running_loop().time() < deadline, "the second reversal never waited"
                await asyncio.sleep(0.01)
            assert not again.done()
        second = await again
    assert first.response_code == ResponseCode.APPROVED
    assert second == first
    async with running.pool.acquire() as conn:
        reversed_legs = await conn.fetchval(
            "SELECT count(*) FROM ledger_transfers WHERE kind = 'reversal' AND metadata->>'client_txn_id' = $1",
            paid.client_txn_id)
        paid_legs = await conn.fetchval("SELECT count(*) FROM ledger_transfers WHERE group_id = $1",
                                        group_id_for(paid.client_txn_id))
        assert (await check_all(conn)).holds
    assert reversed_legs == paid_legs > 0  # each leg undone once, by the first reversal alone


async def test_an_id_recorded_meanwhile_by_another_gateway_is_replayed_not_paid_twice(running: Running) -> None:
    today = datetime.now(UTC).strftime("%Y%m%d")
    ours = VendRequest(kind="topup", client_txn_id=f"{terminal_id(8)}-{today}-890002", terminal_id=terminal_id(8),
                       meter_number=meter_number(8), amount_minor=800, currency="EUR")
    service = _RacedVending(running.keystore, ours, running.pool)
    outcome = await commit_one(running, service, ours)
    assert service.raced == 1
    [first] = service.rival_outcomes
    assert first.response_code == ResponseCode.APPROVED
    assert outcome == first  # the other gateway's answer, receipt and float remaining included
    async with running.pool.acquire() as conn:
        debits = await conn.fetchval(
            "SELECT count(*) FROM ledger_transfers WHERE kind = 'collection' AND metadata->>'client_txn_id' = $1",
            ours.client_txn_id)
    assert debits == 1


async def test_a_replay_answers_the_float_remaining_of_its_first_answer(running: Running) -> None:
    """The float moves on after a payment; its replay still says what the first answer said."""
    today = datetime.now(UTC).strftime("%Y%m%d")
    first = VendRequest(kind="topup", client_txn_id=f"{terminal_id(9)}-{today}-890003", terminal_id=terminal_id(9),
                        meter_number=meter_number(9), amount_minor=900, currency="EUR")
    later = VendRequest(kind="topup", client_txn_id=f"{terminal_id(9)}-{today}-890004", terminal_id=terminal_id(9),
                        meter_number=meter_number(9), amount_minor=500, currency="EUR")
    service = VendingService(running.keystore)
    answered = await commit_one(running, service, first)
    moved_on = await commit_one(running, service, later)
    replayed = await commit_one(running, service, first)
    assert answered.response_code == moved_on.response_code == ResponseCode.APPROVED
    assert answered.float_remaining_minor is not None and moved_on.float_remaining_minor is not None
    assert moved_on.float_remaining_minor == answered.float_remaining_minor - 500
    assert replayed == answered
    async with running.pool.acquire() as conn:
        stored = await conn.fetchval(
            "SELECT t.debit_balance_after_minor FROM vend_transactions v"
            " JOIN ledger_transfers t ON t.group_id = v.group_id AND t.kind = 'collection'"
            " WHERE v.client_txn_id = $1", first.client_txn_id)
        tariff = await conn.fetchval("SELECT tariff_code FROM meters WHERE meter_number = $1", first.meter_number)
    assert stored == answered.float_remaining_minor  # read back from the immutable collection transfer
    assert answered.tariff_code == tariff  # the reply names the tariff it was sold at


@pytest.mark.parametrize("noticed_after_s", [0.0, 0.3], ids=["at-once", "once-noticed"])
async def test_a_lost_database_connection_is_replaced_and_the_batch_redone(running: Running,
                                                                            noticed_after_s: float) -> None:
    """The committer keeps one connection; when the server ends it, the next batch runs on a new one,
    whether the next batch meets the end itself or the client has noticed it already."""
    today = datetime.now(UTC).strftime("%Y%m%d")
    base = 890101 if noticed_after_s == 0 else 890111
    first = VendRequest(kind="topup", client_txn_id=f"{terminal_id(10)}-{today}-{base}", terminal_id=terminal_id(10),
                        meter_number=meter_number(10), amount_minor=600, currency="EUR")
    second = VendRequest(kind="topup", client_txn_id=f"{terminal_id(10)}-{today}-{base + 1}",
                         terminal_id=terminal_id(10), meter_number=meter_number(10), amount_minor=700, currency="EUR")
    committer = Committer(running.pool, VendingService(running.keystore))
    committer.start()
    try:
        answered = await committer.submit(first)
        assert committer._conn is not None
        pid = committer._conn.get_server_pid()
        async with running.pool.acquire() as conn:
            assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
        await asyncio.sleep(noticed_after_s)
        after = await committer.submit(second)
        later = await committer.submit(second)
        assert committer._conn is not None and committer._conn.get_server_pid() != pid
        replayed = await committer.submit(first)
    finally:
        await committer.stop()
    assert answered.response_code == after.response_code == ResponseCode.APPROVED
    assert replayed == answered and later == after
    async with running.pool.acquire() as conn:
        debits = await conn.fetchval(
            "SELECT count(*) FROM ledger_transfers WHERE kind = 'collection' AND metadata->>'client_txn_id' = ANY($1)",
            [first.client_txn_id, second.client_txn_id])
    assert debits == 2


async def test_a_database_out_of_reach_answers_every_request_of_the_batch(running: Running, db_url: str) -> None:
    """No connection to be had: each request of the batch gets SYSTEM_ERROR (retry with the same id)."""
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=1)
    assert pool is not None
    committer = Committer(pool, VendingService(running.keystore))
    committer.start()
    today = datetime.now(UTC).strftime("%Y%m%d")
    requests = [VendRequest(kind="topup", client_txn_id=f"{terminal_id(11)}-{today}-89020{n}",
                            terminal_id=terminal_id(11), meter_number=meter_number(11), amount_minor=500,
                            currency="EUR") for n in range(3)]
    try:
        await pool.close()
        outcomes = await asyncio.gather(*(committer.submit(r) for r in requests))
    finally:
        await committer.stop()
    assert [o.response_code for o in outcomes] == [ResponseCode.SYSTEM_ERROR] * 3
    assert [o.client_txn_id for o in outcomes] == [r.client_txn_id for r in requests]
    async with running.pool.acquire() as conn:
        stored = await conn.fetchval("SELECT count(*) FROM vend_transactions WHERE client_txn_id = ANY($1)",
                                     [r.client_txn_id for r in requests])
    assert stored == 0


async def test_a_ledger_refusal_in_a_batch_with_a_reversal_declines_only_the_refused(running: Running) -> None:
    """A batch holding a reversal runs in a transaction block: a refusal there rolls the block back
    and the batch is decided again, each request answered as if it had come alone, in order."""
    async with running.pool.acquire() as conn:
        first = int(await conn.fetchval("SELECT count(*) FROM terminals")) + 1
        await seed(conn, running.keystore, agents=1, terminals=1, meters=1, seed_secret=running.seed_secret,
                   float_each_minor=1_000)
    terminal = terminal_id(first)
    today = datetime.now(UTC).strftime("%Y%m%d")

    def topup(n: int) -> VendRequest:
        return VendRequest(kind="topup", client_txn_id=f"{terminal}-{today}-{n}", terminal_id=terminal,
                           meter_number=meter_number(1), amount_minor=600, currency="EUR")

    paid, short, after, short_again = topup(891001), topup(891002), topup(891003), topup(891004)
    reversal = VendRequest(kind="reversal", client_txn_id=f"{paid.client_txn_id}/R", terminal_id=terminal,
                           amount_minor=600, currency="EUR", original_txn_id=paid.client_txn_id, reason="lost")
    batch = [paid, short, reversal, after, short_again]
    sizes: list[int] = []
    committer = Committer(running.pool, VendingService(running.keystore), on_batch=lambda size, _: sizes.append(size))
    committer.start()
    try:
        outcomes = await asyncio.gather(*(committer.submit(r) for r in batch))
    finally:
        await committer.stop()
    assert sizes == [5]  # one batch
    assert [o.response_code for o in outcomes] == [ResponseCode.APPROVED, ResponseCode.INSUFFICIENT_FLOAT,
                                                   ResponseCode.APPROVED, ResponseCode.APPROVED,
                                                   ResponseCode.INSUFFICIENT_FLOAT]
    # 1,000 - 600 = 400; the reversal gives the 600 back; the next payment takes it again.
    assert [o.float_remaining_minor for o in outcomes] == [400, None, 1_000, 400, None]
    async with running.pool.acquire() as conn:
        report = await check_all(conn)
        balance = await conn.fetchval(
            "SELECT a.balance_minor FROM ledger_accounts a JOIN agents g ON g.float_account_id = a.id"
            " JOIN terminals t USING (agent_id) WHERE t.terminal_id = $1", terminal)
    assert report.holds, report.broken
    assert balance == 400


@pytest.mark.parametrize("detail", [None, "", "x:insufficient_balance", "0:insufficient_balance",
                                    "9:insufficient_balance", "2:null", "2:what"])
def test_an_unreadable_ledger_refusal_is_an_error_not_a_guess(detail: str | None) -> None:
    with pytest.raises(RuntimeError):
        refused_statuses(detail, 8)


def test_a_ledger_refusal_names_the_transfers_not_posted() -> None:
    assert refused_statuses("2:insufficient_balance,3:linked_failed", 4) == [
        "ok", "insufficient_balance", "linked_failed", "ok"]


async def test_the_committers_connections_read_by_index_and_hand_back_their_settings(running: Running) -> None:
    """Batches run by index, also on a connection that replaces a lost one; a connection back in
    the pool has the defaults."""
    today = datetime.now(UTC).strftime("%Y%m%d")
    requests = [VendRequest(kind="topup", client_txn_id=f"{terminal_id(11)}-{today}-{770001 + n}",
                            terminal_id=terminal_id(11), meter_number=meter_number(11), amount_minor=500,
                            currency="EUR") for n in range(2)]
    committer = Committer(running.pool, VendingService(running.keystore))
    committer.start()
    try:
        assert (await committer.submit(requests[0])).response_code == ResponseCode.APPROVED
        assert committer._conn is not None
        pid = committer._conn.get_server_pid()
        async with running.pool.acquire() as conn:
            assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
        assert (await committer.submit(requests[1])).response_code == ResponseCode.APPROVED
        assert committer._conn is not None and committer._conn.get_server_pid() != pid
        assert await committer._conn.fetchval("SHOW enable_seqscan") == "off"
        kept_pid = committer._conn.get_server_pid()
    finally:
        await committer.stop()
    held = [await running.pool.acquire() for _ in range(running.pool.get_size())]
    try:
        returned = [c for c in held if c.get_server_pid() == kept_pid]
        assert returned, "the committer's connection went back to the pool"
        assert await returned[0].fetchval("SHOW enable_seqscan") == "on"
    finally:
        for conn in held:
            await running.pool.release(conn)


def relation_scans(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Every node of an EXPLAIN (FORMAT JSON) plan that reads a table."""
    found = [plan] if "Relation Name" in plan else []
    for child in plan.get("Plans", []):
        found.extend(relation_scans(child))
    return found


def by_key(scan: dict[str, Any]) -> bool:
    """The node reads its table through an index, by a condition on the key (never a walk of
    the whole table or of a whole index); a write's rows come from the scans below it."""
    if scan["Node Type"] == "ModifyTable":
        return True
    if scan["Node Type"] in ("Index Scan", "Index Only Scan"):
        return "Index Cond" in scan
    return scan["Node Type"] == "Bitmap Heap Scan" and "Recheck Cond" in scan


def sql_array(values: list[str]) -> str:
    """A text[] literal of terminal ids, meter numbers or client transaction ids (no quoting needed)."""
    assert all(set(v) <= set(string.ascii_uppercase + string.digits + "-") for v in values)
    return "'{" + ",".join(values) + "}'"


async def test_the_batch_read_reaches_every_row_by_key_under_the_committers_settings(running: Running) -> None:
    """With the settings the committer's connections run with, the batch read reaches every table
    by key, for a batch of one payment as for a full one, in its generic plan (the one the
    committer's connections keep, made once whatever the tables held then) as in a plan made
    for the values: a small batch costs a few index lookups, however many agents, customers and
    payments there are."""
    async with running.pool.acquire() as conn:
        await committer_module.keep(conn)
        assert await conn.fetchval("SHOW plan_cache_mode") == "force_generic_plan"
        terminals = [r["terminal_id"] for r in await conn.fetch("SELECT terminal_id FROM terminals LIMIT 200")]
        meters = [r["meter_number"] for r in await conn.fetch("SELECT meter_number FROM meters LIMIT 200")]
        assert terminals and meters
        await conn.execute("PREPARE batch_read(text[], text[], text[], timestamptz) AS "
                           + committer_module.sql.VEND_BATCH_READ)
        plans: dict[tuple[str, int], dict[str, Any]] = {}
        try:
            for mode in ("force_generic_plan", "force_custom_plan"):
                await conn.execute(f"SET plan_cache_mode = {mode}")
                for size in (1, 200):
                    ids = [f"{terminals[n % len(terminals)]}-20261202-{n + 1:06d}" for n in range(size)]
                    explained = await conn.fetchval(
                        f"EXPLAIN (FORMAT JSON) EXECUTE batch_read({sql_array(ids)}, {sql_array(terminals[:size])}, "
                        f"{sql_array(meters[:size])}, '{datetime.now(UTC).isoformat()}')")
                    plans[mode, size] = json.loads(explained)[0]["Plan"]
        finally:
            await conn.execute("DEALLOCATE batch_read")
    for (mode, size), plan in plans.items():
        scans = relation_scans(plan)
        tables = {scan["Relation Name"] for scan in scans}
        assert {"vend_transactions", "reversals", "terminals", "agents", "terminal_daily_totals", "meters",
                "customers", "ledger_accounts", "vending_keys", "tariffs", "ledger_transfers"} <= tables, (mode, size)
        assert all(by_key(scan) for scan in scans), (mode, size, [s for s in scans if not by_key(s)])
    # The generic plan is one plan for any values: its conditions name the parameters.
    generic = json.dumps(plans["force_generic_plan", 1])
    assert "$2" in generic and "$3" in generic
    assert "$2" not in json.dumps(plans["force_custom_plan", 1])


@pytest.mark.parametrize(("statement", "types", "values"), [
    (committer_module.sql.TERMINALS_FOR_VEND, "text[]", "'{T0000011}'"),
    (committer_module.sql.TXN_GET, "text", "'T0000011-20261202-000001'"),
    (committer_module.sql.REVERSALS_GET_MANY, "text[]", "'{T0000011-20261202-000001}'"),
    (committer_module.sql.TOKEN_VOID, "text", "'T0000011-20261202-000001'"),
    (committer_module.sql.ACCOUNT_BALANCES, "bigint[]", "'{1,2}'"),
    (committer_module.sql.SYSTEM_ACCOUNT_GET, "text, text", "'vat_payable', 'EUR'"),
    (ledger_sql.SQL_GROUP_TRANSFERS, "uuid", "'6f9619ff-8b86-d011-b42d-00c04fc964ff'"),
], ids=["terminals", "txn", "reversals", "token_void", "balances", "system_account", "group_transfers"])
async def test_what_else_runs_on_the_committers_connections_reaches_rows_by_key_in_its_generic_plan(
        running: Running, statement: str, types: str, values: str) -> None:
    """A reversal's statements and the system account lookup run on the committer's connections
    as well, so with one generic plan each: by key too, whatever the tables held when it was made."""
    async with running.pool.acquire() as conn:
        await committer_module.keep(conn)
        await conn.execute(f"PREPARE keyed({types}) AS {statement}")
        try:  # EXPLAIN without ANALYZE: the statement is planned, not run
            explained = await conn.fetchval(f"EXPLAIN (FORMAT JSON) EXECUTE keyed({values})")
        finally:
            await conn.execute("DEALLOCATE keyed")
    plan = json.loads(explained)[0]["Plan"]
    scans = relation_scans(plan)
    assert scans and all(by_key(scan) for scan in scans), [s for s in scans if not by_key(s)]
    assert "$1" in json.dumps(plan)  # the generic plan: its conditions name the parameter


async def test_a_kept_connection_plans_its_statements_afresh_under_the_committers_settings(running: Running) -> None:
    """A pooled connection that served other work first prepares every statement again once the
    committer keeps it: no plan made under the defaults (maybe while a table was small) is reused
    under force_generic_plan."""
    txn_id = f"{terminal_id(11)}-20261202-000001"
    statement = committer_module.sql.TXN_GET
    listed = "SELECT prepare_time, generic_plans, custom_plans FROM pg_prepared_statements WHERE statement = $1"
    pool = await asyncpg.create_pool(running.db_url, min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn:
            for _ in range(8):  # past the five custom plans after which PostgreSQL may keep a generic one
                await conn.fetchrow(statement, txn_id)
            [before] = await conn.fetch(listed, statement)
        kept = committer_module._KeptConnection(pool)
        conn = await kept.get()
        try:
            await conn.fetchrow(statement, txn_id)
            after = await conn.fetch(listed, statement)
        finally:
            await kept.drop()
    finally:
        await pool.close()
    assert before["custom_plans"] + before["generic_plans"] == 8
    assert len(after) == 1, after  # the one prepared before is gone
    assert after[0]["prepare_time"] > before["prepare_time"]
    assert (after[0]["generic_plans"], after[0]["custom_plans"]) == (1, 0)


async def test_every_plan_a_batch_runs_on_a_kept_connection_reaches_rows_by_key(running: Running) -> None:
    """auto_explain, nested statements included, shows every plan that runs for a batch of
    top-ups on a connection with the committer's settings: the batch read, vend_commit_topups,
    the ledger's functions inside it and the constraint checks; and for a ledger replay (the
    stored transfers read back). Each reaches its tables by key, in the generic plans kept."""
    explained: list[dict[str, Any]] = []

    def on_notice(_: object, message: asyncpg.PostgresLogMessage) -> None:
        text = message.message or ""
        if "plan:" in text:
            explained.append(json.loads(text.split("plan:", 1)[1]))

    today = datetime.now(UTC).strftime("%Y%m%d")
    requests = [VendRequest(kind="topup", client_txn_id=f"{terminal_id(12 + n)}-{today}-{780001 + n}",
                            terminal_id=terminal_id(12 + n), meter_number=meter_number(12 + n), amount_minor=500,
                            currency="EUR") for n in range(3)]
    async with running.pool.acquire() as conn:
        tables = {r["tablename"] for r in await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        # Statistics of small tables, as a young deployment has: the planner's cheapest plan for a
        # few rows may walk a whole table or index, and a generic plan keeps what it chose.
        await conn.execute("ANALYZE")
        debit, credit = [await create_account(conn, kind=AccountKind.suspense, currency="EUR", owner_ref=f"plans-{n}",
                                               lower_bound_minor=None) for n in range(2)]
        replayed = Transfer(id=uuid.uuid4(), debit_account_id=debit, credit_account_id=credit, amount_minor=7,
                            currency="EUR", kind="adjustment", metadata={})
        [first] = await post_transfers(conn, [replayed])
        await committer_module.keep(conn)
        await conn.execute("LOAD 'auto_explain'")
        for name, value in (("log_min_duration", "0"), ("log_nested_statements", "on"), ("log_format", "json"),
                            ("log_level", "notice")):
            await conn.execute(f"SET auto_explain.{name} = {value}")
        conn.add_log_listener(on_notice)
        try:
            service = VendingService(running.keystore)
            prepared = await service.prepare_batch(conn, requests, datetime.now(UTC))
            assert prepared is not None
            outcomes = await service.commit_prepared(conn, prepared)
            [again] = await post_transfers(conn, [replayed])
            await asyncio.sleep(0.05)  # notices are handed to the listener from the event loop
        finally:
            conn.remove_log_listener(on_notice)
            await conn.execute("SET auto_explain.log_min_duration = -1")
    assert [o.response_code for o in outcomes] == [ResponseCode.APPROVED] * 3
    assert first.status == PostStatus.ok and again.status == PostStatus.exists
    read = {scan["Relation Name"] for plan in explained for scan in relation_scans(plan["Plan"])}
    assert {"vend_transactions", "terminals", "meters", "ledger_accounts", "ledger_transfers", "receipts",
            "terminal_daily_totals"} <= read, read
    assert any("JOIN ledger_transfers t ON t.id = u.id" in plan["Query Text"] for plan in explained)
    walks = [(plan["Query Text"][:120], scan["Node Type"], scan["Relation Name"])
             for plan in explained for scan in relation_scans(plan["Plan"])
             if scan["Relation Name"] in tables and not by_key(scan)]
    assert not walks, walks
