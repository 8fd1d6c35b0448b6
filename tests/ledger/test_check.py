"""`vendgate ledger check`: green on a healthy ledger, red, naming the invariant, on corrupted ones.

Each corruption gets its own fresh database; the immutability trigger is disabled to corrupt and
enabled again (unless the corruption is the disabled trigger itself).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from float_ledger.check import (
    DEPOSIT_DECIDED_ONCE_SOURCE_SHA256,
    HASH_FUNCTIONS_SOURCE_SHA256,
    REFUSE_CHANGE_SOURCE_SHA256,
    check_ledger,
    describe_firing,
    problems_shown_max,
)
from float_ledger.deposits import approve_deposit, reject_deposit, request_deposit
from float_ledger.errors import LedgerError
from float_ledger.ledger import post_transfers, reverse_group
from float_ledger.model import AccountKind, TopUpAccounts, top_up_transfers
from tests.conftest import create_fresh_database
from tests.ledger.conftest import account, transfer

ALL_INVARIANTS = {"transfers_balanced", "transfers_sequenced", "currencies_sum_to_zero", "balances_match_transfers",
                  "running_balances_consistent", "balances_within_bounds", "groups_posted_once",
                  "transfers_unchanged", "deposits_match_transfers", "transfers_immutable"}


@pytest.fixture
async def fresh(pg_server_url: str, template_db: str, request: pytest.FixtureRequest) -> AsyncIterator[tuple[Any, str]]:
    """A fresh database holding a small healthy ledger: deposits, top-ups, a reversal."""
    url = await create_fresh_database(pg_server_url, template_db, request.node.name)
    conn = await asyncpg.connect(url)
    try:
        source = await account(conn, AccountKind.float_deposits, "utility", lower_bound_minor=None)
        accounts = TopUpAccounts(
            float_account_id=await account(conn, AccountKind.agent_float, "A-1"),
            customer_credit_account_id=await account(conn, AccountKind.customer_credit, "M-1"),
            customer_debt_account_id=await account(conn, AccountKind.customer_debt, "M-1", lower_bound_minor=None),
            collections_account_id=await account(conn, AccountKind.utility_collections, lower_bound_minor=None),
            commission_expense_account_id=await account(conn, AccountKind.commission_expense, lower_bound_minor=None),
            commission_payable_account_id=await account(conn, AccountKind.commission_payable, "A-1"))
        await post_transfers(conn, [transfer(source, accounts.float_account_id, 50_000, kind="deposit")])
        groups = []
        for amount in (1_000, 2_500, 4_000):
            group = uuid.uuid4()
            groups.append(group)
            results = await post_transfers(conn, top_up_transfers(
                top_up_id=group, accounts=accounts, amount_minor=amount, debt_recovery_minor=amount // 10,
                commission_rate_ppm=20_000, currency="KES", metadata={"agent_id": "A-1", "terminal_id": "T-1"}))
            assert all(r.status.posted for r in results)
        async with conn.transaction():
            assert all(r.status.posted for r in await reverse_group(conn, groups[1], reason="terminal timed out"))
        yield conn, url
    finally:
        await conn.close()


@pytest.fixture
def ledger(fresh: tuple[Any, str]) -> Any:
    return fresh[0]


@pytest.fixture
def ledger_url(fresh: tuple[Any, str]) -> str:
    return fresh[1]


async def broken(conn: Any) -> set[str]:
    report = await check_ledger(conn)
    return set(report.broken)


async def corrupt(conn: Any, statement: str, *args: Any) -> None:
    await conn.execute("ALTER TABLE ledger_transfers DISABLE TRIGGER ledger_transfers_immutable")
    await conn.execute(statement, *args)
    await conn.execute("ALTER TABLE ledger_transfers ENABLE ALWAYS TRIGGER ledger_transfers_immutable")


async def a_collection(conn: Any) -> Any:
    return await conn.fetchrow("SELECT * FROM ledger_transfers WHERE kind = 'collection' ORDER BY seq LIMIT 1")


async def vendgate_ledger_check(url: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VENDGATE_")} | {"VENDGATE_DATABASE_URL": url}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "ledger", "check", env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_a_healthy_ledger_passes(ledger: Any) -> None:
    report = await check_ledger(ledger)
    assert report.holds and {i.name for i in report.invariants} == ALL_INVARIANTS
    assert report.transfers == 1 + 3 * 4 + 4 and report.currencies == 1
    assert len(report.digest_hex) == 64


async def test_the_command_passes_on_a_healthy_ledger_and_prints_what_it_checked(ledger_url: str) -> None:
    status, stdout, stderr = await vendgate_ledger_check(ledger_url)
    assert status == 0, stderr
    lines = stdout.strip().splitlines()
    for name in ALL_INVARIANTS:
        assert any(line.startswith(f"ok      {name}: ") for line in lines), stdout
    assert lines[-1] == "ledger check passed: 14 invariants hold over 17 transfers and 7 accounts"


async def test_the_command_fails_naming_the_broken_invariant(ledger: Any, ledger_url: str) -> None:
    await corrupt(ledger, "UPDATE ledger_transfers SET metadata = metadata || '{\"terminal_id\": \"T-9\"}' "
                          "WHERE id = $1", (await a_collection(ledger))["id"])
    status, stdout, _ = await vendgate_ledger_check(ledger_url)
    assert status == 1
    assert "BROKEN  transfers_unchanged: " in stdout
    assert stdout.strip().splitlines()[-1] == "ledger check FAILED: broken invariants: transfers_unchanged"


async def test_the_command_reports_a_missing_schema_in_one_line(pg_server_url: str) -> None:
    conn = await asyncpg.connect(pg_server_url)
    try:
        await conn.execute("DROP DATABASE IF EXISTS ledger_check_empty")
        await conn.execute("CREATE DATABASE ledger_check_empty")
    finally:
        await conn.close()
    status, _, stderr = await vendgate_ledger_check(pg_server_url.rsplit("/", 1)[0] + "/ledger_check_empty")
    assert status == 2 and stderr.strip() == "vendgate: error: the ledger's tables are missing: run `vendgate migrate`"


async def test_a_changed_amount_is_found(ledger: Any) -> None:
    await corrupt(ledger, "UPDATE ledger_transfers SET amount_minor = amount_minor + 1 WHERE id = $1",
                  (await a_collection(ledger))["id"])
    assert await broken(ledger) == {"balances_match_transfers", "running_balances_consistent", "transfers_unchanged"}


async def test_changed_metadata_is_found_by_the_hash_alone(ledger: Any) -> None:
    await corrupt(ledger, "UPDATE ledger_transfers SET metadata = '{}' WHERE id = $1",
                  (await a_collection(ledger))["id"])
    assert await broken(ledger) == {"transfers_unchanged"}


async def test_a_rehashed_change_still_breaks_the_chain_at_the_next_transfer(ledger: Any) -> None:
    first = await a_collection(ledger)
    # Recompute the changed row's own hash from its predecessors: its successors still name the old one.
    await corrupt(ledger, """
        UPDATE ledger_transfers t SET metadata = '{}', hash = ledger_transfer_hash(
            (SELECT coalesce((SELECT p.hash FROM ledger_transfers p WHERE t.debit_account_id IN
                              (p.debit_account_id, p.credit_account_id) AND p.seq < t.seq ORDER BY p.seq DESC LIMIT 1),
                             ledger_genesis_hash(t.debit_account_id))),
            (SELECT coalesce((SELECT p.hash FROM ledger_transfers p WHERE t.credit_account_id IN
                              (p.debit_account_id, p.credit_account_id) AND p.seq < t.seq ORDER BY p.seq DESC LIMIT 1),
                             ledger_genesis_hash(t.credit_account_id))),
            ledger_transfer_content_hash(t.id, t.debit_account_id, t.credit_account_id, t.amount_minor, t.currency,
                                         t.kind, t.group_id, '{}'),
            t.seq, t.debit_balance_after_minor, t.credit_balance_after_minor, t.created_at)
        WHERE id = $1""", first["id"])
    report = await check_ledger(ledger)
    assert report.broken == ["transfers_unchanged"]
    [problems] = [i.problems for i in report.invariants if i.name == "transfers_unchanged"]
    assert str(first["id"]) not in " ".join(problems)


async def test_a_deleted_transfer_is_found(ledger: Any) -> None:
    await corrupt(ledger, "DELETE FROM ledger_transfers WHERE id = $1", (await a_collection(ledger))["id"])
    assert await broken(ledger) == {"balances_match_transfers", "running_balances_consistent", "transfers_unchanged"}


async def test_a_deleted_last_transfer_is_found_by_the_chain_tip(ledger: Any) -> None:
    last = await ledger.fetchrow("SELECT * FROM ledger_transfers ORDER BY seq DESC LIMIT 1")
    await corrupt(ledger, "DELETE FROM ledger_transfers WHERE id = $1", last["id"])
    # Put the balances back as if the transfer never was: only the chain tips remember it.
    await ledger.execute("UPDATE ledger_accounts SET balance_minor = balance_minor + $2 WHERE id = $1",
                         last["debit_account_id"], last["amount_minor"])
    await ledger.execute("UPDATE ledger_accounts SET balance_minor = balance_minor - $2 WHERE id = $1",
                         last["credit_account_id"], last["amount_minor"])
    assert await broken(ledger) == {"transfers_unchanged"}


async def test_a_changed_balance_is_found(ledger: Any) -> None:
    row = await a_collection(ledger)
    await ledger.execute("UPDATE ledger_accounts SET balance_minor = balance_minor + 5 WHERE id = $1",
                         row["debit_account_id"])
    assert await broken(ledger) == {"currencies_sum_to_zero", "balances_match_transfers"}


async def test_a_transfer_between_currencies_is_found(ledger: Any) -> None:
    await corrupt(ledger, "UPDATE ledger_transfers SET currency = 'USD' WHERE id = $1",
                  (await a_collection(ledger))["id"])
    assert await broken(ledger) == {"transfers_balanced", "transfers_unchanged"}


async def test_a_seq_held_twice_is_found(ledger: Any) -> None:
    first, second = await ledger.fetch("SELECT id, seq FROM ledger_transfers ORDER BY seq LIMIT 2")
    await corrupt(ledger, "UPDATE ledger_transfers SET seq = $2 WHERE id = $1", second["id"], first["seq"])
    report = await check_ledger(ledger)
    assert "transfers_sequenced" in report.broken
    [problems] = [i.problems for i in report.invariants if i.name == "transfers_sequenced"]
    assert problems == [f"seq {first['seq']} is held by 2 transfers"]


async def test_a_transfer_that_joined_a_group_later_is_found(ledger: Any) -> None:
    group, first, last = await ledger.fetchrow(
        "SELECT group_id, min(seq), max(seq) FROM ledger_transfers WHERE group_id = (SELECT group_id FROM "
        "ledger_transfers WHERE kind = 'collection' ORDER BY seq LIMIT 1) GROUP BY group_id")
    await corrupt(ledger, "UPDATE ledger_transfers SET created_at = created_at + interval '1 hour' WHERE seq = $1",
                  last)
    report = await check_ledger(ledger)
    assert "groups_posted_once" in report.broken
    [problems] = [i.problems for i in report.invariants if i.name == "groups_posted_once"]
    assert len(problems) == 1 and problems[0].startswith(f"group {group}: ") and "joined it later" in problems[0]
    assert first < last


async def test_a_group_whose_opening_mark_moved_is_found(ledger: Any) -> None:
    """The mark is outside the hash chain: this invariant alone finds it."""
    group, first, second = await ledger.fetchrow(
        "SELECT group_id, (array_agg(id ORDER BY seq))[1], (array_agg(id ORDER BY seq))[2] FROM ledger_transfers "
        "WHERE group_id = (SELECT group_id FROM ledger_transfers WHERE kind = 'collection' ORDER BY seq LIMIT 1) "
        "GROUP BY group_id")
    seqs = {r["id"]: r["seq"] for r in await ledger.fetch("SELECT id, seq FROM ledger_transfers WHERE id = ANY($1)",
                                                           [first, second])}
    await corrupt(ledger, "UPDATE ledger_transfers SET opens_group = (id = $2) WHERE id IN ($1, $2)", first, second)
    report = await check_ledger(ledger)
    assert report.broken == ["groups_posted_once"]
    [problems] = [i.problems for i in report.invariants if i.name == "groups_posted_once"]
    assert problems == [f"group {group}: opened by its transfer at seq {seqs[second]}, not by its first "
                        f"(seq {seqs[first]})"]


async def test_a_posting_clock_moved_ahead_is_found(ledger: Any) -> None:
    # Every later posting of the account would be stamped at that time, a year ahead: statements,
    # balances as of a time and the day's reconciliation would put it on the wrong day.
    row = await a_collection(ledger)
    await ledger.execute("UPDATE ledger_accounts SET last_transfer_at = now() + interval '365 days' WHERE id = $1",
                         row["debit_account_id"])
    assert await broken(ledger) == {"transfers_unchanged"}
    [problem] = [p for i in (await check_ledger(ledger)).invariants if i.name == "transfers_unchanged"
                 for p in i.problems]
    assert problem.startswith(f"account {row['debit_account_id']}: posting clock at ")


async def deposits_of(ledger: Any, *amounts: int) -> list[Any]:
    """Float deposits of `amounts` (approved where above 1,000) on an account of their own."""
    source = await account(ledger, AccountKind.float_deposits, "bank", lower_bound_minor=None)
    float_id = await account(ledger, AccountKind.agent_float, "A-2")
    made = []
    for n, amount in enumerate(amounts):
        result = await request_deposit(ledger, deposit_id=uuid.uuid4(), float_account_id=float_id,
                                       source_account_id=source, amount_minor=amount, currency="KES",
                                       external_ref=f"BANK-{n}", maker="alice", approval_threshold_minor=1_000)
        if amount > 1_000:
            result = await approve_deposit(ledger, deposit_id=result.deposit.id, checker="bob")
        made.append(result.deposit)
    return made


async def unprotected(ledger: Any, statement: str, *args: Any) -> None:
    await ledger.execute("ALTER TABLE ledger_deposits DISABLE TRIGGER ledger_deposits_decided_once")
    await ledger.execute(statement, *args)
    await ledger.execute("ALTER TABLE ledger_deposits ENABLE ALWAYS TRIGGER ledger_deposits_decided_once")


async def deposit_problems(ledger: Any) -> list[str]:
    report = await check_ledger(ledger)
    assert report.broken == ["deposits_match_transfers"]
    [problems] = [i.problems for i in report.invariants if i.name == "deposits_match_transfers"]
    return problems


async def test_posted_deposits_hold_and_a_decided_one_is_final(ledger: Any) -> None:
    small, large = await deposits_of(ledger, 500, 5_000)
    assert (await check_ledger(ledger)).holds
    for statement in ("UPDATE ledger_deposits SET status = 'rejected', reason = 'x' WHERE id = $1",
                      "UPDATE ledger_deposits SET amount_minor = 1 WHERE id = $1",
                      "UPDATE ledger_deposits SET checker = 'carol' WHERE id = $1",
                      "DELETE FROM ledger_deposits WHERE id = $1"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match=r"is decided|never deleted"):
            await ledger.execute(statement, large.id)
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await ledger.execute("TRUNCATE ledger_deposits CASCADE")
    # Pending, only its decision may be written: not a smaller amount for the checker to approve.
    pending = (await request_deposit(ledger, deposit_id=uuid.uuid4(), float_account_id=small.float_account_id,
                                     source_account_id=small.source_account_id, amount_minor=9_000, currency="KES",
                                     external_ref="BANK-9", maker="alice", approval_threshold_minor=1_000)).deposit
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="only its decision"):
        await ledger.execute("UPDATE ledger_deposits SET amount_minor = 900 WHERE id = $1", pending.id)
    assert (await reject_deposit(ledger, deposit_id=pending.id, checker="bob", reason="no bank slip")).deposit.reason
    assert (await check_ledger(ledger)).holds


async def test_a_posted_deposit_marked_rejected_is_found(ledger: Any) -> None:
    # Rejected, it would free its reference, and the same bank payment could credit the float again.
    [deposit] = await deposits_of(ledger, 5_000)
    await unprotected(ledger, "UPDATE ledger_deposits SET status = 'rejected', reason = 'x' WHERE id = $1", deposit.id)
    assert await deposit_problems(ledger) == [
        f"deposit {deposit.id} is rejected but the ledger holds its deposit into the float"]


@pytest.mark.parametrize("change", ["amount_minor = amount_minor + 1", "checker = 'carol'", "maker = 'mallory'",
                                    "external_ref = 'BANK-77'"])
async def test_a_posted_deposit_that_differs_from_its_transfer_is_found(ledger: Any, change: str) -> None:
    [deposit] = await deposits_of(ledger, 5_000)
    await unprotected(ledger, f"UPDATE ledger_deposits SET {change} WHERE id = $1", deposit.id)
    assert await deposit_problems(ledger) == [f"deposit {deposit.id} is posted but its transfer differs from it "
                                              "(amount, accounts, reference, maker or checker)"]


async def test_a_posted_deposit_without_its_transfer_is_found(ledger: Any) -> None:
    [deposit] = await deposits_of(ledger, 500)
    await ledger.execute("""
        INSERT INTO ledger_deposits (id, float_account_id, source_account_id, amount_minor, currency, external_ref,
                                     maker, status, decided_at)
        SELECT $2, float_account_id, source_account_id, 700, currency, 'BANK-X', maker, 'posted', now()
          FROM ledger_deposits WHERE id = $1""", deposit.id, uuid.uuid4())
    [problem] = await deposit_problems(ledger)
    assert problem.endswith("is posted but the ledger holds no such deposit under its id")


async def refused_in_replica_mode(conn: Any, url: str, statement: str) -> None:
    """`statement` is refused in a new session of a database set to session_replication_role =
    replica (set for a database or a role, it is every new session's)."""
    database = url.rsplit("/", 1)[1]
    await conn.execute(f'ALTER DATABASE "{database}" SET session_replication_role = replica')
    other = await asyncpg.connect(url)
    try:
        assert await other.fetchval("SHOW session_replication_role") == "replica"
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await other.execute(statement)
    finally:
        await other.close()
        await conn.execute(f'ALTER DATABASE "{database}" RESET session_replication_role')


@pytest.mark.parametrize("statement", [
    "UPDATE ledger_transfers SET metadata = '{}' WHERE kind = 'deposit'",
    "DELETE FROM ledger_transfers WHERE kind = 'deposit'",
    "UPDATE ledger_deposits SET status = 'rejected' WHERE status = 'posted'",
])
async def test_a_session_in_replica_mode_is_refused_as_any_other(ledger: Any, ledger_url: str,
                                                                 statement: str) -> None:
    # Before, no protecting trigger fired in such a session.
    await deposits_of(ledger, 500)
    await refused_in_replica_mode(ledger, ledger_url, statement)
    assert (await check_ledger(ledger)).holds


@pytest.mark.parametrize("change", ["kind = 'suspense'", "currency = 'UGX'", "owner_ref = 'A-2'",
                                    "created_at = created_at - interval '1 day'"])
async def test_what_an_account_is_never_changes(ledger: Any, change: str) -> None:
    # Reassigned to another owner, an agent's commission account would move its commission into
    # that agent's reconciliation.
    payable = await ledger.fetchval("SELECT id FROM ledger_accounts WHERE kind = 'commission_payable'")
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="never change"):
        await ledger.execute(f"UPDATE ledger_accounts SET {change} WHERE id = $1", payable)
    # What moves, moves: a flag, a bound, a threshold.
    await ledger.execute("UPDATE ledger_accounts SET blocked = true, low_threshold_minor = 5 WHERE id = $1", payable)
    assert (await check_ledger(ledger)).holds


