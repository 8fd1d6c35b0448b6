"""Benchmark of the float ledger's batched posting against pgbench, on one durable cluster.

    python -m loadtests.bench_ledger [--duration-s 8] [--connections 1,2,4,16] [--rounds 2]
                                     [--agents 1000] [--batch-sizes 1,16,128] [--pgbench-scale 20]

A throw-away PostgreSQL cluster with durable settings (fsync, synchronous_commit and
full_page_writes on: PostgreSQL's defaults) is created in a temporary folder and destroyed at the
end. In one database it runs:

- the ledger: linked top-up groups of 4 transfers (float -> customer credit, credit -> debt,
  credit -> collections, commission expense -> agent's payable), posted with post_transfers()
  by `connections` concurrent connections, `batch` groups per call (one transaction, one round
  trip), for 1,000 agents (each with its own float, collections, commission accounts and 2
  customers; a group picks a random agent) and for 1 hot agent (every group debits the same
  float, collections and commission accounts; 1,000 customers);
- pgbench's built-in tpcb-like script (scale --pgbench-scale) and a single-hot-row script
  (every transaction updates the same row, like one agent's float).

Every case and both pgbench scripts run once per connection count (--connections), in each of
--rounds rounds; each figure compared is the best over counts and rounds, for pgbench as for the
ledger (on a shared machine the best run is the one least disturbed by other work). Two batches that share an
account run one after the other (their locks are held to commit), so large batches gain nothing
from many connections, while pgbench's single-row transactions do.

groups/s counts groups posted ok per second of wall time. Targets: batched groups/s >= 1.5 x the
tpcb-like TPS for spread agents, >= 3 x the hot-row TPS for one hot agent.

A last case measures the floor of any ledger that stores each transfer as a row: the hot agent's
groups written with no ledger at all, one transaction per batch that INSERTs the transfer rows
into a copy of ledger_transfers (same columns, checks and indexes: primary key, the two account
indexes and the group index that statement, reconciliation and reversal read), then UPDATEs the
touched balances: no checks, hashes or results, and the hot rows locked last. Its ratio to the
hot-row TPS bounds what the hot target can reach on this machine. After the runs
`ledger check` verifies every invariant over what was posted. The last line printed is one JSON
object with every figure.
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
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import asyncpg

from float_ledger.check import check_ledger
from float_ledger.ledger import create_account, post_transfers
from float_ledger.model import AccountKind, TopUpAccounts, Transfer, TransferKind, commission_minor
from gateway.database import with_database
from gateway.migrate import migrate
from gateway.pgcluster import LocalCluster, binaries_dir

CURRENCY = "KES"
DATABASE = "bench_ledger"
spread_target_ratio = 1.5
hot_target_ratio = 3.0
duration_s_default = 8.0
warmup_s = 1.0
connections_default = [1, 2, 4, 16]
agents_default = 1_000
customers_per_agent = 2
hot_customers = 1_000
pgbench_scale_default = 20
rounds_default = 2
float_funding_minor = 10**15
commission_rate_ppm = 15_000
pgbench_timeout_s_extra = 120
bare_templates = 64

HOT_ROW_SCRIPT = "UPDATE bench_hot_row SET balance_minor = balance_minor + 1 WHERE id = 1;\n"


@dataclass(frozen=True, slots=True)
class Agent:
    owner_ref: str
    routes: list[TopUpAccounts]


@dataclass(slots=True)
class CaseResult:
    case: str
    batch_groups: int
    connections: int
    groups_per_s: float
    transfers_per_s: float
    calls: int
    groups_ok: int
    groups_refused: int
    elapsed_s: float
    call_p50_ms: float
    call_p99_ms: float
    client_cpu_share: float  # this process's CPU seconds per wall second
    round: int = 1


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- accounts ---------------------------------------------------------------------------------------


async def make_agent(conn: Any, source: int, owner_ref: str, customers: int) -> Agent:
    async def new(kind: AccountKind, bound: int | None, owner: str = owner_ref) -> int:
        return await create_account(conn, kind=kind, currency=CURRENCY, owner_ref=owner, lower_bound_minor=bound)

    float_id = await new(AccountKind.agent_float, 0)
    collections = await new(AccountKind.utility_collections, None)
    expense = await new(AccountKind.commission_expense, None)
    payable = await new(AccountKind.commission_payable, 0)
    routes = []
    for index in range(customers):
        meter = f"{owner_ref}-M{index}"
        routes.append(TopUpAccounts(
            float_account_id=float_id, customer_credit_account_id=await new(AccountKind.customer_credit, 0, meter),
            customer_debt_account_id=await new(AccountKind.customer_debt, None, meter),
            collections_account_id=collections, commission_expense_account_id=expense,
            commission_payable_account_id=payable))
    [funded] = await post_transfers(conn, [Transfer(
        id=uuid.uuid4(), debit_account_id=source, credit_account_id=float_id, amount_minor=float_funding_minor,
        currency=CURRENCY, kind="deposit", metadata={"agent_id": owner_ref})])
    assert funded.status.posted
    return Agent(owner_ref, routes)


async def make_agents(pool: Any, source: int, count: int, customers: int, prefix: str) -> list[Agent]:
    queue = list(range(count))
    agents: list[Agent] = []

    async def work() -> None:
        async with pool.acquire() as conn:
            while queue:
                index = queue.pop()
                agents.append(await make_agent(conn, source, f"{prefix}{index:05d}", customers))

    await asyncio.gather(*(work() for _ in range(8)))
    return agents


# -- the ledger workload ----------------------------------------------------------------------------


def _random_id() -> uuid.UUID:
    # The load generator's ids need to be unique, not secret: cheaper than uuid4's system call.
    return uuid.UUID(int=random.getrandbits(128), version=4)


def build_batch(agents: list[Agent], batch_groups: int) -> list[Transfer]:
    """`batch_groups` top-up groups of 4 transfers, the shape of model.top_up_transfers()."""
    transfers: list[Transfer] = []
    for _ in range(batch_groups):
        agent = random.choice(agents)
        route = random.choice(agent.routes)
        amount = random.randint(100, 10_000)
        debt = amount // 4
        group = _random_id()
        metadata: dict[str, str | int] = {"agent_id": agent.owner_ref,
                                          "terminal_id": f"{agent.owner_ref}-T{random.randint(0, 3)}"}
        for kind, debit, credit, leg_minor in (
            (TransferKind.collection, route.float_account_id, route.customer_credit_account_id, amount),
            (TransferKind.debt_recovery, route.customer_credit_account_id, route.customer_debt_account_id, debt),
            (TransferKind.energy_sale, route.customer_credit_account_id, route.collections_account_id, amount - debt),
            (TransferKind.commission, route.commission_expense_account_id, route.commission_payable_account_id,
             commission_minor(amount, commission_rate_ppm)),
        ):
            transfers.append(Transfer(id=_random_id(), debit_account_id=debit, credit_account_id=credit,
                                      amount_minor=leg_minor, currency=CURRENCY, kind=kind, group_id=group,
                                      metadata=metadata))
    return transfers


async def run_case(pool: Any, name: str, agents: list[Agent], batch_groups: int, connections: int,
                   duration_s: float) -> CaseResult:
    latencies_s: list[float] = []
    counts = {"ok": 0, "refused": 0}

    async def worker(conn: Any, deadline: float, record: bool) -> None:
        while time.perf_counter() < deadline:
            transfers = build_batch(agents, batch_groups)
            started = time.perf_counter()
            results = await post_transfers(conn, transfers)
            if not record:
                continue
            latencies_s.append(time.perf_counter() - started)
            ok = sum(1 for r in results if r.status.posted)
            assert ok % 4 == 0 and len(results) == 4 * batch_groups
            counts["ok"] += ok // 4
            counts["refused"] += batch_groups - ok // 4

    elapsed_s, cpu_s = await drive(pool, worker, connections, duration_s)
    return case_result(name, batch_groups, connections, counts["ok"], counts["refused"], latencies_s, elapsed_s, cpu_s)


# Rows first, balances last: the hot rows are locked only for the UPDATE and the commit, so
# batches on other connections write their rows meanwhile (the most generous order for a floor).
BARE_ROWS_SQL = """
INSERT INTO bench_bare_transfers (id, seq, debit_account_id, credit_account_id, amount_minor, currency, kind,
                                  group_id, metadata, debit_balance_after_minor, credit_balance_after_minor,
                                  created_at, hash)
