"""Payments reach the prepayment engine (a fake HTTP endpoint: the seam to the outside), at least once."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from float_ledger.ledger import set_low_threshold
from gateway import sql
from gateway.outbox import OutboxRelay, event_attempts_max, events_per_post_max, turned_down_delay_s_first
from gateway.seeding import meter_number, terminal_id
from protocol.codes import ResponseCode
from terminal_sim.client import PosTerminal
from tests.gateway.conftest import Running
from tests.ledger.conftest import visible_events


async def fake_engine(fail_first: int = 0, refuse: Callable[[list[dict[str, Any]]], bool] = lambda _: False
                      ) -> tuple[web.AppRunner, str, list[dict[str, Any]]]:
    """The engine's endpoint: it is unavailable (503) for its first `fail_first` posts and refuses
    (422) any whose events `refuse` turns down; the events it took, in the order it took them."""
    received: list[dict[str, Any]] = []
    calls = {"n": 0}

    async def events(request: web.Request) -> web.Response:
        calls["n"] += 1
        batch = (await request.json())["events"]
        if calls["n"] <= fail_first:
            return web.Response(status=503)
        if refuse(batch):
            return web.Response(status=422)
        received.extend(batch)
        return web.json_response({"ok": True})

    runner, url = await engine_endpoint(events)
    return runner, url, received


async def engine_endpoint(handler: Callable[[web.Request], Any],
                          *more: web.RouteDef) -> tuple[web.AppRunner, str]:
    """An engine's POST /events endpoint (and `more` routes) on a free port, answering with
    `handler`: its runner and the endpoint's URL."""
    app = web.Application()
    app.router.add_post("/events", handler)
    app.add_routes(more)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}/events"


async def test_relay_delivers_payment_events_after_engine_recovers(running: Running) -> None:
    runner, url, received = await fake_engine(fail_first=1)
    relay = OutboxRelay(running.pool, url, timeout_s=2)
    try:
        assert running.gateway.pos_port is not None
        pos = PosTerminal(terminal_id(250), running.key(250), "127.0.0.1", running.gateway.pos_port,
                          last_sequence=700_000)
        await pos.logon()
        paid = await pos.top_up(meter_number(20), 1_200, "EUR")
        assert paid.response_code is ResponseCode.APPROVED
        await pos.logoff()
        relay.start()
        key = paid.client_transaction_id.as_key()
        for _ in range(100):
            if any(e["client_txn_id"] == key for e in received):
                break
            await asyncio.sleep(0.1)
        event = next(e for e in received if e["client_txn_id"] == key)
        assert event["kind"] == "payment_received" and event["payload"]["amount_minor"] == 1_200
        async with running.pool.acquire() as conn:
            row = await conn.fetchrow("SELECT delivered_at, attempts FROM outbox WHERE client_txn_id = $1", key)
        assert row["delivered_at"] is not None
        assert row["attempts"] == 0  # the engine was unavailable, which counts against no event
    finally:
        await relay.stop()
        await runner.cleanup()


@contextlib.asynccontextmanager
async def relay_round_by_round(running: Running, refuse: Callable[[list[dict[str, Any]]], bool] = lambda _: False
                               ) -> AsyncIterator[tuple[OutboxRelay, list[dict[str, Any]]]]:
    """A relay to the fake engine, driven by deliver_once() rather than started; what it delivered."""
    runner, url, received = await fake_engine(refuse=refuse)
    relay = OutboxRelay(running.pool, url, timeout_s=2)
    relay._session = aiohttp.ClientSession()
    try:
        yield relay, received
    finally:
        await relay.stop()
        await runner.cleanup()


async def retries_fall_due(pool: asyncpg.Pool) -> int:
    """As if the delay of every event waiting after a turn-down had passed: how many there were."""
    async with pool.acquire() as conn:
        return int(await conn.fetchval(
            "WITH due AS (UPDATE outbox SET retry_at = now() WHERE delivered_at IS NULL AND retry_at > now() "
            "RETURNING 1) SELECT count(*) FROM due"))