async def test_a_low_float_event_stays_as_written(ledger: Any) -> None:
    float_id = await ledger.fetchval("SELECT id FROM ledger_accounts WHERE kind = 'agent_float'")
    await ledger.execute("UPDATE ledger_accounts SET low_threshold_minor = 10 ^ 9 WHERE id = $1", float_id)
    await ledger.execute("INSERT INTO ledger_events (kind, account_id, transfer_id, balance_minor, threshold_minor, "
                         "created_at) VALUES ('float_below_threshold', $1, NULL, 1, 2, now())", float_id)
    for statement in ("UPDATE ledger_events SET balance_minor = 0", "DELETE FROM ledger_events",
                      "TRUNCATE ledger_events"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="immutable"):
            await ledger.execute(statement)


async def test_a_balance_below_its_bound_is_found(ledger: Any) -> None:
    row = await a_collection(ledger)
    await ledger.execute("ALTER TABLE ledger_accounts DROP CONSTRAINT ledger_accounts_balance_within_bound")
    await ledger.execute("UPDATE ledger_accounts SET lower_bound_minor = balance_minor + 1 WHERE id = $1",
                         row["debit_account_id"])
    assert await broken(ledger) == {"balances_within_bounds"}


async def immutability_problems(ledger: Any) -> list[str]:
    report = await check_ledger(ledger)
    [problems] = [i.problems for i in report.invariants if i.name == "transfers_immutable"]
    return problems


