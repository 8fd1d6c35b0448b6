"""The payment records' invariants: `vendgate ledger check` finds a record naming nothing, and no
payment record, terminal or meter can be deleted or have its key changed."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest

from float_ledger.check import REFUSE_KEY_CHANGE_SOURCE_SHA256
from float_ledger.ledger import post_transfers, set_lower_bound
from gateway.keystore import KeyStore
from gateway.records_check import PROTECTING_TRIGGERS, REFUSE_DELETE_SOURCE_SHA256, check_all
from gateway.seeding import meter_number, seed, terminal_id
from gateway.vending import VendingService, VendRequest
from protocol.codes import ResponseCode
from tests.conftest import create_fresh_database
from tests.ledger.conftest import transfer
from tests.ledger.test_check import (
    ALL_INVARIANTS,
    installed_source_sha256,
    refused_in_replica_mode,
    vendgate_ledger_check,
)

VEND_INVARIANTS = {"vend_records_referenced", "vend_records_consistent", "accounts_as_registered",
                   "vend_records_protected"}


@pytest.fixture
async def paid(pg_server_url: str, template_db: str, request: pytest.FixtureRequest
               ) -> AsyncIterator[tuple[asyncpg.Connection, str]]:
    """A fresh database with six paid top-ups, token meters among them."""
    url = await create_fresh_database(pg_server_url, template_db, request.node.name)
    conn = await asyncpg.connect(url)
    try:
        keystore = KeyStore(secrets.token_bytes(32))
        await seed(conn, keystore, agents=2, terminals=3, meters=6, seed_secret=secrets.token_bytes(32))
        today = datetime.now(UTC).strftime("%Y%m%d")
        requests = [VendRequest(kind="topup", client_txn_id=f"{terminal_id(1 + n % 3)}-{today}-{n + 1:06d}",
                                terminal_id=terminal_id(1 + n % 3), meter_number=meter_number(1 + n),
                                amount_minor=2_000, currency="EUR")
                    for n in range(6)]
        outcomes = await VendingService(keystore).process_batch(conn, requests, datetime.now(UTC))
        assert [o.response_code for o in outcomes] == [ResponseCode.APPROVED] * 6
        assert await conn.fetchval("SELECT count(*) FROM tokens") > 0
        yield conn, url
    finally:
        await conn.close()


async def broken(conn: asyncpg.Connection) -> dict[str, list[str]]:
    report = await check_all(conn)
    assert {i.name for i in report.invariants} == ALL_INVARIANTS | VEND_INVARIANTS
    return {i.name: i.problems for i in report.invariants if not i.holds}


async def test_paid_records_pass(paid: tuple[asyncpg.Connection, str]) -> None:
    conn, _ = paid
    assert await broken(conn) == {}


async def test_a_receipt_of_no_payment_is_found(paid: tuple[asyncpg.Connection, str]) -> None:
    conn, url = paid
    # Numbered on from the terminal's counter, which moves with it: no gap, only the payment missing.
    number = await conn.fetchval("UPDATE terminals SET receipt_seq = receipt_seq + 1 WHERE terminal_id = $1"
                                 " RETURNING receipt_seq", terminal_id(1))
    await conn.execute("INSERT INTO receipts (terminal_id, receipt_number, client_txn_id) VALUES ($1, $2, 'NOPE-1')",
                       terminal_id(1), number)
    assert await broken(conn) == {"vend_records_referenced": [f"receipt {terminal_id(1)}/{number}: no payment NOPE-1"]}
    status, stdout, _ = await vendgate_ledger_check(url)
    assert status == 1
    assert "BROKEN  vend_records_referenced: " in stdout
    assert stdout.strip().splitlines()[-1] == "ledger check FAILED: broken invariants: vend_records_referenced"


async def test_a_token_for_no_meter_and_a_payment_of_no_terminal_are_found(
        paid: tuple[asyncpg.Connection, str]) -> None:
    conn, _ = paid
    txn = await conn.fetchval("SELECT client_txn_id FROM tokens LIMIT 1")
    # Renaming the referenced rows is how a record could come to name nothing now (the keys'
    # triggers refuse it: they are disabled to corrupt).
    await conn.execute("ALTER TABLE meters DISABLE TRIGGER meters_keys_fixed")
    await conn.execute("ALTER TABLE vend_transactions DISABLE TRIGGER vend_transactions_keys_fixed")
    await conn.execute("UPDATE meters SET meter_number = '99999999' WHERE meter_number = "
                       "(SELECT meter_number FROM tokens WHERE client_txn_id = $1)", txn)
    other = await conn.fetchval("SELECT client_txn_id FROM vend_transactions WHERE terminal_id = $1 LIMIT 1",
                                terminal_id(2))
    await conn.execute("UPDATE vend_transactions SET terminal_id = 'ZZZZZZZZ' WHERE client_txn_id = $1", other)
    problems = (await broken(conn))["vend_records_referenced"]
    assert any(p.startswith(f"token of payment {txn}: no meter ") for p in problems), problems
    assert f"payment {other}: no terminal ZZZZZZZZ" in problems


async def test_a_receipt_gap_and_payments_out_of_step_with_ledger_and_outbox_are_found(
        paid: tuple[asyncpg.Connection, str]) -> None:
    conn, url = paid
    payments = [r["client_txn_id"] for r in await conn.fetch(
        "SELECT client_txn_id FROM vend_transactions ORDER BY client_txn_id")]
    # A receipt number issued and not on record: the counter ran on past the receipts.
    seq = await conn.fetchval("UPDATE terminals SET receipt_seq = receipt_seq + 1 WHERE terminal_id = $1"
                              " RETURNING receipt_seq", terminal_id(3))
    # The engine never told of a payment; a payment recorded for another amount than was collected;
    # a payment recorded as declined that moved money.
    await conn.execute("DELETE FROM outbox WHERE client_txn_id = $1", payments[0])
    await conn.execute("ALTER TABLE vend_transactions DISABLE TRIGGER vend_transactions_keys_fixed")
    await conn.execute("UPDATE vend_transactions SET amount_minor = amount_minor + 1 WHERE client_txn_id = $1",
                       payments[1])
    await conn.execute("UPDATE vend_transactions SET response_code = 10 WHERE client_txn_id = $1", payments[2])
    await conn.execute("ALTER TABLE vend_transactions ENABLE ALWAYS TRIGGER vend_transactions_keys_fixed")
    assert await broken(conn) == {"vend_records_consistent": [
        f"terminal {terminal_id(3)}: receipt counter {seq}, {seq - 1} receipts, highest {seq - 1}",
        f"payment {payments[0]}: approved with no event of its meter and amount for the prepayment engine",
        # (the engine was told of the amount collected, not of the one recorded now)
        f"payment {payments[1]}: approved with 0 collections of its amount, no event of its meter and amount for "
        "the prepayment engine",
        f"payment {payments[2]}: declined (10) but has a ledger group",
    ]}
    status, stdout, _ = await vendgate_ledger_check(url)
    assert status == 1
    assert stdout.strip().splitlines()[-1] == "ledger check FAILED: broken invariants: vend_records_consistent"


@pytest.mark.parametrize("table", ["terminals", "meters", "vend_transactions", "receipts", "tokens"])
async def test_records_are_never_deleted(paid: tuple[asyncpg.Connection, str], table: str) -> None:
    conn, _ = paid
    before = await conn.fetchval(f"SELECT count(*) FROM {table}")
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match=f"rows of {table} are never deleted"):
        await conn.execute(f"DELETE FROM {table}")
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match=f"rows of {table} are never deleted"):
        await conn.execute(f"TRUNCATE {table} CASCADE")
    assert await conn.fetchval(f"SELECT count(*) FROM {table}") == before > 0


async def test_a_disabled_or_missing_delete_trigger_is_found(paid: tuple[asyncpg.Connection, str]) -> None:
    conn, _ = paid
    assert "receipts_undeletable" in {trigger.name for trigger in PROTECTING_TRIGGERS}
    await conn.execute("ALTER TABLE receipts DISABLE TRIGGER receipts_undeletable")
    await conn.execute("DROP TRIGGER tokens_not_truncated ON tokens")
    assert await broken(conn) == {"vend_records_protected": ["trigger receipts_undeletable is disabled",
                                                               "trigger tokens_not_truncated is missing"]}


async def test_a_protecting_trigger_moved_weakened_or_emptied_is_found(paid: tuple[asyncpg.Connection, str]) -> None:
    conn, url = paid
    await conn.execute("DROP TRIGGER receipts_undeletable ON receipts")
    await conn.execute("CREATE TRIGGER receipts_undeletable BEFORE DELETE ON meters FOR EACH ROW "
                       "EXECUTE FUNCTION vendgate_refuse_delete()")
    await conn.execute("DROP TRIGGER tokens_keys_fixed ON tokens")
    await conn.execute("CREATE TRIGGER tokens_keys_fixed BEFORE UPDATE OF client_txn_id ON tokens FOR EACH ROW "
                       "WHEN (OLD.client_txn_id IS DISTINCT FROM NEW.client_txn_id) "
                       "EXECUTE FUNCTION vendgate_refuse_key_change()")
    await conn.execute("DROP TRIGGER meters_keys_fixed ON meters")
    await conn.execute("CREATE TRIGGER meters_keys_fixed BEFORE UPDATE OF meter_number ON meters FOR EACH ROW "
                       "WHEN (false) EXECUTE FUNCTION vendgate_refuse_key_change()")
    for table in ("tokens", "meters"):  # a trigger created anew fires in ordinary sessions only
        await conn.execute(f"ALTER TABLE {table} ENABLE ALWAYS TRIGGER {table}_keys_fixed")
    assert await broken(conn) == {"vend_records_protected": [
        "trigger meters_keys_fixed fires WHEN false, not WHEN OLD.meter_number IS DISTINCT FROM NEW.meter_number",
        "trigger receipts_undeletable is on meters, not on receipts",
        "trigger tokens_keys_fixed fires on an UPDATE of client_txn_id, not of client_txn_id, meter_number",
        "trigger tokens_keys_fixed fires WHEN (old.client_txn_id IS DISTINCT FROM new.client_txn_id), not WHEN "
        "OLD.client_txn_id IS DISTINCT FROM NEW.client_txn_id OR OLD.meter_number IS DISTINCT FROM NEW.meter_number",
    ]}
    status, stdout, _ = await vendgate_ledger_check(url)
    assert status == 1
    assert stdout.strip().splitlines()[-1] == "ledger check FAILED: broken invariants: vend_records_protected"


async def test_a_refusal_replaced_by_a_no_op_is_found(paid: tuple[asyncpg.Connection, str]) -> None:
    conn, _ = paid
    await conn.execute("""CREATE OR REPLACE FUNCTION vendgate_refuse_key_change() RETURNS trigger
        LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END; $$""")
    await conn.execute("UPDATE meters SET meter_number = '99999999' WHERE meter_number = "
                       "(SELECT min(meter_number) FROM meters)")
    problems = (await broken(conn))["vend_records_protected"]
    assert problems == [f"trigger {table}_keys_fixed calls public.vendgate_refuse_key_change, whose source is not "
                        "the refusal the migrations installed"
                        for table in ("terminals", "meters", "vend_transactions", "receipts", "tokens")]


async def test_a_disabled_keys_trigger_is_found(paid: tuple[asyncpg.Connection, str]) -> None:
    conn, _ = paid
    await conn.execute("ALTER TABLE vend_transactions DISABLE TRIGGER vend_transactions_keys_fixed")
    assert await broken(conn) == {"vend_records_protected": ["trigger vend_transactions_keys_fixed is disabled"]}


def test_the_expected_refusals_are_the_ones_the_migrations_install() -> None:
    assert installed_source_sha256("vendgate_refuse_delete") == REFUSE_DELETE_SOURCE_SHA256
    assert installed_source_sha256("vendgate_refuse_key_change") == REFUSE_KEY_CHANGE_SOURCE_SHA256


@pytest.mark.parametrize(("table", "change"), [
    ("terminals", "terminal_id = 'ZZZZ0001'"), ("meters", "meter_number = '99999999'"),
    ("vend_transactions", "terminal_id = 'ZZZZ0001'"), ("vend_transactions", "client_txn_id = client_txn_id || 'X'"),
    # A payment's record is final but for its reprints: its outcome, amount, group and day too.
    ("vend_transactions", "response_code = 10"), ("vend_transactions", "amount_minor = amount_minor + 1"),
    ("vend_transactions", "group_id = NULL"), ("vend_transactions", "business_date = business_date - 1"),
    ("vend_transactions", "reply = '\\x00'"), ("vend_transactions", "kind = 'advice'"),
    ("receipts", "receipt_number = receipt_number + 1000"), ("receipts", "client_txn_id = 'NOPE-1'"),
    ("tokens", "meter_number = '99999999'"), ("tokens", "client_txn_id = 'NOPE-1'")])
async def test_the_keys_records_name_never_change(paid: tuple[asyncpg.Connection, str], table: str,
                                                   change: str) -> None:
    conn, _ = paid
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match=f"the keys of {table} rows never change"):
        await conn.execute(f"UPDATE {table} SET {change}")
    # Other columns still change (a reprint, a voided token, a blocked terminal).
    await conn.execute("UPDATE vend_transactions SET reprints = reprints + 1")
    await conn.execute("UPDATE tokens SET status = 'voided'")
    await conn.execute("UPDATE terminals SET status = 'blocked'")
    assert await broken(conn) == {}


@pytest.mark.parametrize("statement", ["DELETE FROM receipts", "UPDATE tokens SET meter_number = '99999999'",
                                       "DELETE FROM vend_transactions"])
async def test_a_session_in_replica_mode_is_refused_as_any_other(paid: tuple[asyncpg.Connection, str],
                                                                 statement: str) -> None:
    # Before, no protecting trigger fired in such a session.
    conn, url = paid
    await refused_in_replica_mode(conn, url, statement)
    assert await broken(conn) == {}


async def reversed_payment(conn: asyncpg.Connection, keystore: KeyStore) -> tuple[str, str]:
    """One of the paid top-ups, reversed: (its id, its terminal)."""
    original, terminal = await conn.fetchrow(
        "SELECT client_txn_id, terminal_id FROM vend_transactions ORDER BY client_txn_id LIMIT 1")
    [reversed_] = await VendingService(keystore).process_batch(conn, [VendRequest(
        kind="reversal", client_txn_id=f"{original}/R", terminal_id=terminal, original_txn_id=original,
        amount_minor=2_000, currency="EUR", reason="no reply")], datetime.now(UTC))
    assert reversed_.response_code == ResponseCode.APPROVED
    return original, terminal


@pytest.mark.parametrize("change", ["original_found = NOT original_found", "reversal_txn_id = 'OTHER/R'",
                                    "terminal_id = 'ZZZZ0001'", "original_txn_id = 'NOPE-1'"])
async def test_a_reversal_record_never_changes(paid: tuple[asyncpg.Connection, str], change: str) -> None:
    """The reversals row is the tombstone that bars a payment for ever (0028_reversals_protected.sql)."""
    conn, _ = paid
    await reversed_payment(conn, KeyStore(secrets.token_bytes(32)))
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="the keys of reversals rows never change"):
        await conn.execute(f"UPDATE reversals SET {change}")
    for statement in ("DELETE FROM reversals", "TRUNCATE reversals"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="rows of reversals are never deleted"):
            await conn.execute(statement)
    await conn.execute("UPDATE reversals SET reason = reason")  # nothing the record names
    assert await broken(conn) == {}


async def test_an_approved_reversal_whose_record_is_gone_is_found(paid: tuple[asyncpg.Connection, str]) -> None:
    """Deleted with its trigger disabled: the payment could be reversed again under another id, and a
    second payment_reversed event went to the engine."""
    conn, _ = paid
    original, _ = await reversed_payment(conn, KeyStore(secrets.token_bytes(32)))
    await conn.execute("ALTER TABLE reversals DISABLE TRIGGER reversals_undeletable")
    await conn.execute("DELETE FROM reversals WHERE original_txn_id = $1", original)
    await conn.execute("ALTER TABLE reversals ENABLE ALWAYS TRIGGER reversals_undeletable")
    assert await broken(conn) == {"vend_records_consistent": [
        f"reversal {original}/R: approved, but no reversal of its payment is on record"]}


async def test_two_payments_naming_one_ledger_group_are_found(paid: tuple[asyncpg.Connection, str]) -> None:
    """group_id is no key: B pointing at A's group left B's money in a group no payment names, and
    reversing B would have undone A's."""
    conn, _ = paid
    a, b = await conn.fetch("SELECT client_txn_id, group_id FROM vend_transactions ORDER BY client_txn_id LIMIT 2")
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="the keys of vend_transactions rows never change"):
        await conn.execute("UPDATE vend_transactions SET group_id = $2 WHERE client_txn_id = $1",
                           b["client_txn_id"], a["group_id"])
    await conn.execute("ALTER TABLE vend_transactions DISABLE TRIGGER vend_transactions_keys_fixed")
    await conn.execute("UPDATE vend_transactions SET group_id = $2 WHERE client_txn_id = $1",
                       b["client_txn_id"], a["group_id"])
    await conn.execute("ALTER TABLE vend_transactions ENABLE ALWAYS TRIGGER vend_transactions_keys_fixed")
    assert await broken(conn) == {"vend_records_consistent": [
        f"payment {b['client_txn_id']}: approved with 0 collections of its amount"]}


