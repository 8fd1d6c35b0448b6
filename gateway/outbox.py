"""The outbox relay: payment events go to the prepayment engine, at least once, in order.

Events are written in the payment's own transaction (gateway/vending.py), so an event exists
exactly when its payment does. A round takes up to 100 waiting events that are due (below), oldest
first, each held by a session advisory lock tried as the waiting events are walked in order
(outbox_take, 0031_outbox_retry_delays.sql): two gateways never send one event at once, and while
one relay sends the oldest, another takes the next ones; no database transaction stays open while
the engine is called. It POSTs them as one JSON document and marks them delivered on a 2xx. The
engine deduplicates by event_id (delivery is at least once).

What the engine's answer means: 2xx, delivered; a 4xx (but 408 and 429), refused; a 5xx (but
503), failed. A refused or failed batch is retried event by event at once. An event's own refusal
counts an attempt against it when it is 400, 409, 413 or 422; any other refusal, and a failure,
counts only when another event of the round was delivered (so the URL, the credentials and the
engine work: the 404, 403 or 500 was about that event). An event counted event_attempts_max times
is parked (dead letter) so the rest flow on: one event the engine crashes on does not stop every
meter behind it. Each event the engine turned down, counted or not, waits a delay of its own
before a round takes it again (turned_down_delay_s_first, doubled at each turn-down up to
turned_down_delay_s_max), and then comes after the events never turned down: the relay goes on
polling every poll_interval_s, so a new payment's event is sent at once even while older ones are
turned down, and a run of such events as long as a round holds back no other. Anything else (no
answer, a timeout, a redirect, which is never followed, 408, 429, 503), unavailable: the round
ends and the next comes after a pause that grows to backoff_s_max, no event counted or delayed.
So an outage, a broken engine or a wrong URL of any length parks nothing: in those rounds nothing
was delivered, so nothing was counted.

A reversal's event is taken only once its payment's event is delivered, so a reversal never
reaches the engine before its payment: not when the payment's event was refused or parked, nor
while another gateway's relay is sending it. Events of different payments are independent and
may arrive in any order across relays.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json

import aiohttp
import asyncpg

from gateway import sql
from gateway.jsonlog import get_logger

events_per_post_max = 100
# An event the engine refuses this many times is parked (dead letter) so the rest flow on.
event_attempts_max = 20
# The answers that refuse what was sent (a bad event, or a batch too large) whatever else the
# round saw. Another 4xx (404, 403, ...) counts against an event only when the same round
# delivered another one: else it may be about the URL or the credentials, and nothing is counted.
_REFUSING_STATUSES = frozenset({400, 409, 413, 422})
_UNAVAILABLE_STATUSES = frozenset({408, 429, 503})
poll_interval_s = 0.2
# An unavailable engine: the pause between rounds doubles up to this.
backoff_s_max = 30.0
# An event the engine turned down is taken again after a delay of its own: the first, doubled at
# each next turn-down up to the last. Meanwhile the relay polls for other events as usual.
turned_down_delay_s_first = 0.4
turned_down_delay_s_max = 30.0
assert poll_interval_s <= turned_down_delay_s_first <= turned_down_delay_s_max
log = get_logger("vendgate.outbox")


class Answer(enum.Enum):
    DELIVERED = "delivered"
    REFUSED = "refused"  # the engine answered and will not take these events as they are
    FAILED = "failed"  # the engine answered with an error of its own (5xx), maybe over one of these events
    UNAVAILABLE = "unavailable"  # no answer, or an answer about the engine, not the events


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
                sent, engine_unavailable = await self._round()
                # Only an unavailable engine slows the relay down: events the engine turned down
                # wait delays of their own, and a new payment's event goes out at the next poll.
                pause_s = min(pause_s * 2, backoff_s_max) if sent < 0 and engine_unavailable else poll_interval_s
                if sent > 0:
                    continue  # there may be more waiting
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the relay must outlive any one bad round
                log.error("outbox_round_failed", error=type(exc).__name__)
                pause_s = min(pause_s * 2, backoff_s_max)
            await asyncio.sleep(pause_s)

    async def deliver_once(self) -> int:
        """Send one batch; the number delivered, 0 when nothing was due, -1 when none was delivered
        (the engine turned every event down, or was unavailable).

        A refused or failed batch is retried event by event at once, so one event the engine
        cannot take, or fails on, does not hold back the others; should the engine become
        unavailable meanwhile, the round ends there. Only an event's own refusal or failure counts
        an attempt against it; every event turned down waits a delay of its own before it is
        taken again.
        """
        sent, _ = await self._round()
        return sent

    async def _round(self) -> tuple[int, bool]:
        """deliver_once's number, and whether the engine was found unavailable in the round."""
        assert self._session is not None
        engine_unavailable = False
        async with self._pool.acquire(timeout=10) as conn:
            try:
                rows = await conn.fetch(sql.OUTBOX_PENDING, events_per_post_max, event_attempts_max)
                if not rows:
                    return 0, False
                events = [{"event_id": int(r["event_id"]), "kind": r["kind"], "client_txn_id": r["client_txn_id"],
                           "meter_number": r["meter_number"], "payload": json.loads(r["payload"])} for r in rows]
                delivered: list[int] = []
                refused: list[tuple[int, int]] = []  # (event id, status): refused or failed
                answer, status = await self._post(events)
                if answer is Answer.DELIVERED:
                    delivered = [e["event_id"] for e in events]
                elif answer is Answer.UNAVAILABLE:
                    engine_unavailable = True
                    log.warning("engine_unavailable", events=len(events), status=status)
                elif len(events) == 1:
                    refused = [(events[0]["event_id"], status)]
                else:
                    for event in events:
                        answer, status = await self._post([event])
                        if answer is Answer.UNAVAILABLE:
                            engine_unavailable = True
                            log.warning("engine_unavailable", events=len(events) - len(delivered) - len(refused),
                                        status=status)
                            break
                        if answer is Answer.DELIVERED:
                            delivered.append(event["event_id"])
                        else:
                            refused.append((event["event_id"], status))
                counted = [event_id for event_id, status in refused if status in _REFUSING_STATUSES or delivered]
                if delivered:
                    await conn.execute(sql.OUTBOX_MARK_DELIVERED, delivered)
                if counted:
                    await conn.execute(sql.OUTBOX_MARK_ATTEMPT, counted)
                if refused:
                    # Whether counted or not (a broken engine, or events it breaks on), each waits a
                    # growing delay of its own; meanwhile the rounds take the others.
                    await conn.execute(sql.OUTBOX_MARK_TURNED_DOWN, [event_id for event_id, _ in refused],
                                       turned_down_delay_s_first, turned_down_delay_s_max)
                    log.warning("engine_refused", events=len(refused), counted=len(counted),
                                failed=sum(1 for _, status in refused if status >= 500))
            finally:
                # (A connection that broke took its locks with it; the pool's reset would release them too.)
                with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                    await conn.execute(sql.OUTBOX_RELEASE)
        self.delivered += len(delivered)
        return (len(delivered) if delivered else -1), engine_unavailable

    async def _post(self, events: list[dict[str, object]]) -> tuple[Answer, int]:
        """What the engine made of `events`, and its HTTP status (0: no answer)."""
        assert self._session is not None
        try:
            # A redirect is not followed: aiohttp would turn the POST into a GET without the events,
            # and a 2xx page at the new address would mark them delivered.
            async with self._session.post(self._url, json={"events": events}, allow_redirects=False) as response:
                status = response.status
        except (aiohttp.ClientError, TimeoutError):
            return Answer.UNAVAILABLE, 0
        if 200 <= status < 300:
            return Answer.DELIVERED, status
        if status in _UNAVAILABLE_STATUSES:
            return Answer.UNAVAILABLE, status
        if 400 <= status < 500:
            return Answer.REFUSED, status
        if 500 <= status < 600:
            return Answer.FAILED, status
        if 300 <= status < 400:
            log.warning("engine_redirected", status=status)
        return Answer.UNAVAILABLE, status