async def test_a_disabled_trigger_is_found(ledger: Any) -> None:
    await ledger.execute("ALTER TABLE ledger_transfers DISABLE TRIGGER ledger_transfers_immutable")
    assert await broken(ledger) == {"transfers_immutable"}
    assert await immutability_problems(ledger) == ["trigger ledger_transfers_immutable is disabled"]
    # Firing only in replication sessions protects nothing in the others.
    await ledger.execute("ALTER TABLE ledger_transfers ENABLE REPLICA TRIGGER ledger_transfers_immutable")
    assert await immutability_problems(ledger) == [
        "trigger ledger_transfers_immutable is enabled for replication sessions only"]
    # Enabled the default way it fires in ordinary sessions only: one whose session_replication_role
    # is replica (a database or role setting can make that every new session's) skips it.
    await ledger.execute("ALTER TABLE ledger_transfers ENABLE TRIGGER ledger_transfers_immutable")
    assert await immutability_problems(ledger) == [
        "trigger ledger_transfers_immutable is enabled for ordinary sessions only (one with "
        "session_replication_role = replica skips it)"]
    await ledger.execute("ALTER TABLE ledger_transfers ENABLE ALWAYS TRIGGER ledger_transfers_immutable")
    assert (await check_ledger(ledger)).holds
    await ledger.execute("DROP TRIGGER ledger_transfers_immutable ON ledger_transfers")
    assert await immutability_problems(ledger) == ["trigger ledger_transfers_immutable is missing"]


