"""Top-ups from a simulated POS terminal over real sockets against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

import pytest

from float_ledger.ledger import balance
from gateway.seeding import DEMO_SUPPLY_GROUP, DEMO_VENDING_KEY, meter_number, seed, terminal_id
from gateway.vending import group_id_for
from protocol import sts
from protocol.codes import ResponseCode
from protocol.messages import EndOfDayRequest, ReprintRequest, ReprintResult
from terminal_sim.client import PosTerminal, TerminalRefused
from terminal_sim.meter import Meter
from tests.gateway.conftest import Running

_sequences: dict[int, int] = {}


def terminal(running: Running, n: int) -> PosTerminal:
    """A terminal that goes on from the sequence number its previous incarnation reached."""
    assert running.gateway.pos_port is not None
    _sequences[n] = _sequences.get(n, 0) + 100
    return PosTerminal(terminal_id(n), running.key(n), "127.0.0.1", running.gateway.pos_port,
                       last_sequence=_sequences[n])


async def accounts(running: Running, meter: str, term: str) -> tuple[int, int, int]:
    async with running.pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT c.credit_account_id, c.debt_account_id, a.float_account_id FROM meters m "
            "JOIN customers c USING (customer_id), terminals t JOIN agents a USING (agent_id) "
            "WHERE m.meter_number = $1 AND t.terminal_id = $2", meter, term)
        return int(row[0]), int(row[1]), int(row[2])


async def test_logon_lookup_top_up_debits_float_and_credits_customer(running: Running) -> None:
    pos = terminal(running, 1)
    await pos.logon()
    meter = meter_number(1)  # a smart meter without debt
    found = await pos.lookup(meter)
    assert found.response_code is ResponseCode.APPROVED and found.customer is not None
    assert found.customer.masked_name == "C*** 1"
    credit_id, _, float_id = await accounts(running, meter, pos.terminal_id)
    async with running.pool.acquire() as conn:
        float_before, credit_before = await balance(conn, float_id), await balance(conn, credit_id)

    result = await pos.top_up(meter, 10_000, "EUR")

    assert result.response_code is ResponseCode.APPROVED
    assert result.receipt_number == f"{pos.terminal_id}-000001"  # the terminal's first receipt
    assert result.debt_recovery_minor + result.energy_minor + result.fees_minor + result.vat_minor == 10_000
    assert result.float_remaining_minor == float_before - 10_000
    async with running.pool.acquire() as conn:
        assert await balance(conn, float_id) == float_before - 10_000
        # A smart meter keeps the energy as prepayment credit; fees and VAT leave it.
        assert await balance(conn, credit_id) == credit_before + result.energy_minor
        outbox = await conn.fetchval("SELECT count(*) FROM outbox WHERE client_txn_id = $1",
                                     result.client_transaction_id.as_key())
        assert outbox == 1
    inquiry = await pos.float_inquiry()
    assert inquiry.float_remaining_minor == float_before - 10_000
    await pos.logoff()


def demo_meter(n: int) -> Meter:
    """The emulated STS meter of seeded meter n, holding its decoder key."""
    key = sts.derive_decoder_key_dkga02(DEMO_VENDING_KEY, 2, DEMO_SUPPLY_GROUP, "01", 1, meter_number(n))
    return Meter(key)


async def test_sts_meter_gets_a_token_the_meter_accepts(running: Running) -> None:
    pos = terminal(running, 3)
    await pos.logon()
    meter, other_meter = demo_meter(3), demo_meter(6)  # every third seeded meter is an STS meter
    results = [await pos.top_up(meter_number(3), amount, "EUR") for amount in (5_000, 12_345)]
    for result in results:
        assert result.response_code is ResponseCode.APPROVED
        assert len(result.tokens) == 1 and len(result.tokens[0]) == 20
        accepted = meter.enter(result.tokens[0])
        assert accepted.accepted, accepted
        assert accepted.units_credited * 100 == result.units_wh  # what the receipt says is what loads
    assert meter.credit_units * 100 == sum(r.units_wh for r in results)
    token = results[0].tokens[0]
    assert not meter.enter(token).accepted  # a replay is refused
    assert not other_meter.enter(token).accepted  # another meter refuses it
    typo = token[:7] + str((int(token[7]) + 1) % 10) + token[8:]
    assert not meter.enter(typo).accepted
    await pos.logoff()


async def test_retry_after_lost_reply_returns_the_same_receipt(running: Running) -> None:
    pos = terminal(running, 5)
    await pos.logon()
    txn = pos.next_transaction_id()
    first = await pos.top_up(meter_number(2), 2_500, "EUR", txn=txn)
    await pos.close()  # the reply "was lost": the terminal reconnects and retries the same id
    _, _, float_id = await accounts(running, meter_number(2), pos.terminal_id)
    async with running.pool.acquire() as conn:
        float_before = await balance(conn, float_id)
    again = await pos.top_up(meter_number(2), 2_500, "EUR", txn=txn)
    assert again == first
    async with running.pool.acquire() as conn:
        # One collection from the float: the retry posted nothing and moved no money.
        collections = await conn.fetchval(
            "SELECT count(*) FROM ledger_transfers WHERE group_id = $1 AND kind = 'collection'",
            group_id_for(txn.as_key()))
        assert collections == 1
        assert await balance(conn, float_id) == float_before == first.float_remaining_minor
    different = await pos.top_up(meter_number(2), 2_600, "EUR", txn=txn)
    assert different.response_code is ResponseCode.DUPLICATE_DIFFERENT_CONTENT
    await pos.logoff()


async def test_declines_leave_money_untouched(running: Running) -> None:
    pos = terminal(running, 2)
    await pos.logon()
    credit_id, debt_id, float_id = await accounts(running, meter_number(4), pos.terminal_id)

    async def money() -> tuple[int, ...]:
        async with running.pool.acquire() as conn:
            return (await balance(conn, float_id), await balance(conn, credit_id), await balance(conn, debt_id),
                    await conn.fetchval("SELECT count(*) FROM ledger_transfers"))

    # The seeded tariff's purchase fee is 10 + 2 VAT: 13 buys energy, 12 would buy none.
    assert (await pos.top_up(meter_number(4), 13, "EUR")).response_code is ResponseCode.APPROVED
    before = await money()
    unknown = await pos.top_up("99999999999", 1_000, "EUR")
    assert unknown.response_code is ResponseCode.UNKNOWN_METER
    wrong_currency = await pos.top_up(meter_number(4), 1_000, "USD")
    assert wrong_currency.response_code is ResponseCode.CURRENCY_MISMATCH
    too_much = await pos.top_up(meter_number(4), 2_000_000, "EUR")  # above the float of 1,000,000
    assert too_much.response_code is ResponseCode.INSUFFICIENT_FLOAT
    fee_only = await pos.top_up(meter_number(4), 12, "EUR")
    assert fee_only.response_code is ResponseCode.INVALID_AMOUNT
    declined = [unknown, wrong_currency, too_much, fee_only]
    assert all(r.receipt_number is None and not r.tokens for r in declined)
    assert await money() == before  # no balance moved and no transfer was posted
    async with running.pool.acquire() as conn:
        ids = [r.client_transaction_id.as_key() for r in declined]
        # Each decline is recorded (a retry replays it), with no receipt, group or engine event.
        rows = await conn.fetch("SELECT response_code, group_id, receipt_number FROM vend_transactions"
                                " WHERE client_txn_id = ANY ($1::text[])", ids)
        assert sorted(r["response_code"] for r in rows) == sorted(int(r.response_code) for r in declined)
        assert all(r["group_id"] is None and r["receipt_number"] is None for r in rows)
        assert await conn.fetchval("SELECT count(*) FROM outbox WHERE client_txn_id = ANY ($1::text[])", ids) == 0
    await pos.logoff()


async def test_wrong_key_is_refused(running: Running) -> None:
    assert running.gateway.pos_port is not None
    pos = PosTerminal(terminal_id(4), bytes(16), "127.0.0.1", running.gateway.pos_port)
    with pytest.raises(TerminalRefused) as refused:
        await pos.logon()
    assert refused.value.response_code is ResponseCode.AUTH_FAILED
    await pos.close()


async def test_blocked_terminal_refused_at_logon_and_mid_session(running: Running) -> None:
    pos = terminal(running, 6)
    await pos.logon()
    async with running.pool.acquire() as conn:
        await conn.execute("UPDATE terminals SET status = 'blocked' WHERE terminal_id = $1", pos.terminal_id)
    with pytest.raises(TerminalRefused) as mid:
        await pos.top_up(meter_number(5), 1_000, "EUR")
    assert mid.value.response_code is ResponseCode.TERMINAL_BLOCKED
    fresh = terminal(running, 6)
    with pytest.raises(TerminalRefused) as at_logon:
        await fresh.logon()
    assert at_logon.value.response_code is ResponseCode.TERMINAL_BLOCKED
    await fresh.close()
    await pos.close()


async def test_a_terminal_blocked_after_a_payment_gets_that_payment_s_stored_reply_and_nothing_new(
        running: Running) -> None:
    # The payment was applied (the customer's cash taken) before the block: its repeat answers
    # what the first did, so the agent can hand over the receipt; a new payment is not applied.
    pos = terminal(running, 9)
    await pos.logon()
    paid = await pos.top_up(meter_number(9), 1_000, "EUR")
    assert paid.response_code is ResponseCode.APPROVED
    async with running.pool.acquire() as conn:
        await conn.execute("UPDATE terminals SET status = 'blocked' WHERE terminal_id = $1", pos.terminal_id)
    repeat = await pos.top_up(meter_number(9), 1_000, "EUR", txn=paid.client_transaction_id)
    assert repeat == paid
    with pytest.raises(TerminalRefused) as new:
        await pos.top_up(meter_number(9), 1_000, "EUR")
    assert new.value.response_code is ResponseCode.TERMINAL_BLOCKED
    await pos.close()
    async with running.pool.acquire() as conn:
        approved = await conn.fetch("SELECT client_txn_id FROM vend_transactions WHERE terminal_id = $1"
                                    " AND response_code = $2", pos.terminal_id, ResponseCode.APPROVED)
    assert [r["client_txn_id"] for r in approved] == [paid.client_transaction_id.as_key()]


async def test_reversal_after_commit_compensates_and_repeats_are_idempotent(running: Running) -> None:
    pos = terminal(running, 1)
    await pos.logon()
    _, _, float_id = await accounts(running, meter_number(7), pos.terminal_id)
    async with running.pool.acquire() as conn:
        float_before = await balance(conn, float_id)
    txn = pos.next_transaction_id()
    paid = await pos.top_up(meter_number(7), 3_000, "EUR", txn=txn)
    assert paid.response_code is ResponseCode.APPROVED
    reversed_ = await pos.reverse(txn, 3_000, "EUR")
    assert reversed_.response_code is ResponseCode.APPROVED and reversed_.reversed_amount_minor == 3_000
    again = await pos.reverse(txn, 3_000, "EUR")
    assert again == reversed_
    async with running.pool.acquire() as conn:
        assert await balance(conn, float_id) == float_before
    retried_original = await pos.top_up(meter_number(7), 3_000, "EUR", txn=txn)
    assert retried_original.response_code is ResponseCode.ALREADY_REVERSED
    await pos.logoff()


async def test_reversal_before_original_means_original_is_never_applied(running: Running) -> None:
    pos = terminal(running, 3)
    await pos.logon()
    txn = pos.next_transaction_id()
    early = await pos.reverse(txn, 1_500, "EUR")
    assert early.response_code is ResponseCode.ORIGINAL_NOT_FOUND
    late = await pos.top_up(meter_number(8), 1_500, "EUR", txn=txn)
    assert late.response_code is ResponseCode.ALREADY_REVERSED
    async with running.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM ledger_transfers WHERE group_id = $1",
                                   group_id_for(txn.as_key())) == 0
    await pos.logoff()


async def test_reprint_returns_the_stored_receipt(running: Running) -> None:
    pos = terminal(running, 5)
    await pos.logon()
    txn = pos.next_transaction_id()
    paid = await pos.top_up(meter_number(6), 4_000, "EUR", txn=txn)
    reprint = await pos.reprint(txn)
    assert reprint.response_code is ResponseCode.APPROVED
    assert reprint.receipt_number == paid.receipt_number
    assert reprint.receipt_lines[1:] == paid.receipt_lines and reprint.tokens == paid.tokens
    await pos.logoff()


async def test_reprint_by_receipt_number_takes_only_the_printed_form(running: Running) -> None:
    pos = terminal(running, 5)
    await pos.logon()
    paid = await pos.top_up(meter_number(6), 4_100, "EUR")
    assert paid.receipt_number is not None
    printed = paid.receipt_number
    terminal_part, _, number = printed.rpartition("-")
    assert len(number) == 6
    by_number = await pos._request(ReprintRequest(receipt_number=printed), ReprintResult)
    assert by_number.response_code is ResponseCode.APPROVED and by_number.receipt_number == printed
    for other in (f"{terminal_part}-{int(number)}", f"{terminal_part}-0{number}", f"{terminal_part}-00{number}",
                  f"{terminal_part}-{number}0", f"T0000003-{number}", f"{terminal_part}-"):
        refused = await pos._request(ReprintRequest(receipt_number=other), ReprintResult)
        assert refused.response_code is ResponseCode.ORIGINAL_NOT_FOUND, other
    await pos.logoff()


def test_uuid_group_ids_are_stable() -> None:
    assert group_id_for("T0000001-20250101-000001") == group_id_for("T0000001-20250101-000001")
    assert isinstance(group_id_for("x"), uuid.UUID)


async def test_reversed_payment_cannot_be_reprinted_and_reprinted_cannot_be_reversed(running: Running) -> None:
    pos = terminal(running, 3)
    await pos.logon()
    first = pos.next_transaction_id()
    assert (await pos.top_up(meter_number(9), 2_000, "EUR", txn=first)).response_code is ResponseCode.APPROVED
    assert (await pos.reverse(first, 2_000, "EUR")).response_code is ResponseCode.APPROVED
    reprint = await pos.reprint(first)
    assert reprint.response_code is ResponseCode.ALREADY_REVERSED and reprint.tokens == []
    second = pos.next_transaction_id()
    assert (await pos.top_up(meter_number(9), 2_000, "EUR", txn=second)).response_code is ResponseCode.APPROVED
    assert (await pos.reprint(second)).response_code is ResponseCode.APPROVED
    refused = await pos.reverse(second, 2_000, "EUR")
    assert refused.response_code is ResponseCode.NOT_PERMITTED
    await pos.logoff()


async def test_refused_reversal_can_be_sent_again_corrected(running: Running) -> None:
    pos = terminal(running, 5)
    await pos.logon()
    txn = pos.next_transaction_id()
    assert (await pos.top_up(meter_number(10), 1_700, "EUR", txn=txn)).response_code is ResponseCode.APPROVED
    wrong = await pos.reverse(txn, 1_600, "EUR")
    assert wrong.response_code is ResponseCode.INVALID_AMOUNT
    right = await pos.reverse(txn, 1_700, "EUR")
    assert right.response_code is ResponseCode.APPROVED and right.reversed_amount_minor == 1_700
    await pos.logoff()


async def test_reads_the_back_office_has_not_granted_are_refused(running: Running) -> None:
    # A terminal of its own: the grants change here and must not leak into other tests.
    async with running.pool.acquire() as conn:
        n = int(await conn.fetchval("SELECT count(*) FROM terminals")) + 1
        await seed(conn, running.keystore, agents=1, terminals=1, meters=1, seed_secret=running.seed_secret)
    pos = terminal(running, n)
    await pos.logon()
    txn = pos.next_transaction_id()
    paid = await pos.top_up(meter_number(2), 1_000, "EUR", txn=txn)
    assert paid.response_code is ResponseCode.APPROVED and paid.receipt_number is not None
    assert (await pos.reprint(txn)).response_code is ResponseCode.APPROVED
    async with running.pool.acquire() as conn:
        await conn.execute("UPDATE terminals SET allowed_operations = ARRAY['topup'] WHERE terminal_id = $1",
                           pos.terminal_id)
        reprints_before = await conn.fetchval("SELECT reprints FROM vend_transactions WHERE client_txn_id = $1",
                                              txn.as_key())
    # Withdrawn mid-session: the next request of each kind is refused, and nothing is handed out.
    reprint = await pos.reprint(txn)
    assert reprint.response_code is ResponseCode.NOT_PERMITTED
    assert reprint.tokens == [] and reprint.receipt_lines == [] and reprint.receipt_number is None
    inquiry = await pos.float_inquiry()
    assert inquiry.response_code is ResponseCode.NOT_PERMITTED and inquiry.float_remaining_minor == 0
    assert pos.business_date is not None
    totals = await pos.end_of_day(EndOfDayRequest(
        business_date=pos.business_date, currency="EUR", top_up_count=1, top_up_total_minor=1_000,
        reversal_count=0, reversal_total_minor=0, advice_count=0, advice_total_minor=0))
    assert totals.response_code is ResponseCode.NOT_PERMITTED and totals.top_up_count == 0
    lookup = await pos.lookup(meter_number(2))
    assert lookup.response_code is ResponseCode.NOT_PERMITTED and lookup.customer is None
    async with running.pool.acquire() as conn:
        assert await conn.fetchval("SELECT reprints FROM vend_transactions WHERE client_txn_id = $1",
                                   txn.as_key()) == reprints_before
    # What stays granted still works.
    assert (await pos.top_up(meter_number(2), 1_000, "EUR")).response_code is ResponseCode.APPROVED
    await pos.logoff()


async def _until(condition: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_a_reply_the_gateway_drops_after_commit_is_given_to_the_retry(running: Running) -> None:
    """The terminal logs on again while its payment waits to commit: the old session gets its
    goodbye, the payment commits and its reply goes nowhere. The retry on the new session gets
    the stored reply, and the money moved once."""
    first = terminal(running, 7)
    await first.logon()
    meter = meter_number(9)
    _, _, float_id = await accounts(running, meter, first.terminal_id)
    txn = first.next_transaction_id()
    holder = await running.pool.acquire()
    try:
        async with holder.transaction():
            float_before = await balance(holder, float_id)
            await holder.execute("SELECT 1 FROM ledger_accounts WHERE id = $1 FOR UPDATE", float_id)
            paying = asyncio.create_task(first.top_up(meter, 4_000, "EUR", txn=txn))

            async def commit_waits() -> bool:
                return bool(await running.pool.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND query LIKE '%vend_commit_topups%'"))

            await _until(commit_waits)
            second = terminal(running, 7)
            await second.logon()  # replaces the first session while its payment is in flight
            with pytest.raises(TerminalRefused) as goodbye:
                await paying
            assert goodbye.value.response_code is ResponseCode.SYSTEM_BUSY
    finally:
        await running.pool.release(holder)

    async def recorded() -> bool:
        return bool(await running.pool.fetchval("SELECT count(*) FROM vend_transactions WHERE client_txn_id = $1",
                                                txn.as_key()))

    await _until(recorded)  # committed once the lock went, its reply dropped with the old session
    again = await second.top_up(meter, 4_000, "EUR", txn=txn)
    assert again.response_code is ResponseCode.APPROVED
    async with running.pool.acquire() as conn:
        stored = await conn.fetchval("SELECT receipt_number FROM receipts WHERE client_txn_id = $1", txn.as_key())
        assert again.receipt_number == f"{first.terminal_id}-{stored:06d}"
        assert await conn.fetchval("SELECT count(*) FROM ledger_transfers WHERE group_id = $1 AND kind = 'collection'",
                                   group_id_for(txn.as_key())) == 1
        assert await balance(conn, float_id) == float_before - 4_000 == again.float_remaining_minor
    await second.logoff()
