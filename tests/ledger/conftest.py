"""Helpers for the float-ledger tests: accounts of one currency and short transfer builders."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from float_ledger.ledger import create_account
from float_ledger.model import AccountKind, Transfer

CURRENCY = "KES"


async def account(conn: Any, kind: AccountKind, owner_ref: str | None = None, *, lower_bound_minor: int | None = 0,
                  low_threshold_minor: int | None = None, currency: str = CURRENCY) -> int:
    return await create_account(conn, kind=kind, currency=currency, owner_ref=owner_ref or f"{kind}-{uuid.uuid4()}",
                                lower_bound_minor=lower_bound_minor, low_threshold_minor=low_threshold_minor)


def transfer(debit: int, credit: int, amount: int, *, kind: str = "collection", id: uuid.UUID | None = None,
             group_id: uuid.UUID | None = None, currency: str = CURRENCY, **metadata: str | int) -> Transfer:
    return Transfer(id=id or uuid.uuid4(), debit_account_id=debit, credit_account_id=credit, amount_minor=amount,
                    currency=currency, kind=kind, group_id=group_id, metadata=metadata)


@pytest.fixture
async def source(db_conn: Any) -> int:
    """An unbounded float_deposits account: money enters floats from here."""
    return await account(db_conn, AccountKind.float_deposits, "utility", lower_bound_minor=None)


async def visible_events(conn: Any, after: Any = None, *, wanted: Any = None, at_least: int,
                         wait_s: float = 10.0) -> list[Any]:
    """The events after `after` that `wanted` accepts (all when None), polled until there are
    at_least of them: an event shows once every transaction older than its own has ended, and an
    unrelated one (autovacuum's ANALYZE, say) may hold it back for a moment."""
    import asyncio
    import time

    from float_ledger.ledger import events_after

    deadline = time.monotonic() + wait_s
    while True:
        events = [e for e in await events_after(conn, after, limit=1000) if wanted is None or wanted(e)]
        if len(events) >= at_least or time.monotonic() > deadline:
            return events
        await asyncio.sleep(0.05)