async def test_a_trigger_dropped_and_created_on_another_table_is_found(ledger: Any, ledger_url: str) -> None:
    await ledger.execute("DROP TRIGGER ledger_transfers_immutable ON ledger_transfers")
    await ledger.execute("CREATE TRIGGER ledger_transfers_immutable BEFORE UPDATE OR DELETE ON ledger_accounts "
                         "FOR EACH ROW EXECUTE FUNCTION vendgate_refuse_change()")
    assert await broken(ledger) == {"transfers_immutable"}
    assert await immutability_problems(ledger) == [
        "trigger ledger_transfers_immutable is on ledger_accounts, not on ledger_transfers"]
    status, stdout, _ = await vendgate_ledger_check(ledger_url)
    assert status == 1 and "        - trigger ledger_transfers_immutable is on ledger_accounts" in stdout
    assert stdout.strip().splitlines()[-1] == "ledger check FAILED: broken invariants: transfers_immutable"


async def test_a_refusal_replaced_by_a_no_op_is_found(ledger: Any) -> None:
    await ledger.execute("""CREATE OR REPLACE FUNCTION vendgate_refuse_change() RETURNS trigger
        LANGUAGE plpgsql AS $$ BEGIN RETURN coalesce(NEW, OLD); END; $$""")
    # Nothing refuses a change now.
    await ledger.execute("UPDATE ledger_transfers SET metadata = '{}' WHERE id = $1",
                         (await a_collection(ledger))["id"])
    assert "transfers_immutable" in await broken(ledger)
    assert await immutability_problems(ledger) == [
        f"trigger {name} calls public.vendgate_refuse_change, whose source is not the refusal the migrations installed"
        for name in ("ledger_transfers_immutable", "ledger_transfers_not_truncated", "ledger_accounts_undeletable",
                     "ledger_accounts_not_truncated", "ledger_events_immutable", "ledger_events_not_truncated",
                     "ledger_deposits_not_truncated")][:problems_shown_max]


