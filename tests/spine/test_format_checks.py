"""The format CHECKs that replaced regular expressions (0011_posting_speed.sql) keep the same rules.

Each constraint's expression, read back from the live schema, is evaluated against the regular
expression it replaced over valid and invalid samples; both must agree on every sample.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

# constraint -> (table, column, the regular expression it replaced, samples)
REPLACED = {
    "ledger_transfers_currency_check": ("ledger_transfers", "currency", "^[A-Z]{3}$",
                                        ["KES", "USD", "kes", "KE", "KESS", "K1S", "KÉS", "KES\n", " KES", "", "K S"]),
    "ledger_accounts_currency_check": ("ledger_accounts", "currency", "^[A-Z]{3}$", ["ZAR", "zar", "ZA", "Z4R"]),
    "ledger_transfers_kind_check": ("ledger_transfers", "kind", "^[a-z][a-z0-9_]{0,39}$",
                                    ["a", "collection", "debt_recovery", "x9_", "a" * 40, "a" * 41, "", "9lives",
                                     "_x", "Kind", "kind-x", "kind x", "kïnd", "kind\n"]),
    "terminals_terminal_id_check": ("terminals", "terminal_id", "^[A-Z0-9]{8}$",
                                    ["T0000001", "ABCDEFGH", "12345678", "t0000001", "T000001", "T00000001",
                                     "T000-001", "T000000É", ""]),
    "meters_meter_number_check": ("meters", "meter_number", "^[0-9]{6,20}$",
                                  ["123456", "0" * 20, "12345", "0" * 21, "12345a", "١٢٣٤٥٦", "123 456", ""]),
}


@pytest.mark.parametrize("constraint", sorted(REPLACED))
async def test_the_check_agrees_with_the_regular_expression_it_replaced(db_conn: Any, constraint: str) -> None:
    table, column, pattern, samples = REPLACED[constraint]
    definition = await db_conn.fetchval(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = $1 AND conrelid = $2::regclass",
        constraint, table)
    assert definition is not None and "~" not in definition, definition
    expression = re.fullmatch(r"CHECK \((.*)\)", definition, re.DOTALL)
    assert expression is not None
    probe = re.sub(rf"\b{column}\b", "$1::text", expression.group(1))
    for sample in samples:
        new_rule = await db_conn.fetchval(f"SELECT ({probe})", sample)
        old_rule = await db_conn.fetchval(f"SELECT $1::text ~ '{pattern}'", sample)
        assert new_rule is old_rule, (constraint, sample, new_rule, old_rule)
