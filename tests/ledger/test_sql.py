"""Every SQL statement of the float ledger prepares against the migrated schema."""

from __future__ import annotations

from typing import Any

import pytest

from float_ledger import sql

STATEMENTS = {name: value for name, value in vars(sql).items() if name.startswith("SQL_")}


def test_there_are_statements() -> None:
    assert len(STATEMENTS) > 20


@pytest.mark.parametrize("name", sorted(STATEMENTS))
async def test_statement_prepares(db_conn: Any, name: str) -> None:
    await db_conn.prepare(STATEMENTS[name])