async def drain(relay: OutboxRelay) -> None:
    """Rounds until nothing waits, the delay of each event turned down passed at once."""
    for _ in range(10):
        if await relay.deliver_once() == 0 and not await retries_fall_due(relay._pool):
            return


async def paying_terminal(running: Running, n: int) -> PosTerminal:
    assert running.gateway.pos_port is not None
    pos = PosTerminal(terminal_id(n), running.key(n), "127.0.0.1", running.gateway.pos_port, last_sequence=700_000)
    await pos.logon()
    return pos


async def test_a_reversal_never_reaches_the_engine_before_its_payment(running: Running) -> None:
    # The engine refuses the payment's event twice. Before, the reversal's event went on alone
    # when a batch was retried event by event: the engine met a reversal of a payment it never had.
    refusals = {"left": 2}
    key = ""

    def refuse(batch: list[dict[str, Any]]) -> bool:
        if refusals["left"] and any(e["client_txn_id"] == key and e["kind"] == "payment_received" for e in batch):
            refusals["left"] -= 1
            return True
        return False

    async with relay_round_by_round(running, refuse) as (relay, received):
        pos = await paying_terminal(running, 251)
        paid = await pos.top_up(meter_number(21), 1_300, "EUR")
        assert paid.response_code is ResponseCode.APPROVED
        reversed_ = await pos.reverse(paid.client_transaction_id, 1_300, "EUR")
        assert reversed_.response_code is ResponseCode.APPROVED
        await pos.logoff()
        key = paid.client_transaction_id.as_key()
        await drain(relay)
        assert [e["kind"] for e in received if e["client_txn_id"] == key] == ["payment_received", "payment_reversed"]
        assert refusals["left"] == 0
        async with running.pool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM outbox WHERE delivered_at IS NULL") == 0


async def test_a_parked_payment_holds_back_its_reversal_and_nothing_else(running: Running) -> None:
    async with relay_round_by_round(running) as (relay, received):
        pos = await paying_terminal(running, 252)
        parked = await pos.top_up(meter_number(22), 1_400, "EUR")
        assert (await pos.reverse(parked.client_transaction_id, 1_400, "EUR")).response_code is ResponseCode.APPROVED
        other = await pos.top_up(meter_number(22), 1_500, "EUR")
        await pos.logoff()
        key = parked.client_transaction_id.as_key()
        async with running.pool.acquire() as conn:  # the engine refused it event_attempts_max times
            await conn.execute("UPDATE outbox SET attempts = $2 WHERE client_txn_id = $1 AND kind = 'payment_received'",
                               key, event_attempts_max)
        await drain(relay)
        sent = {(e["client_txn_id"], e["kind"]) for e in received}
        assert (other.client_transaction_id.as_key(), "payment_received") in sent
        assert {kind for txn, kind in sent if txn == key} == set()


def relay_to(running: Running, url: str, *, timeout_s: float) -> OutboxRelay:
    """A relay whose rounds the test runs itself (deliver_once), not started."""
    relay = OutboxRelay(running.pool, url, timeout_s=timeout_s)
    relay._session = aiohttp.ClientSession(timeout=relay._timeout)
    return relay


async def paid_top_up(running: Running, terminal: int, meter: int, amount_minor: int) -> str:
    """One approved top-up from its own terminal session: its transaction id."""
    pos = await paying_terminal(running, terminal)
    paid = await pos.top_up(meter_number(meter), amount_minor, "EUR")
    assert paid.response_code is ResponseCode.APPROVED
    await pos.logoff()
    return paid.client_transaction_id.as_key()


