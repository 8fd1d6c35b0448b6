"""`vendgate demo`: the whole job on the embedded database, start to clean stop."""

from __future__ import annotations

import argparse

from gateway.cli.commands.migrate import apply
from gateway.cli.runner import run
from gateway.database import embedded_cluster
from gateway.errors import SettingsError
from gateway.settings import Settings


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("demo", help="run the demo on the embedded database")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace, settings: Settings) -> int:
    if not settings.uses_embedded_database:
        raise SettingsError("the demo runs on the embedded database: unset VENDGATE_DATABASE_URL")
    cluster = embedded_cluster(settings)
    was_running = cluster.status().running
    status = cluster.start()
    print(f"database: PostgreSQL {status.version} in {cluster.pgdata} on 127.0.0.1:{status.port}")
    try:
        applied = run(apply(settings))
        print(f"migrations: {', '.join(applied) if applied else 'schema up to date'}")
    finally:
        if not was_running:
            cluster.stop()
            print("database: stopped")
    return 0
