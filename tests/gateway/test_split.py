"""Payment split rules (pure: no database)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from float_ledger.split import AmountTooSmall, Tariff, commission_minor, split_payment

TARIFF = Tariff(tariff_code="R1", currency="EUR", energy_price_minor_per_mwh=25_000,
                energy_vat_rate_bp=2_000, fee_per_purchase_minor=50, fee_vat_rate_bp=2_000)


def test_worked_example() -> None:
    # 100.00 paid, 30.00 debt, 25 % recovery share, 0.50 fee + 20 % VAT, energy at 0.25/kWh + 20 % VAT.
    split = split_payment(amount_minor=10_000, debt_outstanding_minor=3_000,
                          debt_recovery_share_bp=2_500, tariff=TARIFF)
    assert split.debt_recovery_minor == 2_500
    assert (split.fees_minor, split.fees_vat_minor) == (50, 10)
    # 74.40 gross energy -> 62.00 net + 12.40 VAT; 62.00 / 0.25 = 248.0 kWh = 2480 tenths.
    assert (split.energy_minor, split.energy_vat_minor) == (6_200, 1_240)
    assert split.units_deci_kwh == 2_480
    assert split.vat_minor == 1_250


def test_debt_recovery_never_exceeds_debt() -> None:
    split = split_payment(amount_minor=10_000, debt_outstanding_minor=700,
                          debt_recovery_share_bp=5_000, tariff=TARIFF)
    assert split.debt_recovery_minor == 700


def test_payment_that_buys_no_energy_is_refused() -> None:
    # The fee with its VAT is 60: a payment of 60 or less would buy nothing.
    for amount in (59, 60):
        with pytest.raises(AmountTooSmall):
            split_payment(amount_minor=amount, debt_outstanding_minor=0, debt_recovery_share_bp=0, tariff=TARIFF)
    assert split_payment(amount_minor=61, debt_outstanding_minor=0, debt_recovery_share_bp=0,
                         tariff=TARIFF).energy_minor == 1
    with pytest.raises(AmountTooSmall):  # what debt recovery leaves covers the fee only
        split_payment(amount_minor=120, debt_outstanding_minor=60, debt_recovery_share_bp=5_000, tariff=TARIFF)


@pytest.mark.parametrize("bad", [0, -1])
def test_non_positive_amount_is_refused(bad: int) -> None:
    with pytest.raises(ValueError, match="positive"):
        split_payment(amount_minor=bad, debt_outstanding_minor=0, debt_recovery_share_bp=0, tariff=TARIFF)


def test_bad_tariff_is_refused() -> None:
    with pytest.raises(ValueError, match="price"):
        Tariff(tariff_code="X", currency="EUR", energy_price_minor_per_mwh=0, energy_vat_rate_bp=0)
    with pytest.raises(ValueError, match="VAT"):
        Tariff(tariff_code="X", currency="EUR", energy_price_minor_per_mwh=1, energy_vat_rate_bp=10_001)


@given(
    amount=st.integers(min_value=60, max_value=10**12),
    debt=st.integers(min_value=0, max_value=10**12),
    share=st.integers(min_value=0, max_value=10_000),
    vat=st.integers(min_value=0, max_value=10_000),
    price=st.integers(min_value=1, max_value=10**7),
)
def test_parts_always_sum_to_the_payment(amount: int, debt: int, share: int, vat: int, price: int) -> None:
    tariff = Tariff(tariff_code="P", currency="EUR", energy_price_minor_per_mwh=price,
                    energy_vat_rate_bp=vat, fee_per_purchase_minor=50, fee_vat_rate_bp=vat)
    try:
        split = split_payment(amount_minor=amount, debt_outstanding_minor=debt, debt_recovery_share_bp=share,
                              tariff=tariff)
    except AmountTooSmall:
        recovery = min(debt, amount * share // 10_000)
        assert amount - recovery <= 50 + (2 * 50 * vat + 10_000) // 20_000
        return
    assert split.debt_recovery_minor + split.fees_minor + split.vat_minor + split.energy_minor == amount
    assert split.energy_minor + split.energy_vat_minor > 0  # every payment buys some energy
    assert 0 <= split.debt_recovery_minor <= min(debt, amount)
    assert split.units_deci_kwh * price <= split.energy_minor * 10_000


def test_commission_rounds_down() -> None:
    assert commission_minor(999, 100) == 9
    assert commission_minor(0, 100) == 0
    with pytest.raises(ValueError, match="range"):
        commission_minor(10, 10_001)


def test_amounts_beyond_the_wire_range_are_capped_not_fatal() -> None:
    from gateway.handlers import wire_amount
    from protocol import limits

    assert wire_amount(None) == 0 and wire_amount(-5) == 0 and wire_amount(1_234) == 1_234
    assert wire_amount(limits.amount_minor_max * 10) == limits.amount_minor_max
