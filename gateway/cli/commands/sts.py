"""`vendgate sts credit|decode`: issue an STS credit token by hand, or read one back.

An operator's tool for support and commissioning (a meter that refuses a token, a token to check
against a receipt); the gateway's vending service issues customers' tokens itself, with the TID it
persists per meter. Every value is taken as text and checked here, so bad input is one line on
stderr and exit status 2 (via StsInputError); `decode` exits 1 when the CRC fails under the key.

Units: --units counts the STS transfer unit, 0.1 kWh (0.1 m3 for water and gas): 25.6 kWh is
--units 256. The output token is the only line on stdout; if the amount field cannot carry the
units exactly they are rounded up (IEC 62055-41) and a note on stderr says so.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from datetime import UTC, datetime

from gateway.errors import VendgateError
from gateway.settings import Settings
from protocol import sts

CLI_BASE_YEARS = ("1993", "2014")
DEFAULT_BASE_YEAR = "2014"  # the 1993 base date ran out on 2024-11-24: tokens issued now use 2014
DKGA_CHOICES = ("02", "04")
_SUBCLASS_NAMES = {0: "electricity", 1: "water", 2: "gas", 3: "time", 4: "electricity currency",
                   5: "water currency", 6: "gas currency", 7: "time currency"}
_UNIT_NAMES = {0: "kWh", 1: "m3", 2: "m3", 3: "min"}
_MANAGEMENT_NAMES = {
    0: "set maximum power limit", 1: "clear credit", 2: "set tariff rate", 3: "set decoder key (1st section)",
    4: "set decoder key (2nd section)", 5: "clear tamper condition", 6: "set maximum phase power unbalance limit",
    7: "set water meter factor", 8: "set decoder key (3rd section)", 9: "set decoder key (4th section)",
}


class StsInputError(VendgateError):
    """A value given to `vendgate sts` that no STS token can carry."""


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("sts", help="issue or decode an STS meter token (IEC 62055-41)")
    actions = parser.add_subparsers(dest="sts_action", metavar="ACTION", required=True)

    credit = actions.add_parser("credit", help="print a class 0 credit token for one meter")
    credit.add_argument("--vending-key", required=True, metavar="HEX",
                        help="vending key: 16 hex digits (DKGA02) or 40 (with --dkga 04), spaces between groups "
                             "allowed (quoted); '-' reads it from stdin (out of the process list and the shell's "
                             "history)")
    credit.add_argument("--pan", required=True, metavar="PAN", help="meter PAN (18 digits) or meter number (11/13)")
    credit.add_argument("--sgc", required=True, metavar="SGC", help="supply group code, 6 digits")
    credit.add_argument("--ti", required=True, metavar="TI", help="tariff index, 2 digits")
    credit.add_argument("--krn", required=True, metavar="KRN", help="key revision number, 1-9")
    credit.add_argument("--kt", required=True, metavar="KT", help="key type, 0-2 (2: unique key)")
    credit.add_argument("--units", required=True, metavar="N", help="credit in 0.1 kWh (0.1 m3): 25.6 kWh is 256")
    credit.add_argument("--issued", metavar="ISO8601", help="issue time with zone, e.g. 2025-01-31T08:00Z "
                        "(default: now)")
    credit.add_argument("--base-year", default=DEFAULT_BASE_YEAR, metavar="|".join(CLI_BASE_YEARS),
                        help=f"TID base date (default {DEFAULT_BASE_YEAR})")
    credit.add_argument("--random", metavar="R", help="the token's 4-bit random number, 0-15 (default: random)")
    credit.add_argument("--dkga", default="02", metavar="|".join(DKGA_CHOICES),
                        help="decoder key generation algorithm (default 02)")
    credit.add_argument("--subclass", default="0", metavar="S", help="0 electricity (default), 1 water, 2 gas")
    credit.set_defaults(handler=handle_credit)

    decode = actions.add_parser("decode", help="decrypt a token with a decoder key and print its fields")
    decode.add_argument("--decoder-key", required=True, metavar="HEX",
                        help="the meter's decoder key, 16 hex digits, spaces between groups allowed (quoted); "
                             "'-' reads it from stdin")
    decode.add_argument("--base-year", default=DEFAULT_BASE_YEAR, metavar="|".join(map(str, sts.BASE_DATES)),
                        help=f"base date to show the TID's time against (default {DEFAULT_BASE_YEAR})")
    decode.add_argument("token", nargs="+", metavar="TOKEN",
                        help="20 digits (spaces or hyphens between groups allowed, quoted or not)")
    decode.set_defaults(handler=handle_decode)


def handle_credit(args: argparse.Namespace, settings: Settings) -> int:
    dkga = _choice("--dkga", args.dkga, DKGA_CHOICES)
    vending_key = _key("--vending-key", args.vending_key)
    base_year = int(_choice("--base-year", args.base_year, CLI_BASE_YEARS))
    key_type = _integer("--kt", args.kt)
    key_revision = _integer("--krn", args.krn)
    units = _integer("--units", args.units)
    subclass = _integer("--subclass", args.subclass)
    random = secrets.randbelow(sts.RANDOM_MAX + 1) if args.random is None else _integer("--random", args.random)
    issued = datetime.now(UTC) if args.issued is None else _time("--issued", args.issued)
    try:
        if dkga == "02":
            decoder_key = sts.derive_decoder_key_dkga02(vending_key, key_type, args.sgc, args.ti, key_revision,
                                                        args.pan)
        else:
            decoder_key = sts.derive_decoder_key_dkga04(vending_key, key_type, args.sgc, args.ti, key_revision,
                                                        args.pan, base_year)
        tid = sts.token_id(issued, base_year)
        token = sts.credit_token(decoder_key, subclass, tid, units, random)
    except sts.StsError as exc:
        raise StsInputError(str(exc)) from None
    carried = sts.rounded_units(units)
    if carried != units:
        print(f"note: --units {units} rounded up to {carried}, the next amount a token can carry",
              file=sys.stderr)
    print(token)
    return 0


def handle_decode(args: argparse.Namespace, settings: Settings) -> int:
    decoder_key = _key("--decoder-key", args.decoder_key)
    base_year = int(_choice("--base-year", args.base_year, tuple(str(year) for year in sts.BASE_DATES)))
    try:
        decoded = sts.decode_token(decoder_key, " ".join(args.token))
    except sts.StsError as exc:
        raise StsInputError(str(exc)) from None
    for line in describe(decoded, base_year):
        print(line)
    return 0 if decoded.crc_ok else 1


def describe(decoded: sts.DecodedToken, base_year: int) -> list[str]:
    """The fields of a decoded token, one `name: value` per line."""
    credit = decoded.token_class == sts.TokenClass.CREDIT
    names = _SUBCLASS_NAMES if credit else _MANAGEMENT_NAMES
    lines = [
        f"class: {decoded.token_class} ({'credit' if credit else 'management'})",
        f"subclass: {decoded.subclass} ({names.get(decoded.subclass, 'reserved')})",
        f"random: {decoded.random}",
        f"token id: {decoded.token_id} "
        f"(issued {sts.token_issued_at(decoded.token_id, base_year).isoformat()} on base date {base_year})",
        f"amount field: 0x{decoded.amount_field:04x}",
    ]
    if decoded.units is not None:
        whole, tenth = divmod(decoded.units, 10)
        lines.append(f"units: {decoded.units} ({whole}.{tenth} {_UNIT_NAMES[decoded.subclass]})")
    if decoded.maximum_power_limit_w is not None:
        lines.append(f"maximum power limit: {decoded.maximum_power_limit_w} W")
    if decoded.register is not None:
        lines.append(f"register: {'all' if decoded.register == sts.REGISTER_ALL else decoded.register}")
    lines.append("crc: ok" if decoded.crc_ok else "crc: FAILED (another meter's key, or a digit mistyped)")
    return lines


def _key(option: str, text: str) -> bytes:
    """A key given as hex digits (in groups or not), or as '-': the first line of stdin."""
    if text == "-":
        text = sys.stdin.readline()
    try:
        return bytes.fromhex("".join(text.split()))
    except ValueError:
        raise StsInputError(f"{option} must be hex digits") from None


def _integer(option: str, text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise StsInputError(f"{option} must be a whole number, not {text!r}")
    return int(text)


def _choice(option: str, text: str, choices: tuple[str, ...]) -> str:
    if text not in choices:
        raise StsInputError(f"{option} must be one of {', '.join(choices)}, not {text!r}")
    return text


def _time(option: str, text: str) -> datetime:
    try:
        issued = datetime.fromisoformat(text)
    except ValueError:
        raise StsInputError(f"{option} must be an ISO 8601 time such as 2025-01-31T08:00:00Z") from None
    if issued.tzinfo is None:
        raise StsInputError(f"{option} must say its zone (Z or +hh:mm): {text!r}")
    return issued
