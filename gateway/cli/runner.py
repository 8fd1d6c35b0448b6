"""Run a coroutine for a CLI command on uvloop when available."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import asyncpg

from gateway import database
from gateway.settings import Settings

T = TypeVar("T")


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def run_on_connection(settings: Settings, body: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    """`body` on one connection to the configured database, closed after."""
    async def go() -> T:
        url = await database.resolve_url(settings)
        conn = await database.connect(url, timeout_s=settings.database_connect_timeout_s)
        try:
            return await body(conn)
        finally:
            await conn.close()

    return run(go())
