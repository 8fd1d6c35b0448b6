"""How one customer payment divides into debt recovery, fees, energy and VAT (pure).

Rules, in order, all in integer minor units:
1. Debt recovery: the customer's recovery share of the payment, never more than the debt
   (floor: the customer keeps any fraction of a minor unit as energy).
2. The per-purchase fee with its VAT comes next; a payment that covers no more than it (buys no energy) is refused.
3. The rest buys energy. It is VAT-inclusive: net = round-half-up(gross / (1 + rate)),
   VAT = gross - net, so the parts always add up to the payment exactly.
4. Units are tenths of a kWh (STS amount units), floor of net / price: never sell a part-unit.
5. Commission is the agent's rate on the whole payment, floor.
"""

from __future__ import annotations

import msgspec

from float_ledger.model import commission_minor as commission_minor_ppm
from float_ledger.model import debt_recovery_minor

BP_PER_UNIT = 10_000  # basis points in 1 (100 %)
PPM_PER_BP = 100
DECI_KWH_PER_MWH = 10_000


class AmountTooSmall(ValueError):
    """The payment does not cover the fixed fee of a purchase."""


class Tariff(msgspec.Struct, frozen=True, kw_only=True):
    tariff_code: str
    currency: str
    energy_price_minor_per_mwh: int
    energy_vat_rate_bp: int
    fee_per_purchase_minor: int = 0
    fee_vat_rate_bp: int = 0

    def __post_init__(self) -> None:
        if self.energy_price_minor_per_mwh <= 0:
            raise ValueError("energy price must be positive")
        for rate in (self.energy_vat_rate_bp, self.fee_vat_rate_bp):
            if not 0 <= rate <= BP_PER_UNIT:
                raise ValueError("VAT rate out of range")
        if self.fee_per_purchase_minor < 0:
            raise ValueError("fee must not be negative")


class Split(msgspec.Struct, frozen=True, kw_only=True):
    amount_minor: int
    debt_recovery_minor: int
    fees_minor: int
    fees_vat_minor: int
    energy_minor: int
    energy_vat_minor: int
    units_deci_kwh: int

    @property
    def vat_minor(self) -> int:
        return self.fees_vat_minor + self.energy_vat_minor


def _round_half_up_div(numerator: int, denominator: int) -> int:
    return (2 * numerator + denominator) // (2 * denominator)


def split_payment(
    *, amount_minor: int, debt_outstanding_minor: int, debt_recovery_share_bp: int, tariff: Tariff
) -> Split:
    if amount_minor <= 0:
        raise ValueError("amount must be positive")
    if debt_outstanding_minor < 0 or not 0 <= debt_recovery_share_bp <= BP_PER_UNIT:
        raise ValueError("debt or recovery share out of range")

    debt_recovery = debt_recovery_minor(amount_minor, debt_outstanding_minor, debt_recovery_share_bp * PPM_PER_BP)
    remainder = amount_minor - debt_recovery

    fees = tariff.fee_per_purchase_minor
    fees_vat = _round_half_up_div(fees * tariff.fee_vat_rate_bp, BP_PER_UNIT)
    # A payment must buy some energy: one that only covers the purchase fee is refused.
    if remainder <= fees + fees_vat:
        raise AmountTooSmall(f"payment of {amount_minor} buys no energy beyond the purchase fee {fees + fees_vat}")

    energy_gross = remainder - fees - fees_vat
    energy_net = _round_half_up_div(energy_gross * BP_PER_UNIT, BP_PER_UNIT + tariff.energy_vat_rate_bp)
    energy_vat = energy_gross - energy_net
    units = energy_net * DECI_KWH_PER_MWH // tariff.energy_price_minor_per_mwh

    split = Split(
        amount_minor=amount_minor,
        debt_recovery_minor=debt_recovery,
        fees_minor=fees,
        fees_vat_minor=fees_vat,
        energy_minor=energy_net,
        energy_vat_minor=energy_vat,
        units_deci_kwh=units,
    )
    assert (
        split.debt_recovery_minor + split.fees_minor + split.vat_minor + split.energy_minor == amount_minor
    ), split
    assert min(debt_recovery, fees, fees_vat, energy_net, energy_vat, units) >= 0, split
    return split


def commission_minor(amount_minor: int, commission_rate_bp: int) -> int:
    """The agent's commission on one payment, rounded down (the ledger's rule, rate in basis points)."""
    if not 0 <= commission_rate_bp <= BP_PER_UNIT:
        raise ValueError("commission rate out of range")
    return commission_minor_ppm(amount_minor, commission_rate_bp * PPM_PER_BP)
