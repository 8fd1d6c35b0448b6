"""Offline advices, lookup by account, and end-of-day totals reconciled against the server's."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from gateway import registry
from gateway.seeding import meter_number, terminal_id
from protocol.codes import ResponseCode
from protocol.messages import Advice, EndOfDayRequest, TenderType
from terminal_sim.client import PosTerminal
from tests.gateway.conftest import Running


async def test_advices_then_end_of_day_totals_match(running: Running) -> None:
    assert running.gateway.pos_port is not None
    pos = PosTerminal(terminal_id(260), running.key(260), "127.0.0.1", running.gateway.pos_port)
    await pos.logon()
    taken = datetime.now(UTC) - timedelta(hours=2)
    advices = [Advice(client_transaction_id=pos.next_transaction_id(), meter_number=meter_number(21 + n),
                      amount_minor=1_000 + n, currency="EUR", tender_type=TenderType.CASH, taken_at=taken)
               for n in range(3)]
    result = await pos.send_advices(advices)
    assert [o.response_code for o in result.outcomes] == [ResponseCode.APPROVED] * 3
    assert len({o.receipt_number for o in result.outcomes}) == 3
    again = await pos.send_advices(advices)  # forwarded twice after a dropped link: applied once
    assert again.outcomes == result.outcomes
    paid = await pos.top_up(meter_number(22), 2_000, "EUR")
    assert paid.response_code is ResponseCode.APPROVED
    assert pos.business_date is not None
    mine = EndOfDayRequest(business_date=pos.business_date, currency="EUR", top_up_count=1,
                           top_up_total_minor=2_000, reversal_count=0, reversal_total_minor=0,
                           advice_count=3, advice_total_minor=3_003)
    totals = await pos.end_of_day(mine)
    assert totals.response_code is ResponseCode.APPROVED
    assert (totals.top_up_count, totals.advice_total_minor) == (1, 3_003)
    wrong = await pos.end_of_day(EndOfDayRequest(**{**{f: getattr(mine, f) for f in mine.__struct_fields__},
                                                     "top_up_total_minor": 1_999}))
    assert wrong.response_code is ResponseCode.TOTALS_MISMATCH and wrong.top_up_total_minor == 2_000
    # The same figures in a currency that is not the terminal's do not reconcile: vendgate's
    # totals come back in its currency.
    other = await pos.end_of_day(msgspec.structs.replace(mine, currency="ZAR"))
    assert other.response_code is ResponseCode.CURRENCY_MISMATCH
    assert (other.currency, other.top_up_total_minor, other.advice_total_minor) == ("EUR", 2_000, 3_003)
    await pos.logoff()


async def test_lookup_by_account_number_and_unknown(running: Running) -> None:
    assert running.gateway.pos_port is not None
    pos = PosTerminal(terminal_id(261), running.key(261), "127.0.0.1", running.gateway.pos_port)
    await pos.logon()
    found = await pos.lookup(account_number="AC00000024")
    assert found.response_code is ResponseCode.APPROVED and found.customer is not None
    assert found.customer.meter_number == meter_number(24)
    missing = await pos.lookup(account_number="AC99999999")
    assert missing.response_code is ResponseCode.UNKNOWN_ACCOUNT and missing.customer is None
    await pos.logoff()


async def test_a_meter_without_a_tariff_in_the_terminal_s_currency_is_not_shown_as_payable(running: Running) -> None:
    """A terminal of a ZAR agent looks up an EUR customer: the lookup answers as the top-up would."""
    assert running.gateway.pos_port is not None
    async with running.pool.acquire() as conn:
        agent = await registry.add_agent(conn, kind="shop", name="Rand shop", currency="ZAR")
        key = await registry.add_terminal(conn, running.keystore, terminal_id="Z0000001", serial="ZSN1",
                                          agent_id=agent.agent_id)
    pos = PosTerminal("Z0000001", key, "127.0.0.1", running.gateway.pos_port)
    await pos.logon()
    for found in (await pos.lookup(meter_number=meter_number(25)), await pos.lookup(account_number="AC00000025")):
        assert found.response_code is ResponseCode.UNKNOWN_METER and found.customer is None
    paid = await pos.top_up(meter_number(25), 1_000, "ZAR")
    assert paid.response_code is ResponseCode.UNKNOWN_METER
    await pos.logoff()
    eur = PosTerminal(terminal_id(261), running.key(261), "127.0.0.1", running.gateway.pos_port)
    await eur.logon()
    shown = await eur.lookup(meter_number=meter_number(25))
    assert shown.response_code is ResponseCode.APPROVED and shown.customer is not None
    assert shown.customer.currency == "EUR"
    await eur.logoff()


async def test_a_lookup_by_account_shows_the_meter_this_terminal_can_pay(running: Running) -> None:
    """An account with a meter on a ZAR tariff (the lower number) and one on the EUR tariff: an EUR
    terminal is shown the EUR one. A customer whose accounts are in ZAR, on an EUR tariff, is not
    payable in EUR: UNKNOWN_METER, not their ZAR debt under the EUR code."""
    assert running.gateway.pos_port is not None
    async with running.pool.acquire() as conn:
        await registry.add_tariff(conn, tariff_code="RAND-1", valid_from=datetime(2020, 1, 1, tzinfo=UTC),
                                  currency="ZAR", energy_price_minor_per_mwh=30_000, energy_vat_rate_bp=1_500)
        eur_tariff = await conn.fetchval("SELECT tariff_code FROM meters WHERE meter_number = $1", meter_number(26))
        both = await registry.add_customer(conn, account_number="AC-TWO-METERS", name="Two Meters",
                                           currency="EUR")
        # Meters the registry refuses (the next test), as one registered before its checks, or
        # straight into the table, would be.
        await conn.execute("INSERT INTO meters (meter_number, customer_id, supply_mode, tariff_code)"
                           " VALUES ('880000000001', $1, 'smart', 'RAND-1')", both)
        await registry.add_meter(conn, meter_number="880000000002", customer_id=both, supply_mode="smart",
                                 tariff_code=eur_tariff)
        rand = await registry.add_customer(conn, account_number="AC-RAND", name="Rand Accounts", currency="ZAR")
        await conn.execute("INSERT INTO meters (meter_number, customer_id, supply_mode, tariff_code)"
                           " VALUES ('880000000003', $1, 'smart', $2)", rand, eur_tariff)
    pos = PosTerminal(terminal_id(265), running.key(265), "127.0.0.1", running.gateway.pos_port)
    await pos.logon()
    shown = await pos.lookup(account_number="AC-TWO-METERS")
    assert shown.response_code is ResponseCode.APPROVED and shown.customer is not None
    assert shown.customer.meter_number == "880000000002"
    assert (await pos.lookup(meter_number="880000000001")).response_code is ResponseCode.UNKNOWN_METER
    for refused in (await pos.lookup(meter_number="880000000003"), await pos.lookup(account_number="AC-RAND")):
        assert refused.response_code is ResponseCode.UNKNOWN_METER and refused.customer is None
    await pos.logoff()


async def test_the_registry_makes_no_meter_a_top_up_could_not_pay(running: Running) -> None:
    async with running.pool.acquire() as conn:
        await registry.add_tariff(conn, tariff_code="RAND-2", valid_from=datetime(2020, 1, 1, tzinfo=UTC),
                                  currency="ZAR", energy_price_minor_per_mwh=30_000, energy_vat_rate_bp=1_500)
        euro = await registry.add_customer(conn, account_number="AC-EURO-2", name="Euro", currency="EUR")
        with pytest.raises(registry.RegistryError, match="priced in ZAR, the customer's accounts are in EUR"):
            await registry.add_meter(conn, meter_number="880000000011", customer_id=euro, supply_mode="smart",
                                     tariff_code="RAND-2")
        with pytest.raises(registry.RegistryError, match="no tariff NO-SUCH"):
            await registry.add_meter(conn, meter_number="880000000011", customer_id=euro, supply_mode="smart",
                                     tariff_code="NO-SUCH")
        with pytest.raises(registry.RegistryError, match="no customer"):
            await registry.add_meter(conn, meter_number="880000000011", customer_id=10**9, supply_mode="smart",
                                     tariff_code="RAND-2")
        # A new version of a tariff keeps its currency; one in the same currency is taken.
        with pytest.raises(registry.RegistryError, match="priced in ZAR: a new version cannot be in EUR"):
            await registry.add_tariff(conn, tariff_code="RAND-2", valid_from=datetime(2030, 1, 1, tzinfo=UTC),
                                      currency="EUR", energy_price_minor_per_mwh=1, energy_vat_rate_bp=0)
        await registry.add_tariff(conn, tariff_code="RAND-2", valid_from=datetime(2030, 1, 1, tzinfo=UTC),
                                  currency="ZAR", energy_price_minor_per_mwh=31_000, energy_vat_rate_bp=1_500)
        rand = await registry.add_customer(conn, account_number="AC-RAND-2", name="Rand", currency="ZAR")
        await registry.add_meter(conn, meter_number="880000000012", customer_id=rand, supply_mode="smart",
                                 tariff_code="RAND-2")
        assert await conn.fetchval("SELECT count(*) FROM meters WHERE meter_number LIKE '88000000001_'") == 1
        assert await conn.fetchval("SELECT count(*) FROM tariffs WHERE tariff_code = 'RAND-2'") == 2
        # A token meter's number must be one a token can carry: 11 or 13 digits with their check
        # digit, or an 18-digit PAN. Before, it was registered, and every top-up declined UNKNOWN_METER.
        sts_fields = {"customer_id": rand, "supply_mode": "sts", "tariff_code": "RAND-2",
                      "sts_supply_group_code": "123456", "sts_tariff_index": "01", "sts_key_revision": 1,
                      "sts_base_year": 2014}
        for number in ("100000000019", "91000000001", "1234567890123"):
            with pytest.raises(registry.RegistryError, match="cannot take STS tokens"):
                await registry.add_meter(conn, meter_number=number, **sts_fields)
        await registry.add_meter(conn, meter_number="91000000017", **sts_fields)
        # A tariff code is bounded: every receipt states it whole.
        for code in ("T" * 41, " RAND-3", "RAND\n3"):
            with pytest.raises(registry.RegistryError, match=r"tariff code is 1\.\.40"):
                await registry.add_tariff(conn, tariff_code=code, valid_from=datetime(2020, 1, 1, tzinfo=UTC),
                                          currency="ZAR", energy_price_minor_per_mwh=1, energy_vat_rate_bp=0)


async def test_a_reversal_counts_on_the_day_it_was_processed_not_its_originals(running: Running) -> None:
    assert running.gateway.pos_port is not None
    pos = PosTerminal(terminal_id(264), running.key(264), "127.0.0.1", running.gateway.pos_port)
    await pos.logon()
    assert pos.business_date is not None
    today = pos.business_date
    yesterday = today - timedelta(days=1)
    txn = pos.next_transaction_id()
    paid = await pos.top_up(meter_number(23), 1_500, "EUR", txn=txn)
    assert paid.response_code is ResponseCode.APPROVED
    async with running.pool.acquire() as conn:  # as if paid just before midnight (a record is final: forced)
        await conn.execute("ALTER TABLE vend_transactions DISABLE TRIGGER vend_transactions_keys_fixed")
        await conn.execute("UPDATE vend_transactions SET business_date = $2 WHERE client_txn_id = $1",
                           txn.as_key(), yesterday)
        await conn.execute("ALTER TABLE vend_transactions ENABLE ALWAYS TRIGGER vend_transactions_keys_fixed")
    assert (await pos.reverse(txn, 1_500, "EUR")).response_code is ResponseCode.APPROVED

    def day(on: object, top_ups: int, top_up_total: int, reversals: int, reversal_total: int) -> EndOfDayRequest:
        return EndOfDayRequest(business_date=on, currency="EUR", top_up_count=top_ups, top_up_total_minor=top_up_total,
                               reversal_count=reversals, reversal_total_minor=reversal_total, advice_count=0,
                               advice_total_minor=0)

    before = await pos.end_of_day(day(yesterday, 1, 1_500, 0, 0))
    assert before.response_code is ResponseCode.APPROVED, before
    on_the_day = await pos.end_of_day(day(today, 0, 0, 1, 1_500))
    assert on_the_day.response_code is ResponseCode.APPROVED, on_the_day
    await pos.logoff()
