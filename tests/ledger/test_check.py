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
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from float_ledger.check import REFUSE_CHANGE_SOURCE_SHA256, check_ledger, describe_firing
from float_ledger.errors import LedgerError
from float_ledger.ledger import post_transfers, reverse_group
from float_ledger.model import AccountKind, TopUpAccounts, top_up_transfers
from tests.conftest import create_fresh_database
from tests.ledger.conftest import account, transfer

ALL_INVARIANTS = {"transfers_balanced", "transfers_sequenced", "currencies_sum_to_zero", "balances_match_transfers",
                  "running_balances_consistent", "balances_within_bounds", "groups_posted_once",
                  "transfers_unchanged", "transfers_immutable"}


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
    await conn.execute("ALTER TABLE ledger_transfers ENABLE TRIGGER ledger_transfers_immutable")


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
    assert lines[-1] == "ledger check passed: 12 invariants hold over 17 transfers and 7 accounts"


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
                     "ledger_accounts_not_truncated")]


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
