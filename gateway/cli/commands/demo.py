"""`vendgate demo`: the whole job on the embedded database, start to clean stop.

Embedded PostgreSQL -> migrate -> seed (first run) -> serve -> simulated terminals for about
20 s -> summary, ledger check verdict and addresses -> stop everything.
"""

from __future__ import annotations

import argparse
import logging

import msgspec

from gateway import database
from gateway.cli.commands.migrate import apply
from gateway.cli.commands.registry_cmds import load_seed_secret
from gateway.cli.runner import run
from gateway.database import embedded_cluster
from gateway.errors import SettingsError
from gateway.keystore import load_keystore
from gateway.records_check import check_all
from gateway.seeding import DEMO_CURRENCY, derive_terminal_key, meter_number, seed, terminal_id
from gateway.server import Gateway
from gateway.settings import Settings
from terminal_sim.client import LINKS
from terminal_sim.sim import run_simulation

DEMO_AGENTS = 5
DEMO_TERMINALS = 40
DEMO_METERS = 300


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("demo", help="run the demo on the embedded database")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of simulated terminals")
    parser.add_argument("--link", choices=sorted(LINKS), default="gprs")
    parser.set_defaults(handler=handle)


async def demo(settings: Settings, duration_s: float, link: str) -> bool:
    keystore = load_keystore(settings, create_for_demo=True)
    secret = load_seed_secret(settings)
    url = await database.resolve_url(settings)
    pool = await database.create_pool(url, settings)
    try:
        async with pool.acquire() as conn:
            if not await conn.fetchval("SELECT count(*) FROM terminals"):
                summary = await seed(conn, keystore, agents=DEMO_AGENTS, terminals=DEMO_TERMINALS,
                                     meters=DEMO_METERS, seed_secret=secret)
                print(f"seeded: {summary.agents} agents, {summary.terminals} terminals, {summary.meters} meters")
        demo_settings = msgspec.structs.replace(settings, pos_port=0, http_port=0)
        gateway = Gateway(demo_settings, pool, keystore)
        await gateway.start()
        print(f"gateway: POS tcp://127.0.0.1:{gateway.pos_port}  metrics http://127.0.0.1:{gateway.http_port}/metrics")
        print(f"simulating {DEMO_TERMINALS} terminals over a {link} link for {duration_s:.0f} s ...")
        assert gateway.pos_port is not None
        terminals = [(terminal_id(n), derive_terminal_key(secret, terminal_id(n)))
                     for n in range(1, DEMO_TERMINALS + 1)]
        result, notes = await run_simulation(
            host="127.0.0.1", port=gateway.pos_port, terminals=terminals,
            meters=[meter_number(n) for n in range(1, DEMO_METERS + 1)], currency=DEMO_CURRENCY,
            duration_s=duration_s, link=LINKS[link])
        await gateway.stop()
        for note in notes[:10]:
            print(f"note: {note}")
        print(f"sim: approved {result.approved}, declined {result.declined}, link errors {result.errors}, "
              f"retries {result.retries}, protocol errors {result.protocol_errors}, "
              f"inconsistencies {result.inconsistencies}, latency p50 {result.latency_p50_ms} ms "
              f"p99 {result.latency_p99_ms} ms")
        async with pool.acquire() as conn:
            report = await check_all(conn)
        verdict = "holds" if report.holds else f"BROKEN: {', '.join(report.broken)}"
        print(f"ledger check: {report.transfers} transfers, {report.accounts} accounts: {verdict}")
        return result.ok and report.holds
    finally:
        await pool.close()


def handle(args: argparse.Namespace, settings: Settings) -> int:
    if not settings.uses_embedded_database:
        raise SettingsError("the demo runs on the embedded database: unset VENDGATE_DATABASE_URL")
    # The demo prints its own summary; per-session and per-transaction log lines would bury it.
    logging.getLogger("vendgate").setLevel(logging.WARNING)
    cluster = embedded_cluster(settings)
    was_running = cluster.status().running
    status = cluster.start()
    print(f"database: PostgreSQL {status.version} in {cluster.pgdata} on 127.0.0.1:{status.port}")
    try:
        applied = run(apply(settings))
        print(f"migrations: {', '.join(applied) if applied else 'schema up to date'}")
        ok = run(demo(settings, args.duration, args.link))
    finally:
        if not was_running:
            cluster.stop()
            print("database: stopped")
    return 0 if ok else 1