@pytest.mark.parametrize(("create", "problem"), [
    ("CREATE FUNCTION let_through() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN coalesce(NEW, OLD); END; $$;"
     "CREATE TRIGGER ledger_transfers_immutable BEFORE UPDATE OR DELETE ON ledger_transfers FOR EACH ROW "
     "EXECUTE FUNCTION let_through()",
     "calls public.let_through, not public.vendgate_refuse_change"),
    ("CREATE SCHEMA elsewhere; CREATE FUNCTION elsewhere.vendgate_refuse_change() RETURNS trigger LANGUAGE plpgsql "
     "AS $$ BEGIN RETURN coalesce(NEW, OLD); END; $$; CREATE TRIGGER ledger_transfers_immutable BEFORE UPDATE OR "
     "DELETE ON ledger_transfers FOR EACH ROW EXECUTE FUNCTION elsewhere.vendgate_refuse_change()",
     "calls elsewhere.vendgate_refuse_change, not public.vendgate_refuse_change"),
    ("CREATE TRIGGER ledger_transfers_immutable BEFORE DELETE ON ledger_transfers FOR EACH ROW "
     "EXECUTE FUNCTION vendgate_refuse_change()",
     "fires BEFORE DELETE FOR EACH ROW, not BEFORE UPDATE OR DELETE FOR EACH ROW"),
    ("CREATE TRIGGER ledger_transfers_immutable AFTER UPDATE OR DELETE ON ledger_transfers FOR EACH STATEMENT "
     "EXECUTE FUNCTION vendgate_refuse_change()",
     "fires AFTER UPDATE OR DELETE FOR EACH STATEMENT, not BEFORE UPDATE OR DELETE FOR EACH ROW"),
    ("CREATE TRIGGER ledger_transfers_immutable BEFORE UPDATE OF seq OR DELETE ON ledger_transfers FOR EACH ROW "
     "EXECUTE FUNCTION vendgate_refuse_change()",
     "fires on an UPDATE of seq, not of any column"),
    ("CREATE TRIGGER ledger_transfers_immutable BEFORE UPDATE OR DELETE ON ledger_transfers FOR EACH ROW "
     "WHEN (false) EXECUTE FUNCTION vendgate_refuse_change()",
     "fires WHEN false, not always"),
], ids=["another function", "same name in another schema", "fewer events", "after each statement",
        "some columns", "a WHEN clause"])
