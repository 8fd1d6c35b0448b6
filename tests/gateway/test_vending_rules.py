"""Batch rules that only show when several payments share a batch: debt per customer, limits after refusals."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, date, datetime, timedelta, timezone

import pytest

from float_ledger.ledger import balance, post_transfers
from float_ledger.model import AccountKind, Transfer
from float_ledger.reconciliation import reconcile_agent_day
from gateway import registry
from gateway.committer import Committer
from gateway.seeding import DEMO_SUPPLY_GROUP, DEMO_TARIFF, meter_number
from gateway.vending import GROUP_NAMESPACE, TOPUP_PARTS, VendingService, VendRequest, group_id_for, transfer_id_for
from protocol.codes import ResponseCode
from tests.gateway.conftest import Running

TODAY = datetime.now(UTC).strftime("%Y%m%d")


async def fund(conn, agent: registry.Agent, amount: int) -> None:  # type: ignore[no-untyped-def]
    deposits = await registry.system_account(conn, AccountKind.float_deposits, "EUR")
    await post_transfers(conn, [Transfer(id=uuid.uuid4(), debit_account_id=deposits,
                                         credit_account_id=agent.float_account_id, amount_minor=amount,
                                         currency="EUR", kind="deposit")])


async def shop_with_indebted_customer(conn, running: Running, *, terminal: str, account: str,  # type: ignore[no-untyped-def]
                                      debt_minor: int) -> tuple[int, int]:
    """An agent with float, one terminal, and a customer who owes `debt_minor` at a 50 % recovery
    share: (customer id, debt account id). The caller adds the customer's meters."""
    agent = await registry.add_agent(conn, kind="shop", name=f"Shop {terminal}", currency="EUR")
    await fund(conn, agent, 100_000)
    await registry.add_terminal(conn, running.keystore, terminal_id=terminal, serial=f"SN{terminal}",
                                agent_id=agent.agent_id)
    customer = await registry.add_customer(conn, account_number=account, name="Owes Money", currency="EUR",
                                           debt_recovery_share_bp=5_000)
    debt_id = await conn.fetchval("SELECT debt_account_id FROM customers WHERE customer_id = $1", customer)
    collections = await registry.system_account(conn, AccountKind.utility_collections, "EUR")
    await post_transfers(conn, [Transfer(id=uuid.uuid4(), debit_account_id=debt_id, credit_account_id=collections,
                                         amount_minor=debt_minor, currency="EUR", kind="adjustment")])
    return customer, int(debt_id)


async def run_batch(running: Running, requests: list[VendRequest]) -> list[int]:
    committer = Committer(running.pool, VendingService(running.keystore))
    committer.start()
    try:
        outcomes = await asyncio.gather(*(committer.submit(r) for r in requests))
    finally:
        await committer.stop()
    return [o.response_code for o in outcomes]


async def test_debt_is_recovered_once_across_a_customers_meters(running: Running) -> None:
    async with running.pool.acquire() as conn:
        customer, debt_id = await shop_with_indebted_customer(conn, running, terminal="D0000001",
                                                              account="DEBT0001", debt_minor=1_000)
        for number in ("90000000001", "90000000002"):
            await registry.add_meter(conn, meter_number=number, customer_id=customer, supply_mode="smart",
                                     tariff_code=DEMO_TARIFF)
    codes = await run_batch(running, [
        VendRequest(kind="topup", client_txn_id=f"D0000001-{TODAY}-00000{n}", terminal_id="D0000001",
                    meter_number=number, amount_minor=5_000, currency="EUR")
        for n, number in ((1, "90000000001"), (2, "90000000002"))])
    assert codes == [ResponseCode.APPROVED, ResponseCode.APPROVED]
    async with running.pool.acquire() as conn:
        assert await balance(conn, debt_id) == 0  # 1,000 recovered in all, not 1,000 per meter


