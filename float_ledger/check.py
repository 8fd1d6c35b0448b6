"""The ledger's invariants, verified from the database alone (`vendgate ledger check`).

Each invariant is a query that returns offending rows (the first few are shown). All run in one
REPEATABLE READ READ ONLY transaction, so they see one consistent ledger while postings go on.

- transfers_balanced        each transfer moves a positive amount from one account to another,
                            both of the transfer's currency
- transfers_sequenced       each transfer has a seq of its own (posting order)
- currencies_sum_to_zero    per currency, the stored balances sum to zero
- balances_match_transfers  each stored balance = its credits - its debits
- running_balances_consistent  each transfer's balance-after = the account's previous one + the
                            amount, an account's transfers never go back in time, and none is
                            dated before its accounts were opened or ahead of the database's clock
                            (posting dates a transfer no earlier than its accounts' last one, so
                            one dated ahead drags every later posting of its accounts with it)
- balances_within_bounds    no balance below its lower bound, and no agent's float below 0 (nor
                            with a bound that would let it go there)
- groups_posted_once        each linked group's transfers were posted together (one posting time),
                            and the transfer that opened it, where marked, is its first
- transfers_unchanged       each transfer's SHA-256, chained over both accounts' previous transfers,
                            recomputes from its columns, and each account's chain tip and posting
                            clock are its last transfer's: a changed, dropped or reordered transfer
                            breaks the chain; the hash functions are each defined once, with the
                            source the migrations installed
- deposits_match_transfers  each posted float deposit's transfer (its id) moves its amount from its
                            source to its float with its reference, maker and checker; a deposit
                            not posted has no deposit transfer
- transfers_immutable       the triggers refusing UPDATE/DELETE/TRUNCATE (and a decided deposit's
                            change) are each on their table, enabled for every session
                            (ENABLE ALWAYS), fire BEFORE those events (per row; TRUNCATE per statement)
                            with no WHEN clause, and call the refusing function whose source is
                            the one the migrations installed

The check runs with pg_catalog first on its search_path, so a function of another schema named
like a built-in the chain uses (sha256, say) cannot stand in for it.

The chain has no secret key: whoever holds the tables' owner's rights (DDL) can rewrite history
and recompute every hash, and this check then passes. What it finds is a change made without
those rights, or made with them but without recomputing the chain, and any change to the
protecting triggers or their functions. The digest over all chain tips changes with every
posting: kept outside the database, it shows whether the ledger is still the one an earlier check
saw with no posting since (docs/THREAT_MODEL.md, "Known gaps").
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from float_ledger import sql
from float_ledger.errors import LedgerError

problems_shown_max = 5
# A transfer dated later than this past the check's start was not posted by this database's clock
# (or the clock stepped back that far): every later posting of its accounts would be dated after it.
clock_skew_s_max = 300


@dataclass(frozen=True, slots=True)
class ProtectingTrigger:
    """A trigger that refuses a change, as its migration created it."""

    name: str
    table: str
    fires: str  # as describe_firing() words pg_trigger.tgtype
    function: str  # in the table's schema
    function_source_sha256: str  # of pg_proc.prosrc, as the migrations installed it
    # Only for an UPDATE of these columns, and only WHEN one of them changes; () = no such limit.
    key_columns: tuple[str, ...] = ()


# SHA-256 of vendgate_refuse_change's source (gateway/migrations/0001_base.sql): a migration that
# redefines the function changes this with it (tests/ledger/test_check.py compares the two).
REFUSE_CHANGE_SOURCE_SHA256 = "5ec25276efcc438e469ce1f1a22c64d91823d0ac8f4c6fde95a0986dd9bf68c4"
# SHA-256 of vendgate_refuse_key_change's source (gateway/migrations/0014_vend_record_keys.sql).
REFUSE_KEY_CHANGE_SOURCE_SHA256 = "217c271d97b4ef3c978a78cdc35e99e7cdfe1fb869e177ad7281f273d1e3dfa3"
# SHA-256 of ledger_deposit_decided_once's source (gateway/migrations/0024_protections_in_every_session.sql).
DEPOSIT_DECIDED_ONCE_SOURCE_SHA256 = "b39e9c0c021e6d66262e5a67c4713cdb9f2b3fcb2d1bf249ef2e98a82c01aa2b"
# SHA-256 of "<language>:<source>" of each function the hash chain is recomputed with
# (gateway/migrations/0002_ledger.sql): a migration that redefines one changes it here
# (tests/ledger/test_check.py compares them).
HASH_FUNCTIONS_SOURCE_SHA256 = {
    "ledger_genesis_hash": "a12f5264d404f26977abfa6a4cd047b178576a6801260829dee5d20a28f581f8",
    "ledger_transfer_content_hash": "78442feb474f0fa7a81840ed65d850be324e8f9b01fef68f557653723f15e764",
    "ledger_transfer_hash": "f5e689a570bae291a30b8a89635b1fc808a33969d2478cd8e8edc1f1accc4f3e",
}
IMMUTABILITY_TRIGGERS = (
    ProtectingTrigger("ledger_transfers_immutable", "ledger_transfers", "BEFORE UPDATE OR DELETE FOR EACH ROW",
                      "vendgate_refuse_change", REFUSE_CHANGE_SOURCE_SHA256),
    ProtectingTrigger("ledger_transfers_not_truncated", "ledger_transfers", "BEFORE TRUNCATE FOR EACH STATEMENT",
                      "vendgate_refuse_change", REFUSE_CHANGE_SOURCE_SHA256),
    ProtectingTrigger("ledger_accounts_undeletable", "ledger_accounts", "BEFORE DELETE FOR EACH ROW",
                      "vendgate_refuse_change", REFUSE_CHANGE_SOURCE_SHA256),
    ProtectingTrigger("ledger_accounts_not_truncated", "ledger_accounts", "BEFORE TRUNCATE FOR EACH STATEMENT",
                      "vendgate_refuse_change", REFUSE_CHANGE_SOURCE_SHA256),
    ProtectingTrigger("ledger_accounts_identity_fixed", "ledger_accounts", "BEFORE UPDATE FOR EACH ROW",
                      "vendgate_refuse_key_change", REFUSE_KEY_CHANGE_SOURCE_SHA256,
                      key_columns=("id", "kind", "currency", "owner_ref", "created_at")),
    ProtectingTrigger("ledger_events_immutable", "ledger_events", "BEFORE UPDATE OR DELETE FOR EACH ROW",
                      "vendgate_refuse_change", REFUSE_CHANGE_SOURCE_SHA256),
    ProtectingTrigger("ledger_events_not_truncated", "ledger_events", "BEFORE TRUNCATE FOR EACH STATEMENT",
                      "vendgate_refuse_change", REFUSE_CHANGE_SOURCE_SHA256),
    ProtectingTrigger("ledger_deposits_decided_once", "ledger_deposits", "BEFORE UPDATE OR DELETE FOR EACH ROW",
                      "ledger_deposit_decided_once", DEPOSIT_DECIDED_ONCE_SOURCE_SHA256),
    ProtectingTrigger("ledger_deposits_not_truncated", "ledger_deposits", "BEFORE TRUNCATE FOR EACH STATEMENT",
                      "vendgate_refuse_change", REFUSE_CHANGE_SOURCE_SHA256),
)


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
        await conn.execute(sql.SQL_PIN_CATALOG_FIRST)
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
                    for r in await rows(sql.SQL_CHECK_RUNNING_BALANCES, limit)] + [
                    f"transfer {r['id']}: posted at {r['created_at']}, before account {r['account_id']} was opened "
                    f"({r['opened_at']})" for r in await rows(sql.SQL_CHECK_BEFORE_OPENING, limit)] + [
                    f"transfer {r['id']}: posted at {r['created_at']}, after this check began ({r['checked_at']})"
                    for r in await rows(sql.SQL_CHECK_FUTURE_DATED, clock_skew_s_max, limit)]

        async def groups() -> list[str]:
            problems = []
            for r in await rows(sql.SQL_CHECK_GROUPS, limit):
                if r["first_at"] != r["last_at"]:
                    problems.append(f"group {r['group_id']}: {r['transfers']} transfers posted at different times "
                                    f"({r['first_at']} to {r['last_at']}): a transfer joined it later")
                elif r["openers"] > 1:
                    problems.append(f"group {r['group_id']}: {r['openers']} transfers marked as opening it")
                else:
                    problems.append(f"group {r['group_id']}: opened by its transfer at seq {r['opener_seq']}, not "
                                    f"by its first (seq {r['first_seq']})")
            return problems

        async def bounds() -> list[str]:
            return [f"account {r['id']}: balance {r['balance_minor']} below bound {r['lower_bound_minor']}"
                    if r["lower_bound_minor"] is not None and r["balance_minor"] < r["lower_bound_minor"] else
                    f"agent float {r['id']}: balance {r['balance_minor']}, bound {r['lower_bound_minor']} "
                    "(a float is never below 0)"
                    for r in await rows(sql.SQL_CHECK_BOUNDS, limit)]

        async def unchanged() -> list[str]:
            functions = await hash_function_problems(conn)
            changed = [f"transfer {r['id']} (seq {r['seq']}): hash does not match its content and chain"
                       for r in await rows(sql.SQL_CHECK_HASHES, limit)]
            tips = [f"account {r['id']}: chain tip is not the hash of its last transfer" if r["tip_differs"] else
                    f"account {r['id']}: posting clock at {r['last_transfer_at']}, its last transfer posted at "
                    f"{r['last_created_at']}"
                    for r in await rows(sql.SQL_CHECK_CHAIN_TIPS, limit)]
            return (functions + changed + tips)[:limit]

        async def deposits() -> list[str]:
            return [f"deposit {r['id']} is posted but the ledger holds no such deposit under its id"
                    if r["status"] == "posted" and not r["has_transfer"] else
                    f"deposit {r['id']} is posted but its transfer differs from it (amount, accounts, reference, "
                    "maker or checker)" if r["status"] == "posted" else
                    f"deposit {r['id']} is {r['status']} but the ledger holds its deposit into the float"
                    for r in await rows(sql.SQL_CHECK_DEPOSITS, limit)]

        async def immutable() -> list[str]:
            return (await protecting_trigger_problems(conn, IMMUTABILITY_TRIGGERS))[:limit]

        checks: list[tuple[str, str, Callable[[], Awaitable[list[str]]]]] = [
            ("transfers_balanced",
             f"{transfers} transfers each move a positive amount between two accounts of its currency", unbalanced),
            ("transfers_sequenced", f"{transfers} transfers each hold a seq of their own", duplicate_seqs),
            ("currencies_sum_to_zero", f"balances sum to zero in each currency ({currencies})", currency_sums),
            ("balances_match_transfers", f"{accounts} stored balances equal credits minus debits", balance_sums),
            ("running_balances_consistent",
             "each transfer's balances-after follow from the accounts' previous ones, in time order, none "
             f"before its accounts were opened nor more than {clock_skew_s_max} s after now", running),
            ("balances_within_bounds", f"{accounts} balances at or above their lower bounds, agents' floats at or "
             "above 0", bounds),
            ("groups_posted_once", "each linked group's transfers posted together, its first one opening it", groups),
            ("transfers_unchanged",
             f"hash chain over {transfers} transfers and {accounts} account tips (hash and posting time), "
             f"recomputed with the {len(HASH_FUNCTIONS_SOURCE_SHA256)} hash functions the migrations installed",
             unchanged),
            ("deposits_match_transfers",
             "each posted float deposit's transfer as recorded, and none of a deposit not posted", deposits),
            ("transfers_immutable",
             f"{len(IMMUTABILITY_TRIGGERS)} immutability triggers on their tables, enabled, firing on the events "
             "they refuse and calling the refusal the migrations installed", immutable),
        ]
        results = [InvariantResult(name, checked, await run()) for name, checked, run in checks]
        digest = await conn.fetchval(sql.SQL_LEDGER_DIGEST)
    return CheckReport(transfers=int(transfers), accounts=int(accounts), currencies=int(currencies),
                       digest_hex=bytes(digest).hex(), invariants=results)


async def hash_function_problems(conn: Any) -> list[str]:
    """Why the functions the chain is recomputed with are not the ones the migrations installed."""
    problems = []
    for r in await conn.fetch(sql.SQL_CHECK_HASH_FUNCTIONS, list(HASH_FUNCTIONS_SOURCE_SHA256)):
        if r["source_sha256"] is None:
            problems.append(f"hash function {r['name']} is missing")
        elif r["definitions"] != 1:
            problems.append(f"hash function {r['name']} is defined {r['definitions']} times (one may shadow it)")
        elif r["source_sha256"] != HASH_FUNCTIONS_SOURCE_SHA256[r["name"]]:
            problems.append(f"hash function {r['name']} is not the one the migrations installed")
    return problems


async def protecting_trigger_problems(conn: Any, triggers: Sequence[ProtectingTrigger]) -> list[str]:
    """Every way the catalog's triggers differ from `triggers` (empty: each protects as created)."""
    found = await conn.fetch(sql.SQL_CHECK_TRIGGERS, [t.name for t in triggers], [t.table for t in triggers])
    return [problem for expected, row in zip(triggers, found, strict=True)
            for problem in trigger_problems(expected, row)]


