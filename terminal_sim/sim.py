"""Many simulated POS terminals paying at once: the load of a collection network in one process.

Each terminal logs on, then loops: look up a meter, top up, now and then a float inquiry, a
reprint or a reversal, with think time between. Payments whose reply was lost are retried with
the same transaction id. The summary counts outcomes and latency, and flags inconsistencies: an
approved reply without a receipt, a receipt number given to two payments, a retry answered
differently, or a protocol error.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from dataclasses import dataclass, field

import msgspec

from protocol.codes import ResponseCode
from protocol.errors import ProtocolError
from terminal_sim.client import LinkLost, LinkModel, PosTerminal, TerminalRefused

sim_terminals_max = 5_000
think_time_s = (0.05, 0.5)


class SimSummary(msgspec.Struct, kw_only=True):
    terminals: int
    duration_s: float
    approved: int = 0
    declined: int = 0
    errors: int = 0
    protocol_errors: int = 0
    inconsistencies: int = 0
    retries: int = 0
    latency_p50_ms: float = 0.0
    latency_p99_ms: float = 0.0
    approved_amount_minor: int = 0
    approved_txn_ids: list[str] = []

    @property
    def ok(self) -> bool:
        return self.protocol_errors == 0 and self.inconsistencies == 0


@dataclass
class _State:
    latencies_s: list[float] = field(default_factory=list)
    receipts: dict[str, str] = field(default_factory=dict)  # receipt number -> txn id
    summary: SimSummary | None = None
    notes: list[str] = field(default_factory=list)


async def _run_terminal(terminal: PosTerminal, meters: list[str], currency: str, deadline: float,
                        state: _State, rng: random.Random, reversal_every: int) -> None:
    summary = state.summary
    assert summary is not None
    n = 0
    try:
        await terminal.logon()
        while time.monotonic() < deadline:
            n += 1
            meter = rng.choice(meters)
            amount = rng.choice((500, 1_000, 2_000, 5_000))
            started = time.monotonic()
            txn = terminal.next_transaction_id()
            try:
                result = await terminal.top_up(meter, amount, currency, txn=txn)
            except (LinkLost, ConnectionError, TimeoutError):
                summary.errors += 1
                continue
            state.latencies_s.append(time.monotonic() - started)
            if result.response_code is ResponseCode.APPROVED:
                summary.approved += 1
                summary.approved_amount_minor += amount
                key = txn.as_key()
                summary.approved_txn_ids.append(key)
                if result.receipt_number is None or state.receipts.setdefault(result.receipt_number, key) != key:
                    summary.inconsistencies += 1
                    state.notes.append(f"receipt {result.receipt_number} reused by {key}")
                if n % reversal_every == 0:
                    # The agent keyed it in error: reverse, and make sure a repeat says the same.
                    reversed_ = await terminal.reverse(txn, amount, currency)
                    if reversed_.response_code is ResponseCode.APPROVED:
                        summary.approved -= 1
                        summary.approved_amount_minor -= amount
                        summary.approved_txn_ids.remove(key)
                elif n % 7 == 0:
                    again = await terminal.top_up(meter, amount, currency, txn=txn)
                    if again != result:
                        summary.inconsistencies += 1
                        state.notes.append(f"retry of {key} answered differently")
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
    except (LinkLost, ConnectionError, TimeoutError):
        summary.errors += 1
    finally:
        summary.retries += terminal.retries
        await terminal.logoff()


async def run_simulation(*, host: str, port: int, terminals: list[tuple[str, bytes]], meters: list[str],
                         currency: str, duration_s: float, link: LinkModel, seed: int = 1,
                         reversal_every: int = 25) -> tuple[SimSummary, list[str]]:
    if not 0 < len(terminals) <= sim_terminals_max:
        raise ValueError(f"1..{sim_terminals_max} terminals")
    state = _State(summary=SimSummary(terminals=len(terminals), duration_s=duration_s))
    deadline = time.monotonic() + duration_s
    rng = random.Random(seed)
    tasks = []
    for index, (tid, key) in enumerate(terminals):
        terminal = PosTerminal(tid, key, host, port, link=link, rng=random.Random(seed * 100_003 + index),
                               last_sequence=rng.randrange(0, 500_000))
        tasks.append(_run_terminal(terminal, meters, currency, deadline, state, random.Random(index), reversal_every))
    await asyncio.gather(*tasks)
    summary = state.summary
    assert summary is not None
    if state.latencies_s:
        ordered = sorted(state.latencies_s)
        summary.latency_p50_ms = round(statistics.median(ordered) * 1000, 2)
        summary.latency_p99_ms = round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 2)
    return summary, state.notes