async def test_a_refused_payment_does_not_count_against_the_daily_limit(running: Running) -> None:
    async with running.pool.acquire() as conn:
        agent = await registry.add_agent(conn, kind="village", name="Limit test", currency="EUR")
        await fund(conn, agent, 500)
        await registry.add_terminal(conn, running.keystore, terminal_id="L0000001", serial="LSN1",
                                    agent_id=agent.agent_id, daily_limit_minor=1_000)
    codes = await run_batch(running, [
        VendRequest(kind="topup", client_txn_id=f"L0000001-{TODAY}-000001", terminal_id="L0000001",
                    meter_number=meter_number(26), amount_minor=800, currency="EUR"),
        VendRequest(kind="topup", client_txn_id=f"L0000001-{TODAY}-000002", terminal_id="L0000001",
                    meter_number=meter_number(27), amount_minor=300, currency="EUR"),
    ])
    assert codes == [ResponseCode.INSUFFICIENT_FLOAT, ResponseCode.APPROVED]
    later = await run_batch(running, [
        VendRequest(kind="topup", client_txn_id=f"L0000001-{TODAY}-000003", terminal_id="L0000001",
                    meter_number=meter_number(26), amount_minor=701, currency="EUR")])
    assert later == [ResponseCode.LIMIT_EXCEEDED]  # 300 approved today + 701 > 1,000, read from the stored totals


async def test_a_reversed_payment_still_counts_against_the_daily_limit_and_a_reversal_is_no_payment(
        running: Running) -> None:
    """A reversed payment's token may already be on the meter: the daily limit bounds what a
    terminal issues, reversals included. A second reversal naming the first one's id is refused
    (no payment has that id) and leaves no event for the engine."""
    async with running.pool.acquire() as conn:
        agent = await registry.add_agent(conn, kind="shop", name="Reversal limit test", currency="EUR")
        await fund(conn, agent, 10_000)
        await registry.add_terminal(conn, running.keystore, terminal_id="L0000002", serial="LSN2",
                                    agent_id=agent.agent_id, daily_limit_minor=1_500)

    def topup(n: int, amount: int) -> VendRequest:
        return VendRequest(kind="topup", client_txn_id=f"L0000002-{TODAY}-00000{n}", terminal_id="L0000002",
                           meter_number=meter_number(26), amount_minor=amount, currency="EUR")

    lost = topup(1, 1_000)
    assert await run_batch(running, [lost, topup(2, 500)]) == [ResponseCode.APPROVED] * 2
    reversal = VendRequest(kind="reversal", client_txn_id=f"{lost.client_txn_id}/R", terminal_id="L0000002",
                           amount_minor=1_000, currency="EUR", original_txn_id=lost.client_txn_id, reason="no reply")
    assert await run_batch(running, [reversal]) == [ResponseCode.APPROVED]
    of_the_reversal = VendRequest(kind="reversal", client_txn_id=f"{reversal.client_txn_id}/R",
                                  terminal_id="L0000002", amount_minor=1_000, currency="EUR",
                                  original_txn_id=reversal.client_txn_id, reason="no reply")
    assert await run_batch(running, [of_the_reversal]) == [ResponseCode.ORIGINAL_NOT_FOUND]
    assert await run_batch(running, [topup(3, 1)]) == [ResponseCode.LIMIT_EXCEEDED]  # 1,500 issued today
    async with running.pool.acquire() as conn:
        events = await conn.fetch("SELECT kind, client_txn_id FROM outbox WHERE client_txn_id LIKE 'L0000002-%' "
                                  "ORDER BY event_id")
        tombstones = await conn.fetchval("SELECT count(*) FROM reversals WHERE original_txn_id = $1",
                                         reversal.client_txn_id)
    assert [(e["kind"], e["client_txn_id"]) for e in events] == [
        ("payment_received", lost.client_txn_id), ("payment_received", f"L0000002-{TODAY}-000002"),
        ("payment_reversed", lost.client_txn_id)]
    assert tombstones == 0


