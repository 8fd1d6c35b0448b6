"""Invariants of the payment records, checked by `vendgate ledger check` beside the ledger's.

The payment path writes its records without foreign keys (gateway/migrations/0013_vend_records.sql,
0014_vend_record_keys.sql),
so this verifies what the keys would have:

- vend_records_referenced   every payment record names a terminal that exists, every receipt a
                            payment and a terminal, every token a payment and a meter
- vend_records_consistent   receipt numbers run 1, 2, 3, ... per terminal up to its counter with no
                            gap; every approved payment (top-up or advice) has its receipt, one
                            collection of its amount naming it in its ledger group and its event for
                            the prepayment engine, of its meter, amount and currency; a declined one
                            has no receipt and no group; an approved reversal and its reversals row
                            (the payment found) name each other
- accounts_as_registered    every agent's float and commission accounts, and every customer's
                            credit and debt accounts, are of the kind, currency and owner the
                            registry created them with (none of these is in the ledger's hash chain)
- vend_records_protected    the triggers refusing DELETE, TRUNCATE and a change of key on those
                            tables are each on their table, enabled, fire on the events they refuse
                            (a key change: an UPDATE of the key columns, WHEN one of them changes),
                            and call the refusing function whose source is the one the migrations
                            installed
"""

from __future__ import annotations

import dataclasses
from typing import Any

from float_ledger.check import (
    REFUSE_KEY_CHANGE_SOURCE_SHA256,
    CheckReport,
    InvariantResult,
    ProtectingTrigger,
    check_ledger,
    problems_shown_max,
    protecting_trigger_problems,
)
from float_ledger.sql import SQL_PIN_CATALOG_FIRST

# SHA-256 of the source of vendgate_refuse_delete (gateway/migrations/0013_vend_records.sql), as
# float_ledger.check keeps vendgate_refuse_key_change's: a migration that redefines either changes
# its hash there (tests/gateway/test_records_check.py compares them).
REFUSE_DELETE_SOURCE_SHA256 = "c8ac8478e6a58de717cdb1ce663fae9197ab2a886baa42c6ab06e4d4c821acea"
# The columns other records name, per table, as 0014_vend_record_keys.sql lists them.
RECORD_KEYS = {"terminals": ("terminal_id",), "meters": ("meter_number",),
               # All but the reprint count (0028_reversals_protected.sql): the record is final.
               "vend_transactions": ("client_txn_id", "terminal_id", "kind", "agent_id", "request_sha256",
                                     "response_code", "meter_number", "amount_minor", "currency", "group_id",
                                     "receipt_number", "business_date", "reply", "created_at"),
               "receipts": ("terminal_id", "receipt_number", "client_txn_id"),
               "tokens": ("client_txn_id", "meter_number"),
               # (0028_reversals_protected.sql)
               "reversals": ("original_txn_id", "reversal_txn_id", "terminal_id", "original_found")}
