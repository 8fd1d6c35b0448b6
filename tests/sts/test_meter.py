"""The meter emulator accepts the tokens vendgate issues and refuses what a real meter refuses."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from protocol import sts
from terminal_sim.meter import Meter, MeterResponse, Refusal

VENDING_KEY = bytes.fromhex("abababababababab")
PAN = "600727000000000009"
OTHER_PAN = "000001000000000082"
NOW = datetime(2024, 6, 3, 9, 30, 12, tzinfo=UTC)


def decoder_key(pan: str = PAN) -> bytes:
    return sts.derive_decoder_key_dkga02(VENDING_KEY, 2, "123456", "01", 1, pan)


class Vendor:
    """The vending side as the gateway does it: one persisted last TID per meter."""

    def __init__(self, pan: str = PAN, base_year: int = 1993) -> None:
        self.key = decoder_key(pan)
        self.base_year = base_year
        self.last_tid: int | None = None
        self.random = 0

    def _tid(self, issued: datetime) -> int:
        self.last_tid = sts.next_token_id(issued, self.last_tid, self.base_year)
        self.random = (self.random + 7) % 16
        return self.last_tid

    def credit(self, units: int, issued: datetime = NOW, subclass: int = 0) -> str:
        return sts.credit_token(self.key, subclass, self._tid(issued), units, self.random)

    def power_limit(self, watts: int, issued: datetime = NOW) -> str:
        return sts.set_maximum_power_limit_token(self.key, self._tid(issued), watts, self.random)

    def clear_credit(self, register: int = sts.REGISTER_ALL, issued: datetime = NOW) -> str:
        return sts.clear_credit_token(self.key, self._tid(issued), self.random, register=register)

    def clear_tamper(self, issued: datetime = NOW) -> str:
        return sts.clear_tamper_token(self.key, self._tid(issued), self.random)


def test_accepts_every_token_vended_in_a_busy_minute_and_credits_what_was_sold() -> None:
    vendor, meter = Vendor(), Meter(decoder_key())
    sold = [256, 1, 16_383, 20_000, 180_223, 55]  # tenths of kWh; 20_000 and 180_223 round up
    for units in sold:
        response = meter.enter(vendor.credit(units))  # all within the same minute: TIDs move forward
        assert response.accepted and response.refusal is None
        assert response.units_credited == sts.rounded_units(units) >= units
    assert meter.credit_units == sum(sts.rounded_units(u) for u in sold)
    assert len(meter.token_ids) == len(sold) and meter.token_ids[-1] - meter.token_ids[0] == len(sold) - 1


def test_refuses_a_replay_without_crediting_twice() -> None:
    vendor, meter = Vendor(), Meter(decoder_key())
    token = vendor.credit(100)
    assert meter.enter(token).accepted
    replay = meter.enter(token)
    assert (replay.accepted, replay.refusal, replay.token_id) == (False, Refusal.USED, vendor.last_tid)
    assert meter.enter(sts.format_token(token)).refusal is Refusal.USED  # typed with spaces: still the same token
    assert meter.credit_units == 100


def test_refuses_a_token_for_another_meter() -> None:
    token = Vendor(OTHER_PAN).credit(100)
    meter = Meter(decoder_key(PAN))
    assert meter.enter(token) == MeterResponse(accepted=False, refusal=Refusal.CRC)
    assert meter.credit_units == 0 and meter.token_ids == ()
    assert Meter(decoder_key(OTHER_PAN)).enter(token).accepted


@pytest.mark.parametrize("units", [1, 256, 16_384, 1_818_624])
def test_refuses_every_token_with_one_digit_changed(units: int) -> None:
    vendor = Vendor()
    token = vendor.credit(units)
    meter = Meter(decoder_key())
    refusals: set[Refusal] = set()
    for position in range(20):
        for digit in "0123456789":
            if digit == token[position]:
                continue
            response = meter.enter(token[:position] + digit + token[position + 1:])
            assert not response.accepted, (token, position, digit)
            assert response.refusal is not None
            refusals.add(response.refusal)
    assert meter.credit_units == 0 and meter.token_ids == ()
    assert Refusal.CRC in refusals
    assert meter.enter(token).accepted  # and the right digits still work


def test_refuses_a_credit_token_for_another_service() -> None:
    vendor, meter = Vendor(), Meter(decoder_key(), service=sts.CreditSubclass.ELECTRICITY)
    water = vendor.credit(10, subclass=sts.CreditSubclass.WATER)
    response = meter.enter(water)
    assert (response.accepted, response.refusal, response.subclass) == (False, Refusal.CLASS, 1)
    water_meter = Meter(decoder_key(), service=sts.CreditSubclass.WATER)
    assert water_meter.enter(water).accepted and water_meter.credit_units == 10


def test_management_tokens_set_the_limit_clear_credit_and_clear_tamper() -> None:
    vendor, meter = Vendor(), Meter(decoder_key())
    assert meter.enter(vendor.credit(500)).accepted
    assert meter.enter(vendor.power_limit(2300)).accepted  # 1 x 230 V x 10 A
    assert meter.maximum_power_limit_w == 2300
    meter.tampered = True
    assert meter.enter(vendor.clear_tamper()).accepted and not meter.tampered
    refused = meter.enter(vendor.clear_credit(register=sts.CreditSubclass.GAS))
    assert refused.refusal is Refusal.CLASS and meter.credit_units == 500
    assert meter.enter(vendor.clear_credit(register=sts.CreditSubclass.ELECTRICITY)).accepted
    assert meter.credit_units == 0
    assert meter.enter(vendor.credit(7)).accepted
    assert meter.enter(vendor.clear_credit()).accepted and meter.credit_units == 0


def test_refuses_management_functions_it_does_not_offer_and_other_classes() -> None:
    key = decoder_key()
    meter = Meter(key)
    # CTSA07 step1 (NectarAPI/tokens-service STSComplianceTests_STS_531_1_0_02_CTSA07.java): class 2
    # subclass 6, set maximum phase power unbalance limit, for this very meter key.
    unbalance = meter.enter("30220533115430798647")
    assert (unbalance.refusal, unbalance.token_class, unbalance.subclass) == (Refusal.CLASS, 2, 6)
    # CTSA11 step1: a class 1 meter test token.
    assert meter.enter("00000000000150997584") == MeterResponse(accepted=False, refusal=Refusal.CLASS, token_class=1)
    for garbage in ("1234", "2371610050118319419x", "99999999999999999999", ""):
        assert meter.enter(garbage) == MeterResponse(accepted=False, refusal=Refusal.FORMAT)
    assert meter.token_ids == ()


def test_an_old_token_is_refused_once_memory_is_full() -> None:
    vendor, meter = Vendor(), Meter(decoder_key(), tid_memory_size=3)
    early = vendor.credit(1, NOW)
    later = [vendor.credit(1, NOW + timedelta(minutes=m)) for m in (10, 20, 30)]
    # Memory not full: every TID ever accepted is still there, so an older unseen TID is provably new.
    assert meter.enter(later[0]).accepted and meter.enter(early).accepted
    assert meter.enter(later[1]).accepted and len(meter.token_ids) == 3
    # Full: the newest pushes the oldest (the early token) out; the early one can no longer be told
    # apart from a forgotten used token, so it is "old", and so is anything below the oldest kept.
    assert meter.enter(later[2]).accepted and len(meter.token_ids) == 3
    assert meter.enter(early).refusal is Refusal.OLD
    assert meter.enter(vendor.credit(1, NOW - timedelta(days=1))).accepted  # allocator moved it forward
    assert meter.credit_units == 5


def test_key_expiry_number_refuses_tokens_past_it_ctsa16() -> None:
    # CTSA16 (NectarAPI/tokens-service STSComplianceTests_STS_531_1_0_02_CTSA16.java): PAN
    # 600727111111111153, key type 1, KEN 85, a 0.1 kWh token dated 01/04/2004 09:30 must be refused.
    key = sts.derive_decoder_key_dkga02(VENDING_KEY, 1, "123456", "01", 1, "600727111111111153")
    token = sts.credit_token(key, 0, sts.token_id(datetime(2004, 4, 1, 9, 30, tzinfo=UTC)), 1, 5)
    assert Meter(key, key_expiry_number=85).enter(token).refusal is Refusal.KEY_EXPIRED
    assert Meter(key, key_expiry_number=255).enter(token).accepted


def test_conformance_tokens_load_in_order_ctsa10() -> None:
    # CTSA10 steps 1-9 (electricity, PAN 600727000000000009), entered in issue order.
    tokens_and_units = [
        ("26456622012185850752", 256), ("02194538019157867319", 16_383), ("49848950875249585071", 16_384),
        ("71997443697501228179", 20_004), ("58589277912776864555", 180_224), ("16328229234437142451", 180_224),
        ("45001756646344378677", 1_818_624), ("15810488151857362998", 1_818_624),
        ("42222423067848970276", 18_201_624),
    ]
    meter = Meter(decoder_key())
    for token, units in tokens_and_units:
        response = meter.enter(token)
        assert response.accepted and response.units_credited == units
    assert meter.credit_units == sum(units for _, units in tokens_and_units)


def test_base_date_2014_meter_with_a_dkga04_key_ctsa25() -> None:
    # CTSA25 steps 5 (NectarAPI/tokens-service STSComplianceTests_STS_531_1_0_02_CTSA25.java): DKGA04 key
    # for base date 2014, KRN 4, SGC 123457; 0.1 kWh on 01/01/2014 08:00.
    key = sts.derive_decoder_key_dkga04(bytes.fromhex("abababababababab949494949494949401234567"), 2, "123457",
                                        "01", 4, PAN, 2014)
    meter = Meter(key)
    assert meter.enter("20324881626382980759").accepted
    issued = datetime(2025, 2, 1, 12, 0, tzinfo=UTC)  # after the 1993 rollover: only base date 2014 works
    token = sts.credit_token(key, 0, sts.next_token_id(issued, meter.token_ids[-1], 2014), 300, 1)
    assert meter.enter(token).accepted and meter.credit_units == 301


def test_consume_takes_no_more_than_the_credit() -> None:
    meter = Meter(decoder_key())
    assert meter.enter(Vendor().credit(10)).accepted
    assert meter.consume(4) == 4 and meter.consume(100) == 6 and meter.credit_units == 0


@pytest.mark.parametrize("kwargs", [{"decoder_key": b"short"}, {"key_expiry_number": 256},
                                    {"tid_memory_size": 0}])
def test_meter_refuses_a_bad_configuration(kwargs: dict[str, object]) -> None:
    arguments: dict[str, object] = {"decoder_key": decoder_key()}
    arguments.update(kwargs)
    with pytest.raises(ValueError):
        Meter(**arguments)  # type: ignore[arg-type]
