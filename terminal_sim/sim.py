"""Many simulated POS terminals paying at once: the load of a collection network in one process.

Each terminal logs on, then loops: look up a meter, top up, now and then a float inquiry, a
reprint or a reversal, with think time between. Payments whose reply was lost are retried with
the same transaction id (and after SYSTEM_BUSY); one never answered is reversed (NO_REPLY), as
docs/protocol.md asks of a terminal. The summary counts outcomes and latency (nearest rank), and
flags inconsistencies: an approved reply for another transaction, amount or currency, or without
a receipt, a receipt number given to two payments, a retry answered differently. A protocol
error is counted, never a crash. The run is bounded: terminals still waiting stop_grace_s after
it are cut off, their payments counted unresolved.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import signal
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import msgspec

from protocol import limits
from protocol.codes import ResponseCode
from protocol.errors import ProtocolError
from protocol.messages import ClientTransactionId, ReversalReason, TopUpResult
from terminal_sim.client import LinkLost, LinkModel, PosTerminal, TerminalRefused

sim_terminals_max = 5_000
think_time_s = (0.05, 0.5)
failure_pause_s = (0.5, 1.5)  # after a payment that failed, before the next customer
stop_grace_s = 5.0  # after the run, for replies still on their way
sequence_per_second = 10  # transaction ids a run may use per terminal and second of the day
sequence_headroom = 100_000  # ids left for a run started late in the day


class SimSummary(msgspec.Struct, kw_only=True):
    terminals: int
    duration_s: float
    approved: int = 0
    declined: int = 0
    errors: int = 0
    protocol_errors: int = 0
    inconsistencies: int = 0
    retries: int = 0
    # Payments whose outcome the terminal never learnt and whose NO_REPLY reversal got no answer
    # either (or that were cut off at the end of the run): the back office settles them.
    unresolved: int = 0
    latency_p50_ms: float = 0.0
    latency_p99_ms: float = 0.0
    approved_amount_minor: int = 0
    approved_txn_ids: list[str] = []
    # Stopped early by SIGINT: no payment started after it, those in flight had stop_grace_s (a
    # second SIGINT cut that short); duration_s is then the time the run took.
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        """No protocol error, no inconsistent reply, and the gateway answered at least one payment."""
        return self.protocol_errors == 0 and self.inconsistencies == 0 and self.approved + self.declined > 0


@dataclass
class _State:
    latencies_s: list[float] = field(default_factory=list)
    receipts: dict[str, str] = field(default_factory=dict)  # receipt number -> txn id
    summary: SimSummary | None = None
    notes: list[str] = field(default_factory=list)
    deadline: float = 0.0  # time.monotonic() after which no terminal starts a payment

    def inconsistent(self, note: str) -> None:
        assert self.summary is not None
        self.summary.inconsistencies += 1
        self.notes.append(note)


_last_used: dict[str, int] = {}  # terminal id -> the last sequence a run of this process used


def first_sequence(now: datetime | None = None) -> int:
    """Where each terminal's sequence starts: later runs on a business day start higher, so a run
    never repeats an earlier run's transaction ids (its payments would be answered from the stored
    replies, and no money would move)."""
    moment = now or datetime.now(UTC)
    seconds = moment.hour * 3600 + moment.minute * 60 + moment.second
    return min(seconds * sequence_per_second, limits.terminal_sequence_max - sequence_headroom)


def _mismatch(result: TopUpResult, txn: ClientTransactionId, amount: int, currency: str) -> str | None:
    """Why an approved reply is not the answer to this request (None: it is)."""
    if result.client_transaction_id != txn:
        return f"reply for {result.client_transaction_id.as_key()} to {txn.as_key()}"
    if result.amount_minor != amount or result.currency != currency:
        return f"{txn.as_key()} approved for {result.amount_minor} {result.currency}, {amount} {currency} paid"
    if result.receipt_number is None:
        return f"{txn.as_key()} approved without a receipt"
    return None


async def _settle_unanswered(terminal: PosTerminal, txn: ClientTransactionId, amount: int, currency: str,
                             summary: SimSummary) -> None:
    """A top-up whose reply never came: reverse it (NO_REPLY), as docs/protocol.md asks, so the
    customer is not charged for a payment the agent could not confirm."""
    try:
        reversed_ = await terminal.reverse(txn, amount, currency, ReversalReason.NO_REPLY)
    except (LinkLost, ConnectionError, TimeoutError, TerminalRefused):
        summary.unresolved += 1
        return
    if reversed_.response_code not in (ResponseCode.APPROVED, ResponseCode.ORIGINAL_NOT_FOUND):
        summary.unresolved += 1


async def _pause_after_failure(state: _State, rng: random.Random) -> None:
    """After a payment that failed (no link, no gateway, busy): the agent waits before the next
    customer, as a terminal does, and a gateway that is down is not called in a tight loop."""
    remaining_s = state.deadline - time.monotonic()
    if remaining_s > 0:
        await asyncio.sleep(min(remaining_s, rng.uniform(*failure_pause_s)))


async def _run_terminal(terminal: PosTerminal, meters: list[str], currency: str, state: _State,
                        rng: random.Random, reversal_every: int) -> None:
    summary = state.summary
    assert summary is not None
    n = 0
    in_flight: ClientTransactionId | None = None
    try:
        await terminal.connect()
        while time.monotonic() < state.deadline:
            n += 1
            meter = rng.choice(meters)
            amount = rng.choice((500, 1_000, 2_000, 5_000))
            started = time.monotonic()
            txn = in_flight = terminal.next_transaction_id()
            try:
                result = await terminal.top_up(meter, amount, currency, txn=txn)
            except (LinkLost, ConnectionError, TimeoutError):
                summary.errors += 1
                await _settle_unanswered(terminal, txn, amount, currency, summary)
                in_flight = None
                await _pause_after_failure(state, rng)
                continue
            except TerminalRefused as refused:
                if refused.response_code is not ResponseCode.SYSTEM_BUSY:
                    raise
                summary.errors += 1  # busy after every repeat: the payment was not applied
                in_flight = None
                await _pause_after_failure(state, rng)
                continue
            in_flight = None
            state.latencies_s.append(time.monotonic() - started)
            if result.response_code is ResponseCode.APPROVED:
                summary.approved += 1
                summary.approved_amount_minor += amount
                key = txn.as_key()
                summary.approved_txn_ids.append(key)
                if (why := _mismatch(result, txn, amount, currency)) is not None:
                    state.inconsistent(why)
                elif state.receipts.setdefault(result.receipt_number or "", key) != key:
                    state.inconsistent(f"receipt {result.receipt_number} reused by {key}")
                if n % reversal_every == 0:
                    # The agent keyed it in error: reverse, and make sure a repeat says the same.
                    reversed_ = await terminal.reverse(txn, amount, currency, ReversalReason.AGENT_CANCELLED)
                    if reversed_.response_code is ResponseCode.APPROVED:
                        summary.approved -= 1
                        summary.approved_amount_minor -= amount
                        summary.approved_txn_ids.remove(key)
                elif n % 7 == 0:
                    again = await terminal.top_up(meter, amount, currency, txn=txn)
                    if again != result:
                        state.inconsistent(f"retry of {key} answered differently")
            else:
                summary.declined += 1
            if n % 5 == 0:
                await terminal.float_inquiry()
            await asyncio.sleep(rng.uniform(*think_time_s))
    except ProtocolError as error:
        summary.protocol_errors += 1
        state.notes.append(f"{terminal.terminal_id}: {error!r}")
    except TerminalRefused as refused:
        if refused.response_code is not ResponseCode.SYSTEM_BUSY:
            summary.protocol_errors += 1
            state.notes.append(f"{terminal.terminal_id}: {refused}")
    except (LinkLost, ConnectionError, TimeoutError) as lost:
        summary.errors += 1
        # Said once per terminal: what ended it (a refused connection names the wrong port or a
        # gateway that is not running, which a bare error count does not).
        state.notes.append(f"{terminal.terminal_id}: stopped: {lost!r}")
    except asyncio.CancelledError:
        if in_flight is not None:  # cut off at the end of the run with a payment unanswered
            summary.unresolved += 1
        await terminal.close()
        raise
    finally:
        summary.retries += terminal.retries
        if terminal.protocol_errors:  # replies refused by the protocol's checks, each retried as a lost link
            summary.protocol_errors += terminal.protocol_errors
            state.notes.append(f"{terminal.terminal_id}: {terminal.protocol_errors} replies refused, the last "
                               f"{terminal.last_protocol_error!r}")
    await terminal.logoff()


async def run_simulation(*, host: str, port: int, terminals: list[tuple[str, bytes]], meters: list[str],
                         currency: str, duration_s: float, link: LinkModel, seed: int | None = None,
                         reversal_every: int = 25, stop_on_sigint: bool = False) -> tuple[SimSummary, list[str]]:
    """Run the terminals for duration_s; those still waiting on a reply stop_grace_s later are cut
    off. `seed` makes the choices repeatable; the transaction ids start from first_sequence().

    With stop_on_sigint (in the main thread), SIGINT ends the run early the same way: no payment starts
    after it, the payments in flight get stop_grace_s, and the summary covers what was done."""
    if not 0 < len(terminals) <= sim_terminals_max:
        raise ValueError(f"1..{sim_terminals_max} terminals")
    started = time.monotonic()
    state = _State(summary=SimSummary(terminals=len(terminals), duration_s=duration_s),
                   deadline=started + duration_s)
    rng = random.Random(seed)
    start = first_sequence()
    tasks = []
    used: list[PosTerminal] = []
    for tid, key in terminals:
        # On from the clock, and past what an earlier run of this process used (within a second).
        terminal = PosTerminal(tid, key, host, port, link=link, rng=random.Random(rng.getrandbits(64)),
                               last_sequence=max(start, _last_used.get(tid, 0)))
        used.append(terminal)
        tasks.append(asyncio.ensure_future(_run_terminal(terminal, meters, currency, state,
                                                         random.Random(rng.getrandbits(64)), reversal_every)))
    interrupted, forced = asyncio.Event(), asyncio.Event()

    def on_sigint() -> None:  # the first stops the run gently, a second at once
        (forced if interrupted.is_set() else interrupted).set()

    loop = asyncio.get_running_loop()
    handling_sigint = False
    if stop_on_sigint:
        try:
            loop.add_signal_handler(signal.SIGINT, on_sigint)
            handling_sigint = True
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no such signals here
            pass
    finished = asyncio.ensure_future(asyncio.wait(tasks))
    stop, force = asyncio.ensure_future(interrupted.wait()), asyncio.ensure_future(forced.wait())
    try:
        await asyncio.wait((finished, stop), timeout=duration_s + stop_grace_s, return_when=asyncio.FIRST_COMPLETED)
        if interrupted.is_set() and not finished.done():
            state.deadline = 0.0
            summary = state.summary
            assert summary is not None
            summary.interrupted = True
            summary.duration_s = round(time.monotonic() - started, 1)  # what the summary covers
            state.notes.append(f"interrupted after {summary.duration_s:.1f} s: no new payments, those in flight "
                               f"given {stop_grace_s:.0f} s (Ctrl-C again to stop at once)")
            await asyncio.wait((finished, force), timeout=stop_grace_s, return_when=asyncio.FIRST_COMPLETED)
        late = [task for task in tasks if not task.done()]
    finally:
        if handling_sigint:
            loop.remove_signal_handler(signal.SIGINT)
        stop.cancel()
        force.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(asyncio.CancelledError):
            await finished
    for terminal in used:
        _last_used[terminal.terminal_id] = terminal.last_sequence
    summary = state.summary
    assert summary is not None
    if late:
        state.notes.append(f"{len(late)} terminals still waiting {stop_grace_s:.0f} s after the run: cut off")
    if state.latencies_s:
        summary.latency_p50_ms = round(nearest_rank(state.latencies_s, 0.50) * 1000, 2)
        summary.latency_p99_ms = round(nearest_rank(state.latencies_s, 0.99) * 1000, 2)
    return summary, state.notes


def nearest_rank(values: list[float], fraction: float) -> float:
    """The `fraction` quantile by nearest rank: the smallest value with at least that share of
    the values at or below it (the p99 of 100 values is the 99th)."""
    assert values and 0 < fraction <= 1
    ordered = sorted(values)
    return ordered[max(math.ceil(fraction * len(ordered)), 1) - 1]
