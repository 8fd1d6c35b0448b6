"""`vendgate demo`: the whole job on the embedded database, start to clean stop.

Embedded PostgreSQL -> migrate -> seed (first run) -> serve -> simulated POS terminals and
kiosks for about 20 s -> summary, ledger check verdict and addresses -> stop everything.

The kiosks pay over HTTPS with client certificates of the demo's own CA (data_dir/ca, created
on first run, as `vendgate ca init` does); each kiosk's certificate is issued once, into
data_dir/kiosks, as `vendgate kiosk cert` does.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import msgspec

from gateway import database, registry
from gateway.ca import CertificateAuthority
from gateway.cli.arguments import bounded_seconds
from gateway.cli.commands.ca_cmds import ca_dir, issue_kiosk_certificate
from gateway.cli.commands.migrate import apply
from gateway.cli.commands.registry_cmds import load_seed_secret
from gateway.cli.commands.sim import sim_duration_s_max
from gateway.cli.runner import run
from gateway.database import embedded_cluster
from gateway.errors import SettingsError
from gateway.keystore import KeyStore, load_keystore
from gateway.records_check import check_all
from gateway.seeding import DEMO_CURRENCY, derive_terminal_key, meter_number, seed, terminal_id
from gateway.server import Gateway
from gateway.settings import Settings
from terminal_sim.client import LINKS
from terminal_sim.kiosk import Kiosk, client_ssl_context, run_kiosks
from terminal_sim.sim import run_simulation

DEMO_AGENTS = 5
DEMO_TERMINALS = 40
DEMO_METERS = 300
DEMO_KIOSKS = ("K0000001", "K0000002")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("demo", help="run the demo on the embedded database")
    parser.add_argument("--duration", type=bounded_seconds(0, sim_duration_s_max), default=20.0,
                        help="seconds of simulated terminals")
    parser.add_argument("--link", choices=sorted(LINKS), default="gprs")
    parser.set_defaults(handler=handle)


async def demo(settings: Settings, duration_s: float, link: str) -> bool:
    keystore = load_keystore(settings, demo=True)
    secret = load_seed_secret(settings)
    url = await database.resolve_url(settings)
    pool = await database.create_pool(url, settings)
    try:
        async with pool.acquire() as conn:
            if not await conn.fetchval("SELECT count(*) FROM terminals"):
                summary = await seed(conn, keystore, agents=DEMO_AGENTS, terminals=DEMO_TERMINALS,
                                     meters=DEMO_METERS, seed_secret=secret)
                print(f"seeded: {summary.agents} agents, {summary.terminals} terminals, {summary.meters} meters")
                for line in summary.ranges():
                    print(f"  {line}")
        authority = CertificateAuthority(ca_dir(settings))
        authority.init(now=datetime.now(UTC))
        async with pool.acquire() as conn:
            kiosk_files = await _demo_kiosks(conn, keystore, authority, Path(settings.data_dir) / "kiosks")
        demo_settings = msgspec.structs.replace(settings, pos_port=0, http_port=0, kiosk_port=0)
        gateway = Gateway(demo_settings, pool, keystore, kiosk_ssl=authority.server_ssl_context())
        await gateway.start()
        print(f"gateway: POS tcp://127.0.0.1:{gateway.pos_port}  kiosks https://127.0.0.1:{gateway.kiosk_port}  "
              f"metrics http://127.0.0.1:{gateway.http_port}/metrics")
        print(f"simulating {DEMO_TERMINALS} terminals over a {link} link and {len(DEMO_KIOSKS)} kiosks "
              f"for {duration_s:.0f} s ...")
        assert gateway.pos_port is not None
        terminals = [(terminal_id(n), derive_terminal_key(secret, terminal_id(n)))
                     for n in range(1, DEMO_TERMINALS + 1)]
        meters = [meter_number(n) for n in range(1, DEMO_METERS + 1)]
        today = datetime.now(UTC).date()
        kiosks = [Kiosk(kiosk_id, f"https://127.0.0.1:{gateway.kiosk_port}",
                        client_ssl_context(str(authority.ca_cert_path), str(cert), str(key)), today,
                        # where this run's sequence starts, as the POS simulator's do (random)
                        last_sequence=random.randrange(0, 500_000))
                  for kiosk_id, (cert, key) in kiosk_files.items()]
        try:
            (result, notes), kiosk_result = await asyncio.gather(
                run_simulation(host="127.0.0.1", port=gateway.pos_port, terminals=terminals, meters=meters,
                               currency=DEMO_CURRENCY, duration_s=duration_s, link=LINKS[link]),
                run_kiosks(kiosks, meters, DEMO_CURRENCY, duration_s))
        finally:
            await gateway.stop()
        for note in [*notes, *kiosk_result.notes][:10]:
            print(f"note: {note}")
        print(f"sim: approved {result.approved}, declined {result.declined}, link errors {result.errors}, "
              f"retries {result.retries}, protocol errors {result.protocol_errors}, "
              f"inconsistencies {result.inconsistencies}, latency p50 {result.latency_p50_ms} ms "
              f"p99 {result.latency_p99_ms} ms")
        print(f"kiosks: approved {kiosk_result.approved}, declined {kiosk_result.declined}, "
              f"errors {kiosk_result.errors}, inconsistencies {kiosk_result.inconsistencies}")
        async with pool.acquire() as conn:
            report = await check_all(conn)
        verdict = "holds" if report.holds else f"BROKEN: {', '.join(report.broken)}"
        print(f"ledger check: {report.transfers} transfers, {report.accounts} accounts: {verdict}")
        return result.ok and kiosk_result.ok and kiosk_result.approved > 0 and report.holds
    finally:
        await pool.close()


async def _demo_kiosks(conn: asyncpg.Connection, keystore: KeyStore, authority: CertificateAuthority,
                       out_dir: Path) -> dict[str, tuple[Path, Path]]:
    """The demo's kiosks (of the first agent) with their certificate and key files: registered
    and issued on the first run, reused after."""
    files = {}
    for kiosk_id in DEMO_KIOSKS:
        if await conn.fetchval("SELECT kind FROM terminals WHERE terminal_id = $1", kiosk_id) is None:
            agent_id = await conn.fetchval("SELECT min(agent_id) FROM agents")
            await registry.add_terminal(conn, keystore, terminal_id=kiosk_id, serial=f"DEMO-{kiosk_id}",
                                        agent_id=agent_id, kind="kiosk", model="demo kiosk")
        cert, key = out_dir / f"{kiosk_id}.pem", out_dir / f"{kiosk_id}.key"
        if not (cert.exists() and key.exists()):
            cert, key, _ = await issue_kiosk_certificate(conn, authority, kiosk_id, out_dir)
        files[kiosk_id] = (cert, key)
    return files


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
