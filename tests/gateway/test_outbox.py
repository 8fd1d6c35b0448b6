"""Payments reach the prepayment engine (a fake HTTP endpoint: the seam to the outside), at least once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
from aiohttp import web

from gateway.outbox import OutboxRelay, event_attempts_max
from gateway.seeding import meter_number, terminal_id
from protocol.codes import ResponseCode
from terminal_sim.client import PosTerminal
from tests.gateway.conftest import Running


async def fake_engine(fail_first: int = 0, refuse: Callable[[list[dict[str, Any]]], bool] = lambda _: False
                      ) -> tuple[web.AppRunner, str, list[dict[str, Any]]]:
    """The engine's endpoint: it refuses its first `fail_first` posts and any whose events `refuse`
    turns down; the events it took, in the order it took them."""
    received: list[dict[str, Any]] = []
    calls = {"n": 0}

    async def events(request: web.Request) -> web.Response:
        calls["n"] += 1
        batch = (await request.json())["events"]
        if calls["n"] <= fail_first or refuse(batch):
            return web.Response(status=503)
        received.extend(batch)
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/events", events)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}/events", received


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
        assert row["attempts"] >= 1  # the engine's first refusal was counted, not lost
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
