"""Where the database is: the external one named by VENDGATE_DATABASE_URL, or the embedded one.

Callers get a URL and connections with explicit timeouts; a server that cannot be reached is
a DatabaseUnavailable naming host and reason, never a traceback and never the password.
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from gateway.errors import DatabaseUnavailable
from gateway.pgcluster import LocalCluster
from gateway.settings import Settings


def embedded_cluster(settings: Settings) -> LocalCluster:
    return LocalCluster(settings.pgdata_dir, port=settings.database_port)


def with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


def describe(url: str) -> str:
    """Host, port and database of `url`, never its user or password."""
    parts = urlsplit(url)
    try:
        port = parts.port or 5432
        host = parts.hostname or "localhost"
    except ValueError:  # a port that is no number, an unbalanced [IPv6] host
        return "an address that is not a valid URL"
    return f"{host}:{port}{parts.path or ''}"


def _check_well_formed(url: str) -> None:
    """A URL asyncpg would refuse with a ValueError (a port that is no number, an unbalanced
    [IPv6] host), refused in words that never repeat it: it may hold a password."""
    try:
        urlsplit(url).port  # noqa: B018 - parsing it raises ValueError
    except ValueError:
        raise DatabaseUnavailable(_MALFORMED) from None


_MALFORMED = "the database URL is malformed (its host, port or parameters): see VENDGATE_DATABASE_URL"


# Every vendgate session runs its transactions READ COMMITTED, whatever the database's or the
# role's default_transaction_isolation says: a payment and its reversal each wait for the other's
# id lock and then read what committed meanwhile, which a REPEATABLE READ snapshot, taken before
# the wait, would not show (a reversal would answer "nothing was charged" beside a charged
# payment). Sent at connection start, it takes precedence over those defaults.
SESSION_SETTINGS = {"default_transaction_isolation": "read committed"}


async def connect(url: str, *, timeout_s: float) -> asyncpg.Connection:
    _check_well_formed(url)
    try:
        return await asyncpg.connect(url, timeout=timeout_s, server_settings=SESSION_SETTINGS)
    except ValueError:
        raise DatabaseUnavailable(_MALFORMED) from None
    except (OSError, TimeoutError, socket.gaierror, asyncpg.PostgresError,
            asyncpg.InterfaceError) as exc:
        reason = exc.__class__.__name__ if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
        raise DatabaseUnavailable(f"cannot reach database at {describe(url)}: {reason}") from None


async def ensure_database(server_url: str, database: str, *, timeout_s: float) -> None:
    """Create `database` on the server when missing (embedded default only)."""
    conn = await connect(server_url, timeout_s=timeout_s)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database)
        if not exists:
            await conn.execute(f'CREATE DATABASE "{database}"')
    finally:
        await conn.close()


async def resolve_url(settings: Settings, *, start_embedded: bool = True) -> str:
    """The application database's URL, starting the embedded cluster when that is the default."""
    if settings.database_url is not None:
        return settings.database_url
    cluster = embedded_cluster(settings)
    if start_embedded:
        cluster.start()
    server_url = cluster.url("postgres")
    await ensure_database(server_url, settings.database_name, timeout_s=settings.database_connect_timeout_s)
    return with_database(server_url, settings.database_name)


async def create_pool(url: str, settings: Settings, *, size_min: int = 2) -> asyncpg.Pool:
    _check_well_formed(url)
    try:
        pool = await asyncpg.create_pool(
            url, min_size=min(size_min, settings.database_pool_size_max),
            max_size=settings.database_pool_size_max, timeout=settings.database_connect_timeout_s,
            command_timeout=60, server_settings=SESSION_SETTINGS,
        )
    except ValueError:
        raise DatabaseUnavailable(_MALFORMED) from None
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise DatabaseUnavailable(f"cannot reach database at {describe(url)}: {exc}") from None
    assert pool is not None
    return pool