async def test_an_engine_event_for_another_amount_is_found(paid: tuple[asyncpg.Connection, str]) -> None:
    conn, _ = paid
    txn = await conn.fetchval("SELECT client_txn_id FROM vend_transactions ORDER BY client_txn_id LIMIT 1")
    await conn.execute("UPDATE outbox SET payload = jsonb_set(payload, '{amount_minor}', '1') "
                       "WHERE client_txn_id = $1 AND kind = 'payment_received'", txn)
    assert await broken(conn) == {"vend_records_consistent": [
        f"payment {txn}: approved with no event of its meter and amount for the prepayment engine"]}


async def test_an_agent_float_turned_into_another_kind_of_account_is_found(
        paid: tuple[asyncpg.Connection, str]) -> None:
    """An account's kind, currency and owner are in no transfer's hash. A float made a suspense
    account (its identity trigger off for a moment, then on again as created) takes a credit limit
    through the API and goes below 0 with every ledger invariant holding: the registry says what
    the account must be."""
    conn, _ = paid
    agent = await conn.fetchrow("SELECT agent_id, float_account_id FROM agents ORDER BY agent_id LIMIT 1")
    credit_id = await conn.fetchval("SELECT credit_account_id FROM customers LIMIT 1")
    await conn.execute("ALTER TABLE ledger_accounts DISABLE TRIGGER ledger_accounts_identity_fixed")
    await conn.execute("UPDATE ledger_accounts SET kind = 'suspense' WHERE id = $1", agent["float_account_id"])
    await conn.execute("ALTER TABLE ledger_accounts ENABLE ALWAYS TRIGGER ledger_accounts_identity_fixed")
    await set_lower_bound(conn, agent["float_account_id"], lower_bound_minor=-10**9)  # allowed: not a float now
    float_id = agent["float_account_id"]
    balance = await conn.fetchval("SELECT balance_minor FROM ledger_accounts WHERE id = $1", float_id)
    [result] = await post_transfers(conn, [transfer(float_id, credit_id, balance + 500, currency="EUR")])
    assert result.status.posted
    problems = await broken(conn)
    assert list(problems) == ["accounts_as_registered"]
    assert problems["accounts_as_registered"] == [
        f"agent {agent['agent_id']}: float account {agent['float_account_id']} is suspense in EUR owned by "
        f"agent:{agent['agent_id']}, not agent_float in EUR owned by agent:{agent['agent_id']}"]


async def test_customer_accounts_owned_by_another_or_of_two_currencies_are_found(
        paid: tuple[asyncpg.Connection, str]) -> None:
    conn, _ = paid
    first, second = await conn.fetch("SELECT * FROM customers ORDER BY customer_id LIMIT 2")
    await conn.execute("ALTER TABLE ledger_accounts DISABLE TRIGGER ledger_accounts_identity_fixed")
    await conn.execute("UPDATE ledger_accounts SET owner_ref = $2 WHERE id = $1", first["debt_account_id"],
                       f"customer:{second['account_number']}")
    await conn.execute("UPDATE ledger_accounts SET currency = 'KES' WHERE id = $1", second["credit_account_id"])
    await conn.execute("ALTER TABLE ledger_accounts ENABLE ALWAYS TRIGGER ledger_accounts_identity_fixed")
    problems = (await broken(conn))["accounts_as_registered"]
    assert [p.split(":")[0] for p in problems] == [f"customer {first['account_number']}",
                                                    f"customer {second['account_number']}"]
    assert f"owned by customer:{second['account_number']}, not customer_credit" in problems[0]
    assert "is customer_credit in KES" in problems[1]
