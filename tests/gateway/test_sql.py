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


async def test_only_the_commit_form_with_the_debt_check_is_left(db_conn: asyncpg.Connection) -> None:
    # The older form (0012) never checked a debt recovery against the debt left (0019): a gateway
    # still calling it could take a customer's debt account above zero. 0021 drops it.
    forms = await db_conn.fetch("SELECT pronargs, prosrc FROM pg_proc WHERE proname = 'vend_commit_topups'")
    assert len(forms) == 1
    [form] = forms
    assert "V0003" in form["prosrc"]
    statement = await db_conn.prepare(sql.VEND_COMMIT_TOPUPS)
    assert len(statement.get_parameters()) == form["pronargs"]
