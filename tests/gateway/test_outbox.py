"""Payments reach the prepayment engine (a fake HTTP endpoint: the seam to the outside), at least once."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
from aiohttp import web

from float_ledger.ledger import set_low_threshold
from gateway.outbox import OutboxRelay, event_attempts_max
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


async def engine_endpoint(handler: Callable[[web.Request], Any]) -> tuple[web.AppRunner, str]:
    """An engine's /events endpoint on a free port, answering with `handler`: its runner and URL."""
    app = web.Application()
    app.router.add_post("/events", handler)
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


async def drain(relay: OutboxRelay) -> None:
    for _ in range(10):
        if await relay.deliver_once() == 0:
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


def a_port_nobody_listens_on() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_an_engine_outage_parks_no_payment(running: Running) -> None:
    """Unreachable for event_attempts_max rounds (about 7 minutes of backoff): before, every event
    waiting then was parked for good, and those meters were never re-armed."""
    runner, url, received = await fake_engine()
    relay = OutboxRelay(running.pool, f"http://127.0.0.1:{a_port_nobody_listens_on()}/events", timeout_s=2)
    relay._session = aiohttp.ClientSession(timeout=relay._timeout)
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
    relay = OutboxRelay(running.pool, url, timeout_s=3)
    relay._session = aiohttp.ClientSession(timeout=relay._timeout)
    try:
        pos = await paying_terminal(running, 254)
        assert (await pos.top_up(meter_number(24), 1_100, "EUR")).response_code is ResponseCode.APPROVED
        await pos.logoff()
        round_ = asyncio.create_task(relay.deliver_once())
        await asyncio.sleep(0.3)  # the relay is now waiting on the engine
        async with running.pool.acquire() as conn:
            # A second relay finds nothing to take: the waiting round still holds its event.
            other = OutboxRelay(running.pool, url, timeout_s=1)
            other._session = aiohttp.ClientSession(timeout=other._timeout)
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
