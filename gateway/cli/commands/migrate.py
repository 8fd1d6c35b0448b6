"""`vendgate migrate`: apply pending schema migrations (idempotent)."""

from __future__ import annotations

import argparse

from gateway import database
from gateway.cli.runner import run
from gateway.migrate import migrate
from gateway.settings import Settings


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("migrate", help="apply pending database migrations")
    parser.set_defaults(handler=handle)


async def apply(settings: Settings) -> list[str]:
    url = await database.resolve_url(settings)
    conn = await database.connect(url, timeout_s=settings.database_connect_timeout_s)
    try:
        return [f"{m.version:04d}_{m.name}" for m in await migrate(conn)]
    finally:
        await conn.close()


def handle(args: argparse.Namespace, settings: Settings) -> int:
    applied = run(apply(settings))
    if applied:
        for name in applied:
            print(f"applied {name}")
    else:
        print("schema up to date")
    return 0
