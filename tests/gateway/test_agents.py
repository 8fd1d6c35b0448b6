"""Agents in the ledger: each agent's accounts are its own, whatever its name."""

from __future__ import annotations

import shutil
import uuid
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest

from float_ledger.ledger import create_account, find_accounts, post_transfers
from float_ledger.model import AccountKind, Transfer
from float_ledger.reconciliation import reconcile_agent_day
from gateway import registry
from gateway.migrate import MIGRATIONS_DIR, migrate
from tests.conftest import create_fresh_database


async def test_agents_sharing_a_name_reconcile_apart(db_conn: asyncpg.Connection) -> None:
    first = await registry.add_agent(db_conn, kind="shop", name="Duka Moja", currency="KES")
    second = await registry.add_agent(db_conn, kind="shop", name="Duka Moja", currency="KES")
    system = await registry.ensure_system_accounts(db_conn, "KES")
    for agent, amount in ((first, 30), (second, 700)):
        [posted] = await post_transfers(db_conn, [Transfer(
            id=uuid.uuid4(), debit_account_id=system[AccountKind.commission_expense],
            credit_account_id=agent.commission_account_id, amount_minor=amount, currency="KES",
            kind="commission", metadata={"terminal_id": f"T{agent.agent_id:07d}"})])
        assert posted.status.posted
    for agent in (first, second):
        owned = {a.id for a in await find_accounts(db_conn, owner_ref=registry.agent_owner_ref(agent.agent_id))}
        assert owned == {agent.float_account_id, agent.commission_account_id}
    today = datetime.now(UTC).date()
    days = [await reconcile_agent_day(db_conn, float_account_id=agent.float_account_id, business_day=today,
                                      time_zone="UTC") for agent in (first, second)]
    assert [day.commission_minor for day in days] == [30, 700]
    assert [[t.terminal_id for t in day.terminals] for day in days] == [
        [f"T{first.agent_id:07d}"], [f"T{second.agent_id:07d}"]]


@pytest.fixture
async def unmigrated_db(pg_server_url: str) -> str:
    conn = await asyncpg.connect(pg_server_url)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = 'agents_unmigrated_src'"):
            await conn.execute('CREATE DATABASE "agents_unmigrated_src"')
    finally:
        await conn.close()
    return await create_fresh_database(pg_server_url, "agents_unmigrated_src", "agents_unmigrated")


async def test_agents_created_before_0017_have_their_accounts_renamed(unmigrated_db: str, tmp_path: Path) -> None:
    for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
        if int(path.name[:4]) < 17:
            shutil.copy(path, tmp_path / path.name)
    conn = await asyncpg.connect(unmigrated_db)
    try:
        await migrate(conn, tmp_path)
        # Two agents of one name, as the release before created them: accounts owned by the name.
        ids = []
        for _ in range(2):
            float_id = await create_account(conn, kind=AccountKind.agent_float, currency="KES",
                                            owner_ref="agent:Duka Moja", lower_bound_minor=0)
            commission_id = await create_account(conn, kind=AccountKind.commission_payable, currency="KES",
                                                 owner_ref="agent:Duka Moja", lower_bound_minor=0)
            ids.append(await conn.fetchval(
                "INSERT INTO agents (kind, name, currency, float_account_id, commission_account_id)"
                " VALUES ('shop', 'Duka Moja', 'KES', $1, $2) RETURNING agent_id", float_id, commission_id))
        applied = await migrate(conn)
        assert applied[0].version == 17  # and any later ones
        rows = await conn.fetch(
            "SELECT a.agent_id, f.owner_ref AS float_owner, c.owner_ref AS commission_owner FROM agents a"
            " JOIN ledger_accounts f ON f.id = a.float_account_id"
            " JOIN ledger_accounts c ON c.id = a.commission_account_id ORDER BY a.agent_id")
        assert [(r["float_owner"], r["commission_owner"]) for r in rows] == [
            (f"agent:{i}", f"agent:{i}") for i in ids]
    finally:
        await conn.close()
