"""The committer decides the next batch while one commits, on from that batch's effects.

Each test holds the first batch at chosen points (a fake slowness in the vending service, on
real PostgreSQL), so that the requests submitted meanwhile are decided ahead: either before the
batch in flight commits (its effects added to what was read) or after (the read shows them).
Receipts stay gap-free, TIDs rise, a customer's debt is recovered once, daily limits count the
batch in flight, and a refused batch in flight sends the next one back to be decided afresh."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from float_ledger.ledger import post_transfers
from float_ledger.model import Transfer
from gateway import committer as committer_module
from gateway import registry
from gateway.committer import Committer
from gateway.records_check import check_all
from gateway.seeding import DEMO_CURRENCY, DEMO_TARIFF, seed, terminal_id
from gateway.vending import BatchEffects, VendingService, VendOutcome, VendRequest
from protocol.codes import ResponseCode
from tests.gateway.conftest import Running
from tests.gateway.test_load_and_shutdown import assert_each_approved_has_one_group


class _Held(VendingService):
    """Holds the first batch's reads (so later requests queue behind it), the batch's commit
    statement, or the read of a batch decided ahead; counts the batches decided ahead."""

    def __init__(self, keystore: Any, *, first_read_s: float = 0.2, post_s: float = 0.0,
                 ahead_read_s: float = 0.0) -> None:
        super().__init__(keystore)
        self.first_read_s, self.post_s, self.ahead_read_s = first_read_s, post_s, ahead_read_s
        self.reads = 0
        self.decided_ahead = 0
        self.posts = 0  # writing statements sent: a batch redone sends its statement again

    async def _prepare(self, conn, requests, indexes, outcomes, now, refused, after):  # type: ignore[no-untyped-def]
        self.reads += 1
        if self.reads == 1:
            await asyncio.sleep(self.first_read_s)
        if after is not None:
            self.decided_ahead += 1
            await asyncio.sleep(self.ahead_read_s)
        return await super()._prepare(conn, requests, indexes, outcomes, now, refused, after)

    async def _post(self, conn, pending, arguments):  # type: ignore[no-untyped-def]
        self.posts += 1
        await asyncio.sleep(self.post_s)
        return await super()._post(conn, pending, arguments)


@dataclass
class Shop:
    terminal: str
    sts_meter: str
    smart_meter: str
    debt_account_id: int
    receipt_seq: int


async def new_shop(running: Running, *, float_minor: int = 10_000_000, debt_minor: int = 0) -> Shop:
    """An agent with one terminal, an STS meter whose customer owes `debt_minor` (half of each
    payment recovers it) and a smart meter."""
    async with running.pool.acquire() as conn:
        first_terminal = int(await conn.fetchval("SELECT count(*) FROM terminals")) + 1
        first_meter = int(await conn.fetchval("SELECT count(*) FROM meters")) + 1
        await seed(conn, running.keystore, agents=1, terminals=1, meters=3, seed_secret=running.seed_secret,
                   float_each_minor=float_minor)
        rows = await conn.fetch(
            "SELECT m.meter_number, m.supply_mode, c.customer_id, c.debt_account_id FROM meters m"
            " JOIN customers c USING (customer_id) ORDER BY m.meter_number DESC LIMIT 3")
        assert len(rows) == 3 and first_meter > 0
        sts = next(r for r in rows if r["supply_mode"] == "sts")
        smart = next(r for r in rows if r["supply_mode"] == "smart")
        await conn.execute("UPDATE customers SET debt_recovery_share_bp = 5000 WHERE customer_id = $1",
                           sts["customer_id"])
        if debt_minor:
            collections = await conn.fetchval(
                "SELECT account_id FROM system_accounts WHERE kind = 'utility_collections' AND currency = $1",
                DEMO_CURRENCY)
            [raised] = await post_transfers(conn, [Transfer(
                id=uuid.uuid4(), debit_account_id=int(sts["debt_account_id"]), credit_account_id=int(collections),
                amount_minor=debt_minor, currency=DEMO_CURRENCY, kind="debt_raised", metadata={})])
            assert raised.status.posted
        terminal = terminal_id(first_terminal)
        seq = int(await conn.fetchval("SELECT receipt_seq FROM terminals WHERE terminal_id = $1", terminal))
    return Shop(terminal, sts["meter_number"], smart["meter_number"], int(sts["debt_account_id"]), seq)


def topup(shop: Shop, n: int, meter: str, amount_minor: int) -> VendRequest:
    today = datetime.now(UTC).strftime("%Y%m%d")
    return VendRequest(kind="topup", client_txn_id=f"{shop.terminal}-{today}-{700_000 + n:06d}",
                       terminal_id=shop.terminal, meter_number=meter, amount_minor=amount_minor,
                       currency=DEMO_CURRENCY)


async def run_behind(running: Running, service: VendingService, first: VendRequest,
                     behind: list[VendRequest], kept: list[bool] | None = None) -> list[VendOutcome]:
    """`first` alone in a batch, `behind` submitted while that batch is being read and committed;
    `kept` collects, per batch decided ahead, whether its decisions were kept."""
    committer = Committer(running.pool, service, on_decided_ahead=None if kept is None else kept.append)
    committer.start()
    try:
        leading = asyncio.create_task(committer.submit(first))
        await asyncio.sleep(0.05)  # the committer holds `first`'s batch in its (held) read now
        outcomes = await asyncio.gather(leading, *(committer.submit(r) for r in behind))
    finally:
        await committer.stop()
    return list(outcomes)


async def tids(running: Running, ids: list[str]) -> dict[str, int]:
    async with running.pool.acquire() as conn:
        rows = await conn.fetch("SELECT client_txn_id, token_id FROM tokens WHERE client_txn_id = ANY($1)", ids)
    return {r["client_txn_id"]: r["token_id"] for r in rows}


@pytest.mark.parametrize("held", ["commit", "read_ahead"])
async def test_a_batch_decided_ahead_numbers_tokens_limits_and_recovers_debt_on_from_the_one_in_flight(
        running: Running, monkeypatch: pytest.MonkeyPatch, held: str) -> None:
    """"commit": the batch ahead is read before the one in flight commits (its effects are added);
    "read_ahead": after (the read shows them, and nothing is added twice)."""
    shop = await new_shop(running, debt_minor=300)
    async with running.pool.acquire() as conn:
        await conn.execute("UPDATE terminals SET daily_limit_minor = 4500 WHERE terminal_id = $1", shop.terminal)
    applied: list[BatchEffects] = []
    apply = BatchEffects.apply

    def counting_apply(self: BatchEffects, terminals: Any, meters: Any) -> None:
        applied.append(self)
        apply(self, terminals, meters)

    monkeypatch.setattr(BatchEffects, "apply", counting_apply)
    service = (_Held(running.keystore, post_s=0.4) if held == "commit"
               else _Held(running.keystore, ahead_read_s=0.4))
    a = topup(shop, 1, shop.sts_meter, 2_000)
    b = topup(shop, 2, shop.sts_meter, 2_000)
    c = topup(shop, 3, shop.smart_meter, 1_000)  # over the daily limit once a and b count
    d = topup(shop, 4, shop.smart_meter, 500)
    kept: list[bool] = []
    out = await run_behind(running, service, a, [b, c, d], kept)
    assert service.decided_ahead == 1 and kept == [True]
    assert len(applied) == (1 if held == "commit" else 0)
    assert service.posts == 2  # each batch committed as decided, at its first attempt
    assert [o.response_code for o in out] == [ResponseCode.APPROVED, ResponseCode.APPROVED,
                                              ResponseCode.LIMIT_EXCEEDED, ResponseCode.APPROVED]
    # Gap-free, in arrival order, on from the batch in flight; the decline takes no number.
    assert [o.receipt_number for o in out] == [shop.receipt_seq + 1, shop.receipt_seq + 2, None,
                                               shop.receipt_seq + 3]
    issued = await tids(running, [a.client_txn_id, b.client_txn_id])
    assert issued[a.client_txn_id] < issued[b.client_txn_id]
    # Half of each payment recovers the debt: a recovers all 300, b nothing more.
    assert (out[0].debt_recovery_minor, out[1].debt_recovery_minor) == (300, 0)
    assert out[3].float_remaining_minor == out[0].float_remaining_minor - 2_000 - 500  # type: ignore[operator]
    async with running.pool.acquire() as conn:
        debt = await conn.fetchval("SELECT balance_minor FROM ledger_accounts WHERE id = $1", shop.debt_account_id)
        seq = await conn.fetchval("SELECT receipt_seq FROM terminals WHERE terminal_id = $1", shop.terminal)
        last_tid = await conn.fetchval("SELECT last_token_id FROM meters WHERE meter_number = $1", shop.sts_meter)
        report = await check_all(conn)
    assert debt == 0 and seq == shop.receipt_seq + 3 and last_tid == issued[b.client_txn_id]
    assert report.holds, report.broken


async def test_a_refusal_in_flight_sends_the_batch_decided_ahead_back_to_be_decided_afresh(
        running: Running) -> None:
    """The batch in flight had taken its payment to be approved; the ledger refuses it (the float
    is short), so the receipt number the batch ahead continued from was never issued."""
    shop = await new_shop(running, float_minor=3_000)
    service = _Held(running.keystore, post_s=0.3)
    refused = topup(shop, 1, shop.smart_meter, 5_000)
    paid = topup(shop, 2, shop.smart_meter, 1_000)
    kept: list[bool] = []
    out = await run_behind(running, service, refused, [paid], kept)
    assert service.decided_ahead == 1 and kept == [False]
    # The refused batch's statement, its statement again with the payment declined, and the
    # batch behind it decided afresh.
    assert service.posts == 3
    assert [o.response_code for o in out] == [ResponseCode.INSUFFICIENT_FLOAT, ResponseCode.APPROVED]
    assert out[1].receipt_number == shop.receipt_seq + 1 and out[1].float_remaining_minor == 2_000
    async with running.pool.acquire() as conn:
        assert (await check_all(conn)).holds


async def test_a_repeat_of_an_id_in_flight_waits_for_its_commit_and_replays_it(running: Running) -> None:
    shop = await new_shop(running)
    service = _Held(running.keystore, post_s=0.3)
    first = topup(shop, 1, shop.sts_meter, 2_000)
    other = topup(shop, 2, shop.smart_meter, 1_000)
    out = await run_behind(running, service, first, [first, other])
    assert service.decided_ahead == 1  # `other` went ahead; the repeat waited
    assert out[1] == out[0] and out[0].response_code == ResponseCode.APPROVED
    assert out[2].receipt_number == shop.receipt_seq + 2
    await assert_each_approved_has_one_group(running.pool, [first.client_txn_id])


async def test_a_reversal_queued_behind_a_commit_is_not_decided_ahead(running: Running) -> None:
    shop = await new_shop(running)
    service = _Held(running.keystore, post_s=0.3)
    payment = topup(shop, 1, shop.smart_meter, 2_000)
    reversal = VendRequest(kind="reversal", client_txn_id=f"{payment.client_txn_id}/R", terminal_id=shop.terminal,
                           amount_minor=2_000, currency=DEMO_CURRENCY, original_txn_id=payment.client_txn_id,
                           reason="reply lost")
    out = await run_behind(running, service, payment, [reversal])
    assert service.decided_ahead == 0
    assert [o.response_code for o in out] == [ResponseCode.APPROVED, ResponseCode.APPROVED]
    async with running.pool.acquire() as conn:
        float_now = await conn.fetchval(
            "SELECT a.balance_minor FROM ledger_accounts a JOIN agents g ON g.float_account_id = a.id"
            " JOIN terminals t ON t.agent_id = g.agent_id WHERE t.terminal_id = $1", shop.terminal)
        assert (await check_all(conn)).holds
    assert float_now == 10_000_000  # the reversal restored the float in full


async def test_a_read_connection_lost_while_deciding_ahead_leaves_the_requests_to_be_decided_afresh(
        running: Running) -> None:
    """The server ends the connection that decides ahead while it reads: the batch in flight
    commits, and the requests behind it are decided afresh once it has."""
    shop = await new_shop(running)

    class _LosesItsReadingConnection(_Held):
        async def _prepare(self, conn, requests, indexes, outcomes, now, refused, after):  # type: ignore[no-untyped-def]
            if after is not None and self.decided_ahead == 0:
                async with running.pool.acquire() as other:
                    await other.execute("SELECT pg_terminate_backend($1)", conn.get_server_pid())
            return await super()._prepare(conn, requests, indexes, outcomes, now, refused, after)

    service = _LosesItsReadingConnection(running.keystore, post_s=0.3)
    kept: list[bool] = []
    first = topup(shop, 1, shop.sts_meter, 2_000)
    behind = [topup(shop, 2 + n, shop.smart_meter if n % 2 else shop.sts_meter, 1_000) for n in range(4)]
    out = await run_behind(running, service, first, behind, kept)
    assert [o.response_code for o in out] == [ResponseCode.APPROVED] * 5
    assert [o.receipt_number for o in out] == [shop.receipt_seq + n for n in range(1, 6)]
    assert service.decided_ahead == 1 and kept == []  # the failed read decided nothing
    assert service.posts == 2  # the batch in flight, then the four behind it as one batch
    async with running.pool.acquire() as conn:
        assert (await check_all(conn)).holds


async def test_a_later_tid_another_gateway_issued_meanwhile_is_not_moved_back(running: Running) -> None:
    """Between the batch in flight's read and its commit, another gateway (its clock ten minutes
    ahead) issues the meter a later TID; the batch decided ahead reads it, and must issue after
    it, not after the batch in flight's earlier one."""
    shop = await new_shop(running)
    elsewhere = await new_shop(running)
    t0 = datetime.now(UTC).replace(second=0, microsecond=0)
    theirs = topup(elsewhere, 90, shop.sts_meter, 2_000)

    class _OtherGatewayFirst(_Held):
        async def _post(self, conn, pending, arguments):  # type: ignore[no-untyped-def]
            if self.posts == 0:
                async with running.pool.acquire() as other:
                    [paid] = await VendingService(running.keystore).process_batch(
                        other, [theirs], t0 + timedelta(minutes=10))
                assert paid.response_code == ResponseCode.APPROVED
            return await super()._post(conn, pending, arguments)

    service = _OtherGatewayFirst(running.keystore, post_s=0.6, ahead_read_s=0.3)
    first, behind = topup(shop, 1, shop.sts_meter, 2_000), topup(shop, 2, shop.sts_meter, 2_000)
    kept: list[bool] = []
    committer = Committer(running.pool, service, clock=lambda: t0, on_decided_ahead=kept.append)
    committer.start()
    try:
        leading = asyncio.create_task(committer.submit(first))
        await asyncio.sleep(0.05)
        out = await asyncio.gather(leading, committer.submit(behind))
    finally:
        await committer.stop()
    assert [o.response_code for o in out] == [ResponseCode.APPROVED] * 2 and kept == [True]
    issued = await tids(running, [first.client_txn_id, behind.client_txn_id, theirs.client_txn_id])
    assert issued[first.client_txn_id] < issued[theirs.client_txn_id] < issued[behind.client_txn_id]