async def test_a_trigger_recreated_to_protect_less_is_found(ledger: Any, create: str, problem: str) -> None:
    await ledger.execute("DROP TRIGGER ledger_transfers_immutable ON ledger_transfers")
    await ledger.execute(create)
    await ledger.execute("ALTER TABLE ledger_transfers ENABLE ALWAYS TRIGGER ledger_transfers_immutable")
    assert await broken(ledger) == {"transfers_immutable"}
    assert await immutability_problems(ledger) == [f"trigger ledger_transfers_immutable {problem}"]


async def test_a_rewrite_by_ddl_fires_no_trigger_and_only_the_chain_finds_it(ledger: Any) -> None:
    # The tables' owner can rewrite rows without any row trigger firing: the chain finds the change,
    # unless the hashes are recomputed too (docs/THREAT_MODEL.md, "Known gaps").
    await ledger.execute("ALTER TABLE ledger_transfers ALTER COLUMN metadata TYPE jsonb USING metadata - 'agent_id'")
    assert await ledger.fetchval("SELECT count(*) FROM ledger_transfers WHERE metadata ? 'agent_id'") == 0
    assert await broken(ledger) == {"transfers_unchanged"}


MIGRATIONS = Path(__file__).resolve().parents[2] / "gateway" / "migrations"


def installed_source_sha256(function: str) -> str:
    """SHA-256 of the source the last migration defining trigger function `function` gave it."""
    pattern = re.compile(rf"FUNCTION {function}\(\) RETURNS trigger\s+LANGUAGE plpgsql AS \$\$(.*?)\$\$;", re.DOTALL)
    bodies = [body for path in sorted(MIGRATIONS.glob("*.sql")) for body in pattern.findall(path.read_text())]
    assert bodies, f"no migration defines {function}"
    return hashlib.sha256(bodies[-1].encode()).hexdigest()


def test_the_expected_refusal_is_the_one_the_migrations_install() -> None:
    assert installed_source_sha256("vendgate_refuse_change") == REFUSE_CHANGE_SOURCE_SHA256
    assert installed_source_sha256("ledger_deposit_decided_once") == DEPOSIT_DECIDED_ONCE_SOURCE_SHA256


@pytest.mark.parametrize(("tgtype", "words"), [
    (27, "BEFORE UPDATE OR DELETE FOR EACH ROW"), (34, "BEFORE TRUNCATE FOR EACH STATEMENT"),
    (11, "BEFORE DELETE FOR EACH ROW"), (5, "AFTER INSERT FOR EACH ROW"), (81, "INSTEAD OF UPDATE FOR EACH ROW"),
    (28, "AFTER INSERT OR UPDATE OR DELETE FOR EACH STATEMENT")])
def test_trigger_types_are_described_in_create_trigger_s_words(tgtype: int, words: str) -> None:
    assert describe_firing(tgtype) == words


async def test_the_check_runs_in_its_own_transaction(ledger: Any) -> None:
    async with ledger.transaction():
        with pytest.raises(LedgerError, match="outside"):
            await check_ledger(ledger)


# -- corruptions that left the chain's own checks satisfied -----------------------------------------


