"""How many decimals a currency's minor unit has, to show an amount of minor units to a person.

vendgate keeps every amount as an integer of minor units: only what a person reads (a receipt)
needs the decimals. ISO 4217 gives each currency its minor unit; most have two decimals. These
are the current codes with other than two, from ISO 4217's List One (the maintenance agency's
current-codes table, "Minor unit" column). A code not listed has two, and so do the funds and
precious metals for which the standard defines none ("N.A."): no float is kept in those.
"""

from __future__ import annotations

from typing import Final

MINOR_UNIT_DIGITS: Final[dict[str, int]] = {
    # no minor unit
    **dict.fromkeys(("BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG", "RWF", "UGX", "UYI", "VND",
                     "VUV", "XAF", "XOF", "XPF"), 0),
    # three decimals
    **dict.fromkeys(("BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"), 3),
    # four decimals
    **dict.fromkeys(("CLF", "UYW"), 4),
}


def minor_unit_digits(currency: str) -> int:
    return MINOR_UNIT_DIGITS.get(currency, 2)


def format_minor(amount_minor: int, currency: str) -> str:
    """An amount of minor units as a person reads it: 5000 JPY, 1.500 KWD, 50.00 EUR."""
    digits = minor_unit_digits(currency)
    sign, amount = ("-", -amount_minor) if amount_minor < 0 else ("", amount_minor)
    if digits == 0:
        return f"{sign}{amount} {currency}"
    whole, fraction = divmod(amount, 10**digits)
    return f"{sign}{whole}.{fraction:0{digits}d} {currency}"