SELECT u.id, nextval('bench_bare_seq'), u.debit, u.credit, u.amount, u.currency, u.kind, u.group_id, u.metadata,
       0, 0, clock_timestamp(), '\\x00'::bytea
  FROM unnest($1::uuid[], $2::bigint[], $3::bigint[], $4::bigint[], $5::text[], $6::text[], $7::uuid[],
              $8::jsonb[]) AS u(id, debit, credit, amount, currency, kind, group_id, metadata)
"""
BARE_BALANCES_SQL = """
UPDATE bench_bare_balances b SET balance_minor = b.balance_minor + d.delta
  FROM unnest($1::bigint[], $2::bigint[]) AS d(id, delta)
 WHERE b.id = d.id
"""


async def prepare_bare_writes(conn: Any) -> None:
    await conn.execute("CREATE TABLE bench_bare_transfers"
                       " (LIKE ledger_transfers INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES)")
    await conn.execute("CREATE SEQUENCE bench_bare_seq AS bigint")
    await conn.execute("CREATE TABLE bench_bare_balances (id bigint PRIMARY KEY, balance_minor bigint NOT NULL)")
    await conn.execute("INSERT INTO bench_bare_balances SELECT id, balance_minor FROM ledger_accounts")


def bare_write_args(transfers: list[Transfer]) -> list[Any]:
    deltas: dict[int, int] = {}
    for t in transfers:
        deltas[t.debit_account_id] = deltas.get(t.debit_account_id, 0) - t.amount_minor
        deltas[t.credit_account_id] = deltas.get(t.credit_account_id, 0) + t.amount_minor
    accounts = sorted(deltas)  # id order, as the ledger locks them
    return [[t.id for t in transfers], [t.debit_account_id for t in transfers],
            [t.credit_account_id for t in transfers], [t.amount_minor for t in transfers],
            [t.currency for t in transfers], [str(t.kind) for t in transfers], [t.group_id for t in transfers],
            [json.dumps(t.metadata) for t in transfers], accounts, [deltas[a] for a in accounts]]


async def run_bare_case(pool: Any, agents: list[Agent], batch_groups: int, connections: int,
                        duration_s: float) -> CaseResult:
    """The floor case (see the module doc): batches shaped as run_case's, written with no ledger.

    The most generous floor: the batches' contents are made before the clock starts, and each call
    draws only fresh transfer and group ids.
    """
    latencies_s: list[float] = []
    groups = 0
    templates = [bare_write_args(build_batch(agents, batch_groups)) for _ in range(bare_templates)]

    async def worker(conn: Any, deadline: float, record: bool) -> None:
        nonlocal groups
        rows, balances = await conn.prepare(BARE_ROWS_SQL), await conn.prepare(BARE_BALANCES_SQL)
        while time.perf_counter() < deadline:
            args = list(random.choice(templates))
            args[0] = [_random_id() for _ in range(4 * batch_groups)]
            args[6] = [group for group in (_random_id() for _ in range(batch_groups)) for _ in range(4)]
            started = time.perf_counter()
            try:
                async with conn.transaction():
                    await rows.fetch(*args[:8])
                    await balances.fetch(*args[8:])
            except asyncpg.DeadlockDetectedError:
                continue  # two batches met on shared customers in opposite orders; not counted
            if record:
                latencies_s.append(time.perf_counter() - started)
                groups += batch_groups

    elapsed_s, cpu_s = await drive(pool, worker, connections, duration_s)
    return case_result("bare_writes_hot_agent", batch_groups, connections, groups, 0, latencies_s, elapsed_s, cpu_s)


async def drive(pool: Any, worker: Callable[[Any, float, bool], Awaitable[None]], connections: int,
                duration_s: float) -> tuple[float, float]:
    """Run `worker` on `connections` connections: a warm-up, then `duration_s` measured; wall and CPU seconds."""
    connections_held = [await pool.acquire() for _ in range(connections)]
    try:
        deadline = time.perf_counter() + warmup_s
        await asyncio.gather(*(worker(conn, deadline, False) for conn in connections_held))
        cpu_started, started = time.process_time(), time.perf_counter()
        deadline = started + duration_s
        await asyncio.gather(*(worker(conn, deadline, True) for conn in connections_held))
        return time.perf_counter() - started, time.process_time() - cpu_started
    finally:
        for conn in connections_held:
            await pool.release(conn)


def case_result(name: str, batch_groups: int, connections: int, ok: int, refused: int, latencies_s: list[float],
                elapsed_s: float, cpu_s: float) -> CaseResult:
    latencies_ms = sorted(x * 1000 for x in latencies_s)
    return CaseResult(
        case=name, batch_groups=batch_groups, connections=connections, groups_per_s=round(ok / elapsed_s, 1),
        transfers_per_s=round(4 * ok / elapsed_s, 1), calls=len(latencies_ms), groups_ok=ok,
        groups_refused=refused, elapsed_s=round(elapsed_s, 2),
        call_p50_ms=round(statistics.median(latencies_ms), 2),
        call_p99_ms=round(latencies_ms[max(math.ceil(len(latencies_ms) * 0.99 - 1e-9), 1) - 1], 2),  # nearest rank
        client_cpu_share=round(cpu_s / elapsed_s, 2))


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


def pgbench_tps(url: str, connections: int, duration_s: float, extra: list[str]) -> float:
    output = pgbench(url, ["-n", "-M", "prepared", "-c", str(connections), "-j", str(min(connections, 4)),
                           "-T", str(int(duration_s)), *extra], timeout_s=duration_s + pgbench_timeout_s_extra)
    match = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", output)
    if match is None:
        raise RuntimeError(f"no tps in pgbench output: {output[-500:]}")
    return float(match.group(1))


# -- main -------------------------------------------------------------------------------------------


async def bench(args: argparse.Namespace, cluster: LocalCluster, workdir: Path) -> dict[str, Any]:
    server_url = cluster.url("postgres")
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(f'CREATE DATABASE "{DATABASE}"')
        version = await conn.fetchval("SHOW server_version")
        durability = {name: await conn.fetchval(f"SHOW {name}")
                      for name in ("fsync", "synchronous_commit", "full_page_writes")}
    finally:
        await conn.close()
    url = with_database(server_url, DATABASE)
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn)
        await conn.execute("CREATE TABLE bench_hot_row (id integer PRIMARY KEY, balance_minor bigint NOT NULL)")
        await conn.execute("INSERT INTO bench_hot_row VALUES (1, 0)")
    finally:
        await conn.close()

    log(f"pgbench: initialising tpcb-like tables at scale {args.pgbench_scale}")
    pgbench(url, ["-i", "-q", "-s", str(args.pgbench_scale)], timeout_s=600)

    pool = await asyncpg.create_pool(url, min_size=8, max_size=max(args.connections) + 8)
    assert pool is not None
    try:
        async with pool.acquire() as conn:
            source = await create_account(conn, kind=AccountKind.float_deposits, currency=CURRENCY,
                                          owner_ref="bench-utility", lower_bound_minor=None)
        log(f"ledger: creating {args.agents} agents and 1 hot agent")
        spread = await make_agents(pool, source, args.agents, customers_per_agent, "A")
        [hot] = await make_agents(pool, source, 1, hot_customers, "HOT")
        async with pool.acquire() as conn:
            await prepare_bare_writes(conn)
            await conn.execute("VACUUM ANALYZE")
            await conn.execute("CHECKPOINT")

        cases: list[CaseResult] = []
        pgbench_runs: list[dict[str, Any]] = []
        script = workdir / "hot_row.sql"
        script.write_text(HOT_ROW_SCRIPT)
        for round_number in range(1, args.rounds + 1):
            for connections in args.connections:
                for reference, extra in (("tpcb_like", []), ("hot_row", ["-f", str(script)])):
                    tps = pgbench_tps(url, connections, args.duration_s, extra)
                    pgbench_runs.append({"round": round_number, "script": reference, "connections": connections,
                                         "tps": tps})
                    log(f"round {round_number}: pgbench {reference} with {connections} clients: {tps:.0f} tps")
            for name, agents in (("spread_agents", spread), ("hot_agent", [hot])):
                for batch in args.batch_sizes:
                    for connections in args.connections:
                        result = await run_case(pool, name, agents, batch, connections, args.duration_s)
                        result.round = round_number
                        cases.append(result)
                        log(f"round {round_number}: ledger {name} batch {batch} on {connections} connections: "
                            f"{result.groups_per_s:.0f} groups/s (call p50 {result.call_p50_ms} ms, "
                            f"p99 {result.call_p99_ms} ms, client CPU {result.client_cpu_share})")
            for connections in args.connections:
                result = await run_bare_case(pool, [hot], max(args.batch_sizes), connections, args.duration_s)
                result.round = round_number
                cases.append(result)
                log(f"round {round_number}: bare writes, hot agent, batch {result.batch_groups} on {connections} "
                    f"connections: {result.groups_per_s:.0f} groups/s")
        references = {f"{name}_tps": max(run["tps"] for run in pgbench_runs if run["script"] == name)
                      for name in ("tpcb_like", "hot_row")}

        best: dict[str, float] = {}
        for result in cases:
            key = f"{result.case}_batch{result.batch_groups}"
            best[key] = max(best.get(key, 0.0), result.groups_per_s)
        ratios = {key: round(value / references["tpcb_like_tps" if key.startswith("spread") else "hot_row_tps"], 2)
                  for key, value in best.items()}
        batched = [r for r in cases if r.batch_groups > 1]
        best_spread = max(r.groups_per_s for r in batched if r.case == "spread_agents")
        best_hot = max(r.groups_per_s for r in batched if r.case == "hot_agent")
        targets: dict[str, dict[str, Any]] = {
            "spread_batched_vs_tpcb_like": {"ratio": round(best_spread / references["tpcb_like_tps"], 2),
                                            "target": spread_target_ratio},
            "hot_batched_vs_hot_row": {"ratio": round(best_hot / references["hot_row_tps"], 2),
                                       "target": hot_target_ratio},
        }
        for target in targets.values():
            target["met"] = target["ratio"] >= target["target"]
        best_bare = max(r.groups_per_s for r in cases if r.case == "bare_writes_hot_agent")
        floor = {"bare_writes_hot_agent_groups_per_s": best_bare,
                 "ratio_to_hot_row": round(best_bare / references["hot_row_tps"], 2),
                 "hot_target_groups_per_s": round(hot_target_ratio * references["hot_row_tps"]),
                 "ledger_hot_share_of_floor": round(best_hot / best_bare, 2)}

        check: dict[str, Any] = {"ran": False}
        if args.check:
            log("ledger check over everything posted")
            async with pool.acquire() as conn:
                started = time.perf_counter()
                report = await check_ledger(conn)
                check = {"ran": True, "holds": report.holds, "broken": report.broken, "transfers": report.transfers,
                         "seconds": round(time.perf_counter() - started, 1)}
    finally:
        await pool.close()
    return {
        "benchmark": "bench_ledger",
        "groups_per_s": best,
        "pgbench": references,
        "pgbench_runs": pgbench_runs,
        "ratios": ratios,
        "targets": targets,
        "floor": floor,
        "cases": [asdict(r) for r in cases],
        "ledger_check": check,
        "settings": {"connections": args.connections, "duration_s": args.duration_s, "rounds": args.rounds,
                     "agents": args.agents, "load_average_1min_at_end": round(os.getloadavg()[0], 2),
                     "transfers_per_group": 4, "pgbench_scale": args.pgbench_scale, "postgres": version,
                     **durability, "cpus": os.cpu_count(), "python": platform.python_version()},
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench_ledger", description=__doc__.split("\n")[0])
    parser.add_argument("--duration-s", type=float, default=duration_s_default, help="seconds per case")
    parser.add_argument("--connections", type=lambda text: [int(x) for x in text.split(",")],
                        default=connections_default, help="connection counts to run every case with")
    parser.add_argument("--agents", type=int, default=agents_default)
    parser.add_argument("--batch-sizes", type=lambda text: [int(x) for x in text.split(",")], default=[1, 16, 128])
    parser.add_argument("--pgbench-scale", type=int, default=pgbench_scale_default)
    parser.add_argument("--rounds", type=int, default=rounds_default, help="repeat every measurement")
    parser.add_argument("--no-check", dest="check", action="store_false", help="skip the ledger check at the end")
    parser.add_argument("--keep", action="store_true", help="keep the cluster's folder (printed) after the run")
    args = parser.parse_args(argv)
    if not any(size > 1 for size in args.batch_sizes):
        parser.error("--batch-sizes needs a size above 1 for the batched targets")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="vendgate-bench-ledger-"))
    cluster = LocalCluster(workdir / "pgdata", ephemeral=False)
    run: Callable[[Any], Any] = asyncio.run
    try:
        import uvloop

        run = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
        pass
    try:
        cluster.init()
        cluster.start()
        summary = run(bench(args, cluster, workdir))
    finally:
        if args.keep:
            cluster.stop()
            log(f"cluster kept in {workdir}")
        else:
            cluster.destroy()
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(summary, sort_keys=False))
    check = summary.get("ledger_check") or {}
    return 1 if check.get("ran") and not check.get("holds") else 0  # figures over a broken ledger are no result


if __name__ == "__main__":
    sys.exit(main())
