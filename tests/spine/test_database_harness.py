"""The harness reaches a real PostgreSQL server, and each module's database is isolated."""

from __future__ import annotations

import asyncpg
import pytest


async def test_server_is_real_postgresql(db_conn: asyncpg.Connection) -> None:
    version_num = int(await db_conn.fetchval("SHOW server_version_num"))
    assert version_num >= 150000
    assert await db_conn.fetchval("SELECT current_setting('TimeZone')") == "UTC"


async def test_rolled_back_transaction_leaves_nothing(db_conn: asyncpg.Connection) -> None:
    await db_conn.execute("CREATE TABLE IF NOT EXISTS harness_probe (id int PRIMARY KEY)")
    with pytest.raises(RuntimeError):
        async with db_conn.transaction():
            await db_conn.execute("INSERT INTO harness_probe VALUES (1)")
            assert await db_conn.fetchval("SELECT count(*) FROM harness_probe") == 1
            raise RuntimeError("roll back")
    assert await db_conn.fetchval("SELECT count(*) FROM harness_probe") == 0


async def test_module_database_is_migrated(db_conn: asyncpg.Connection) -> None:
    versions = [r["version"] for r in await db_conn.fetch("SELECT version FROM schema_migrations")]
    assert 1 in versions
    assert versions == sorted(versions)