async def test_receipts_stay_gap_free_across_a_reversal_in_the_batch(running: Running) -> None:
    """A reversal cuts the batch in two: the second run of top-ups numbers on from the first."""
    terminal = "T0000002"
    first = VendRequest(kind="topup", client_txn_id=f"{terminal}-{TODAY}-990001", terminal_id=terminal,
                        meter_number=meter_number(2), amount_minor=500, currency="EUR")
    reversal = VendRequest(kind="reversal", client_txn_id=f"{first.client_txn_id}/R", terminal_id=terminal,
                           amount_minor=500, currency="EUR", original_txn_id=first.client_txn_id, reason="lost")
    second = VendRequest(kind="topup", client_txn_id=f"{terminal}-{TODAY}-990002", terminal_id=terminal,
                         meter_number=meter_number(4), amount_minor=500, currency="EUR")
    third = VendRequest(kind="topup", client_txn_id=f"{terminal}-{TODAY}-990003", terminal_id=terminal,
                        meter_number=meter_number(6), amount_minor=500, currency="EUR")
    service = VendingService(running.keystore)
    async with running.pool.acquire() as conn:
        before = int(await conn.fetchval("SELECT receipt_seq FROM terminals WHERE terminal_id = $1", terminal))
        async with conn.transaction():
            outcomes = await service.process_batch(conn, [first, reversal, second, third], datetime.now(UTC))
        after = int(await conn.fetchval("SELECT receipt_seq FROM terminals WHERE terminal_id = $1", terminal))
        stored = [r["receipt_number"] for r in await conn.fetch(
            "SELECT receipt_number FROM receipts WHERE terminal_id = $1 AND receipt_number > $2 ORDER BY 1",
            terminal, before)]
    assert [o.response_code for o in outcomes] == [ResponseCode.APPROVED] * 4
    assert [outcomes[i].receipt_number for i in (0, 2, 3)] == [before + 1, before + 2, before + 3]
    assert stored == [before + 1, before + 2, before + 3] and after == before + 3


def test_payment_ids_are_the_uuid5_ids_every_earlier_gateway_derived() -> None:
    """A retry must derive the ids its first attempt posted, whichever gateway version took it:
    the group id is uuid5(GROUP_NAMESPACE, client transaction id) and a leg's id is the group id
    with its last byte set to the leg's number (1-5)."""
    names = [f"T{n:07d}-20261202-{n % 999_999 + 1:06d}" for n in range(0, 5_000_000, 997)]
    names += ["", "K0000001-20991231-999999", "T\u00e9rminal-\U0001f600"]
    for name in names:
        group = group_id_for(name)
        expected = uuid.uuid5(GROUP_NAMESPACE, name)
        assert group == expected and hash(group) == hash(expected) and str(group) == str(expected)
        assert isinstance(group, uuid.UUID) and group.version == 5
        for number, part in enumerate(TOPUP_PARTS, start=1):
            leg = transfer_id_for(group, part)
            assert leg == uuid.UUID(int=(expected.int & ~0xFF) | number)
            assert leg == transfer_id_for(expected, part)  # from a group id read back from the database


async def test_a_token_meter_without_a_tid_left_is_declined_and_its_debt_share_stays_for_the_next(
        running: Running) -> None:
    """TIDs of the 1993 base date ran out in November 2024: that meter needs a key change. Its
    payment is a stored decline, the batch around it commits as one, and the debt its share
    would have recovered is recovered by the customer's next payment in the batch instead."""
    async with running.pool.acquire() as conn:
        customer, debt_id = await shop_with_indebted_customer(conn, running, terminal="K0000001",
                                                              account="TID00001", debt_minor=100)
        await registry.add_meter(conn, meter_number="91000000009", customer_id=customer, supply_mode="sts",
                                 tariff_code=DEMO_TARIFF, sts_supply_group_code=DEMO_SUPPLY_GROUP,
                                 sts_tariff_index="01", sts_key_revision=1, sts_base_year=1993)
        await registry.add_meter(conn, meter_number="91000000002", customer_id=customer, supply_mode="smart",
                                 tariff_code=DEMO_TARIFF)
    old, smart = (VendRequest(kind="topup", client_txn_id=f"K0000001-{TODAY}-00000{n}", terminal_id="K0000001",
                              meter_number=number, amount_minor=1_000, currency="EUR")
                  for n, number in ((1, "91000000009"), (2, "91000000002")))
    service = VendingService(running.keystore)
    async with running.pool.acquire() as conn:
        async with conn.transaction():
            outcomes = await service.process_batch(conn, [old, smart], datetime.now(UTC))
        assert [o.response_code for o in outcomes] == [ResponseCode.UNKNOWN_METER, ResponseCode.APPROVED]
        assert outcomes[0].tokens == [] and outcomes[0].receipt_number is None
        assert outcomes[1].receipt_number == 1  # numbered as the terminal's first: no gap for the decline
        assert outcomes[1].debt_recovery_minor == 100  # the declined payment's share did not use it up
        assert await balance(conn, debt_id) == 0
        # Asked again, the decline is the stored one.
        async with conn.transaction():
            [again] = await service.process_batch(conn, [old], datetime.now(UTC))
    assert again.response_code == ResponseCode.UNKNOWN_METER and again.message == outcomes[0].message


