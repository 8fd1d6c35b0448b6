"""The ledger's invariants, verified from the database alone (`vendgate ledger check`).

Each invariant is a query that returns offending rows (the first few are shown). All run in one
REPEATABLE READ READ ONLY transaction, so they see one consistent ledger while postings go on.

- transfers_balanced        each transfer moves a positive amount from one account to another,
                            both of the transfer's currency
- transfers_sequenced       each transfer has a seq of its own (posting order)
- currencies_sum_to_zero    per currency, the stored balances sum to zero
- balances_match_transfers  each stored balance = its credits - its debits
- running_balances_consistent  each transfer's balance-after = the account's previous one + the
                            amount, and an account's transfers never go back in time
- balances_within_bounds    no balance below its lower bound
- transfers_unchanged       each transfer's SHA-256, chained over both accounts' previous transfers,
                            recomputes from its columns, and each account's chain tip is its last
                            transfer's: a changed, dropped or reordered transfer breaks the chain
- transfers_immutable       the triggers refusing UPDATE/DELETE/TRUNCATE are present and enabled

The digest over all chain tips changes with every posting; recorded elsewhere (a daily report), it
also reveals a history rewritten with recomputed hashes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from float_ledger import sql
from float_ledger.errors import LedgerError

problems_shown_max = 5
IMMUTABILITY_TRIGGERS = ("ledger_transfers_immutable", "ledger_transfers_not_truncated",
                         "ledger_accounts_undeletable", "ledger_accounts_not_truncated")


@dataclass(frozen=True, slots=True)
class InvariantResult:
    name: str
    checked: str  # what was verified, for the operator
    problems: list[str]  # the first problems_shown_max offenders; empty when the invariant holds

    @property
    def holds(self) -> bool:
        return not self.problems


@dataclass(frozen=True, slots=True)
class CheckReport:
    transfers: int
    accounts: int
    currencies: int
    digest_hex: str
    invariants: list[InvariantResult]

    @property
    def holds(self) -> bool:
        return all(invariant.holds for invariant in self.invariants)

    @property
    def broken(self) -> list[str]:
        return [invariant.name for invariant in self.invariants if not invariant.holds]


async def check_ledger(conn: Any) -> CheckReport:
    """Run every invariant in one consistent snapshot (a transaction of its own)."""
    if conn.is_in_transaction():
        raise LedgerError("check_ledger opens its own REPEATABLE READ transaction: call it outside yours")
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        counts = await conn.fetchrow(sql.SQL_CHECK_COUNTS)
        transfers, accounts, currencies = counts["transfers"], counts["accounts"], counts["currencies"]
        limit = problems_shown_max

        async def rows(query: str, *args: Any) -> list[Any]:
            return list(await conn.fetch(query, *args))

        async def unbalanced() -> list[str]:
            return [f"transfer {r['id']}: {r['amount_minor']} {r['currency']} from {r['debit_account_id']} "
                    f"({r['debit_currency']}) to {r['credit_account_id']} ({r['credit_currency']})"
                    for r in await rows(sql.SQL_CHECK_UNBALANCED, limit)]

        async def duplicate_seqs() -> list[str]:
            return [f"seq {r['seq']} is held by {r['transfers']} transfers"
                    for r in await rows(sql.SQL_CHECK_DUPLICATE_SEQS, limit)]

        async def currency_sums() -> list[str]:
            return [f"{r['currency']} balances sum to {r['total_minor']}"
                    for r in await rows(sql.SQL_CHECK_CURRENCY_SUMS)]

        async def balance_sums() -> list[str]:
            return [f"account {r['id']}: stored {r['balance_minor']}, transfers sum to {r['transfers_minor']}"
                    for r in await rows(sql.SQL_CHECK_BALANCE_SUMS, limit)]

        async def running() -> list[str]:
            return [f"account {r['account_id']} transfer {r['id']}: balance after {r['balance_after']}, "
                    f"expected {r['expected']}"
                    + ("" if r["previous_created_at"] is None or r["created_at"] >= r["previous_created_at"]
                       else f", posted at {r['created_at']} before its predecessor ({r['previous_created_at']})")
                    for r in await rows(sql.SQL_CHECK_RUNNING_BALANCES, limit)]

        async def bounds() -> list[str]:
            return [f"account {r['id']}: balance {r['balance_minor']} below bound {r['lower_bound_minor']}"
                    for r in await rows(sql.SQL_CHECK_BOUNDS, limit)]

        async def unchanged() -> list[str]:
            changed = [f"transfer {r['id']} (seq {r['seq']}): hash does not match its content and chain"
                       for r in await rows(sql.SQL_CHECK_HASHES, limit)]
            tips = [f"account {r['id']}: chain tip is not the hash of its last transfer"
                    for r in await rows(sql.SQL_CHECK_CHAIN_TIPS, limit)]
            return (changed + tips)[:limit]

        async def immutable() -> list[str]:
            return [trigger_problem(r["name"], r["tgenabled"])
                    for r in await rows(sql.SQL_CHECK_TRIGGERS, list(IMMUTABILITY_TRIGGERS))]

        checks: list[tuple[str, str, Callable[[], Awaitable[list[str]]]]] = [
            ("transfers_balanced",
             f"{transfers} transfers each move a positive amount between two accounts of its currency", unbalanced),
            ("transfers_sequenced", f"{transfers} transfers each hold a seq of their own", duplicate_seqs),
            ("currencies_sum_to_zero", f"balances sum to zero in each currency ({currencies})", currency_sums),
            ("balances_match_transfers", f"{accounts} stored balances equal credits minus debits", balance_sums),
            ("running_balances_consistent",
             "each transfer's balances-after follow from the accounts' previous ones, in time order", running),
            ("balances_within_bounds", f"{accounts} balances at or above their lower bounds", bounds),
            ("transfers_unchanged", f"hash chain over {transfers} transfers and {accounts} account tips", unchanged),
            ("transfers_immutable", f"{len(IMMUTABILITY_TRIGGERS)} immutability triggers present and enabled",
             immutable),
        ]
        results = [InvariantResult(name, checked, await run()) for name, checked, run in checks]
        digest = await conn.fetchval(sql.SQL_LEDGER_DIGEST)
    return CheckReport(transfers=int(transfers), accounts=int(accounts), currencies=int(currencies),
                       digest_hex=bytes(digest).hex(), invariants=results)


def trigger_problem(name: str, enabled: str | None) -> str:
    """Why a trigger that must fire in every session does not (pg_trigger.tgenabled)."""
    state = {None: "missing", "D": "disabled", "R": "enabled for replication sessions only"}.get(enabled, enabled)
    return f"trigger {name} is {state}"


def render(report: CheckReport) -> list[str]:
    """The lines `vendgate ledger check` prints."""
    lines = []
    for invariant in report.invariants:
        lines.append(f"{'ok    ' if invariant.holds else 'BROKEN'}  {invariant.name}: {invariant.checked}")
        lines.extend(f"        - {problem}" for problem in invariant.problems)
    lines.append(f"ledger digest: {report.digest_hex}")
    if report.holds:
        lines.append(f"ledger check passed: {len(report.invariants)} invariants hold over {report.transfers} transfers "
                     f"and {report.accounts} accounts")
    else:
        lines.append(f"ledger check FAILED: broken invariants: {', '.join(report.broken)}")
    return lines
