"""Long haul: thousands of mostly idle terminals stay logged on and pay, for N minutes.

    python -m loadtests.soak --minutes N [--terminals 2000] [--pay-interval-s 60]

Like GPRS terminals in the field, each terminal holds its session open all the time, sends a
heartbeat when it has been quiet for the heartbeat interval the gateway gave at logon, and now
and then serves a customer (lookup, then top-up), on average every --pay-interval-s seconds. The
gateway runs as `vendgate serve` in its own process on a durable throw-away cluster, so its RSS
is its own: the memory of one idle session is (RSS with every terminal logged on - RSS before
any logon) / terminals (target <= 25 KB).

Reported per minute: top-up p50/p99, RSS and sessions open. Latency drift is the last minute's
p50 and p99 over the first minute's (the in-run reference; flat means <= 1.5). Sessions lost
(a connection the gateway cut or that broke) are counted; none is expected. At the end every
terminal logs off, the gateway stops and `ledger check` verifies everything paid. The last line
printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from collections import Counter
from typing import Any

from gateway.records_check import check_all
from gateway.seeding import DEMO_CURRENCY, derive_terminal_key, meter_number, terminal_id
from loadtests.aio_terminal import AioTerminal
from loadtests.bench_gateway import percentile_ms
from loadtests.deployment import LocalDeployment, run_in_deployment
from protocol.codes import ResponseCode
from protocol.errors import ProtocolError
from protocol.messages import (
    HeartbeatReply,
    HeartbeatRequest,
    LookupRequest,
    LookupResult,
    TenderType,
    TopUpRequest,
    TopUpResult,
)
from terminal_sim.client import LinkLost, TerminalRefused

terminals_default = 2_000
terminals_max = 10_000
minutes_max = 24 * 60
pay_interval_s_default = 60.0
heartbeat_interval_s_default = 60.0  # replaced by what the gateway says at logon
rss_per_session_target_bytes = 25 * 1024
drift_ratio_max = 1.5
agents = 100
meters = 1_000
float_each_minor = 10**11
logon_concurrency = 100
settle_s = 3.0
AMOUNTS_MINOR = (500, 1_000, 2_000, 5_000)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Soak:
    def __init__(self, deployment: LocalDeployment, args: argparse.Namespace) -> None:
        self.deployment = deployment
        self.args = args
        self.started = 0.0
        self.deadline = 0.0
        self.minute_latencies: dict[int, list[float]] = {}
        self.codes: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.sessions_lost = 0
        self.heartbeats = 0
        self.lookups = 0
        self.samples: list[dict[str, Any]] = []

    def minute(self) -> int:
        return int((time.monotonic() - self.started) // 60)

    async def terminal_loop(self, terminal: AioTerminal, heartbeat_s: float, rng: random.Random) -> None:
        meters_list = [meter_number(n) for n in range(1, meters + 1)]
        last_traffic = time.monotonic()
        next_payment = time.monotonic() + rng.expovariate(1 / self.args.pay_interval_s)
        while True:
            # Decided before sleeping: a timer may fire a hair early, which must not turn a
            # payment into a heartbeat.
            paying = next_payment <= last_traffic + heartbeat_s
            wake = min(next_payment if paying else last_traffic + heartbeat_s, self.deadline)
            now = time.monotonic()
            if wake > now:
                await asyncio.sleep(wake - now)
            if time.monotonic() >= self.deadline:
                return
            try:
                if not terminal.connected:
                    self.sessions_lost += 1
                    await terminal.logon()
                if paying:
                    await self.serve_customer(terminal, rng.choice(meters_list), rng)
                    next_payment = time.monotonic() + rng.expovariate(1 / self.args.pay_interval_s)
                else:
                    await terminal.request(HeartbeatRequest(), HeartbeatReply)
                    self.heartbeats += 1
            except (LinkLost, TerminalRefused, ProtocolError) as exc:
                self.errors[f"{type(exc).__name__}: {exc}"[:120]] += 1
            last_traffic = time.monotonic()

    async def serve_customer(self, terminal: AioTerminal, meter: str, rng: random.Random) -> None:
        await terminal.request(LookupRequest(meter_number=meter), LookupResult)
        self.lookups += 1
        started = time.perf_counter()
        request = TopUpRequest(client_transaction_id=terminal.next_transaction_id(), meter_number=meter,
                               amount_minor=rng.choice(AMOUNTS_MINOR), currency=DEMO_CURRENCY,
                               tender_type=TenderType.CASH)
        result = await terminal.request(request, TopUpResult)
        self.minute_latencies.setdefault(self.minute(), []).append(time.perf_counter() - started)
        self.codes[ResponseCode(result.response_code).name] += 1

    async def sampler(self) -> None:
        """Once a minute: RSS and sessions open, for the memory and session curves."""
        while time.monotonic() < self.deadline:
            await asyncio.sleep(min(60.0, max(0.0, self.deadline - time.monotonic())))
            self.samples.append(await asyncio.to_thread(self.sample))

    def sample(self) -> dict[str, Any]:
        sessions = None
        for line in (self.deployment.http_get("/metrics", quiet=True) or "").splitlines():
            if line.startswith('vendgate_sessions_open{channel="pos"}'):
                sessions = int(float(line.split()[-1]))
        return {"minute": round((time.monotonic() - self.started) / 60, 2),
                "rss_mb": round(self.deployment.gateway_rss_bytes() / 2**20, 2), "sessions_open": sessions}


async def soak(args: argparse.Namespace, deployment: LocalDeployment) -> dict[str, Any]:
    await deployment.start_database()
    log(f"seeding {agents} agents, {args.terminals} terminals, {meters} meters")
    population = await deployment.seed_population(agents=agents, terminals=args.terminals, meters=meters,
                                                  float_each_minor=float_each_minor)
    await asyncio.to_thread(deployment.start_gateway, log_level="warning")
    secret = deployment.seed_secret()
    terminals = []
    for n in range(population.first_terminal, population.first_terminal + population.terminals):
        tid = terminal_id(n)
        terminals.append(AioTerminal(tid, derive_terminal_key(secret, tid), "127.0.0.1", deployment.pos_port))

    # Warm the gateway's pools and caches with a few sessions, then measure the idle baseline.
    warm = terminals[:10]
    for terminal in warm:
        await terminal.logon()
        await Soak(deployment, args).serve_customer(terminal, meter_number(1), random.Random(0))
        await terminal.logoff()
    await asyncio.sleep(settle_s)
    rss_before = deployment.gateway_rss_bytes()

    gate = asyncio.Semaphore(logon_concurrency)
    heartbeat_s: dict[str, float] = {}

    async def logon(terminal: AioTerminal) -> None:
        async with gate:
            accepted = await terminal.logon()
            heartbeat_s[terminal.terminal_id] = float(accepted.heartbeat_interval_s)

    started = time.perf_counter()
    await asyncio.gather(*(logon(t) for t in terminals))
    logon_s = time.perf_counter() - started
    await asyncio.sleep(settle_s)
    rss_logged_on = deployment.gateway_rss_bytes()
    rss_per_session = (rss_logged_on - rss_before) / len(terminals)
    log(f"{len(terminals)} terminals logged on in {logon_s:.1f} s; gateway RSS {rss_before / 2**20:.1f} MB -> "
        f"{rss_logged_on / 2**20:.1f} MB: {rss_per_session / 1024:.1f} KB per idle session")

    runner = Soak(deployment, args)
    runner.started = time.monotonic()
    runner.deadline = runner.started + args.minutes * 60
    tasks = [runner.terminal_loop(t, heartbeat_s.get(t.terminal_id, heartbeat_interval_s_default),
                                  random.Random(index)) for index, t in enumerate(terminals)]
    await asyncio.gather(runner.sampler(), *tasks)
    rss_end = deployment.gateway_rss_bytes()
    await asyncio.gather(*(t.logoff() for t in terminals))
    gateway_exit = await asyncio.to_thread(deployment.stop_gateway)
    conn = await deployment.connect()
    try:
        report = await check_all(conn)
    finally:
        await conn.close()

    per_minute = []
    for minute in sorted(runner.minute_latencies):
        ordered = sorted(runner.minute_latencies[minute])
        per_minute.append({"minute": minute, "top_ups": len(ordered), "p50_ms": percentile_ms(ordered, 0.5),
                           "p99_ms": percentile_ms(ordered, 0.99)})
    full = [m for m in per_minute if m["minute"] < args.minutes] or per_minute
    first: dict[str, Any] = full[0] if full else {}
    last: dict[str, Any] = full[-1] if full else {}

    def drift(key: str) -> float | None:
        before, after = first.get(key), last.get(key)
        if not isinstance(before, float) or not isinstance(after, float) or before <= 0:
            return None
        return round(after / before, 2)

    drift_p50, drift_p99 = drift("p50_ms"), drift("p99_ms")
    every = sorted(x for values in runner.minute_latencies.values() for x in values)
    return {
        "benchmark": "soak",
        "minutes": args.minutes,
        "terminals": args.terminals,
        "rss_per_idle_session_kb": round(rss_per_session / 1024, 1),
        "rss_per_idle_session_target_kb": rss_per_session_target_bytes / 1024,
        "rss_target_met": rss_per_session <= rss_per_session_target_bytes,
        "gateway_rss_mb": {"before_logon": round(rss_before / 2**20, 1),
                           "all_logged_on": round(rss_logged_on / 2**20, 1), "end": round(rss_end / 2**20, 1)},
        "reference": "first minute of the run (latency); RSS before any logon (memory)",
        "latency_drift": {"p50_last_over_first": drift_p50, "p99_last_over_first": drift_p99,
                          "flat": drift_p50 is not None and drift_p99 is not None
                          and max(drift_p50, drift_p99) <= drift_ratio_max, "ratio_max": drift_ratio_max},
        "top_up_latency_ms": {"p50": percentile_ms(every, 0.5), "p99": percentile_ms(every, 0.99),
                              "max": percentile_ms(every, 1.0)},
        "per_minute": per_minute,
        "samples": runner.samples,
        "top_ups": dict(runner.codes), "lookups": runner.lookups, "heartbeats": runner.heartbeats,
        "errors": sum(runner.errors.values()), "error_reasons": dict(runner.errors.most_common(5)),
        "sessions_lost": runner.sessions_lost,
        "logon_s": round(logon_s, 1),
        "gateway_exit_code": gateway_exit,
        "ledger_check": {"holds": report.holds, "broken": report.broken, "transfers": report.transfers},
        "settings": {"pay_interval_s": args.pay_interval_s, "agents": agents, "meters": meters,
                     "gateway_log_level": "warning", "cpus": os.cpu_count()},
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtests.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, required=True, help="how long the terminals stay on")
    parser.add_argument("--terminals", type=int, default=terminals_default)
    parser.add_argument("--pay-interval-s", type=float, default=pay_interval_s_default,
                        help="mean seconds between two customers at one terminal")
    parser.add_argument("--keep", action="store_true", help="keep the data folder (printed) after the run")
    args = parser.parse_args(argv)
    if not 0 < args.minutes <= minutes_max:
        parser.error(f"--minutes must be in (0, {minutes_max}]")
    if not 1 <= args.terminals <= terminals_max:
        parser.error(f"--terminals must be 1..{terminals_max}")
    if args.pay_interval_s <= 0:
        parser.error("--pay-interval-s must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    summary = run_in_deployment("vendgate-soak-", lambda deployment: soak(args, deployment), keep=args.keep)
    print(json.dumps(summary), flush=True)
    ok = summary["ledger_check"]["holds"] and summary["errors"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