async def test_the_engine_is_told_when_an_advice_was_taken_in_utc(running: Running) -> None:
    taken = datetime(2026, 3, 1, 11, 0, tzinfo=timezone(timedelta(hours=3)))  # the terminal's local clock
    advice = VendRequest(kind="advice", client_txn_id=f"T0000004-{TODAY}-995001", terminal_id="T0000004",
                         meter_number=meter_number(8), amount_minor=700, currency="EUR", taken_at=taken)
    service = VendingService(running.keystore)
    async with running.pool.acquire() as conn:
        async with conn.transaction():
            [outcome] = await service.process_batch(conn, [advice], datetime.now(UTC))
        assert outcome.response_code == ResponseCode.APPROVED
        payload = json.loads(await conn.fetchval("SELECT payload FROM outbox WHERE client_txn_id = $1",
                                                 advice.client_txn_id))
    assert payload["taken_at"] == "2026-03-01T08:00:00+00:00"
    assert payload["paid_at"].endswith("+00:00")


async def test_a_payment_is_recorded_on_the_business_day_the_reconciliation_counts_it_on(running: Running) -> None:
    """One source of business days. CET is an IANA zone with summer time (what the reconciliation
    and the terminal's session use); PostgreSQL reads 'CET' as the fixed +01:00 abbreviation, so a
    day worked out in SQL put a summer night's payment on the day before: at the terminal's end of
    day and against the daily limit it counted on one day, in `float reconcile` on the next."""
    at = datetime(2031, 7, 1, 22, 30, tzinfo=UTC)  # 00:30 on 2 July in Central European summer time
    async with running.pool.acquire() as conn:
        agent = await registry.add_agent(conn, kind="shop", name="Night shop", currency="EUR", time_zone="CET")
        await fund(conn, agent, 10_000)
        await registry.add_terminal(conn, running.keystore, terminal_id="N0000001", serial="NSN1",
                                    agent_id=agent.agent_id)
        # The ledger stamps a posting no earlier than its accounts' last one: stamped at `at`.
        await conn.execute("UPDATE ledger_accounts SET last_transfer_at = $1", at)
        request = VendRequest(kind="topup", client_txn_id="N0000001-20310702-000001", terminal_id="N0000001",
                              meter_number=meter_number(26), amount_minor=1_000, currency="EUR")
        [outcome] = await VendingService(running.keystore).process_batch(conn, [request], at)
        assert outcome.response_code == ResponseCode.APPROVED
        recorded = await conn.fetchval("SELECT business_date FROM vend_transactions WHERE client_txn_id = $1",
                                       request.client_txn_id)
        counted = await conn.fetchval("SELECT business_date FROM terminal_daily_totals WHERE terminal_id = $1",
                                      "N0000001")
        day = await reconcile_agent_day(conn, float_account_id=agent.float_account_id, business_day=recorded,
                                        time_zone=agent.time_zone)
    assert recorded == counted == date(2031, 7, 2)
    assert (day.collections_count, day.collections_minor) == (1, 1_000)