async def test_a_replaced_hash_function_is_found_and_cannot_hide_a_changed_transfer(ledger: Any) -> None:
    """One CREATE OR REPLACE that answers each stored transfer's own hash made every later change
    invisible, no hash recomputed."""
    await ledger.execute("""
        CREATE OR REPLACE FUNCTION ledger_transfer_hash(
            prev_debit_hash bytea, prev_credit_hash bytea, content_hash bytea, seq bigint,
            debit_balance_after_minor bigint, credit_balance_after_minor bigint, created_at timestamptz
        ) RETURNS bytea LANGUAGE sql STABLE AS $$
            SELECT coalesce((SELECT t.hash FROM ledger_transfers t WHERE t.seq = $4),
                            sha256($1 || $2 || $3 || int8send($4) || int8send($5) || int8send($6)
                                   || timestamptz_send($7)))
        $$""")
    collection = await a_collection(ledger)
    await corrupt(ledger, "UPDATE ledger_transfers SET metadata = metadata || '{\"terminal_id\": \"T-9\"}' "
                          "WHERE id = $1", collection["id"])
    report = await check_ledger(ledger)
    assert report.broken == ["transfers_unchanged"]
    [invariant] = [i for i in report.invariants if i.name == "transfers_unchanged"]
    assert invariant.problems[0] == "hash function ledger_transfer_hash is not the one the migrations installed"


async def test_a_hash_function_shadowed_by_another_definition_is_found(ledger: Any) -> None:
    await ledger.execute("CREATE SCHEMA shadow")
    await ledger.execute("CREATE FUNCTION shadow.ledger_genesis_hash(account_id bigint) RETURNS bytea "
                         "LANGUAGE sql AS $$ SELECT '\\x00'::bytea $$")
    report = await check_ledger(ledger)
    [invariant] = [i for i in report.invariants if i.name == "transfers_unchanged"]
    assert invariant.problems == ["hash function ledger_genesis_hash is defined 2 times (one may shadow it)"]


async def insert_chained_transfer(conn: Any, debit: int, credit: int, amount: int, created_at: str) -> None:
    """A transfer inserted past the posting function, dated `created_at` (an SQL expression), with
    its hash made by the database's own functions and its accounts' balances, tips and clocks set
    to follow it: only what its date breaks shows."""
    await conn.execute(f"""
        WITH a AS (SELECT id, balance_minor, coalesce(chain_hash, ledger_genesis_hash(id)) AS tip
                     FROM ledger_accounts WHERE id IN ($1, $2)),
             t AS (SELECT gen_random_uuid() AS id, nextval('ledger_transfer_seq') AS seq, {created_at} AS created_at,
                          (SELECT balance_minor FROM a WHERE id = $1) - $3 AS debit_after,
                          (SELECT balance_minor FROM a WHERE id = $2) + $3 AS credit_after),
             ins AS (
                INSERT INTO ledger_transfers (id, seq, debit_account_id, credit_account_id, amount_minor, currency,
                                              kind, group_id, metadata, debit_balance_after_minor,
                                              credit_balance_after_minor, created_at, hash)
                SELECT t.id, t.seq, $1, $2, $3, 'KES', 'deposit', NULL, '{{}}', t.debit_after, t.credit_after,
                       t.created_at,
                       ledger_transfer_hash((SELECT tip FROM a WHERE id = $1), (SELECT tip FROM a WHERE id = $2),
                                            ledger_transfer_content_hash(t.id, $1, $2, $3, 'KES', 'deposit', NULL,
                                                                         '{{}}'),
                                            t.seq, t.debit_after, t.credit_after, t.created_at)
                  FROM t RETURNING *)
        UPDATE ledger_accounts a SET balance_minor = CASE WHEN a.id = $1 THEN ins.debit_balance_after_minor
                                                          ELSE ins.credit_balance_after_minor END,
               chain_hash = ins.hash, last_transfer_at = ins.created_at
          FROM ins WHERE a.id IN ($1, $2)""", debit, credit, amount)


async def test_a_transfer_dated_before_its_accounts_were_opened_is_found(ledger: Any) -> None:
    source = await account(ledger, AccountKind.float_deposits, "bank-x", lower_bound_minor=None)
    float_id = await account(ledger, AccountKind.agent_float, "A-9")
    await insert_chained_transfer(ledger, source, float_id, 7000, "now() - interval '30 days'")
    assert await broken(ledger) == {"running_balances_consistent"}


async def test_a_transfer_dated_ahead_of_the_clock_is_found(ledger: Any) -> None:
    """Posting dates a transfer no earlier than its accounts' last one: one dated a year ahead
    drags every later posting of its accounts a year ahead, onto another business day."""
    source = await ledger.fetchval("SELECT id FROM ledger_accounts WHERE kind = 'float_deposits'")
    float_id = await ledger.fetchval("SELECT id FROM ledger_accounts WHERE kind = 'agent_float'")
    credit_id = await ledger.fetchval("SELECT id FROM ledger_accounts WHERE kind = 'customer_credit'")
    await insert_chained_transfer(ledger, source, float_id, 7000, "now() + interval '365 days'")
    [later] = await post_transfers(ledger, [transfer(float_id, credit_id, 100)])
    assert later.transfer is not None and (later.transfer.created_at - datetime.now(UTC)).days >= 364
    report = await check_ledger(ledger)
    assert report.broken == ["running_balances_consistent"]
    [invariant] = [i for i in report.invariants if not i.holds]
    assert len(invariant.problems) == 2 and all("after this check began" in p for p in invariant.problems)
    # Within the allowed skew (the database's clock stepped back a little, say): no finding.
    fresh_source = await account(ledger, AccountKind.float_deposits, "bank-y", lower_bound_minor=None)
    fresh_float = await account(ledger, AccountKind.agent_float, "A-10")
    await insert_chained_transfer(ledger, fresh_source, fresh_float, 100, "now() + interval '10 seconds'")
    again = await check_ledger(ledger)
    assert [[p.split(":")[0] for p in i.problems] for i in again.invariants if not i.holds] == [
        [p.split(":")[0] for p in invariant.problems]]