async def test_requests_dropped_from_ahead_are_decided_again_in_arrival_order(running: Running) -> None:
    """The batch in flight fails for good (its link lost twice), so its payment x was not
    recorded; x sent again (x') arrived before y, of the same agent, whose float covers one of
    them: x' is the one paid."""
    shop = await new_shop(running, float_minor=3_000)

    class _LinkLostTwice(_Held):
        async def _post(self, conn, pending, arguments):  # type: ignore[no-untyped-def]
            if self.posts < 2:
                self.posts += 1
                await asyncio.sleep(self.post_s)
                raise ConnectionResetError("link lost")
            return await super()._post(conn, pending, arguments)

    service = _LinkLostTwice(running.keystore, post_s=0.3)
    x, y = topup(shop, 1, shop.smart_meter, 2_000), topup(shop, 2, shop.smart_meter, 2_000)
    kept: list[bool] = []
    out = await run_behind(running, service, x, [x, y], kept)
    assert kept == [False]
    assert [o.response_code for o in out] == [ResponseCode.SYSTEM_ERROR, ResponseCode.APPROVED,
                                              ResponseCode.INSUFFICIENT_FLOAT]
    assert out[1].receipt_number == shop.receipt_seq + 1


async def test_with_no_connection_to_spare_nothing_is_decided_ahead_and_nothing_waits_for_one(
        running: Running) -> None:
    """A pool of one connection: the commit holds it, so the requests behind are decided after
    the commit, on that connection, and the pool is never asked for a second one."""
    shop = await new_shop(running)
    real = await asyncpg.create_pool(running.db_url, min_size=1, max_size=1)
    assert real is not None
    acquired: list[object] = []

    class _CountingPool:
        def acquire(self, *args: Any, **kwargs: Any) -> Any:
            acquired.append(kwargs.get("timeout"))
            return real.acquire(*args, **kwargs)

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

    pool: Any = _CountingPool()
    service = _Held(running.keystore, post_s=0.2)
    committer = Committer(pool, service)
    committer.start()
    first, behind = topup(shop, 1, shop.smart_meter, 1_000), [topup(shop, 2 + n, shop.smart_meter, 1_000)
                                                              for n in range(3)]
    try:
        leading = asyncio.create_task(committer.submit(first))
        await asyncio.sleep(0.05)
        out = await asyncio.gather(leading, *(committer.submit(r) for r in behind))
    finally:
        await committer.stop()
        await real.close()
    assert [o.response_code for o in out] == [ResponseCode.APPROVED] * 4
    assert [o.receipt_number for o in out] == [shop.receipt_seq + n for n in range(1, 5)]
    assert service.decided_ahead == 0 and len(acquired) == 1  # the commit's connection only


