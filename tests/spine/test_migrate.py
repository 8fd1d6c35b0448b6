"""Migrations: ordered, recorded, idempotent, safe under concurrent runners, refuse edits."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import asyncpg
import pytest

from float_ledger.ledger import create_account, post_transfers
from float_ledger.model import AccountKind, PostStatus, Transfer
from gateway.errors import MigrationError
from gateway.migrate import discover, migrate
from tests.conftest import create_fresh_database


@pytest.fixture
async def empty_db(pg_server_url: str) -> str:
    conn = await asyncpg.connect(pg_server_url)
    try:
        await conn.execute('CREATE DATABASE "empty_template_src"') if not await conn.fetchval(
            "SELECT 1 FROM pg_database WHERE datname='empty_template_src'") else None
    finally:
        await conn.close()
    return await create_fresh_database(pg_server_url, "empty_template_src", "empty")


def write(directory: Path, name: str, sql: str) -> None:
    (directory / name).write_text(sql)


async def test_applies_in_order_then_is_idempotent(empty_db: str, tmp_path: Path) -> None:
    write(tmp_path, "0002_second.sql", "INSERT INTO m_probe VALUES (2);")
    write(tmp_path, "0001_first.sql", "CREATE TABLE m_probe (n int);")
    conn = await asyncpg.connect(empty_db)
    try:
        first = await migrate(conn, tmp_path)
        assert [m.version for m in first] == [1, 2]
        assert await migrate(conn, tmp_path) == []
        assert await conn.fetchval("SELECT count(*) FROM m_probe") == 1
    finally:
        await conn.close()


async def test_failed_migration_rolls_back_and_is_not_recorded(empty_db: str, tmp_path: Path) -> None:
    write(tmp_path, "0001_ok.sql", "CREATE TABLE ok_probe (n int);")
    write(tmp_path, "0002_bad.sql", "CREATE TABLE half_done (n int); SELECT no_such_function();")
    conn = await asyncpg.connect(empty_db)
    try:
        with pytest.raises(MigrationError, match="0002_bad failed"):
            await migrate(conn, tmp_path)
        assert await conn.fetchval("SELECT to_regclass('half_done')") is None
        assert [r[0] for r in await conn.fetch("SELECT version FROM schema_migrations")] == [1]
    finally:
        await conn.close()


async def test_changed_migration_is_refused(empty_db: str, tmp_path: Path) -> None:
    write(tmp_path, "0001_first.sql", "CREATE TABLE c_probe (n int);")
    conn = await asyncpg.connect(empty_db)
    try:
        await migrate(conn, tmp_path)
        write(tmp_path, "0001_first.sql", "CREATE TABLE c_probe (n bigint);")
        with pytest.raises(MigrationError, match="changed after it was applied"):
            await migrate(conn, tmp_path)
    finally:
        await conn.close()


async def test_concurrent_runners_apply_each_migration_once(empty_db: str, tmp_path: Path) -> None:
    write(tmp_path, "0001_slow.sql", "SELECT pg_sleep(0.2); CREATE TABLE r_probe (n int);")
    conns = [await asyncpg.connect(empty_db) for _ in range(4)]
    try:
        results = await asyncio.gather(*(migrate(c, tmp_path) for c in conns))
        assert sorted(len(r) for r in results) == [0, 0, 0, 1]
    finally:
        for c in conns:
            await c.close()


def test_bad_file_names_are_refused(tmp_path: Path) -> None:
    write(tmp_path, "1_first.sql", "SELECT 1;")
    with pytest.raises(MigrationError, match=r"NNNN_name\.sql"):
        discover(tmp_path)


def test_shipped_migrations_have_unique_versions() -> None:
    versions = [m.version for m in discover()]
    assert versions == sorted(set(versions))


async def test_a_group_posted_before_0023_takes_no_new_transfer_after_it(empty_db: str, tmp_path: Path) -> None:
    """0023 marks the first transfer of each group posted from then on; the groups already in the
    ledger are unmarked, and the posting function still finds them posted."""
    before, after = tmp_path / "before", tmp_path / "after"
    before.mkdir()
    after.mkdir()
    for migration in discover():
        name = f"{migration.version:04d}_{migration.name}.sql"
        if migration.version <= 23:
            write(after, name, migration.sql)
        if migration.version < 23:
            write(before, name, migration.sql)
    conn = await asyncpg.connect(empty_db)
    try:
        assert max(m.version for m in await migrate(conn, before)) == 22
        source = await create_account(conn, kind=AccountKind.float_deposits, currency="KES", owner_ref="bank",
                                      lower_bound_minor=None)
        float_id = await create_account(conn, kind=AccountKind.agent_float, currency="KES", owner_ref="agent")

        def deposit(amount: int, group: uuid.UUID) -> Transfer:
            return Transfer(id=uuid.uuid4(), debit_account_id=source, credit_account_id=float_id,
                            amount_minor=amount, currency="KES", kind="deposit", group_id=group)

        old_group = uuid.uuid4()
        posted = [deposit(10, old_group), deposit(20, old_group)]
        assert [r.status for r in await post_transfers(conn, posted)] == [PostStatus.ok, PostStatus.ok]
        assert [m.version for m in await migrate(conn, after)] == [23]
        assert await conn.fetchval("SELECT count(*) FROM ledger_transfers WHERE opens_group") == 0
        [joined] = await post_transfers(conn, [deposit(5, old_group)])
        assert joined.status is PostStatus.exists_with_different_content
        assert [r.status for r in await post_transfers(conn, posted)] == [PostStatus.exists, PostStatus.exists]
        new_group = uuid.uuid4()
        assert [r.status for r in await post_transfers(conn, [deposit(1, new_group), deposit(2, new_group)])] == [
            PostStatus.ok, PostStatus.ok]
        assert await conn.fetchval("SELECT count(*) FROM ledger_transfers WHERE opens_group") == 1
        assert await conn.fetchval("SELECT balance_minor FROM ledger_accounts WHERE id = $1", float_id) == 33
    finally:
        await conn.close()
