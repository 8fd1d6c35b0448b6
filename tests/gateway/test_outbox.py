"""Payments reach the prepayment engine (a fake HTTP endpoint: the seam to the outside), at least once."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from gateway.outbox import OutboxRelay
from gateway.seeding import meter_number, terminal_id
from protocol.codes import ResponseCode
from terminal_sim.client import PosTerminal
from tests.gateway.conftest import Running


async def fake_engine(fail_first: int) -> tuple[web.AppRunner, str, list[dict[str, Any]]]:
    received: list[dict[str, Any]] = []
    calls = {"n": 0}

    async def events(request: web.Request) -> web.Response:
        calls["n"] += 1
        if calls["n"] <= fail_first:
            return web.Response(status=503)
        received.extend((await request.json())["events"])
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
