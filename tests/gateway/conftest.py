"""A running gateway on a fresh database with seeded agents, terminals and meters."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import pytest

from gateway.keystore import KeyStore
from gateway.seeding import derive_terminal_key, seed, terminal_id
from gateway.server import Gateway
from gateway.settings import load_settings


@contextlib.asynccontextmanager
async def table_locked(pool: asyncpg.Pool, table: str) -> AsyncIterator[None]:
    """`table` held in ACCESS EXCLUSIVE mode for the block: whatever reads or writes it stalls."""
    async with pool.acquire() as holder:
        lock = holder.transaction()
        await lock.start()
        try:
            await holder.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            yield
        finally:
            await lock.rollback()


@dataclass
class Running:
    gateway: Gateway
    pool: asyncpg.Pool
    keystore: KeyStore
    seed_secret: bytes
    master_key: bytes
    db_url: str

    def key(self, n: int) -> bytes:
        return derive_terminal_key(self.seed_secret, terminal_id(n))


@pytest.fixture(scope="module")
async def running(db_url: str) -> AsyncIterator[Running]:
    master_key = secrets.token_bytes(32)
    keystore = KeyStore(master_key)
    seed_secret = secrets.token_bytes(32)
    pool = await asyncpg.create_pool(db_url, min_size=2, max_size=20)
    assert pool is not None
    async with pool.acquire() as conn:
        # 2 agents; terminals 1,3,5 belong to agent 1, terminals 2,4,6 to agent 2.
        await seed(conn, keystore, agents=2, terminals=6, meters=12, seed_secret=seed_secret,
                   float_each_minor=1_000_000)
        # Terminals 7.. for the load tests: 3 agents with ample float.
        await seed(conn, keystore, agents=3, terminals=300, meters=30, seed_secret=seed_secret,
                   float_each_minor=10_000_000_000)
    settings = load_settings(environ={"VENDGATE_POS_PORT": "0", "VENDGATE_HTTP_PORT": "0"})
    gateway = Gateway(settings, pool, keystore)
    await gateway.start()
    try:
        yield Running(gateway, pool, keystore, seed_secret, master_key, db_url)
    finally:
        await gateway.stop()
        await pool.close()