PROTECTING_TRIGGERS = tuple(
    trigger
    for table, keys in RECORD_KEYS.items()
    for trigger in (
        ProtectingTrigger(f"{table}_undeletable", table, "BEFORE DELETE FOR EACH ROW", "vendgate_refuse_delete",
                          REFUSE_DELETE_SOURCE_SHA256),
        ProtectingTrigger(f"{table}_not_truncated", table, "BEFORE TRUNCATE FOR EACH STATEMENT",
                          "vendgate_refuse_delete", REFUSE_DELETE_SOURCE_SHA256),
        ProtectingTrigger(f"{table}_keys_fixed", table, "BEFORE UPDATE FOR EACH ROW", "vendgate_refuse_key_change",
                          REFUSE_KEY_CHANGE_SOURCE_SHA256, key_columns=keys),
    ))

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
# One row per inconsistency between the payment records, the ledger and the outbox; each part
# stops at the first few. PRIMARY KEY (terminal_id, receipt_number) and receipt_number > 0 make
# "count = highest = counter" mean exactly 1..counter.
SQL_INCONSISTENT = """
(SELECT 'terminal ' || t.terminal_id || ': receipt counter ' || t.receipt_seq || ', ' || count(r.receipt_number)
        || ' receipts, highest ' || coalesce(max(r.receipt_number), 0) AS problem
   FROM terminals t LEFT JOIN receipts r ON r.terminal_id = t.terminal_id
  GROUP BY t.terminal_id, t.receipt_seq
 HAVING count(r.receipt_number) <> t.receipt_seq OR coalesce(max(r.receipt_number), 0) <> t.receipt_seq
  ORDER BY t.terminal_id LIMIT $1)
UNION ALL
(SELECT 'payment ' || v.client_txn_id || ': approved with '
        || concat_ws(', ',
                     CASE WHEN r.receipt_number IS DISTINCT FROM v.receipt_number OR r.terminal_id <> v.terminal_id
                          THEN 'receipt ' || coalesce(v.receipt_number::text, 'none') || ' not on record' END,
                     CASE WHEN c.n IS DISTINCT FROM 1 THEN coalesce(c.n, 0) || ' collections of its amount' END,
                     CASE WHEN o.client_txn_id IS NULL THEN 'no event of its meter and amount for the prepayment engine'
                     END)
   FROM vend_transactions v
   LEFT JOIN receipts r ON r.client_txn_id = v.client_txn_id
   -- Joined, not looked up per payment: the outbox has no index on the payment's id.
   LEFT JOIN (SELECT DISTINCT e.client_txn_id, e.meter_number, e.payload ->> 'amount_minor' AS amount_minor,
                     e.payload ->> 'currency' AS currency
                FROM outbox e WHERE e.kind = 'payment_received') o
          ON o.client_txn_id = v.client_txn_id AND o.meter_number IS NOT DISTINCT FROM v.meter_number
         AND o.amount_minor = v.amount_minor::text AND o.currency = v.currency
   -- The collection names its payment: a group is one payment's, never shared.
   LEFT JOIN LATERAL (SELECT count(*) AS n FROM ledger_transfers l
                       WHERE v.group_id IS NOT NULL AND l.group_id = v.group_id AND l.kind = 'collection'
                         AND l.amount_minor = v.amount_minor
                         AND l.metadata ->> 'client_txn_id' = v.client_txn_id) c ON true
  WHERE v.kind IN ('topup', 'advice') AND v.response_code = 0
    AND (r.receipt_number IS DISTINCT FROM v.receipt_number OR r.terminal_id <> v.terminal_id
         OR c.n IS DISTINCT FROM 1 OR o.client_txn_id IS NULL)
  ORDER BY v.client_txn_id LIMIT $1)
UNION ALL
(SELECT 'payment ' || v.client_txn_id || ': declined (' || v.response_code || ') but has '
        || CASE WHEN v.group_id IS NOT NULL THEN 'a ledger group' ELSE 'a receipt' END
   FROM vend_transactions v
  WHERE v.kind IN ('topup', 'advice') AND v.response_code <> 0
    AND (v.group_id IS NOT NULL OR v.receipt_number IS NOT NULL
         OR EXISTS (SELECT 1 FROM receipts r WHERE r.client_txn_id = v.client_txn_id))
  ORDER BY v.client_txn_id LIMIT $1)"""
# An approved reversal's record and its reversals row (the tombstone barring the payment) name
# each other, the payment found; a reversals row saying the payment was found and reversed has
# its approved reversal record. Joined, not looked up: reversals has no index on reversal_txn_id.
SQL_REVERSALS_INCONSISTENT = """
SELECT 'reversal ' || coalesce(v.client_txn_id, r.reversal_txn_id) || ': '
       || CASE WHEN r.reversal_txn_id IS NULL THEN 'approved, but no reversal of its payment is on record'
               WHEN v.client_txn_id IS NULL THEN 'on record for payment ' || r.original_txn_id
                                                 || ', but no approved reversal made it'
               ELSE 'on record for payment ' || r.original_txn_id || ' by terminal ' || r.terminal_id
                    || ', made by ' || v.terminal_id END AS problem
  FROM (SELECT client_txn_id, terminal_id FROM vend_transactions
         WHERE kind = 'reversal' AND response_code = 0) v
  FULL JOIN (SELECT * FROM reversals WHERE original_found) r ON r.reversal_txn_id = v.client_txn_id
 WHERE r.reversal_txn_id IS NULL OR v.client_txn_id IS NULL OR r.terminal_id <> v.terminal_id
 ORDER BY 1
 LIMIT $1"""