def a_port_nobody_listens_on() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_an_engine_outage_parks_no_payment(running: Running) -> None:
    """Unreachable for event_attempts_max rounds (about 7 minutes of backoff): before, every event
    waiting then was parked for good, and those meters were never re-armed."""
    runner, url, received = await fake_engine()
    relay = relay_to(running, f"http://127.0.0.1:{a_port_nobody_listens_on()}/events", timeout_s=2)
    try:
        pos = await paying_terminal(running, 253)
        paid = [await pos.top_up(meter_number(23), amount, "EUR") for amount in (1_600, 1_700)]
        assert all(p.response_code is ResponseCode.APPROVED for p in paid)
        await pos.logoff()
        for _ in range(event_attempts_max + 1):
            assert await relay.deliver_once() == -1  # the engine is unreachable
        relay._url = url  # the engine is back
        await drain(relay)
        keys = {p.client_transaction_id.as_key() for p in paid}
        assert keys <= {e["client_txn_id"] for e in received}
        async with running.pool.acquire() as conn:
            attempts = await conn.fetch("SELECT attempts FROM outbox WHERE client_txn_id = ANY($1::text[])", list(keys))
        assert [r["attempts"] for r in attempts] == [0, 0]
    finally:
        await relay.stop()
        await runner.cleanup()


