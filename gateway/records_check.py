"""Invariants of the payment records, checked by `vendgate ledger check` beside the ledger's.

The payment path writes its records without foreign keys (gateway/migrations/0013_vend_records.sql,
0014_vend_record_keys.sql),
so this verifies what the keys would have:

- vend_records_referenced   every payment record names a terminal that exists, every receipt a
                            payment and a terminal, every token a payment and a meter
- vend_records_protected    the triggers refusing DELETE, TRUNCATE and a change of key on those
                            tables are present and enabled
"""

from __future__ import annotations

import dataclasses
from typing import Any

from float_ledger import sql as ledger_sql
from float_ledger.check import CheckReport, InvariantResult, check_ledger, problems_shown_max, trigger_problem

PROTECTING_TRIGGERS = tuple(
    f"{table}_{suffix}"
    for table in ("terminals", "meters", "vend_transactions", "receipts", "tokens")
    for suffix in ("undeletable", "not_truncated", "keys_fixed"))

# One row per record naming a row that is not there; each part stops at the first few.
SQL_UNREFERENCED = """
(SELECT 'payment ' || v.client_txn_id || ': no terminal ' || v.terminal_id AS problem
   FROM vend_transactions v
  WHERE NOT EXISTS (SELECT 1 FROM terminals t WHERE t.terminal_id = v.terminal_id) LIMIT $1)
UNION ALL
(SELECT 'receipt ' || r.terminal_id || '/' || r.receipt_number || ': no payment ' || r.client_txn_id
   FROM receipts r
  WHERE NOT EXISTS (SELECT 1 FROM vend_transactions v WHERE v.client_txn_id = r.client_txn_id) LIMIT $1)
UNION ALL
(SELECT 'receipt ' || r.terminal_id || '/' || r.receipt_number || ': no terminal ' || r.terminal_id
   FROM receipts r
  WHERE NOT EXISTS (SELECT 1 FROM terminals t WHERE t.terminal_id = r.terminal_id) LIMIT $1)
UNION ALL
(SELECT 'token of payment ' || k.client_txn_id || ': no such payment'
   FROM tokens k
  WHERE NOT EXISTS (SELECT 1 FROM vend_transactions v WHERE v.client_txn_id = k.client_txn_id) LIMIT $1)
UNION ALL
(SELECT 'token of payment ' || k.client_txn_id || ': no meter ' || k.meter_number
   FROM tokens k
  WHERE NOT EXISTS (SELECT 1 FROM meters m WHERE m.meter_number = k.meter_number) LIMIT $1)"""
SQL_COUNTS = """
SELECT (SELECT count(*) FROM vend_transactions) AS payments, (SELECT count(*) FROM receipts) AS receipts,
       (SELECT count(*) FROM tokens) AS tokens"""


async def check_vend_records(conn: Any) -> list[InvariantResult]:
    """The payment records' invariants, in one consistent snapshot (a transaction of its own)."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        counts = await conn.fetchrow(SQL_COUNTS)
        unreferenced = [r["problem"] for r in await conn.fetch(SQL_UNREFERENCED, problems_shown_max)]
        triggers = [trigger_problem(r["name"], r["tgenabled"])
                    for r in await conn.fetch(ledger_sql.SQL_CHECK_TRIGGERS, list(PROTECTING_TRIGGERS))]
    return [
        InvariantResult("vend_records_referenced",
                        f"{counts['payments']} payments, {counts['receipts']} receipts and {counts['tokens']} "
                        "tokens name terminals, payments and meters that exist",
                        unreferenced[:problems_shown_max]),
        InvariantResult("vend_records_protected",
                        f"{len(PROTECTING_TRIGGERS)} triggers refusing DELETE, TRUNCATE and key changes present and "
                        "enabled",
                        triggers[:problems_shown_max]),
    ]


async def check_all(conn: Any) -> CheckReport:
    """The ledger's invariants, then the payment records'."""
    report = await check_ledger(conn)
    return dataclasses.replace(report, invariants=[*report.invariants, *await check_vend_records(conn)])
