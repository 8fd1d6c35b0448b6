"""`vendgate serve`: run the gateway until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

from gateway import database
from gateway.ca import CertificateAuthority
from gateway.cli.runner import run
from gateway.errors import MigrationError
from gateway.jsonlog import get_logger
from gateway.keystore import load_keystore
from gateway.migrate import discover
from gateway.server import Gateway, serve_until_signalled
from gateway.settings import Settings

gc_young_threshold = 20_000
log = get_logger("vendgate.serve")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("serve", help="run the gateway (POS TCP, kiosk HTTPS, metrics)")
    parser.set_defaults(handler=handle)


async def check_schema(pool) -> None:  # type: ignore[no-untyped-def]
    expected = max(m.version for m in discover())
    async with pool.acquire() as conn:
        applied = await conn.fetchval("SELECT max(version) FROM schema_migrations") \
            if await conn.fetchval("SELECT to_regclass('schema_migrations')") else None
    if applied != expected:
        raise MigrationError(f"database schema is at {applied}, vendgate needs {expected}: run `vendgate migrate`")


def kiosk_tls(settings: Settings):  # type: ignore[no-untyped-def]
    authority = CertificateAuthority(Path(settings.data_dir) / "ca")
    if not authority.exists:
        # Said at start, where whoever runs the gateway looks: kiosks would only see a refused connection.
        log.warning("kiosk_listener_off", reason=f"no CA in {authority.directory}: run `vendgate ca init` to serve "
                                                 "kiosks")
        return None
    return authority.server_ssl_context()


async def serve(settings: Settings) -> None:
    keystore = load_keystore(settings)
    url = await database.resolve_url(settings)
    pool = await database.create_pool(url, settings)
    try:
        await check_schema(pool)
        gateway = Gateway(settings, pool, keystore, kiosk_ssl=kiosk_tls(settings))
        # Long-lived start-up objects leave the collector's view, and young collections run
        # less often: fewer full-heap pauses in the reply path of every session.
        gc.freeze()
        gc.set_threshold(gc_young_threshold, 20, 100)
        await serve_until_signalled(gateway)
    finally:
        await pool.close()


def handle(args: argparse.Namespace, settings: Settings) -> int:
    run(serve(settings))
    return 0