# pg_trigger.tgtype bits (PostgreSQL's catalog/pg_trigger.h).
_ROW, _BEFORE, _INSERT, _DELETE, _UPDATE, _TRUNCATE, _INSTEAD = 1, 2, 4, 8, 16, 32, 64
_EVENTS = ((_INSERT, "INSERT"), (_UPDATE, "UPDATE"), (_DELETE, "DELETE"), (_TRUNCATE, "TRUNCATE"))
# The WHEN clause in pg_get_triggerdef()'s text: CREATE TRIGGER ... FOR EACH ROW WHEN (...) EXECUTE ...
_WHEN_CLAUSE = re.compile(r" FOR EACH (?:ROW|STATEMENT) WHEN \((.*)\) EXECUTE (?:FUNCTION|PROCEDURE) ")


def describe_firing(tgtype: int) -> str:
    """pg_trigger.tgtype in CREATE TRIGGER's words, e.g. "BEFORE UPDATE OR DELETE FOR EACH ROW"."""
    timing = "INSTEAD OF" if tgtype & _INSTEAD else "BEFORE" if tgtype & _BEFORE else "AFTER"
    events = " OR ".join(word for bit, word in _EVENTS if tgtype & bit)
    return f"{timing} {events} FOR EACH {'ROW' if tgtype & _ROW else 'STATEMENT'}"


