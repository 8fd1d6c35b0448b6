"""`vendgate ledger check`: verify the float ledger's invariants; exit 1 naming any that is broken."""

from __future__ import annotations

import argparse

import asyncpg

from float_ledger.check import CheckReport, render
from gateway import database
from gateway.cli.runner import run
from gateway.errors import MigrationError
from gateway.records_check import check_all
from gateway.settings import Settings

EXIT_BROKEN = 1


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("ledger", help="float ledger tools")
    actions = parser.add_subparsers(dest="ledger_action", metavar="ACTION", required=True)
    check = actions.add_parser(
        "check", help="verify the ledger's invariants: balanced transfers, zero sums, balances, bounds, hash chain")
    check.set_defaults(handler=handle_check)


async def _check(settings: Settings) -> CheckReport:
    url = await database.resolve_url(settings)
    conn = await database.connect(url, timeout_s=settings.database_connect_timeout_s)
    try:
        return await check_all(conn)
    except asyncpg.UndefinedTableError:
        raise MigrationError("the ledger's tables are missing: run `vendgate migrate`") from None
    finally:
        await conn.close()


def handle_check(args: argparse.Namespace, settings: Settings) -> int:
    report = run(_check(settings))
    for line in render(report):
        print(line)
    return 0 if report.holds else EXIT_BROKEN
