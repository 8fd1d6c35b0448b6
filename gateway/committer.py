"""The batching committer: every session's payments, grouped into one transaction per batch.

No timer: a batch leaves as soon as no batch is in flight, and requests that arrive while one
is in flight wait for the next (up to batch_requests_max). Under light load a request commits
alone at once; under heavy load the batches grow and one commit, one fsync and one lock round
on a hot agent's float serve many payments. One queue keeps arrival order, hence per-agent order.

Pipelined: while a batch of top-ups commits on the committer's connection, the requests queued
meanwhile are read and decided on a second connection, on from that batch's effects (receipt
counters, daily totals, TIDs, debt: vending.BatchEffects), and their statement goes as soon as
that commit returns. They are taken a little way into the commit (ahead_take_fraction of its
expected time), so that the requests sent in answer to the previous batch's replies are among
them. Batches still commit one after the other, in arrival order. The decisions
are kept only when the batch before committed exactly as prepared, at its first attempt; else
they are dropped and the requests decided afresh. A request repeating an id of the batch in
flight waits for the next batch (it will replay); a batch holding a reversal is not decided ahead.

A batch that fails on a retryable SQLSTATE is retried a bounded number of times; a batch that
fails otherwise is split and each request retried alone, so one bad request cannot take its
neighbours down. Replies are released only after the batch's commit returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from datetime import datetime

import asyncpg

from float_ledger.model import batch_transfers_max
from gateway import sql
from gateway.jsonlog import get_logger
from gateway.vending import (
    BatchEffects,
    PreparedTopUps,
    Refusals,
    RefusedByLedger,
    StaleRefusals,
    VendingService,
    VendOutcome,
    VendRequest,
    decline,
    now_utc,
)
from protocol.codes import ResponseCode

batch_requests_max = 256
queue_requests_max = 20_000
batch_retries_max = 5
acquire_timeout_s = 10.0
reading_acquire_timeout_s = 0.5
# A session waits this long for its payment's batch (a POS session: from reading the request, its
# wait for the terminal's turn included); then it answers SYSTEM_BUSY ("retry with the same id"),
# which is safe: the payment either committed and the retry replays it, or not.
submit_timeout_s = 30.0
# While a batch commits, the batch after it is taken from the queue this far into the commit's
# expected time (an estimate from the commits before it), not at once: the sessions that the
# previous batch's replies woke have sent their next requests by then, and those join the batch
# decided ahead instead of waiting out one more commit. Deciding a batch (its reads and the
# gateway's work) takes about half of what committing it does, so the rest of the commit's time
# is left for that. The take happens at once when the queue holds a full batch, and the wait
# never outlasts the commit.
ahead_take_fraction = 0.3
ahead_take_wait_max_s = 0.05
commit_estimate_weight = 0.3  # of the latest commit in the running estimate of a commit's time
assert batch_requests_max <= queue_requests_max
# A top-up posts at most 5 transfers; one batch must fit one ledger call.
assert batch_requests_max * 5 <= batch_transfers_max

log = get_logger("vendgate.committer")
_RETRYABLE = (asyncpg.SerializationError, asyncpg.DeadlockDetectedError)
# A unique key that another transaction took between the batch's reads and its writes: receipt
# numbers continue from the counter the batch read, TIDs from the meter's last TID. Redone from
# fresh reads, the batch numbers on from what that transaction committed.
# The same for a client transaction id that another gateway recorded meanwhile: redone, the batch
# replays it.
_RACED_CONSTRAINTS = frozenset({"receipts_pkey", "tokens_meter_number_token_id_key", "vend_transactions_pkey"})
# Failures of the database or the link, not of a request: splitting the batch would only repeat them.
_INFRASTRUCTURE = (OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.InternalClientError,
                   asyncpg.PostgresConnectionError, asyncpg.QueryCanceledError, asyncpg.CannotConnectNowError)
# The committer's connection went away: whether the batch committed is unknown, and redoing it on
# a fresh connection is safe (a committed payment replays from its stored reply, any other is
# decided anew), so it is redone once there before the batch is answered SYSTEM_ERROR.
# (A server that ends the connection between two batches may surface as an asyncpg client error.)
_CONNECTION_LOST = (OSError, asyncpg.PostgresConnectionError, asyncpg.AdminShutdownError, asyncpg.InterfaceError,
                    asyncpg.InternalClientError)
reconnects_max = 1


_STALE_READ_STATES = frozenset({sql.STATE_REVERSAL_ARRIVED, sql.STATE_DEBT_PAID_DOWN})


def retryable(exc: BaseException) -> bool:
    """Redo the batch from the start: the conflict was with a transaction that has since ended."""
    if isinstance(exc, _RETRYABLE):
        return True
    if getattr(exc, "sqlstate", None) in _STALE_READ_STATES:
        return True  # a reversal, or a debt paid down, committed since the batch's reads: decide again
    return isinstance(exc, asyncpg.UniqueViolationError) and exc.constraint_name in _RACED_CONSTRAINTS


class CommitterBusy(Exception):
    """The queue is full or the committer is stopping: answer SYSTEM_BUSY."""


BatchObserver = Callable[[int, float], None]
_Item = tuple[VendRequest, "asyncio.Future[VendOutcome]"]


class Committer:
    def __init__(self, pool: asyncpg.Pool, service: VendingService, *,
                 batch_max: int = batch_requests_max, queue_max: int = queue_requests_max,
                 clock: Callable[[], datetime] = now_utc, on_batch: BatchObserver | None = None,
                 on_decided_ahead: Callable[[bool], None] | None = None) -> None:
        assert 1 <= batch_max <= queue_max
        self._pool = pool
        self._service = service
        self._batch_max = batch_max
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(queue_max)
        self._clock = clock
        self._on_batch = on_batch
        self._on_decided_ahead = on_decided_ahead  # called with True (kept) or False (dropped)
        self._task: asyncio.Task[None] | None = None
        self._accepting = False
        self._committing = _KeptConnection(pool)  # every batch's commit
        # Decides the next batch while one commits; taken only when the pool has one to spare.
        self._reading = _KeptConnection(pool, acquire_timeout_s=reading_acquire_timeout_s)
        # Taken from the queue but not yet in a batch, in arrival order (_take takes them first).
        self._carry: list[_Item] = []
        self._commit_s_estimate = 0.0  # a running estimate of one batch's commit time
        self._queue_full = asyncio.Event()  # set when a full batch is queued

    def start(self) -> None:
        assert self._task is None
        self._accepting = True
        self._task = asyncio.create_task(self._run(), name="vendgate-committer")

    async def stop(self) -> None:
        """Refuse new requests, commit everything queued, then end."""
        self._accepting = False
        if self._task is None:
            return
        await self._queue.join()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        await self._committing.drop()
        await self._reading.drop()

    @property
    def _conn(self) -> asyncpg.Connection | None:
        """The connection batches commit on (None until the first batch)."""
        return self._committing.conn

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    async def submit(self, request: VendRequest, *, answer_by: float | None = None) -> VendOutcome:
        """The request's outcome, waited for until `answer_by` (time.monotonic(): what is left of
        the session's own bound, when it waited for its turn first) or submit_timeout_s; then
        CommitterBusy, the request staying queued (it may still commit)."""
        wait_s = submit_timeout_s if answer_by is None else answer_by - time.monotonic()
        if not self._accepting:
            raise CommitterBusy("stopping")
        if wait_s <= 0:
            raise CommitterBusy("no time left to wait")  # not queued: it could only be left unanswered
        loop = asyncio.get_running_loop()
        future: asyncio.Future[VendOutcome] = loop.create_future()
        try:
            self._queue.put_nowait((request, future))
        except asyncio.QueueFull:
            raise CommitterBusy("queue full") from None
        if self._queue.qsize() >= self._batch_max:
            self._queue_full.set()
        # The session waits on a future of its own, woken by the outcome or by the time limit: a
        # session that goes away cancels only that, never the payment already queued. (What
        # asyncio.shield and asyncio.timeout do, for a fraction of their cost on every payment.)
        waiter: asyncio.Future[None] = loop.create_future()

        def wake(_: object = None) -> None:
            if not waiter.done():
                waiter.set_result(None)

        future.add_done_callback(wake)
        timer = loop.call_later(wait_s, wake)
        try:
            await waiter
        finally:
            timer.cancel()
            future.remove_done_callback(wake)
        if not future.done():
            raise CommitterBusy("batch still running")
        return future.result()

    async def _run(self) -> None:
        ahead: tuple[list[_Item], PreparedTopUps] | None = None
        prepared: PreparedTopUps | None
        while True:
            if ahead is not None:
                batch, prepared = ahead
                ahead = None
            else:
                batch = await self._take()
                prepared = await self._prepare(self._committing, batch, None)
            try:
                if prepared is None:
                    await self._commit(batch, None)
                    continue
                commit = asyncio.create_task(self._commit(batch, prepared))
                ahead = await self._decide_ahead(prepared, commit)
            except Exception as exc:  # our own bug: still, every waiting session gets an answer
                log.exception("commit_crashed", batch_size=len(batch), error=type(exc).__name__)
                for request, future in batch:
                    if not future.done():
                        future.set_result(decline(request, ResponseCode.SYSTEM_ERROR, "system error"))
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _take(self) -> list[_Item]:
        """The next batch: what was carried over, then what is queued, up to batch_max."""
        if not self._carry:
            self._carry.append(await self._queue.get())
        batch, self._carry = self._carry[:self._batch_max], self._carry[self._batch_max:]
        while len(batch) < self._batch_max:
            try:
                batch.append(self._queue.get_nowait())
            except asyncio.QueueEmpty:
                break
        return batch

    async def _decide_ahead(self, prepared: PreparedTopUps, commit: asyncio.Task[bool]
                            ) -> tuple[list[_Item], PreparedTopUps] | None:
        """While `commit` runs, read and decide the requests queued meanwhile, on from the
        committing batch's effects. Returns them with their decisions once the commit is known
        to have written exactly what was prepared; else they go back to be decided afresh."""
        effects = prepared.effects
        waiting = self._carry  # taken earlier, not yet in a batch: they go first
        if not waiting:
            await self._await_arrivals(commit)
        queued: list[_Item] = []
        while not waiting and len(queued) < self._batch_max:
            try:
                queued.append(self._queue.get_nowait())
            except asyncio.QueueEmpty:
                break
        # Until they are in a batch, what was taken waits in _carry, in arrival order.
        self._carry = queued + waiting
        ahead: tuple[list[_Item], PreparedTopUps] | None = None
        # Never waits for the pool: with no connection to spare, the batch is decided after the commit.
        if queued and self._reading.ready():
            batch = [item for item in queued if item[0].client_txn_id not in effects.new_txn_ids]
            if batch:
                # The batch in flight writes nothing when it records no id: nothing to add then.
                after = effects if effects.probe_txn_id is not None else None
                decided = await self._prepare(self._reading, batch, after)
                if decided is not None:
                    ahead = (batch, decided)
                    # Repeats of the ids in flight follow the batch decided ahead: they replay,
                    # so they move no money and their place among the others does not matter.
                    self._carry = [item for item in queued if item[0].client_txn_id in effects.new_txn_ids]
        try:
            as_prepared = await commit
        except BaseException:
            self._carry = queued + waiting
            raise
        if ahead is not None and self._on_decided_ahead is not None:
            with contextlib.suppress(Exception):
                self._on_decided_ahead(as_prepared)
        if ahead is not None and not as_prepared:
            # Decided afresh, in the order they arrived: a repeat that came first may now be the
            # payment itself (the batch in flight did not record it).
            self._carry = queued + waiting
            return None
        return ahead

    async def _await_arrivals(self, commit: asyncio.Task[bool]) -> None:
        """Let requests gather for the batch decided ahead (see ahead_take_fraction): until that
        share of the commit's expected time has passed, the commit has ended, or a full batch
        is queued, whichever comes first."""
        wait_s = min(ahead_take_wait_max_s, ahead_take_fraction * self._commit_s_estimate)
        if wait_s <= 0 or commit.done() or self._queue.qsize() >= self._batch_max:
            return
        self._queue_full.clear()
        full = asyncio.ensure_future(self._queue_full.wait())
        try:
            await asyncio.wait((commit, full), timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            commit.cancel()  # as awaiting it would: the commit goes down with the committer
            raise
        finally:
            full.cancel()

    def _count_commit_time(self, seconds: float) -> None:
        if self._commit_s_estimate == 0.0:
            self._commit_s_estimate = seconds
        else:
            self._commit_s_estimate += commit_estimate_weight * (seconds - self._commit_s_estimate)

    async def _prepare(self, connection: _KeptConnection, batch: list[_Item],
                       after: BatchEffects | None) -> PreparedTopUps | None:
        """The batch read and decided, ready to commit; None when process_batch must decide it
        (a reversal in it: prepare_batch declines it) or the reads failed (the commit path then
        retries them as usual)."""
        requests = [request for request, _ in batch]
        try:
            conn = await connection.get()
            return await self._service.prepare_batch(conn, requests, self._clock(), after)
        except _CONNECTION_LOST:
            await connection.drop()
            return None
        except (asyncpg.PostgresError, TimeoutError, LookupError) as exc:  # the database's or its data's
            log.warning("batch_read_failed", batch_size=len(batch), error=type(exc).__name__)
            return None
        except Exception as exc:  # our own bug: the commit path decides the batch again, visibly
            log.exception("batch_decide_failed", batch_size=len(batch), error=type(exc).__name__)
            return None

    async def _commit(self, batch: list[_Item], prepared: PreparedTopUps | None) -> bool:
        """Commit the batch and answer its sessions. True when `prepared` was committed as it was."""
        requests = [request for request, _ in batch]
        started = time.perf_counter()
        as_prepared = False
        try:
            outcomes, as_prepared = await self._transact(requests, prepared)
        except Exception as exc:
            log.exception("batch_failed", batch_size=len(batch), error=type(exc).__name__)
            if len(batch) > 1 and not isinstance(exc, _INFRASTRUCTURE):
                for item in batch:
                    await self._commit([item], None)
                return False
            outcomes = [decline(request, ResponseCode.SYSTEM_ERROR, "system error") for request in requests]
        elapsed_s = time.perf_counter() - started
        if as_prepared:  # a prepared batch's one statement, at its first attempt: what the estimate is of
            self._count_commit_time(elapsed_s)
        if self._on_batch is not None:
            with contextlib.suppress(Exception):
                self._on_batch(len(batch), elapsed_s)
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if not future.done():
                future.set_result(outcome)
        return as_prepared

    async def _transact(self, requests: list[VendRequest], prepared: PreparedTopUps | None
                        ) -> tuple[list[VendOutcome], bool]:
        """The batch's outcomes, committed, and whether `prepared` was committed as it was (at
        the first attempt); any later attempt decides the batch again from fresh reads."""
        refused = Refusals()
        attempt = 0
        reconnects = 0
        # Each refusal round declines at least one more request, so those rounds are bounded by
        # the batch size; retryable SQLSTATEs and stale refusals get batch_retries_max attempts
        # together, a lost connection reconnects_max, and each of those may start the refusal
        # rounds again.
        for _ in range((len(requests) + 1) * (batch_retries_max + reconnects_max + 1)):
            try:
                conn = await self._committing.get()
                if prepared is not None:
                    first, prepared = prepared, None
                    return await self._service.commit_prepared(conn, first), True
                return await self._service.process_batch(conn, requests, self._clock(), refused), False
            except RefusedByLedger as refusal:
                refused.add(refusal)
            except StaleRefusals:
                refused = Refusals()
                attempt += 1
                if attempt == batch_retries_max:
                    raise
            except _CONNECTION_LOST:
                await self._committing.drop()
                if reconnects == reconnects_max:
                    raise
                reconnects += 1
                log.warning("committer_reconnecting", batch_size=len(requests))
            except asyncpg.PostgresError as exc:
                if not retryable(exc):
                    raise
                attempt += 1
                if attempt == batch_retries_max:
                    raise
                await asyncio.sleep(0.001 * attempt)
            except _INFRASTRUCTURE:
                await self._committing.drop()
                raise
        raise AssertionError("unreachable: every round declines one more request or counts an attempt")


# The committer's statements reach every row by key, for batches of 1 to batch_requests_max: no
# table is scanned whole (with a few thousand agents or customers the planner takes a whole-table
# hash join for cheaper than a few index lookups, and for the small batches of moderate load it
# is not). Each statement is planned once per connection (a generic plan): planning the batch
# read cost three to six times what running it did for batches of up to 16 payments. A generic
# plan is fitted to the tables as they were when the connection first ran it, so the statements
# are written to reach rows by key in any plan: the batch read drives each table by = ANY of
# the batch's keys or looks it up in a LATERAL ... LIMIT 1 subquery (sql.VEND_BATCH_READ), and
# vend_commit_topups and the ledger's functions touch tables by key only, with enable_seqscan
# off for themselves as well.
#
# And READ COMMITTED: the payment/reversal race relies on it (vend_commit_topups and the reversal
# path read what committed while they waited for an id's lock). gateway/database.py sends it at
# connection start; it is set here too because a committer may be given a pool made elsewhere (a
# test's, a benchmark's), whose sessions take the database's or role's default.
KEPT_CONNECTION_SETTINGS = {"enable_seqscan": "off", "plan_cache_mode": "force_generic_plan",
                            "default_transaction_isolation": "read committed"}


async def keep(conn: asyncpg.Connection) -> None:
    """Make a pooled connection one of the committer's: its settings, and every statement planned
    afresh under them."""
    for name, value in KEPT_CONNECTION_SETTINGS.items():
        await conn.execute("SELECT set_config($1, $2, false)", name, value)
    # Statements this connection prepared before may hold a generic plan made under the defaults
    # (a sequential scan of a table that was small then), which force_generic_plan would reuse:
    # asyncpg forgets its prepared statements (the pool's, all cheap to prepare again).
    await conn.reload_schema_state()


class _KeptConnection:
    """A pooled connection kept between batches (no acquire and no reset per batch), replaced
    once the server or the pool has ended it. Its settings (KEPT_CONNECTION_SETTINGS) last until
    it goes back to the pool, whose reset undoes them."""

    def __init__(self, pool: asyncpg.Pool, acquire_timeout_s: float = acquire_timeout_s) -> None:
        self._pool = pool
        self._acquire_timeout_s = acquire_timeout_s
        self.conn: asyncpg.Connection | None = None

    def ready(self) -> bool:
        """Held already, or one the pool can hand over at once (idle, or room to open one)."""
        if self.conn is not None:
            return True
        return bool(self._pool.get_idle_size() or self._pool.get_size() < self._pool.get_max_size())

    async def get(self) -> asyncpg.Connection:
        if self.conn is not None and self._closed(self.conn):
            await self.drop()
        if self.conn is None:
            conn = await self._pool.acquire(timeout=self._acquire_timeout_s)
            try:
                await keep(conn)
            except BaseException:
                with contextlib.suppress(Exception):  # the reason it failed is what the caller needs
                    await self._pool.release(conn, timeout=acquire_timeout_s)
                raise
            self.conn = conn
        return self.conn

    async def drop(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await self._pool.release(conn, timeout=acquire_timeout_s)

    @staticmethod
    def _closed(conn: asyncpg.Connection) -> bool:
        try:
            return bool(conn.is_closed())
        except asyncpg.InterfaceError:  # the pool took a connection that died back already
            return True
