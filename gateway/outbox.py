"""The outbox relay: payment events go to the prepayment engine, at least once, in order.

Events are written in the payment's own transaction (gateway/vending.py), so an event exists
exactly when its payment does. The relay takes the oldest undelivered events (FOR UPDATE SKIP
LOCKED, so two gateways share the work without sending one event twice at once), POSTs them as
one JSON document and marks them delivered on a 2xx. Anything else leaves them for the next
round with a growing pause. The engine deduplicates by event_id (delivery is at least once).
A reversal's event is taken only once its payment's event is delivered, so a reversal never
reaches the engine before its payment: not when the payment's event was refused or parked, nor
while another gateway's relay is sending it. Events of different payments are independent and
may arrive in any order across relays.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import aiohttp
import asyncpg

from gateway import sql
from gateway.jsonlog import get_logger

events_per_post_max = 100
# An event the engine refuses this many times is parked (dead letter) so the rest flow on.
event_attempts_max = 20
poll_interval_s = 0.2
backoff_s_max = 30.0
log = get_logger("vendgate.outbox")


class OutboxRelay:
    def __init__(self, pool: asyncpg.Pool, engine_url: str, *, timeout_s: float = 5.0) -> None:
        self._pool = pool
        self._url = engine_url
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self.delivered = 0

    def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=self._timeout)
        self._task = asyncio.create_task(self._run(), name="vendgate-outbox")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._session is not None:
            await self._session.close()

    async def _run(self) -> None:
        pause_s = poll_interval_s
        while True:
            try:
                sent = await self.deliver_once()
                pause_s = poll_interval_s if sent >= 0 else min(pause_s * 2, backoff_s_max)
                if sent > 0:
                    continue  # there may be more waiting
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the relay must outlive any one bad round
                log.error("outbox_round_failed", error=type(exc).__name__)
                pause_s = min(pause_s * 2, backoff_s_max)
            await asyncio.sleep(pause_s)

    async def deliver_once(self) -> int:
        """Send one batch; the number delivered, 0 when nothing waited, -1 when the engine refused.

        A refused batch is retried event by event at once, so one event the engine cannot take
        does not hold back the others; an event refused event_attempts_max times is parked.
        """
        assert self._session is not None
        async with self._pool.acquire(timeout=10) as conn, conn.transaction():
            rows = await conn.fetch(sql.OUTBOX_PENDING, events_per_post_max, event_attempts_max)
            if not rows:
                return 0
            events = [{"event_id": int(r["event_id"]), "kind": r["kind"], "client_txn_id": r["client_txn_id"],
                       "meter_number": r["meter_number"], "payload": json.loads(r["payload"])} for r in rows]
            delivered: list[int] = []
            refused: list[int] = []
            if await self._post(events):
                delivered = [e["event_id"] for e in events]
            elif len(events) == 1:
                refused = [events[0]["event_id"]]
            else:
                for event in events:
                    (delivered if await self._post([event]) else refused).append(event["event_id"])
            if delivered:
                await conn.execute(sql.OUTBOX_MARK_DELIVERED, delivered)
            if refused:
                await conn.execute(sql.OUTBOX_MARK_ATTEMPT, refused)
                log.warning("engine_refused", events=len(refused))
        self.delivered += len(delivered)
        return len(delivered) if delivered else -1

    async def _post(self, events: list[dict[str, object]]) -> bool:
        assert self._session is not None
        try:
            async with self._session.post(self._url, json={"events": events}) as response:
                return 200 <= response.status < 300
        except (aiohttp.ClientError, TimeoutError):
            return False
