"""Migrations: ordered, recorded, idempotent, safe under concurrent runners, refuse edits."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

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
