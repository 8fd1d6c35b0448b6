"""Versioned SQL migrations: `gateway/migrations/NNNN_name.sql`, applied in order.

Each file runs in its own transaction and is recorded in schema_migrations with a SHA-256 of
its text; a recorded migration whose file has since changed is refused. A session-level
advisory lock serialises concurrent runners (two gateways starting at once).

A small runner was preferred to alembic/yoyo: vendgate's schema is plain SQL, asyncpg is the
only driver, and the runner is ~80 lines that tests exercise directly.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from gateway.errors import MigrationError

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Arbitrary constant naming vendgate's migration lock among advisory locks.
ADVISORY_LOCK_KEY = 0x76656E64  # "vend"
lock_timeout_s = 60
_NAME = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.sql$")

SQL_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    sha256     text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""
SQL_APPLIED = "SELECT version, name, sha256 FROM schema_migrations ORDER BY version"
SQL_RECORD = "INSERT INTO schema_migrations (version, name, sha256) VALUES ($1, $2, $3)"


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def discover(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    migrations = []
    for path in sorted(directory.glob("*.sql")):
        match = _NAME.match(path.name)
        if not match:
            raise MigrationError(f"migration file name not of the form NNNN_name.sql: {path.name}")
        migrations.append(Migration(int(match["version"]), match["name"], path.read_text()))
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migration files share a version: {versions}")
    return migrations


async def migrate(conn: asyncpg.Connection, directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Apply what is missing; return what was applied (empty when up to date)."""
    migrations = discover(directory)
    await conn.execute(f"SET lock_timeout = '{int(lock_timeout_s)}s'")
    await conn.execute("SELECT pg_advisory_lock($1)", ADVISORY_LOCK_KEY)
    try:
        await conn.execute(SQL_CREATE_TABLE)
        applied = {row["version"]: row for row in await conn.fetch(SQL_APPLIED)}
        done: list[Migration] = []
        for migration in migrations:
            recorded = applied.get(migration.version)
            if recorded is not None:
                if recorded["sha256"] != migration.sha256:
                    raise MigrationError(
                        f"migration {migration.version:04d}_{migration.name} changed after it was applied"
                    )
                continue
            try:
                async with conn.transaction():
                    await conn.execute(migration.sql)
                    await conn.execute(SQL_RECORD, migration.version, migration.name, migration.sha256)
            except asyncpg.PostgresError as exc:
                raise MigrationError(
                    f"migration {migration.version:04d}_{migration.name} failed: {exc.__class__.__name__}: {exc}"
                ) from None
            done.append(migration)
        return done
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", ADVISORY_LOCK_KEY)
        await conn.execute("RESET lock_timeout")
