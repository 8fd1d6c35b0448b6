"""What a receipt says: amounts in each currency's own minor unit, and every line whole."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from float_ledger.currency import ISO_4217_CODES, MINOR_UNIT_DIGITS, format_minor, minor_unit_digits
from float_ledger.split import Tariff, split_payment
from gateway.vending import VendRequest, _Pending, receipt_line_chars_max, receipt_lines


def receipt(currency: str, amount: int, tariff_code: str = "T1") -> list[str]:
    tariff = Tariff(tariff_code=tariff_code, currency=currency, energy_price_minor_per_mwh=30_000,
                    energy_vat_rate_bp=1_000)
    request = VendRequest(kind="topup", client_txn_id="J0000001-20260101-000001", terminal_id="J0000001",
                          meter_number="92000000001", amount_minor=amount, currency=currency)
    split = split_payment(amount_minor=amount, debt_outstanding_minor=0, debt_recovery_share_bp=0, tariff=tariff)
    return receipt_lines(request, _Pending(0, request, None, None, tariff, split, []), 1,  # type: ignore[arg-type]
                         datetime(2026, 1, 1, tzinfo=UTC))


@pytest.mark.parametrize(("currency", "amount", "printed"), [
    ("JPY", 5_000, "PAID 5000 JPY"),  # yen have no minor unit: 5,000 yen, not 50.00
    ("UGX", 20_000, "PAID 20000 UGX"),
    ("KWD", 1_500, "PAID 1.500 KWD"),  # 1,500 fils are 1.500 dinar, not 15.00
    ("EUR", 5_005, "PAID 50.05 EUR"),
    ("KES", 7, "PAID 0.07 KES"),
])
def test_a_receipt_shows_amounts_in_the_currency_s_own_minor_unit(currency: str, amount: int, printed: str) -> None:
    lines = receipt(currency, amount)
    assert printed in lines
    split = split_payment(amount_minor=amount, debt_outstanding_minor=0, debt_recovery_share_bp=0,
                          tariff=Tariff(tariff_code="T1", currency=currency, energy_price_minor_per_mwh=30_000,
                                        energy_vat_rate_bp=1_000))
    assert f"ENERGY {format_minor(split.energy_minor, currency)}" in lines


@pytest.mark.parametrize(("amount", "currency", "shown"), [
    (0, "EUR", "0.00 EUR"), (-1, "EUR", "-0.01 EUR"), (-150, "JPY", "-150 JPY"),
    (10**15, "BHD", "1000000000000.000 BHD"), (12_345, "CLF", "1.2345 CLF"), (99, "XYZ", "0.99 XYZ"),
])
def test_amounts_are_formatted_exactly(amount: int, currency: str, shown: str) -> None:
    assert format_minor(amount, currency) == shown


def test_every_currency_with_other_decimals_is_a_current_code() -> None:
    assert set(MINOR_UNIT_DIGITS) <= ISO_4217_CODES
    assert len(ISO_4217_CODES) > 150 and not {"XXX", "XTS", "XAU", "HRK", "ZWL"} & ISO_4217_CODES


def test_most_currencies_have_two_decimals() -> None:
    assert [minor_unit_digits(c) for c in ("EUR", "ZAR", "KES", "USD", "JPY", "KWD")] == [2, 2, 2, 2, 0, 3]


def test_a_long_line_goes_on_over_the_next_and_is_never_cut() -> None:
    # Before, every line was cut at the printer's width: "RESIDENTIAL-LIFELINE-2026-V2" printed
    # as "...-2026", the same as another version's code.
    lines = receipt("EUR", 10_000, tariff_code="RESIDENTIAL-LIFELINE-2026-V2-NIGHT")
    assert all(0 < len(line) <= receipt_line_chars_max for line in lines)
    tariff_at = next(i for i, line in enumerate(lines) if line.startswith("TARIFF "))
    assert "".join(lines[tariff_at:]) == "TARIFF RESIDENTIAL-LIFELINE-2026-V2-NIGHT"