@pytest.mark.parametrize("time_zone", ["localtime", "posixrules", "Factory", "right/Europe/London",
                                       "posix/Africa/Nairobi", "Mars/Olympus"])
async def test_an_agent_needs_a_time_zone_of_the_tz_database_not_a_copy_or_the_hosts(
        running: Running, time_zone: str) -> None:
    """localtime moves with the machine that reads it; right/ zones count leap seconds; posix/ and
    posixrules are copies under other names; PostgreSQL knows none of them."""
    async with running.pool.acquire() as conn:
        with pytest.raises(registry.RegistryError, match="unknown time zone"):
            await registry.add_agent(conn, kind="shop", name="Zone shop", currency="EUR", time_zone=time_zone)
        added = await registry.add_agent(conn, kind="shop", name="Zone shop", currency="EUR",
                                         time_zone="Pacific/Chatham")
    assert added.time_zone == "Pacific/Chatham"


async def test_a_token_meter_is_registered_once_whichever_of_its_numbers_names_it(running: Running) -> None:
    """Its 11-digit number and its 18-digit PAN are one meter (one decoder key). Registered under
    both, it had two last TIDs: two payments in a minute, one under each number, got one TID, and
    the meter refused the second token as used."""
    from protocol import sts

    async with running.pool.acquire() as conn:
        customer = await registry.add_customer(conn, account_number="PAN00001", name="Two Numbers", currency="EUR")
        sts_fields = {"tariff_code": DEMO_TARIFF, "sts_supply_group_code": DEMO_SUPPLY_GROUP,
                      "sts_tariff_index": "01", "sts_key_revision": 1, "sts_base_year": 2014}
        number = "0123456789" + str(sts.luhn_check_digit("0123456789"))
        pan = sts.meter_pan(number)
        await registry.add_meter(conn, meter_number=number, customer_id=customer, supply_mode="sts", **sts_fields)
        with pytest.raises(registry.RegistryError, match=f"meter {pan} is the token meter registered as {number}"):
            await registry.add_meter(conn, meter_number=pan, customer_id=customer, supply_mode="sts", **sts_fields)
        # The other way round, and for a 13-digit meter number.
        long_number = "123456789012" + str(sts.luhn_check_digit("123456789012"))
        await registry.add_meter(conn, meter_number=sts.meter_pan(long_number), customer_id=customer,
                                 supply_mode="sts", **sts_fields)
        with pytest.raises(registry.RegistryError, match=f"registered as {sts.meter_pan(long_number)}"):
            await registry.add_meter(conn, meter_number=long_number, customer_id=customer, supply_mode="sts",
                                     **sts_fields)
        assert await conn.fetchval("SELECT count(*) FROM meters WHERE customer_id = $1", customer) == 2
        # In a caller's transaction (a customer and their meter registered as one) it is the same
        # RegistryError, not the aborted transaction's error for the lookup of the registered number.
        with pytest.raises(registry.RegistryError, match=f"registered as {number}"):
            async with conn.transaction():
                other = await registry.add_customer(conn, account_number="PAN00002", name="One Tx", currency="EUR")
                await registry.add_meter(conn, meter_number=pan, customer_id=other, supply_mode="sts",
                                         **sts_fields)


async def test_the_databases_sts_pan_is_the_gateways(running: Running) -> None:
    """The unique index reads PANs in SQL (vendgate_sts_pan): it must agree with protocol/sts.py
    for every length, or two spellings of one meter would pass it."""
    import random

    from protocol import sts

    rng = random.Random(20261207)
    numbers = []
    for digits in (11, 13):
        for _ in range(300):
            body = "".join(rng.choice("0123456789") for _ in range(digits - 1))
            numbers.append(body + str(sts.luhn_check_digit(body)))
    numbers += [sts.meter_pan(n) for n in numbers[:50]]
    async with running.pool.acquire() as conn:
        in_sql = await conn.fetchval("SELECT array_agg(vendgate_sts_pan(n) ORDER BY o) "
                                     "FROM unnest($1::text[]) WITH ORDINALITY AS u(n, o)", numbers)
    assert in_sql == [sts.meter_pan(n) for n in numbers]