async def test_a_hung_engine_does_not_hold_back_the_ledgers_low_float_events(running: Running) -> None:
    """The relay holds no transaction while it waits on the engine: before, its row locks kept a
    transaction open for the whole round (a timeout per event), and events_after(), which shows an
    event once every transaction older than it has ended, hid low-float events meanwhile."""
    release = asyncio.Event()

    async def hung(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(status=503)

    runner, url = await engine_endpoint(hung)
    relay = relay_to(running, url, timeout_s=3)
    try:
        await paid_top_up(running, 254, 24, 1_100)
        round_ = asyncio.create_task(relay.deliver_once())
        await asyncio.sleep(0.3)  # the relay is now waiting on the engine
        async with running.pool.acquire() as conn:
            # A second relay finds nothing to take: the waiting round still holds its event.
            other = relay_to(running, url, timeout_s=1)
            try:
                assert await other.deliver_once() == 0
            finally:
                await other._session.close()
            float_id = await conn.fetchval("SELECT float_account_id FROM agents ORDER BY agent_id LIMIT 1")
            before = await conn.fetchval("SELECT coalesce(max(id), 0) FROM ledger_events") or 0
            balance = await conn.fetchval("SELECT balance_minor FROM ledger_accounts WHERE id = $1", float_id)
            await set_low_threshold(conn, float_id, low_threshold_minor=balance + 1)  # committed: below it now
            shown = await visible_events(conn, wanted=lambda e: e.id > before and e.account_id == float_id,
                                         at_least=1, wait_s=1.5)
            assert not round_.done(), "the engine answered: the test proves nothing"
            assert shown, "a committed low-float event stayed hidden while the relay waited on the engine"
        assert await round_ == -1  # cut at the timeout: unavailable, nothing counted
    finally:
        release.set()
        await relay.stop()
        await runner.cleanup()


async def test_an_engine_that_redirects_is_not_marked_delivered(running: Running) -> None:
    """aiohttp would follow a 302 by turning the POST into a GET without the events, and a 2xx page
    at the new address (a moved endpoint's landing page, a login page) marked them delivered: the
    engine never heard of the payment. A redirect is not followed: the events wait, uncounted."""
    received: list[dict[str, Any]] = []

    async def events(request: web.Request) -> web.Response:
        received.extend((await request.json())["events"])
        return web.json_response({"ok": True})

    async def moved(_: web.Request) -> web.Response:
        raise web.HTTPFound("/v2/events")

    async def landing(_: web.Request) -> web.Response:
        return web.Response(text="the engine moved to /v2/events")

    runner, url = await engine_endpoint(moved, web.get("/v2/events", landing), web.post("/v2/events", events))
    relay = relay_to(running, url, timeout_s=2)
    try:
        key = await paid_top_up(running, 255, 25, 900)
        for _ in range(3):
            assert await relay.deliver_once() == -1
        async with running.pool.acquire() as conn:
            row = await conn.fetchrow("SELECT delivered_at, attempts FROM outbox WHERE client_txn_id = $1", key)
        assert (row["delivered_at"], row["attempts"]) == (None, 0)
        relay._url = url.replace("/events", "/v2/events")  # the operator points the relay at the new address
        await drain(relay)
        assert key in {e["client_txn_id"] for e in received}
    finally:
        await relay.stop()
        await runner.cleanup()


async def test_a_misconfigured_engine_url_parks_nothing(running: Running) -> None:
    """404 (a wrong path) or 401/403 (wrong credentials) say nothing of the events: counted as
    refusals, about 7 minutes of misconfiguration would have parked every waiting event."""
    async def not_found(_: web.Request) -> web.Response:
        return web.Response(status=404)

    runner, url = await engine_endpoint(not_found)
    relay = relay_to(running, url, timeout_s=2)
    try:
        key = await paid_top_up(running, 256, 26, 950)
        for _ in range(event_attempts_max + 1):
            assert await relay.deliver_once() == -1
            await retries_fall_due(running.pool)
        async with running.pool.acquire() as conn:
            attempts = await conn.fetchval("SELECT attempts FROM outbox WHERE client_txn_id = $1", key)
        assert attempts == 0
    finally:
        await relay.stop()
        await runner.cleanup()


async def test_a_backlog_after_an_outage_is_delivered_a_batch_at_a_time(running: Running) -> None:
    """The advisory lock is tried only on the events a round walks, up to events_per_post_max taken.
    Once, it was a filter beside the scan: a round locked every waiting event, and a backlog of 40,000
    filled PostgreSQL's shared lock table ("out of shared memory"), so nothing was delivered again."""
    runner, url, received = await fake_engine()
    relay = relay_to(running, url, timeout_s=2)
    async with running.pool.acquire() as conn:
        # What payments wrote while the engine was away (the relay reads only these columns).
        await conn.execute("INSERT INTO outbox (kind, client_txn_id, meter_number, payload) "
                           "SELECT 'payment_received', 'BACKLOG-' || g, 'm', '{}' FROM generate_series(1, 40000) g")
    try:
        assert await relay.deliver_once() == events_per_post_max
        assert len(received) == events_per_post_max
    finally:
        async with running.pool.acquire() as conn:
            await conn.execute("UPDATE outbox SET delivered_at = now() WHERE client_txn_id LIKE 'BACKLOG-%'")
        await relay.stop()
        await runner.cleanup()


async def mark_waiting_delivered(running: Running) -> None:
    """Events earlier tests left waiting are out of the way."""
    async with running.pool.acquire() as conn:
        await conn.execute("UPDATE outbox SET delivered_at = now() WHERE delivered_at IS NULL")


async def engine_turning_down(meter: str, status: int
                              ) -> tuple[web.AppRunner, str, list[dict[str, Any]], list[float]]:
    """An engine answering `status` to any post holding an event of `meter` (a meter it does not
    know, or one it crashes on), taking every other: its runner, its URL, the events it took and
    when (time.monotonic()) it turned down each post."""
    received: list[dict[str, Any]] = []
    turned_down: list[float] = []

    async def events(request: web.Request) -> web.Response:
        batch = (await request.json())["events"]
        if any(e["meter_number"] == meter for e in batch):
            turned_down.append(time.monotonic())
            return web.json_response({"error": f"cannot take meter {meter}"}, status=status)
        received.extend(batch)
        return web.json_response({"ok": True})

    runner, url = await engine_endpoint(events)
    return runner, url, received, turned_down


async def relay_to_engine_turning_down(running: Running, meter: str, status: int
                                      ) -> tuple[OutboxRelay, web.AppRunner, list[dict[str, Any]]]:
    """A relay (run round by round) to engine_turning_down(meter, status): the relay, the engine's
    runner and the events it took. Events of earlier tests are marked delivered."""
    await mark_waiting_delivered(running)
    runner, url, received, _ = await engine_turning_down(meter, status)
    return relay_to(running, url, timeout_s=2), runner, received


async def test_an_engine_answering_404_for_one_event_holds_back_no_other(running: Running) -> None:
    """A 404 ("no such meter") for one event: its batch is retried event by event, the others go
    through, and the 404 counts against that event (parked in the end) because the round showed the
    URL works. Before, every 404 was taken for a wrong URL: the same batch failed every round and
    nothing behind that event ever reached the engine."""
    relay, runner, received = await relay_to_engine_turning_down(running, meter_number(27), 404)
    try:
        bad = await paid_top_up(running, 260, 27, 800)
        other = await paid_top_up(running, 261, 28, 800)
        for _ in range(event_attempts_max + 2):
            await relay.deliver_once()
        assert other in {e["client_txn_id"] for e in received}
        async with running.pool.acquire() as conn:
            attempts = await conn.fetchval("SELECT attempts FROM outbox WHERE client_txn_id = $1", bad)
        assert attempts >= 1
    finally:
        await relay.stop()
        await runner.cleanup()


async def test_an_engine_failing_on_one_event_holds_back_no_other(running: Running) -> None:
    """An event the engine crashes on (500 whenever it is in the batch): its batch is retried event
    by event, the others go through, and the failures count against that event alone until it is
    parked. Before, every 5xx ended the round: the same batch failed every round for good and no
    meter behind that event was re-armed again."""
    relay, runner, received = await relay_to_engine_turning_down(running, meter_number(29), 500)
    try:
        bad = await paid_top_up(running, 266, 29, 800)
        others = [await paid_top_up(running, 267, 30, 800), await paid_top_up(running, 268, 28, 850)]
        assert await relay.deliver_once() == 2  # the first round delivers the others
        assert set(others) <= {e["client_txn_id"] for e in received}

        async def attempts() -> int:
            async with running.pool.acquire() as conn:
                return int(await conn.fetchval("SELECT attempts FROM outbox WHERE client_txn_id = $1", bad))

        assert await attempts() == 1  # the round showed the engine works
        for _ in range(3):  # alone, its failure may be the engine's: not counted
            assert await relay.deliver_once() == 0  # it waits its delay
            assert await retries_fall_due(running.pool) == 1
            assert await relay.deliver_once() == -1
        assert await attempts() == 1
        async with running.pool.acquire() as conn:  # failed in as many rounds that delivered others
            await conn.execute("UPDATE outbox SET attempts = $2 WHERE client_txn_id = $1", bad, event_attempts_max - 1)
        await retries_fall_due(running.pool)
        later = await paid_top_up(running, 270, 30, 900)
        assert await relay.deliver_once() == 1
        assert later in {e["client_txn_id"] for e in received}
        assert await attempts() == event_attempts_max  # parked: the rest flow on
        assert bad not in {e["client_txn_id"] for e in received}
        assert await relay.deliver_once() == 0
    finally:
        await relay.stop()
        await runner.cleanup()


async def test_a_broken_engine_parks_nothing(running: Running) -> None:
    """An engine that fails on everything (500), or says it is unavailable (503), is not taken for
    one bad event: nothing was delivered in those rounds, so nothing is counted, and the events
    are delivered once it works. A 503 ends the round at once, without a post for each event."""
    async with running.pool.acquire() as conn:
        await conn.execute("UPDATE outbox SET delivered_at = now() WHERE delivered_at IS NULL")
    state = {"status": 500, "posts": 0}
    received: list[dict[str, Any]] = []

    async def events(request: web.Request) -> web.Response:
        state["posts"] += 1
        batch = (await request.json())["events"]
        if state["status"] != 200:
            return web.Response(status=state["status"])
        received.extend(batch)
        return web.json_response({"ok": True})

    runner, url = await engine_endpoint(events)
    relay = relay_to(running, url, timeout_s=2)
    try:
        keys = {await paid_top_up(running, 269, 21, 700), await paid_top_up(running, 273, 22, 750)}
        for _ in range(event_attempts_max + 1):
            assert await relay.deliver_once() == -1
            assert await retries_fall_due(running.pool) == 2
        assert state["posts"] == 3 * (event_attempts_max + 1)  # the batch, then each event
        state.update(status=503, posts=0)
        for _ in range(3):
            assert await relay.deliver_once() == -1
            assert await retries_fall_due(running.pool) == 0  # an unavailable engine turns down no event
        assert state["posts"] == 3  # the batch alone
        async with running.pool.acquire() as conn:
            attempts = await conn.fetch("SELECT attempts FROM outbox WHERE client_txn_id = ANY($1::text[])", list(keys))
        assert [r["attempts"] for r in attempts] == [0, 0]
        state["status"] = 200
        await drain(relay)
        assert keys <= {e["client_txn_id"] for e in received}
    finally:
        await relay.stop()
        await runner.cleanup()


async def test_a_run_of_failing_events_at_the_head_holds_back_no_other(running: Running) -> None:
    """A terminal back from a day offline uploads its advices at once: events_per_post_max
    consecutive events (here: of one meter) that the engine crashes on (500), then another meter's
    payment. The first round fails on all of them, in the batch and one by one, and counts none;
    it sends them to the back, so the next round delivers the payment behind them, and the run's
    failures in rounds beside delivered events count until they are parked. Before, every round
    took the same oldest events: nothing behind them ever reached the engine."""
    received: list[dict[str, Any]] = []
    posts = {"n": 0}

    async def events(request: web.Request) -> web.Response:
        posts["n"] += 1
        batch = (await request.json())["events"]
        if any(e["meter_number"] == "OFFLINE-1" for e in batch):
            return web.json_response({"error": "internal"}, status=500)
        received.extend(batch)
        return web.json_response({"ok": True})

    runner, url = await engine_endpoint(events)
    relay = OutboxRelay(running.pool, url, timeout_s=2)
    relay._session = aiohttp.ClientSession(timeout=relay._timeout)
    async with running.pool.acquire() as conn:
        await conn.execute("INSERT INTO outbox (kind, client_txn_id, meter_number, payload) "
                           "SELECT 'payment_received', 'OFFLINE-' || g, 'OFFLINE-1', '{}' "
                           "FROM generate_series(1, $1::int) g", events_per_post_max)
        await conn.execute("INSERT INTO outbox (kind, client_txn_id, meter_number, payload) "
                           "VALUES ('payment_received', 'GOOD-1', 'GOOD-METER', '{}')")
    try:
        for _ in range(2 * event_attempts_max):  # far more rounds than it takes to park a poison event
            await relay.deliver_once()
            await retries_fall_due(running.pool)  # none waits its delay: the order alone lets GOOD-1 pass
        async with running.pool.acquire() as conn:
            max_attempts = await conn.fetchval("SELECT max(attempts) FROM outbox WHERE meter_number = 'OFFLINE-1'")
        assert "GOOD-1" in {e["client_txn_id"] for e in received}, (
            f"after {2 * event_attempts_max} rounds and {posts['n']} posts, the payment behind the failing run "
            f"was never sent; the failing events' attempts: {max_attempts}")
        assert max_attempts == 1  # counted once, in the round that delivered GOOD-1
    finally:
        async with running.pool.acquire() as conn:
            await conn.execute("UPDATE outbox SET delivered_at = now() WHERE meter_number = 'OFFLINE-1'")
        await relay.stop()
        await runner.cleanup()


async def until(condition: Callable[[], bool], *, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        await asyncio.sleep(0.01)


async def test_a_new_payment_is_sent_at_once_while_a_lone_event_is_turned_down(running: Running) -> None:
    """The engine fails on one event's every post (500): alone in its rounds, its failures count
    against nothing (the engine may be broken), and it is sent again after a growing delay of its
    own. Before, that delay was the relay's: after the fourth failure the relay paused 3.2 s (up to
    30 s later on), and a customer who paid meanwhile waited that long for the meter to be re-armed."""
    await mark_waiting_delivered(running)
    runner, url, received, turned_down = await engine_turning_down(meter_number(31), 500)
    relay = OutboxRelay(running.pool, url, timeout_s=2)
    relay.start()
    lone = ""
    try:
        lone = await paid_top_up(running, 280, 31, 800)
        await until(lambda: len(turned_down) >= 4, timeout_s=10, what="the lone event turned down four times")
        paid = await paid_top_up(running, 281, 32, 800)
        paid_at = time.monotonic()
        await until(lambda: paid in {e["client_txn_id"] for e in received}, timeout_s=40, what="the new payment sent")
        waited_s = time.monotonic() - paid_at
        assert waited_s < 1.0, f"the new payment's event waited {waited_s:.1f} s behind the turned-down one"
        # Sent again after a delay that doubles, not at every poll.
        gaps_s = [later - earlier for earlier, later in itertools.pairwise(turned_down)]
        assert all(gap_s >= turned_down_delay_s_first * 2 ** n - 0.05 for n, gap_s in enumerate(gaps_s[:3])), gaps_s
        async with running.pool.acquire() as conn:
            assert await conn.fetchval("SELECT attempts FROM outbox WHERE client_txn_id = $1", lone) == 0
    finally:
        await relay.stop()
        await runner.cleanup()
        await mark_waiting_delivered(running)


async def test_a_turned_down_event_waits_a_delay_of_its_own_that_doubles_up_to_30_s(running: Running) -> None:
    relay, runner, received = await relay_to_engine_turning_down(running, meter_number(33), 500)
    try:
        lone = await paid_top_up(running, 282, 33, 800)
        delays_s = []
        for _ in range(10):
            assert await relay.deliver_once() == -1  # turned down, counted against nothing
            assert await relay.deliver_once() == 0  # not due yet: the relay takes the others meanwhile
            async with running.pool.acquire() as conn:
                delays_s.append(float(await conn.fetchval(
                    "SELECT extract(epoch FROM retry_at - turned_down_at) FROM outbox WHERE client_txn_id = $1", lone)))
            assert await retries_fall_due(running.pool) == 1
        assert delays_s == pytest.approx([0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30.0, 30.0, 30.0])
        async with running.pool.acquire() as conn:
            row = await conn.fetchrow("SELECT attempts, turned_down_count FROM outbox WHERE client_txn_id = $1", lone)
        assert (row["attempts"], row["turned_down_count"]) == (0, 10)
        paid = await paid_top_up(running, 283, 34, 800)
        assert await relay.deliver_once() == 1  # beside a delivered event the failure counts
        assert paid in {e["client_txn_id"] for e in received}
        async with running.pool.acquire() as conn:
            assert await conn.fetchval("SELECT attempts FROM outbox WHERE client_txn_id = $1", lone) == 1
    finally:
        await relay.stop()
        await runner.cleanup()
        await mark_waiting_delivered(running)


async def insert_backlog(running: Running, prefix: str, events: int) -> None:
    """What payments wrote while the engine was away (the relay reads only these columns)."""
    async with running.pool.acquire() as conn:
        await conn.execute("INSERT INTO outbox (kind, client_txn_id, meter_number, payload) "
                           "SELECT 'payment_received', $1 || g, 'm', '{}' FROM generate_series(1, $2::int) g",
                           prefix, events)


async def test_a_second_relay_takes_the_events_behind_those_another_is_sending(running: Running) -> None:
    """Two gateways' relays share a backlog. Before, a round tried its locks on the oldest
    events_per_post_max waiting events only: while one relay was sending those, the other found
    nothing, however many waited behind them."""
    await mark_waiting_delivered(running)
    held: list[dict[str, Any]] = []
    posted, release = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        held.extend((await request.json())["events"])
        posted.set()
        await release.wait()
        return web.json_response({"ok": True})

    runner_a, url_a = await engine_endpoint(slow)
    runner_b, url_b, received_b = await fake_engine()
    relay_a, relay_b = relay_to(running, url_a, timeout_s=10), relay_to(running, url_b, timeout_s=2)
    await insert_backlog(running, "SHARED-", 3 * events_per_post_max)
    try:
        round_a = asyncio.create_task(relay_a.deliver_once())
        await asyncio.wait_for(posted.wait(), timeout=5)
        assert await relay_b.deliver_once() == events_per_post_max
        sent_a, sent_b = [e["event_id"] for e in held], [e["event_id"] for e in received_b]
        assert len(sent_a) == events_per_post_max
        assert min(sent_b) > max(sent_a)  # the next ones, oldest first
        assert sent_b == sorted(sent_b)
        release.set()
        assert await round_a == events_per_post_max
        assert await relay_b.deliver_once() == events_per_post_max
        assert await relay_b.deliver_once() == 0
    finally:
        release.set()
        await relay_a.stop()
        await relay_b.stop()
        await runner_a.cleanup()
        await runner_b.cleanup()
        await mark_waiting_delivered(running)


async def test_two_relays_share_a_backlog_and_send_each_event_once(running: Running) -> None:
    """Two gateways' relays, running, against a slow engine (0.3 s a post): both send from one
    backlog at once, and no event reaches the engine twice."""
    await mark_waiting_delivered(running)
    received: list[dict[str, Any]] = []
    posts = {"in_flight": 0, "most_in_flight": 0}

    async def slow(request: web.Request) -> web.Response:
        batch = (await request.json())["events"]
        posts["in_flight"] += 1
        posts["most_in_flight"] = max(posts["most_in_flight"], posts["in_flight"])
        try:
            await asyncio.sleep(0.3)
        finally:
            posts["in_flight"] -= 1
        received.extend(batch)
        return web.json_response({"ok": True})

    runner, url = await engine_endpoint(slow)
    relays = [OutboxRelay(running.pool, url, timeout_s=5) for _ in range(2)]
    backlog = 3 * events_per_post_max
    await insert_backlog(running, "PAIR-", backlog)

    async def waiting() -> int:
        async with running.pool.acquire() as conn:
            return int(await conn.fetchval(
                "SELECT count(*) FROM outbox WHERE delivered_at IS NULL AND client_txn_id LIKE 'PAIR-%'"))

    try:
        for relay in relays:
            relay.start()
        deadline = time.monotonic() + 20
        while await waiting():
            assert time.monotonic() < deadline, f"{await waiting()} events still waiting"
            await asyncio.sleep(0.05)
    finally:
        for relay in relays:
            await relay.stop()
        await runner.cleanup()
        await mark_waiting_delivered(running)
    times_sent = Counter(e["event_id"] for e in received if e["client_txn_id"].startswith("PAIR-"))
    assert len(times_sent) == backlog
    assert set(times_sent.values()) == {1}, [event_id for event_id, n in times_sent.items() if n > 1]
    assert posts["most_in_flight"] == 2
    assert all(relay.delivered >= events_per_post_max for relay in relays), [relay.delivered for relay in relays]


async def test_a_round_locks_only_the_events_it_takes_whatever_the_plan(running: Running) -> None:
    """With index scans off the waiting events are read sorted: a lock tried beside that scan would
    take one per waiting event (40,000 here, enough to fill PostgreSQL's shared lock table)."""
    await mark_waiting_delivered(running)
    await insert_backlog(running, "SORTED-", 40_000)
    conn = await asyncpg.connect(running.db_url)  # a session of its own: no plan cached with index scans
    try:
        for setting in ("enable_indexscan", "enable_indexonlyscan", "enable_bitmapscan"):
            await conn.execute(f"SET {setting} = off")
        rows = await conn.fetch(sql.OUTBOX_PENDING, events_per_post_max, event_attempts_max)
        held = await conn.fetchval("SELECT count(*) FROM pg_locks "
                                   "WHERE locktype = 'advisory' AND pid = pg_backend_pid()")
        assert len(rows) == events_per_post_max == held
        assert [r["client_txn_id"] for r in rows] == [f"SORTED-{n}" for n in range(1, events_per_post_max + 1)]
    finally:
        await conn.close()
        await mark_waiting_delivered(running)
