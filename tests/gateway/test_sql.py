"""Every named SQL statement of the gateway prepares against the live schema."""

from __future__ import annotations

import asyncpg
import pytest

from gateway import handlers, kiosk, server, sql
from gateway.cli.commands import ca_cmds

STATEMENTS = {
    f"{module.__name__}.{name}": value
    for module in (sql, handlers, kiosk, server, ca_cmds)
    for name, value in vars(module).items()
    if (name.isupper() and name.startswith(("SQL", "TXN", "TERMINAL", "METER", "AGENT", "TARIFF", "VENDING",
                                            "CUSTOMER", "RECEIPT", "TOKEN", "DAILY", "REVERSAL", "OUTBOX",
                                            "SYSTEM", "ACCOUNT", "BATCH", "LOCK", "VEND"))
        and isinstance(value, str))
}


def test_statements_were_found() -> None:
    assert len(STATEMENTS) > 40


@pytest.mark.parametrize("name", sorted(STATEMENTS))
async def test_statement_prepares(db_conn: asyncpg.Connection, name: str) -> None:
    await db_conn.prepare(STATEMENTS[name])
