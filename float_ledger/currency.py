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


# The codes of ISO 4217's List One that a float can be kept in: every current currency, and the
# funds codes (BOV, CHE, CHW, CLF, COU, MXV, USN, UYI, UYW); not the precious metals, the IMF's
# and the bond markets' units (XAU, XDR, XBA, ...), the testing code XTS or "no currency" XXX.
# From the maintenance agency's (SIX) table of current codes as of 2026: codes withdrawn by then
# (HRK, SLL, ZWL, ANG, BGN among the latest) are not here, their successors (SLE, ZWG, XCG; EUR) are.
ISO_4217_CODES: Final[frozenset[str]] = frozenset("""
    AED AFN ALL AMD AOA ARS AUD AWG AZN BAM BBD BDT BHD BIF BMD BND BOB BOV BRL BSD BTN BWP BYN BZD
    CAD CDF CHE CHF CHW CLF CLP CNY COP COU CRC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR FJD FKP
    GBP GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD JOD JPY KES KGS KHR
    KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN
    MXV MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN PYG QAR RON RSD RUB RWF SAR SBD
    SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS TMT TND TOP TRY TTD TWD TZS UAH UGX
    USD USN UYI UYU UYW UZS VED VES VND VUV WST XAF XCD XCG XOF XPF YER ZAR ZMW ZWG
""".split())


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