async def test_a_builtin_shadowed_through_the_search_path_does_not_hide_a_change(ledger: Any,
                                                                                  ledger_url: str) -> None:
    """The chain's functions call sha256() unqualified: with a schema ahead of pg_catalog in the
    database's search_path, a sha256(bytea) there answering each stored transfer's own hash would
    make any change invisible, had the check not put pg_catalog first."""
    database = ledger_url.rsplit("/", 1)[1]
    await ledger.execute("""
        CREATE FUNCTION public.sha256(b bytea) RETURNS bytea LANGUAGE sql STABLE AS $$
            SELECT coalesce((SELECT t.hash FROM public.ledger_transfers t
                              WHERE pg_catalog.octet_length(b) = 128
                                AND t.seq = ('x' || pg_catalog.encode(pg_catalog.substr(b, 97, 8), 'hex'))
                                            ::pg_catalog.bit(64)::pg_catalog.int8),
                            pg_catalog.sha256(b))
        $$""")
    await ledger.execute(f'ALTER DATABASE "{database}" SET search_path = public, pg_catalog')
    changed = await ledger.fetchval("SELECT id FROM ledger_transfers WHERE kind = 'collection' ORDER BY seq LIMIT 1")
    await corrupt(ledger, "UPDATE ledger_transfers SET metadata = metadata || '{\"terminal_id\": \"T-9\"}' "
                          "WHERE id = $1", changed)
    other = await asyncpg.connect(ledger_url)  # a new session, as `vendgate ledger check` opens
    try:
        assert await other.fetchval("SHOW search_path") == "public, pg_catalog"
        report = await check_ledger(other)
        assert await other.fetchval("SHOW search_path") == "public, pg_catalog"  # pinned for the check alone
    finally:
        await other.close()
    assert report.broken == ["transfers_unchanged"]


async def test_a_balance_after_at_bigints_limit_is_reported_not_an_overflow(ledger: Any, ledger_url: str) -> None:
    collections = await ledger.fetchval("SELECT id FROM ledger_accounts WHERE kind = 'utility_collections'")
    first = await ledger.fetchval("SELECT id FROM ledger_transfers WHERE credit_account_id = $1 ORDER BY seq LIMIT 1",
                                  collections)
    await corrupt(ledger, "UPDATE ledger_transfers SET credit_balance_after_minor = 9223372036854775807 "
                          "WHERE id = $1", first)
    status, stdout, stderr = await vendgate_ledger_check(ledger_url)
    assert status == 1 and "BROKEN  running_balances_consistent" in stdout, (status, stdout, stderr)


@pytest.mark.parametrize("bound", [None, -1_000_000])
async def test_an_agent_float_let_below_zero_is_found(ledger: Any, bound: int | None) -> None:
    """A float's bound is a column like any other: lowered, the ledger let the float go under."""
    float_id = await ledger.fetchval("SELECT id FROM ledger_accounts WHERE kind = 'agent_float'")
    credit_id = await ledger.fetchval("SELECT id FROM ledger_accounts WHERE kind = 'customer_credit'")
    await ledger.execute("UPDATE ledger_accounts SET lower_bound_minor = $2 WHERE id = $1", float_id, bound)
    assert await broken(ledger) == {"balances_within_bounds"}  # the bound alone is wrong already
    [result] = await post_transfers(ledger, [transfer(float_id, credit_id, 1_000_000)])
    assert result.status.posted
    report = await check_ledger(ledger)
    assert report.broken == ["balances_within_bounds"]
    [invariant] = [i for i in report.invariants if i.name == "balances_within_bounds"]
    assert "a float is never below 0" in invariant.problems[0]


def test_the_expected_hash_functions_are_the_ones_the_migrations_install() -> None:
    for name, expected in HASH_FUNCTIONS_SOURCE_SHA256.items():
        pattern = re.compile(rf"FUNCTION {name}\(.*?\) RETURNS bytea\s+LANGUAGE (\w+) [A-Z ]+AS \$\$(.*?)\$\$;",
                             re.DOTALL)
        bodies = [m for path in sorted(MIGRATIONS.glob("*.sql")) for m in pattern.findall(path.read_text())]
        assert bodies, f"no migration defines {name}"
        language, body = bodies[-1]
        assert hashlib.sha256(f"{language}:{body}".encode()).hexdigest() == expected, name
