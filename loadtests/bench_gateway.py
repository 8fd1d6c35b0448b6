"""Benchmark of the whole gateway: simulated terminals -> `vendgate serve` -> PostgreSQL, against pgbench.

    python -m loadtests.bench_gateway [--duration-s 15] [--agents 1000] [--hot-terminals 500]
                                      [--pgbench-clients 16] [--pgbench-scale 20] [--load-fraction 0.7]

Everything runs on this machine, in one throw-away durable PostgreSQL cluster (fsync,
synchronous_commit and full_page_writes on), in one database:

1. pgbench's built-in tpcb-like script (scale --pgbench-scale) and a single-hot-row script (every
   transaction updates one row, like one agent's float), --pgbench-clients clients each: the
   in-run references.
2. `vendgate serve` as its own process, and simulated POS terminals over TCP (protocol v1, MACed
   frames) in this process, for two populations: 1,000 agents with one terminal each, then one
   hot agent with 500 terminals whose every payment debits the same float. For each:
   - maximum rate: every terminal pays back to back (offered load above what the gateway can
     take) for --duration-s; top-ups/s = approved top-ups per second of wall time;
   - open loop at --load-fraction of that rate: payments arrive as a Poisson process whatever
     the gateway does, each taken by an idle terminal; latency runs from the arrival's scheduled
     time to its reply, so queueing counts (no coordinated omission); p50/p99 reported.
   The gateway's mean commit batch size in each phase comes from its /metrics.

Targets: top-ups/s >= 1.5 x tpcb-like TPS (1,000 agents), >= 3 x hot-row TPS (hot agent), and p99
<= 15 ms at 70 % of the maximum rate. `ledger check` runs over everything paid at the end. The
last line printed is one JSON object with every figure, ratio and target.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from gateway.pgcluster import binaries_dir
from gateway.records_check import check_all
from gateway.seeding import DEMO_CURRENCY, derive_terminal_key, meter_number, terminal_id
from loadtests.aio_terminal import AioTerminal
from loadtests.deployment import (
    LocalDeployment,
    Population,
    bucket_quantile_ms,
    histogram_buckets,
    machine_busy_seconds,
    metric_sums,
    process_cpu_seconds,
    run_in_deployment,
)
from protocol.codes import ResponseCode
from protocol.errors import ProtocolError
from protocol.messages import TenderType, TopUpRequest, TopUpResult
from terminal_sim.client import LinkLost, TerminalRefused

spread_target_ratio = 1.5
hot_target_ratio = 3.0
p99_target_ms = 15.0
load_fraction_default = 0.7
duration_s_default = 15.0
warmup_s = 2.0
agents_default = 1_000
hot_terminals_default = 500
pgbench_clients_default = 16
pgbench_scale_default = 20
spread_float_each_minor = 10**11
hot_float_minor = 10**12  # amount_minor_max: a larger float cannot be stated in a reply
amount_minor = 1_000
logon_concurrency = 50
phase_timeout_s_extra = 60.0
arrival_tick_s = 0.001  # the open loop's shortest sleep (see offer_arrivals)
pgbench_timeout_s_extra = 120.0
duration_s_max = 600.0
HOT_ROW_SCRIPT = "UPDATE bench_hot_row SET balance_minor = balance_minor + 1 WHERE id = 1;\n"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def percentile_ms(sorted_seconds: list[float], fraction: float) -> float | None:
    """The nearest-rank percentile of sorted latencies in seconds, in milliseconds."""
    if not sorted_seconds:
        return None
    # Nearest rank: the ceil(fraction * n)-th value (the p99 of 100 values is the 99th, not the largest).
    rank = min(len(sorted_seconds) - 1, max(0, math.ceil(fraction * len(sorted_seconds) - 1e-9) - 1))
    return round(sorted_seconds[rank] * 1000, 2)


@dataclass(slots=True)
class PhaseResult:
    phase: str
    offered_per_s: float | None  # None: closed loop, every terminal back to back
    top_ups_per_s: float
    approved: int
    declined: int
    errors: int
    elapsed_s: float
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    # Inside the gateway, from a decoded request to its reply written (its own histogram): the
    # upper bound of the bucket holding the quantile. Above, the terminals' view.
    gateway_p50_ms: float | None
    gateway_p99_ms: float | None
    mean_batch_size: float | None
    batches: int
    mean_batch_ms: float | None  # one batch's transaction, from its first statement to COMMIT
    committer_busy_share: float  # seconds spent committing per second of the phase (1.0: never idle)
    cpu_us_per_top_up: dict[str, float | None]  # CPU time per approved top-up: gateway, terminals, the rest
    machine_cpu_busy_share: float  # all cores: 1.0 means the machine had no idle CPU left


def latency(phase: PhaseResult) -> dict[str, float | None]:
    """The terminals' p50/p99, and the gateway's own (bucket upper bounds)."""
    return {"p50": phase.p50_ms, "p99": phase.p99_ms, "in_gateway_p50_at_most": phase.gateway_p50_ms,
            "in_gateway_p99_at_most": phase.gateway_p99_ms}


def per_top_up_us(cpu_s: float, top_ups: int) -> float | None:
    return round(cpu_s / top_ups * 1e6, 1) if top_ups else None


class Tally:
    def __init__(self) -> None:
        self.latencies_s: list[float] = []
        self.codes: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()

    def record(self, code: ResponseCode | None, latency_s: float, error: str | None = None) -> None:
        if error is not None:
            self.errors[error] += 1
            return
        assert code is not None
        self.codes[code.name] += 1
        self.latencies_s.append(latency_s)


async def pay(terminal: AioTerminal, meters: list[str], rng: random.Random, tally: Tally, started: float) -> None:
    """One top-up; latency from `started` (the scheduled arrival in the open loop)."""
    try:
        if not terminal.connected:
            await terminal.logon()
        request = TopUpRequest(client_transaction_id=terminal.next_transaction_id(), meter_number=rng.choice(meters),
                               amount_minor=amount_minor, currency=DEMO_CURRENCY, tender_type=TenderType.CASH)
        result = await terminal.request(request, TopUpResult)
    except TerminalRefused as refused:
        tally.record(None, 0.0, f"refused {refused.response_code.name}")
        return
    except LinkLost as lost:
        tally.record(None, 0.0, f"link lost: {lost}")
        return
    except ProtocolError as error:
        tally.record(None, 0.0, f"protocol error {type(error).__name__}")
        return
    tally.record(result.response_code, time.perf_counter() - started)


async def closed_loop(terminals: list[AioTerminal], meters: list[str], duration_s: float, seed: int) -> Tally:
    tally = Tally()
    deadline = time.perf_counter() + duration_s

    async def run(terminal: AioTerminal, rng: random.Random) -> None:
        while time.perf_counter() < deadline:
            await pay(terminal, meters, rng, tally, time.perf_counter())

    await asyncio.wait_for(asyncio.gather(*(run(t, random.Random(seed + i)) for i, t in enumerate(terminals))),
                           duration_s + phase_timeout_s_extra)
    return tally


async def offer_arrivals(queue: asyncio.Queue[float | None], rate_per_s: float, duration_s: float,
                         rng: random.Random) -> int:
    """Put the scheduled time of each Poisson arrival in `queue` once it is due, for duration_s;
    returns how many times the generator woke.

    An arrival goes in at its scheduled time or a little after (latency counts from the scheduled
    time, so the delay is the gateway's to bear), never before. The generator sleeps at least
    arrival_tick_s at a time: uvloop's timers count whole milliseconds, so a shorter sleep returns
    at once, and sleeping out the gaps between arrivals (a third of a millisecond at 3,000 a
    second) would spin, taking the CPU of the machine the gateway runs on."""
    wakeups = 0
    start = time.perf_counter()
    end = start + duration_s
    next_arrival = start + rng.expovariate(rate_per_s)
    while next_arrival < end:
        now = time.perf_counter()
        if next_arrival > now:
            await asyncio.sleep(max(next_arrival - now, arrival_tick_s))
            wakeups += 1
        # Every arrival that is due goes in now, at its scheduled time, however late the loop woke.
        now = time.perf_counter()
        while next_arrival <= now and next_arrival < end:
            queue.put_nowait(next_arrival)
            next_arrival += rng.expovariate(rate_per_s)
    return wakeups


async def open_loop(terminals: list[AioTerminal], meters: list[str], rate_per_s: float, duration_s: float,
                    seed: int) -> Tally:
    """Poisson arrivals at rate_per_s for duration_s, each served by the next idle terminal."""
    tally = Tally()
    rng = random.Random(seed)
    arrivals_max = int(rate_per_s * duration_s * 2) + len(terminals) + 64
    queue: asyncio.Queue[float | None] = asyncio.Queue(maxsize=arrivals_max)

    async def serve(terminal: AioTerminal, worker_rng: random.Random) -> None:
        while (scheduled := await queue.get()) is not None:
            await pay(terminal, meters, worker_rng, tally, scheduled)

    workers = [asyncio.create_task(serve(t, random.Random(seed + 1 + i))) for i, t in enumerate(terminals)]
    await offer_arrivals(queue, rate_per_s, duration_s, rng)
    for _ in workers:
        queue.put_nowait(None)
    await asyncio.wait_for(asyncio.gather(*workers), phase_timeout_s_extra)
    return tally


class Bench:
    def __init__(self, deployment: LocalDeployment, args: argparse.Namespace) -> None:
        self.deployment = deployment
        self.args = args

    def batch_counters(self) -> tuple[tuple[float, float, float], dict[float, float]]:
        """(requests in batches, batches, seconds spent committing batches) so far, and the
        gateway's own top-up latency histogram, from /metrics."""
        text = self.deployment.http_get("/metrics") or ""
        size_sum, count = metric_sums(text, "vendgate_commit_batch_size")
        seconds_sum, _ = metric_sums(text, "vendgate_commit_batch_duration_seconds")
        latency = histogram_buckets(text, "vendgate_request_duration_seconds", message_type="TopUpRequest")
        return (size_sum, count, seconds_sum), latency

    async def phase(self, name: str, terminals: list[AioTerminal], meters: list[str],
                    rate_per_s: float | None) -> PhaseResult:
        duration_s = self.args.duration_s
        batches_before, latency_before = await asyncio.to_thread(self.batch_counters)
        assert self.deployment.process is not None
        gateway_pid = self.deployment.process.pid
        cpu_before = (process_cpu_seconds(gateway_pid), time.process_time(), machine_busy_seconds())
        started = time.perf_counter()
        if rate_per_s is None:
            tally = await closed_loop(terminals, meters, duration_s, seed=len(name))
        else:
            tally = await open_loop(terminals, meters, rate_per_s, duration_s, seed=len(name))
        elapsed_s = time.perf_counter() - started
        gateway_cpu_s, client_cpu_s, machine_cpu_s = (after - before for after, before in zip(
            (process_cpu_seconds(gateway_pid), time.process_time(), machine_busy_seconds()), cpu_before, strict=True))
        batches_after, latency_after = await asyncio.to_thread(self.batch_counters)
        batch_sum, batch_count, batch_seconds = (after - before for after, before in zip(batches_after,
                                                                                      batches_before, strict=True))
        latencies = sorted(tally.latencies_s)
        approved = tally.codes.get(ResponseCode.APPROVED.name, 0)
        result = PhaseResult(
            phase=name, offered_per_s=None if rate_per_s is None else round(rate_per_s, 1),
            top_ups_per_s=round(approved / elapsed_s, 1), approved=approved,
            declined=sum(tally.codes.values()) - approved, errors=sum(tally.errors.values()),
            elapsed_s=round(elapsed_s, 2), p50_ms=percentile_ms(latencies, 0.50),
            p99_ms=percentile_ms(latencies, 0.99), max_ms=percentile_ms(latencies, 1.0),
            gateway_p50_ms=bucket_quantile_ms(latency_before, latency_after, 0.50),
            gateway_p99_ms=bucket_quantile_ms(latency_before, latency_after, 0.99),
            mean_batch_size=round(batch_sum / batch_count, 2) if batch_count else None, batches=int(batch_count),
            mean_batch_ms=round(batch_seconds / batch_count * 1000, 2) if batch_count else None,
            committer_busy_share=round(batch_seconds / elapsed_s, 2),
            cpu_us_per_top_up={"gateway": per_top_up_us(gateway_cpu_s, approved),
                               "terminals": per_top_up_us(client_cpu_s, approved),
                               "postgresql_and_rest": per_top_up_us(machine_cpu_s - gateway_cpu_s - client_cpu_s,
                                                                    approved)},
            machine_cpu_busy_share=round(machine_cpu_s / (elapsed_s * (os.cpu_count() or 1)), 2))
        for reason, count in tally.errors.most_common(3):
            log(f"  {name}: {count} x {reason}")
        log(f"{name}: {result.top_ups_per_s} top-ups/s (offered {result.offered_per_s}), p50 {result.p50_ms} ms, "
            f"p99 {result.p99_ms} ms (in the gateway <= {result.gateway_p50_ms}/{result.gateway_p99_ms} ms), "
            f"mean batch {result.mean_batch_size} in {result.mean_batch_ms} ms "
            f"(committer busy {result.committer_busy_share}), CPU/top-up {result.cpu_us_per_top_up} us, machine CPU "
            f"busy {result.machine_cpu_busy_share}, declined {result.declined}, "
            f"errors {result.errors}")
        return result

    async def population(self, name: str, population: Population) -> list[PhaseResult]:
        secret = self.deployment.seed_secret()
        terminals = []
        for n in range(population.first_terminal, population.first_terminal + population.terminals):
            tid = terminal_id(n)
            terminals.append(AioTerminal(tid, derive_terminal_key(secret, tid), "127.0.0.1",
                                         self.deployment.pos_port))
        meters = [meter_number(n) for n in range(population.first_meter, population.first_meter + population.meters)]
        gate = asyncio.Semaphore(logon_concurrency)

        async def logon(terminal: AioTerminal) -> None:
            async with gate:
                await terminal.logon()

        started = time.perf_counter()
        await asyncio.gather(*(logon(t) for t in terminals))
        log(f"{name}: {len(terminals)} terminals logged on in {time.perf_counter() - started:.1f} s")
        try:
            await closed_loop(terminals, meters, warmup_s, seed=99)
            maximum = await self.phase(f"{name}_max", terminals, meters, None)
            at_fraction = await self.phase(f"{name}_{round(self.args.load_fraction * 100)}pct", terminals, meters,
                                           maximum.top_ups_per_s * self.args.load_fraction)
        finally:
            await asyncio.gather(*(t.logoff() for t in terminals))
        return [maximum, at_fraction]


# -- pgbench ----------------------------------------------------------------------------------------


def pgbench(url: str, args: list[str], timeout_s: float) -> str:
    parts = urlsplit(url)
    env = {**os.environ, "PGPASSWORD": unquote(parts.password or ""), "PGHOST": parts.hostname or "127.0.0.1",
           "PGPORT": str(parts.port), "PGUSER": unquote(parts.username or ""), "PGDATABASE": parts.path.lstrip("/")}
    result = subprocess.run([str(binaries_dir() / "pgbench"), *args], capture_output=True, text=True, env=env,
                            timeout=timeout_s, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"pgbench {' '.join(args)} failed: {result.stderr.strip()[-500:]}")
    return result.stdout + result.stderr


def pgbench_tps(url: str, clients: int, duration_s: float, extra: list[str]) -> float:
    output = pgbench(url, ["-n", "-M", "prepared", "-c", str(clients), "-j", str(min(clients, os.cpu_count() or 1)),
                           "-T", str(max(1, round(duration_s))), *extra],
                     timeout_s=duration_s + pgbench_timeout_s_extra)
    match = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", output)
    if match is None:
        raise RuntimeError(f"no tps in pgbench output: {output[-500:]}")
    return float(match.group(1))


# -- main -------------------------------------------------------------------------------------------


async def bench(args: argparse.Namespace, deployment: LocalDeployment) -> dict[str, Any]:
    url = await deployment.start_database()
    log(f"seeding {args.agents} agents with one terminal each, and 1 hot agent with {args.hot_terminals} terminals")
    spread = await deployment.seed_population(agents=args.agents, terminals=args.agents, meters=args.agents,
                                              float_each_minor=spread_float_each_minor)
    hot = await deployment.seed_population(agents=1, terminals=args.hot_terminals, meters=args.hot_terminals,
                                           float_each_minor=hot_float_minor)
    conn = await deployment.connect()
    try:
        await conn.execute("CREATE TABLE bench_hot_row (id integer PRIMARY KEY, balance_minor bigint NOT NULL)")
        await conn.execute("INSERT INTO bench_hot_row VALUES (1, 0)")
        durability = {name: await conn.fetchval(f"SHOW {name}")
                      for name in ("fsync", "synchronous_commit", "full_page_writes")}
        postgres = await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()
    log(f"pgbench: initialising tpcb-like tables at scale {args.pgbench_scale}")
    await asyncio.to_thread(pgbench, url, ["-i", "-q", "-s", str(args.pgbench_scale)], 600)
    conn = await deployment.connect()
    try:
        await conn.execute("VACUUM ANALYZE")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()
    references: dict[str, float] = {}
    log("pgbench: tpcb-like")
    references["tpcb_like_tps"] = await asyncio.to_thread(pgbench_tps, url, args.pgbench_clients, args.duration_s, [])
    log(f"  {references['tpcb_like_tps']:.0f} tps")
    script = deployment.data_dir / "hot_row.sql"
    script.write_text(HOT_ROW_SCRIPT)
    log("pgbench: single hot row")
    references["hot_row_tps"] = await asyncio.to_thread(pgbench_tps, url, args.pgbench_clients, args.duration_s,
                                                        ["-f", str(script)])
    log(f"  {references['hot_row_tps']:.0f} tps")

    await asyncio.to_thread(deployment.start_gateway, log_level="warning")
    runner = Bench(deployment, args)
    rss_start = deployment.gateway_rss_bytes()
    phases = [*await runner.population("spread_agents", spread), *await runner.population("hot_agent", hot)]
    rss_end = deployment.gateway_rss_bytes()
    gateway_exit = await asyncio.to_thread(deployment.stop_gateway)

    log("ledger check over everything paid")
    conn = await deployment.connect()
    try:
        started = time.perf_counter()
        report = await check_all(conn)
        check = {"holds": report.holds, "broken": report.broken, "transfers": report.transfers,
                 "seconds": round(time.perf_counter() - started, 1)}
    finally:
        await conn.close()

    by_name = {p.phase: p for p in phases}
    fraction_tag = f"{round(args.load_fraction * 100)}pct"
    spread_max, hot_max = by_name["spread_agents_max"], by_name["hot_agent_max"]
    spread_at, hot_at = by_name[f"spread_agents_{fraction_tag}"], by_name[f"hot_agent_{fraction_tag}"]
    ratios = {
        "spread_agents_vs_tpcb_like": round(spread_max.top_ups_per_s / references["tpcb_like_tps"], 2),
        "hot_agent_vs_hot_row": round(hot_max.top_ups_per_s / references["hot_row_tps"], 2),
    }
    targets: dict[str, dict[str, Any]] = {
        "spread_agents_vs_tpcb_like": {"ratio": ratios["spread_agents_vs_tpcb_like"], "target": spread_target_ratio},
        "hot_agent_vs_hot_row": {"ratio": ratios["hot_agent_vs_hot_row"], "target": hot_target_ratio},
        f"spread_agents_p99_ms_at_{fraction_tag}": {"value": spread_at.p99_ms, "target": p99_target_ms},
        f"hot_agent_p99_ms_at_{fraction_tag}": {"value": hot_at.p99_ms, "target": p99_target_ms},
    }
    for target in targets.values():
        if "ratio" in target:
            target["met"] = target["ratio"] >= target["target"]
        else:
            target["met"] = target["value"] is not None and target["value"] <= target["target"]
    return {
        "benchmark": "bench_gateway",
        "top_ups_per_s": {"spread_agents": spread_max.top_ups_per_s, "hot_agent": hot_max.top_ups_per_s},
        "latency_ms": {
            f"spread_agents_at_{fraction_tag}": {**latency(spread_at), "offered_per_s": spread_at.offered_per_s},
            f"hot_agent_at_{fraction_tag}": {**latency(hot_at), "offered_per_s": hot_at.offered_per_s},
            "spread_agents_at_max": latency(spread_max),
            "hot_agent_at_max": latency(hot_max),
        },
        "mean_batch_size": {p.phase: p.mean_batch_size for p in phases},
        "pgbench": references,
        "reference": f"pgbench tpcb-like and single-hot-row, {args.pgbench_clients} clients, same database",
        "ratios": ratios,
        "targets": targets,
        "phases": [asdict(p) for p in phases],
        "gateway_rss_mb": {"start": round(rss_start / 2**20, 1), "end": round(rss_end / 2**20, 1)},
        "gateway_exit_code": gateway_exit,
        "ledger_check": check,
        "settings": {"duration_s": args.duration_s, "agents": args.agents, "hot_terminals": args.hot_terminals,
                     "load_fraction": args.load_fraction, "pgbench_clients": args.pgbench_clients,
                     "pgbench_scale": args.pgbench_scale, "amount_minor": amount_minor, "postgres": postgres,
                     **durability, "gateway_log_level": "warning", "cpus": os.cpu_count(),
                     "python": platform.python_version()},
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench_gateway", description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=duration_s_default, help="seconds per phase")
    parser.add_argument("--agents", type=int, default=agents_default, help="agents, one terminal each")
    parser.add_argument("--hot-terminals", type=int, default=hot_terminals_default)
    parser.add_argument("--pgbench-clients", type=int, default=pgbench_clients_default)
    parser.add_argument("--pgbench-scale", type=int, default=pgbench_scale_default)
    parser.add_argument("--load-fraction", type=float, default=load_fraction_default,
                        help="open-loop rate as a fraction of the maximum")
    parser.add_argument("--keep", action="store_true", help="keep the data folder (printed) after the run")
    args = parser.parse_args(argv)
    if not 1 <= args.duration_s <= duration_s_max:
        parser.error(f"--duration-s must be 1..{duration_s_max:.0f}")
    if not 0 < args.load_fraction <= 1:
        parser.error("--load-fraction must be in (0, 1]")
    if not (1 <= args.agents <= 10_000 and 1 <= args.hot_terminals <= 5_000):
        parser.error("--agents 1..10000 and --hot-terminals 1..5000")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    summary = run_in_deployment("vendgate-bench-gateway-", lambda deployment: bench(args, deployment), keep=args.keep)
    print(json.dumps(summary), flush=True)
    # Figures of a run whose gateway failed, or whose ledger no longer holds, are no result.
    return 0 if summary["ledger_check"]["holds"] and summary["gateway_exit_code"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