async def test_requests_sent_just_after_a_commit_starts_join_the_batch_decided_ahead(
        running: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    """Terminals answered by one batch send their next payments as the next batch starts to
    commit: those are taken into the batch decided ahead (committed next), not left for the
    batch after it."""
    # Commits of half a second, so the take waits 0.15 s (the cap, raised for a slow machine's sake)
    # and a payment sent 10 ms into the commit is in time.
    monkeypatch.setattr(committer_module, "ahead_take_wait_max_s", 0.15)
    shop = await new_shop(running)
    started = asyncio.Event()

    class _Signalling(_Held):
        async def _post(self, conn, pending, arguments):  # type: ignore[no-untyped-def]
            if self.posts == 1:  # the second batch's statement goes now
                started.set()
            return await super()._post(conn, pending, arguments)

    service = _Signalling(running.keystore, first_read_s=0.0, post_s=0.5)
    kept: list[bool] = []
    committer = Committer(running.pool, service, on_decided_ahead=kept.append)
    committer.start()
    try:
        first = await committer.submit(topup(shop, 1, shop.smart_meter, 1_000))  # its commit: about 0.5 s
        second = asyncio.create_task(committer.submit(topup(shop, 2, shop.smart_meter, 1_000)))
        await started.wait()
        await asyncio.sleep(0.01)  # sent just after the second batch started to commit
        third = await committer.submit(topup(shop, 3, shop.smart_meter, 1_000))
        second_outcome = await second
    finally:
        await committer.stop()
    assert service.decided_ahead == 1 and kept == [True], "the third payment was decided while the second committed"
    assert [o.response_code for o in (first, second_outcome, third)] == [ResponseCode.APPROVED] * 3
    assert [o.receipt_number for o in (first, second_outcome, third)] == [
        shop.receipt_seq + 1, shop.receipt_seq + 2, shop.receipt_seq + 3]
    assert service.posts == 3


async def test_a_debt_paid_down_by_another_gateway_after_the_read_is_not_recovered_again(running: Running) -> None:
    # The customer owes 300 and half of each payment recovers it. Our batch reads the debt, then,
    # before its commit, another gateway commits a payment (another agent's terminal, same meter)
    # that recovers all 300. Our commit would recover 300 more (the debt account would end at
    # +300); it is decided again instead.
    shop = await new_shop(running, debt_minor=300)
    other_shop = await new_shop(running)
    meter = "77700000001"  # a smart meter of the indebted customer: no token, no TID to race on
    async with running.pool.acquire() as conn:
        customer = await conn.fetchval("SELECT customer_id FROM meters WHERE meter_number = $1", shop.sts_meter)
        await registry.add_meter(conn, meter_number=meter, customer_id=customer, supply_mode="smart",
                                 tariff_code=DEMO_TARIFF)
    rival = topup(other_shop, 2, meter, 2_000)
    rival_outcomes: list[VendOutcome] = []

    class _RivalCommitsFirst(_Held):
        async def _post(self, conn, pending, arguments):  # type: ignore[no-untyped-def]
            if self.posts == 0:
                async with running.pool.acquire() as other:
                    rival_outcomes.extend(await VendingService(running.keystore).process_batch(
                        other, [rival], datetime.now(UTC)))
            return await super()._post(conn, pending, arguments)

    service = _RivalCommitsFirst(running.keystore, first_read_s=0.0)
    committer = Committer(running.pool, service)
    committer.start()
    try:
        ours = await committer.submit(topup(shop, 1, meter, 2_000))
    finally:
        await committer.stop()
    assert [o.response_code for o in (*rival_outcomes, ours)] == [ResponseCode.APPROVED] * 2
    assert (rival_outcomes[0].debt_recovery_minor, ours.debt_recovery_minor) == (300, 0)
    assert service.reads == 2 and service.posts == 2, "our batch was read and decided again after the rival's commit"
    async with running.pool.acquire() as conn:
        debt = await conn.fetchval("SELECT balance_minor FROM ledger_accounts WHERE id = $1", shop.debt_account_id)
        assert debt == 0
        assert (await check_all(conn)).holds


async def reversed_after_the_first_refusal(running: Running, reversal: VendRequest, requests: list[VendRequest]
                                          ) -> tuple[list[VendOutcome], list[VendOutcome]]:
    """Commit `requests` as one batch; right after the ledger first refuses one of them (before
    the batch is decided again), another gateway commits `reversal`. Its outcomes, then theirs."""
    rival: list[VendOutcome] = []

    class _ReversedAfterTheRefusal(_Held):
        async def _post(self, conn, pending, arguments):  # type: ignore[no-untyped-def]
            await super()._post(conn, pending, arguments)
            if not rival and any(p.group_status != "ok" for p in pending):
                async with running.pool.acquire() as other, other.transaction():
                    rival.extend(await VendingService(running.keystore).process_batch(
                        other, [reversal], datetime.now(UTC)))

    committer = Committer(running.pool, _ReversedAfterTheRefusal(running.keystore, first_read_s=0.0))
    committer.start()
    try:
        outcomes = await asyncio.gather(*(committer.submit(r) for r in requests))
    finally:
        await committer.stop()
    return rival, list(outcomes)


async def test_a_refusal_is_decided_again_when_the_payment_beside_it_is_reversed_meanwhile(running: Running) -> None:
    # A float of 1,000 and two payments of 600 in one batch: the first posts, the ledger refuses
    # the second. Before the batch is decided again, another gateway reverses the first (a
    # tombstone: it was never committed). The second now fits and is approved, not declined as
    # the earlier attempt's refusal would have it.
    shop = await new_shop(running, float_minor=1_000)
    first = topup(shop, 31, shop.smart_meter, 600)
    second = topup(shop, 32, shop.smart_meter, 600)
    reversal = VendRequest(kind="reversal", client_txn_id=f"{first.client_txn_id}/R", terminal_id=shop.terminal,
                           amount_minor=600, currency=DEMO_CURRENCY, original_txn_id=first.client_txn_id,
                           reason="no reply")
    rival, outcomes = await reversed_after_the_first_refusal(running, reversal, [first, second])
    assert [o.response_code for o in rival] == [ResponseCode.ORIGINAL_NOT_FOUND]
    assert [o.response_code for o in outcomes] == [ResponseCode.ALREADY_REVERSED, ResponseCode.APPROVED]
    assert outcomes[1].float_remaining_minor == 400
    async with running.pool.acquire() as conn:
        assert (await check_all(conn)).holds


async def test_a_refusal_after_a_reversal_in_the_batch_is_decided_again_when_a_payment_before_it_is_reversed(
        running: Running) -> None:
    # As above, with a reversal between the two payments: the batch is cut at the reversal, so the
    # first payment posts in the segment before the one the ledger refuses the second in. Its
    # reversal by another gateway in between must still send the batch to be decided afresh.
    shop = await new_shop(running, float_minor=1_000)
    first = topup(shop, 41, shop.smart_meter, 600)
    second = topup(shop, 42, shop.smart_meter, 600)
    never_paid = topup(shop, 43, shop.smart_meter, 100)
    between = VendRequest(kind="reversal", client_txn_id=f"{never_paid.client_txn_id}/R", terminal_id=shop.terminal,
                          amount_minor=100, currency=DEMO_CURRENCY, original_txn_id=never_paid.client_txn_id,
                          reason="no reply")
    reversal = VendRequest(kind="reversal", client_txn_id=f"{first.client_txn_id}/R", terminal_id=shop.terminal,
                           amount_minor=600, currency=DEMO_CURRENCY, original_txn_id=first.client_txn_id,
                           reason="no reply")
    rival, outcomes = await reversed_after_the_first_refusal(running, reversal, [first, between, second])
    assert [o.response_code for o in rival] == [ResponseCode.ORIGINAL_NOT_FOUND]
    assert [o.response_code for o in outcomes] == [
        ResponseCode.ALREADY_REVERSED, ResponseCode.ORIGINAL_NOT_FOUND, ResponseCode.APPROVED]
    assert outcomes[2].float_remaining_minor == 400
    async with running.pool.acquire() as conn:
        assert await conn.fetchval(
            "SELECT a.balance_minor FROM terminals t JOIN agents g USING (agent_id)"
            " JOIN ledger_accounts a ON a.id = g.float_account_id WHERE t.terminal_id = $1", shop.terminal) == 400
        assert (await check_all(conn)).holds
