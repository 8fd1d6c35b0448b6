"""Daily reconciliation of an agent's float, per agent and per terminal, from transfers alone.

A business day is a calendar day in the agent's IANA time zone: [local midnight, next local
midnight), 23 or 25 hours across a DST change. For the agent's float account it reports:

- opening and closing float: the float's balance-after of its last transfer before the day's
  start and end (stored in every transfer and verified by `vendgate ledger check`);
- deposits (kind deposit credited to the float), collections (kind collection debited from it),
  reversals (kind reversal of a collection, credited back), every other movement (signed);
- commission: kind commission credited to the agent's commission_payable accounts (those with the
  float's owner_ref and currency), less reversals of it;
- per terminal (metadata terminal_id): collections, reversals and commission.

closing = opening + deposits - collections + reversals + other_net holds by construction; an
assertion guards it.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from datetime import date
from typing import Any

from float_ledger import sql
from float_ledger.errors import AccountNotFound, ReconciliationNeedsSnapshot
from float_ledger.ledger import postings_settle_timeout_s, wait_for_postings_until
from float_ledger.model import AgentDay, TerminalDay, TransferKind, business_day_bounds


async def reconcile_agent_day(conn: Any, *, float_account_id: int, business_day: date, time_zone: str,
                              settle_timeout_s: float = postings_settle_timeout_s) -> AgentDay:
    """Reconcile one agent's float for one business day in `time_zone` (e.g. "Africa/Nairobi").

    Outside a transaction, the report of a day that has ended is final: it first waits (at most
    `settle_timeout_s`, then PostingsInFlight) for postings still open that began before the day's
    end, which may yet commit transfers dated within it. A day still in progress is reported as
    far as it has gone.
    """
    starts_at, ends_at = business_day_bounds(business_day, time_zone)
    account = await conn.fetchrow(sql.SQL_FLOAT_ACCOUNT, float_account_id)
    if account is None:
        raise AccountNotFound(f"no ledger account {float_account_id}")
    agent_ref = account["owner_ref"]
    # One snapshot, so the day's totals and its opening and closing balances agree. A caller's
    # transaction must hold one for all its statements: under READ COMMITTED each read would see
    # what committed since the one before, and the day would not add up.
    if conn.is_in_transaction():
        if await conn.fetchval(sql.SQL_ISOLATION) == "read committed":
            raise ReconciliationNeedsSnapshot(
                "reconcile outside a transaction or in a REPEATABLE READ or SERIALIZABLE one")
        snapshot: Any = contextlib.nullcontext()
    else:
        await wait_for_postings_until(conn, ends_at, timeout_s=settle_timeout_s)
        snapshot = conn.transaction(isolation="repeatable_read", readonly=True)
    async with snapshot:
        opening = int(await conn.fetchval(sql.SQL_BALANCE_BEFORE, float_account_id, starts_at))
        closing = int(await conn.fetchval(sql.SQL_BALANCE_BEFORE, float_account_id, ends_at))
        movements = await conn.fetch(sql.SQL_RECONCILE_FLOAT, float_account_id, starts_at, ends_at)
        commissions = await conn.fetch(sql.SQL_RECONCILE_COMMISSION, agent_ref, starts_at, ends_at,
                                      account["currency"])

    totals: dict[str, int] = defaultdict(int)
    terminals: dict[str | None, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for row in movements:
        count, amount = int(row["transfers"]), int(row["amount_minor"])
        terminal = terminals[row["terminal_id"]]
        if row["kind"] == TransferKind.deposit and row["credited"]:
            totals["deposits_count"] += count
            totals["deposits_minor"] += amount
        elif row["kind"] == TransferKind.collection and not row["credited"]:
            totals["collections_count"] += count
            totals["collections_minor"] += amount
            terminal["collections_count"] += count
            terminal["collections_minor"] += amount
        elif (row["kind"] == TransferKind.reversal and row["reversed_kind"] == TransferKind.collection
              and row["credited"]):
            totals["reversals_count"] += count
            totals["reversals_minor"] += amount
            terminal["reversals_count"] += count
            terminal["reversals_minor"] += amount
        else:
            totals["other_count"] += count
            totals["other_net_minor"] += amount if row["credited"] else -amount
    for row in commissions:
        signed = int(row["amount_minor"])
        totals["commission_minor"] += signed
        terminals[row["terminal_id"]]["commission_minor"] += signed

    assert closing == (opening + totals["deposits_minor"] - totals["collections_minor"] + totals["reversals_minor"]
                       + totals["other_net_minor"]), f"float {float_account_id} does not reconcile on {business_day}"
    by_terminal = [
        TerminalDay(terminal_id=terminal_id, **values)
        for terminal_id, values in sorted(terminals.items(), key=lambda item: (item[0] is None, item[0] or ""))
        if any(values.values())
    ]
    return AgentDay(
        float_account_id=float_account_id, agent_ref=agent_ref, currency=account["currency"],
        business_day=business_day, time_zone=time_zone, starts_at=starts_at, ends_at=ends_at,
        opening_float_minor=opening, deposits_count=totals["deposits_count"],
        deposits_minor=totals["deposits_minor"], collections_count=totals["collections_count"],
        collections_minor=totals["collections_minor"], reversals_count=totals["reversals_count"],
        reversals_minor=totals["reversals_minor"], commission_minor=totals["commission_minor"],
        other_count=totals["other_count"], other_net_minor=totals["other_net_minor"],
        closing_float_minor=closing, terminals=by_terminal)