def _condition_terms(condition: str) -> frozenset[str]:
    """The OR-ed terms of a WHEN condition, compared without case, spaces or parentheses ("": none)."""
    terms = (re.sub(r"[\s()]", "", term).lower() for term in re.split(r"\s+OR\s+", condition, flags=re.I))
    return frozenset(term for term in terms if term)


def trigger_problems(expected: ProtectingTrigger, found: Mapping[str, Any]) -> list[str]:
    """Why the trigger the catalog has (a row of sql.SQL_CHECK_TRIGGERS) does not protect as
    `expected` does; empty when it does."""
    name = expected.name
    if not found["on_table"]:
        if found["elsewhere"]:
            return [f"trigger {name} is on {', '.join(found['elsewhere'])}, not on {expected.table}"]
        return [f"trigger {name} is missing"]
    problems = []
    enabled = found["tgenabled"]
    if enabled != "A":  # A: fires in every session, whatever its session_replication_role
        state = {"D": "disabled", "R": "enabled for replication sessions only",
                 "O": "enabled for ordinary sessions only (one with session_replication_role = replica skips it)",
                 }.get(enabled, enabled)
        problems.append(f"trigger {name} is {state}")
    fires = describe_firing(found["tgtype"])
    if fires != expected.fires:
        problems.append(f"trigger {name} fires {fires}, not {expected.fires}")
    columns = list(found["columns"] or ())
    if sorted(columns) != sorted(expected.key_columns):
        problems.append(f"trigger {name} fires on an UPDATE of {', '.join(columns) or 'any column'}, "
                        f"not of {', '.join(expected.key_columns) or 'any column'}")
    when = _WHEN_CLAUSE.search(found["definition"])
    condition = when.group(1) if when else ""
    expected_condition = " OR ".join(f"OLD.{c} IS DISTINCT FROM NEW.{c}" for c in expected.key_columns)
    if _condition_terms(condition) != _condition_terms(expected_condition):
        problems.append(f"trigger {name} fires {'WHEN ' + condition if condition else 'with no WHEN clause'}, "
                        f"not {'WHEN ' + expected_condition if expected_condition else 'always'}")
    function = f"{found['function_schema']}.{found['function_name']}"
    if found["function_name"] != expected.function or found["function_schema"] != found["table_schema"]:
        problems.append(f"trigger {name} calls {function}, not {found['table_schema']}.{expected.function}")
    elif (found["function_language"] != "plpgsql"
          or found["function_source_sha256"] != expected.function_source_sha256):
        problems.append(f"trigger {name} calls {function}, whose source is not the refusal the migrations "
                        "installed")
    return problems


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