# The accounts the registry names are what it made them: an agent's float an agent_float and its
# commission account a commission_payable, both of the agent's currency and owned by it; a
# customer's credit and debt accounts customer_credit and customer_debt, owned by the customer, of
# one currency. Kind, currency and owner are in no transfer's hash: a float turned into a
# suspense account (its identity trigger off for a moment) could take a credit limit and go below
# 0 with every ledger invariant holding.
SQL_ACCOUNTS_NOT_AS_REGISTERED = """
(SELECT 'agent ' || a.agent_id || ': ' || r.role || ' account ' || r.account_id || ' is '
        || coalesce(l.kind || ' in ' || l.currency || ' owned by ' || l.owner_ref, 'missing')
        || ', not ' || r.kind || ' in ' || a.currency || ' owned by agent:' || a.agent_id AS problem
   FROM agents a
  CROSS JOIN LATERAL (VALUES ('float', a.float_account_id, 'agent_float'),
                             ('commission', a.commission_account_id, 'commission_payable')) r(role, account_id, kind)
   LEFT JOIN ledger_accounts l ON l.id = r.account_id
  WHERE l.id IS NULL OR l.kind <> r.kind OR l.currency <> a.currency
     OR l.owner_ref IS DISTINCT FROM 'agent:' || a.agent_id
  ORDER BY a.agent_id, r.role LIMIT $1)
UNION ALL
(SELECT 'customer ' || c.account_number || ': credit account ' || c.credit_account_id || ' is '
        || coalesce(cr.kind || ' in ' || cr.currency || ' owned by ' || cr.owner_ref, 'missing')
        || ', debt account ' || c.debt_account_id || ' is '
        || coalesce(d.kind || ' in ' || d.currency || ' owned by ' || d.owner_ref, 'missing')
        || ', not customer_credit and customer_debt of one currency owned by customer:' || c.account_number
   FROM customers c
   LEFT JOIN ledger_accounts cr ON cr.id = c.credit_account_id
   LEFT JOIN ledger_accounts d ON d.id = c.debt_account_id
  WHERE cr.id IS NULL OR d.id IS NULL OR cr.kind <> 'customer_credit' OR d.kind <> 'customer_debt'
     OR cr.currency <> d.currency OR cr.owner_ref IS DISTINCT FROM 'customer:' || c.account_number
     OR d.owner_ref IS DISTINCT FROM 'customer:' || c.account_number
  ORDER BY c.account_number LIMIT $1)"""
SQL_COUNTS = """
SELECT (SELECT count(*) FROM vend_transactions) AS payments, (SELECT count(*) FROM receipts) AS receipts,
       (SELECT count(*) FROM tokens) AS tokens, (SELECT count(*) FROM agents) AS agents,
       (SELECT count(*) FROM customers) AS customers"""


async def check_vend_records(conn: Any) -> list[InvariantResult]:
    """The payment records' invariants, in one consistent snapshot (a transaction of its own)."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        await conn.execute(SQL_PIN_CATALOG_FIRST)
        counts = await conn.fetchrow(SQL_COUNTS)
        not_as_registered = [r["problem"] for r in await conn.fetch(SQL_ACCOUNTS_NOT_AS_REGISTERED,
                                                                    problems_shown_max)]
        unreferenced = [r["problem"] for r in await conn.fetch(SQL_UNREFERENCED, problems_shown_max)]
        inconsistent = [r["problem"] for r in await conn.fetch(SQL_INCONSISTENT, problems_shown_max)]
        inconsistent += [r["problem"] for r in await conn.fetch(SQL_REVERSALS_INCONSISTENT, problems_shown_max)]
        triggers = await protecting_trigger_problems(conn, PROTECTING_TRIGGERS)
    return [
        InvariantResult("vend_records_referenced",
                        f"{counts['payments']} payments, {counts['receipts']} receipts and {counts['tokens']} "
                        "tokens name terminals, payments and meters that exist",
                        unreferenced[:problems_shown_max]),
        InvariantResult("vend_records_consistent",
                        "receipts gap-free per terminal up to its counter; every approved payment with its receipt, "
                        "one collection of its amount naming it and its engine event of that meter and amount; no "
                        "declined payment with a receipt or a ledger group; every approved reversal with its "
                        "reversal record and every reversal record with its approved reversal",
                        inconsistent[:problems_shown_max]),
        InvariantResult("accounts_as_registered",
                        f"{counts['agents']} agents' float and commission accounts and {counts['customers']} "
                        "customers' credit and debt accounts of the kind, currency and owner the registry made them",
                        not_as_registered[:problems_shown_max]),
        InvariantResult("vend_records_protected",
                        f"{len(PROTECTING_TRIGGERS)} triggers refusing DELETE, TRUNCATE and key changes on their "
                        "tables, enabled, firing on those events and calling the refusals the migrations installed",
                        triggers[:problems_shown_max]),
    ]


async def check_all(conn: Any) -> CheckReport:
    """The ledger's invariants, then the payment records'."""
    report = await check_ledger(conn)
    return dataclasses.replace(report, invariants=[*report.invariants, *await check_vend_records(conn)])
