"""STS prepayment meter tokens (IEC 62055-41): the 20-digit numbers a customer types into a meter.

This module owns, bit-exact with the standard:

- decoder keys: DKGA02 (DES, 64-bit vending key) and DKGA04 (HMAC-SHA-256, 160-bit vending key);
- the STA cipher (EA07) that encrypts the 64-bit data block, the CRC-16 over it, the transposition
  of the two token-class bits, and the 66-bit number rendered as 20 decimal digits and parsed back;
- the token identifier (TID: minutes since the base date 1993, 2014 or 2035) and a pure TID
  allocator that never repeats or goes back for one meter;
- the 16-bit amount field (2-bit decimal exponent, 14-bit mantissa, rounded up in favour of the
  customer);
- class 0 credit tokens (electricity, water, gas), class 2 management tokens (set maximum power
  limit, clear credit, clear tamper condition) and decoding of any class 0 or class 2 token.

Units. Every `units` argument and result is an integer count of the STS transfer unit, a tenth:
0.1 kWh for electricity (subclass 0), 0.1 m3 for water (1) and gas (2). So 25.6 kWh is
`units=256`. A power limit is in whole watts. A `units` value the amount field cannot hold exactly
is rounded up to the next value it can hold (IEC 62055-41 6.3.6.2: "rounded up in favour of the
customer"); `rounded_units()` says what the meter will actually credit, and that is the figure a
receipt must show.

Rules: sans-IO and pure. No clock, no randomness, no I/O: the issue time, the 4-bit random number
and every key are passed in. Bad input from outside raises StsError (a ValueError) with a message
fit for one line on an operator's screen; assertions guard our own invariants only.

Sources. The constants (substitution and permutation tables, CRC polynomial, base dates, DKGA04
data layout) are the standard's; their values were checked against the open implementation
NectarAPI/tokens-service and, above all, against the STS 531-1-0-02 conformance vectors it
publishes (tests/sts/test_sts_conformance.py), which this code reproduces digit for digit.
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime, timedelta
from enum import IntEnum
from typing import Final

import msgspec
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes

__all__ = [
    "AMOUNT_FIELD_MAX",
    "BASE_DATES",
    "RANDOM_MAX",
    "REGISTER_ALL",
    "TOKEN_DIGITS",
    "TOKEN_ID_MAX",
    "TOKEN_VALUE_MAX",
    "UNITS_MAX",
    "CreditSubclass",
    "DecodedToken",
    "ManagementSubclass",
    "StsError",
    "TokenClass",
    "clear_credit_token",
    "clear_tamper_token",
    "credit_token",
    "decode_amount",
    "decode_token",
    "decrypt_block",
    "derive_decoder_key_dkga02",
    "derive_decoder_key_dkga04",
    "encode_amount",
    "encrypt_block",
    "format_token",
    "meter_pan",
    "next_token_id",
    "normalise_token",
    "rounded_units",
    "set_maximum_power_limit_token",
    "token_class_of",
    "token_id",
    "token_issued_at",
]


class StsError(ValueError):
    """Input the standard cannot carry: a bad key, PAN, amount, time, token or field value."""


class TokenClass(IntEnum):
    """The 2-bit token class, carried outside the encrypted block (IEC 62055-41 6.1)."""

    CREDIT = 0
    METER_TEST = 1  # not encrypted, not meter-specific: vendgate neither issues nor decodes them
    MANAGEMENT = 2
    RESERVED = 3


class CreditSubclass(IntEnum):
    """Class 0 subclasses vendgate issues; the amount is in tenths of the named unit."""

    ELECTRICITY = 0  # 0.1 kWh
    WATER = 1  # 0.1 m3
    GAS = 2  # 0.1 m3


class ManagementSubclass(IntEnum):
    """Class 2 subclasses (IEC 62055-41 table of class 2 token types)."""

    SET_MAXIMUM_POWER_LIMIT = 0
    CLEAR_CREDIT = 1
    SET_TARIFF_RATE = 2
    SET_DECODER_KEY_1 = 3
    SET_DECODER_KEY_2 = 4
    CLEAR_TAMPER_CONDITION = 5
    SET_MAXIMUM_PHASE_POWER_UNBALANCE_LIMIT = 6
    SET_WATER_METER_FACTOR = 7
    SET_DECODER_KEY_3 = 8
    SET_DECODER_KEY_4 = 9


# ---------------------------------------------------------------------------------------------
# Limits and layout. The 66-bit token: class (2) | subclass (4) | random (4) | TID (24) |
# amount or other 16-bit field (16) | CRC (16); the last 64 bits are the encrypted data block.
# ---------------------------------------------------------------------------------------------

TOKEN_DIGITS: Final = 20
TOKEN_BITS: Final = 66
TOKEN_VALUE_MAX: Final = (1 << TOKEN_BITS) - 1  # 73786976294838206463: 20 digits always suffice
TOKEN_ID_BITS: Final = 24
TOKEN_ID_MAX: Final = (1 << TOKEN_ID_BITS) - 1
RANDOM_MAX: Final = 0xF
FIELD_MAX: Final = 0xFFFF
SUBCLASS_MAX: Final = 0xF
DECODER_KEY_BYTES: Final = 8
DKGA02_VENDING_KEY_BYTES: Final = 8
DKGA04_VENDING_KEY_BYTES: Final = 20
REGISTER_ALL: Final = 0xFFFF  # clear credit: every register (IEC 62055-41, class 2 subclass 1)
assert len(str(TOKEN_VALUE_MAX)) == TOKEN_DIGITS

_BLOCK_MASK: Final = (1 << 64) - 1
_BLOCK_BITS: Final = 64
_STA_ROUNDS: Final = 16
_STA_KEY_ROTATE_BITS: Final = 12

# The base dates of the TID (IEC 62055-41: BDT 1993, 2014, 2035), midnight UTC. The 24-bit TID of
# the 1993 base date ran out on 2024-11-24 (the "TID rollover"); meters moved to 2014 with a key
# change. A TID is compared only with TIDs of the same meter key, so the zone is a convention: UTC.
BASE_DATES: Final[dict[int, datetime]] = {
    1993: datetime(1993, 1, 1, tzinfo=UTC),
    2014: datetime(2014, 1, 1, tzinfo=UTC),
    2035: datetime(2035, 1, 1, tzinfo=UTC),
}

# ---------------------------------------------------------------------------------------------
# Amount field (IEC 62055-41 6.3.6.2, quoted with its "rounded up in favour of the customer" rule at
# mrgr.cn/news/54718.html; range confirmed by the CTSA10/CTSA12 vectors): bits 15-14 a decimal
# exponent e, bits 13-0 a mantissa m;
#   value = m * 10**e + sum(2**14 * 10**(i-1) for i in 1..e)
# so the four exponent ranges join without gap or overlap:
#   e=0: 0..16_383   e=1: 16_384..180_214 (step 10)   e=2: 180_224..1_818_524 (step 100)
#   e=3: 1_818_624..18_201_624 (step 1000)
# ---------------------------------------------------------------------------------------------

_MANTISSA_BITS: Final = 14
_MANTISSA_LIMIT: Final = 1 << _MANTISSA_BITS  # 16384
_EXPONENT_MAX: Final = 3
_EXPONENT_STEP: Final = (1, 10, 100, 1000)  # 10**e, spelled out so it stays an int to the type checker
# Lowest value of each exponent's range, the sum term of the formula above.
_EXPONENT_OFFSET: Final = (0, 16_384, 180_224, 1_818_624)
assert _EXPONENT_OFFSET == tuple(sum(_MANTISSA_LIMIT * _EXPONENT_STEP[i] for i in range(e)) for e in range(4))
UNITS_MAX: Final = _EXPONENT_OFFSET[_EXPONENT_MAX] + (_MANTISSA_LIMIT - 1) * _EXPONENT_STEP[_EXPONENT_MAX]
AMOUNT_FIELD_MAX: Final = FIELD_MAX
assert UNITS_MAX == 18_201_624


def encode_amount(units: int) -> int:
    """The 16-bit amount field for `units` (tenths of kWh or m3; watts for a power limit).

    A value between two representable ones is rounded up to the next (in favour of the customer,
    IEC 62055-41 6.3.6.2), so decode_amount(encode_amount(u)) >= u, and == u when u is
    representable. The smallest exponent that holds the value is used.
    """
    _check_int("units", units, 0, UNITS_MAX)
    for exponent in range(_EXPONENT_MAX + 1):
        step = _EXPONENT_STEP[exponent]
        mantissa = -(-(units - _EXPONENT_OFFSET[exponent]) // step)  # ceiling division
        if mantissa < _MANTISSA_LIMIT:
            field = (exponent << _MANTISSA_BITS) | mantissa
            assert decode_amount(field) >= units
            return field
    raise AssertionError("unreachable: units <= UNITS_MAX always fits exponent 3")  # pragma: no cover


def decode_amount(field: int) -> int:
    """The value (tenths of kWh or m3; watts for a power limit) that a 16-bit amount field carries."""
    _check_int("amount field", field, 0, AMOUNT_FIELD_MAX)
    exponent = field >> _MANTISSA_BITS
    mantissa = field & (_MANTISSA_LIMIT - 1)
    return _EXPONENT_OFFSET[exponent] + mantissa * _EXPONENT_STEP[exponent]


def rounded_units(units: int) -> int:
    """What a meter credits for a token asked to carry `units`: `units` rounded up to a representable value."""
    return decode_amount(encode_amount(units))


# ---------------------------------------------------------------------------------------------
# Token identifier
# ---------------------------------------------------------------------------------------------


def token_id(issued: datetime, base_year: int = 1993) -> int:
    """The TID of a token issued at `issued`: whole minutes since the base date (seconds dropped)."""
    base = _base_date(base_year)
    if issued.tzinfo is None or issued.utcoffset() is None:
        raise StsError("the issue time must carry a time zone (UTC)")
    minutes = (issued - base) // timedelta(minutes=1)
    if minutes < 0:
        raise StsError(f"issue time {issued.isoformat()} is before the {base_year} base date")
    if minutes > TOKEN_ID_MAX:
        raise StsError(f"issue time {issued.isoformat()} is past the last TID of the {base_year} base date "
                       f"({token_issued_at(TOKEN_ID_MAX, base_year).isoformat()}); use a later base date")
    return minutes


def token_issued_at(tid: int, base_year: int = 1993) -> datetime:
    """The UTC minute a TID stands for (the inverse of token_id, to the minute)."""
    _check_int("token id", tid, 0, TOKEN_ID_MAX)
    return _base_date(base_year) + timedelta(minutes=tid)


def next_token_id(issued: datetime, last_token_id: int | None, base_year: int = 1993) -> int:
    """The TID for the next token to one meter: never equal to or below the last one issued to it.

    A meter refuses a TID it has seen, so two tokens for one meter within a minute cannot both use
    the minute: the second moves forward one minute past the last (the rule for "multiple tokens
    generated within the same minute" that NectarAPI/tokens-service cites from IEC 62055-51 6.3.5.3,
    and what the CTSA09 step 2 vector carries). The same holds if the clock ever steps back. The caller
    persists the result per meter (and per base date: TIDs of different base dates are unrelated)
    before handing the token out.
    """
    now = token_id(issued, base_year)
    if last_token_id is None:
        return now
    _check_int("last token id", last_token_id, 0, TOKEN_ID_MAX)
    if last_token_id == TOKEN_ID_MAX:
        raise StsError(f"no TID is left after {TOKEN_ID_MAX} on the {base_year} base date; "
                       "the meter needs a key change to a later base date")
    allocated = max(now, last_token_id + 1)
    assert allocated > last_token_id
    return allocated


def _base_date(base_year: int) -> datetime:
    try:
        return BASE_DATES[base_year]
    except (KeyError, TypeError):
        raise StsError(f"base year must be one of {sorted(BASE_DATES)}, not {base_year!r}") from None


# ---------------------------------------------------------------------------------------------
# Meter identity and decoder keys
# ---------------------------------------------------------------------------------------------

# The STS issuer identification numbers: 600727 for 11-digit decoder reference numbers (meter
# numbers), 0000 for 13-digit ones. PAN = IIN + DRN + Luhn check digit = 18 digits.
_IIN_FOR_DRN_DIGITS: Final = {11: "600727", 13: "0000"}
_PAN_DIGITS: Final = 18


def meter_pan(meter_number: str) -> str:
    """The 18-digit meter PAN from a PAN or from an 11- or 13-digit meter number (DRN).

    Both check digits are verified (the DRN's own last digit and the PAN's last digit are Luhn
    digits), so a mistyped meter number is refused instead of getting a token no meter accepts.
    """
    if not isinstance(meter_number, str) or not meter_number.isascii() or not meter_number.isdigit():
        raise StsError("meter number / PAN must be digits only")
    if len(meter_number) in _IIN_FOR_DRN_DIGITS:
        drn = meter_number
        body = _IIN_FOR_DRN_DIGITS[len(drn)] + drn
        pan = body + str(luhn_check_digit(body))
    elif len(meter_number) == _PAN_DIGITS:
        pan = meter_number
        if luhn_check_digit(pan[:-1]) != int(pan[-1]):
            raise StsError(f"PAN {pan} fails its check digit")
        iin = next((iin for iin in ("600727", "0000") if pan.startswith(iin)), None)
        if iin is None:
            raise StsError(f"PAN {pan} starts with neither STS issuer number 600727 nor 0000")
        drn = pan[len(iin):-1]
    else:
        raise StsError(f"meter number must have 11 or 13 digits, or the PAN 18 digits; got {len(meter_number)}")
    if luhn_check_digit(drn[:-1]) != int(drn[-1]):
        raise StsError(f"meter number {drn} fails its check digit")
    return pan


def luhn_check_digit(digits: str) -> int:
    total = 0
    for position, char in enumerate(reversed(digits)):
        digit = int(char)
        if position % 2 == 0:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return (10 - total % 10) % 10


def _check_key_parameters(key_type: int, supply_group_code: str, tariff_index: str, key_revision: int) -> None:
    # KT 3 (common key) builds its PAN block differently; no conformance vector covers it, so it is refused.
    _check_int("key type", key_type, 0, 2)
    _check_int("key revision number", key_revision, 1, 9)
    if not (isinstance(supply_group_code, str) and len(supply_group_code) == 6 and supply_group_code.isascii()
            and supply_group_code.isdigit()):
        raise StsError("supply group code must be 6 digits")
    if not (isinstance(tariff_index, str) and len(tariff_index) == 2 and tariff_index.isascii()
            and tariff_index.isdigit()):
        raise StsError("tariff index must be 2 digits")


def derive_decoder_key_dkga02(vending_key: bytes, key_type: int, supply_group_code: str, tariff_index: str,
                              key_revision: int, pan: str) -> bytes:
    """The meter's 8-byte decoder key by DKGA02 (IEC 62055-41), most significant byte first.

    PANBlock = the 16 digits of IIN||IAIN after the first (PAN without its first and last digit);
    CONTROLBlock = KT || SGC || TI || KRN || FFFFFF as 16 hex nibbles; D = PANBlock xor CONTROLBlock;
    decoder key = DES(vending key, D) xor D xor vending key.
    """
    if not isinstance(vending_key, bytes) or len(vending_key) != DKGA02_VENDING_KEY_BYTES:
        raise StsError(f"a DKGA02 vending key has {DKGA02_VENDING_KEY_BYTES} bytes (16 hex digits)")
    _check_key_parameters(key_type, supply_group_code, tariff_index, key_revision)
    full_pan = meter_pan(pan)
    pan_block = bytes.fromhex(full_pan[1:17])
    control_block = bytes.fromhex(f"{key_type}{supply_group_code}{tariff_index}{key_revision}FFFFFF")
    data = _xor(pan_block, control_block)
    # Single DES is TripleDES with K1 = K2 = K3 (cryptography keeps it in its "decrepit" module).
    encryptor = Cipher(TripleDES(vending_key * 3), modes.ECB()).encryptor()  # noqa: S305 - one block, by the standard
    encrypted = encryptor.update(data) + encryptor.finalize()
    return _xor(_xor(encrypted, data), vending_key)


def derive_decoder_key_dkga04(vending_key: bytes, key_type: int, supply_group_code: str, tariff_index: str,
                              key_revision: int, pan: str, base_year: int) -> bytes:
    """The meter's 8-byte STA decoder key by DKGA04 (IEC 62055-41 ed. 3, HMAC-SHA-256; 160-bit vending key).

    The base date is part of the derivation: a meter moved to base date 2014 has a new key.
    The key is the first 8 bytes of HMAC-SHA-256(vending key, data), data as the standard lays it
    out (byte values as in NectarAPI/tokens-service DecoderKeyGeneratorAlgorithm04.java).
    """
    if not isinstance(vending_key, bytes) or len(vending_key) != DKGA04_VENDING_KEY_BYTES:
        raise StsError(f"a DKGA04 vending key has {DKGA04_VENDING_KEY_BYTES} bytes (40 hex digits)")
    _check_key_parameters(key_type, supply_group_code, tariff_index, key_revision)
    _base_date(base_year)
    full_pan = meter_pan(pan)
    decoder_key_bits = DECODER_KEY_BYTES * 8
    data = b"".join((
        b"\x04\x02", b"04",  # DKGA 04
        b"\x02", f"{base_year % 100:02d}".encode(),  # base date 93 / 14 / 35
        b"\x02", b"07",  # encryption algorithm EA07 (STA)
        b"\x02", tariff_index.encode(),
        b"\x00\x04\x06", supply_group_code.encode(),
        b"\x01", f"{key_type:x}".encode(),
        b"\x01", f"{key_revision:x}".encode(),
        b"\x12", full_pan.encode(),
        decoder_key_bits.to_bytes(4, "big"),
    ))
    return hmac.new(vending_key, data, hashlib.sha256).digest()[:DECODER_KEY_BYTES]


def _xor(left: bytes, right: bytes) -> bytes:
    assert len(left) == len(right)
    return bytes(a ^ b for a, b in zip(left, right, strict=True))


# ---------------------------------------------------------------------------------------------
# STA, encryption algorithm 07 (IEC 62055-41 annex: Standard Transfer Algorithm). Bits are numbered
# from the least significant (bit 0) to bit 63, nibble n is bits 4n..4n+3. Encryption runs 16
# rounds on a working key that starts as the decoder key complemented and rotated right 12 bits:
# each round substitutes every nibble n with table 1 or table 2 as bit 4n+3 of the working key is
# 0 or 1, moves bit i to bit PERMUTATION[i], then rotates the working key left one bit.
# Tables as published in NectarAPI/tokens-service src/main/java/ke/co/nectar/token/domain/table/
# (EncryptingFirstSubstitutionTable, EncryptingSecondSubstitutionTable, EncryptingPermutationTable).
# ---------------------------------------------------------------------------------------------

_SUBSTITUTION_1: Final = (14, 10, 7, 9, 12, 3, 2, 5, 13, 0, 15, 1, 4, 8, 6, 11)
_SUBSTITUTION_2: Final = (12, 8, 2, 13, 7, 6, 1, 3, 11, 5, 9, 15, 0, 4, 10, 14)
_PERMUTATION: Final = (
    55, 42, 10, 18, 24, 21, 44, 35, 2, 22, 56, 43, 27, 58, 9, 50,
    6, 36, 12, 61, 37, 38, 53, 16, 62, 3, 7, 4, 32, 20, 63, 25,
    51, 52, 54, 33, 49, 19, 46, 29, 48, 31, 23, 30, 41, 28, 13, 5,
    40, 60, 39, 11, 15, 17, 1, 0, 57, 34, 59, 8, 47, 14, 45, 26,
)
assert sorted(_SUBSTITUTION_1) == sorted(_SUBSTITUTION_2) == list(range(16))
assert sorted(_PERMUTATION) == list(range(_BLOCK_BITS))

_INVERSE_SUBSTITUTION_1: Final = tuple(_SUBSTITUTION_1.index(v) for v in range(16))
_INVERSE_SUBSTITUTION_2: Final = tuple(_SUBSTITUTION_2.index(v) for v in range(16))
_INVERSE_PERMUTATION: Final = tuple(_PERMUTATION.index(i) for i in range(_BLOCK_BITS))


def _byte_tables(permutation: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    # Bit permutation one input byte at a time: 8 lookups a round instead of 64 bit moves.
    return tuple(
        tuple(sum(1 << permutation[8 * position + bit] for bit in range(8) if value >> bit & 1) for value in range(256))
        for position in range(8)
    )


_PERMUTE_BYTES: Final = _byte_tables(_PERMUTATION)
_UNPERMUTE_BYTES: Final = _byte_tables(_INVERSE_PERMUTATION)
# The two key bits that pick the tables of a byte's two nibbles (bits 3 and 7 of the byte's key
# bits), kept in place: (key >> 8 * position) & _KEY_BITS_OF_BYTE is 0x00, 0x01, 0x10 or 0x11.
_KEY_BITS_OF_BYTE: Final = 0x11


def _substitute_byte(value: int, key_bits: int, table_0: tuple[int, ...], table_1: tuple[int, ...]) -> int:
    low = (table_1 if key_bits & 0x01 else table_0)[value & 0xF]
    high = (table_1 if key_bits & 0x10 else table_0)[value >> 4]
    return high << 4 | low


def _substitution_tables(table_0: tuple[int, ...], table_1: tuple[int, ...]) -> tuple[int, ...]:
    # Indexed by key_bits << 8 | byte: both nibbles of a byte substituted in one lookup.
    table = [0] * ((_KEY_BITS_OF_BYTE + 1) << 8)
    for key_bits in (0x00, 0x01, 0x10, 0x11):
        for value in range(256):
            table[key_bits << 8 | value] = _substitute_byte(value, key_bits, table_0, table_1)
    return tuple(table)


def _round_tables() -> tuple[tuple[int, ...], ...]:
    # One encryption round per input byte: substitute its nibbles, then scatter its bits where the
    # permutation sends them. Indexed like _substitution_tables; the round ORs 8 lookups.
    substitution = _substitution_tables(_SUBSTITUTION_1, _SUBSTITUTION_2)
    return tuple(
        tuple(_PERMUTE_BYTES[position][byte] for byte in substitution)
        for position in range(8)
    )


_ENCRYPT_ROUND: Final = _round_tables()
_DECRYPT_SUBSTITUTION: Final = _substitution_tables(_INVERSE_SUBSTITUTION_1, _INVERSE_SUBSTITUTION_2)


def _permute(block: int, tables: tuple[tuple[int, ...], ...]) -> int:
    out = 0
    for position in range(8):
        out |= tables[position][(block >> (8 * position)) & 0xFF]
    return out


def _substitute(block: int, key: int, table_0: tuple[int, ...], table_1: tuple[int, ...], key_bit: int) -> int:
    """The nibble substitution bit by bit, as the standard states it (the reference the tables are checked against)."""
    out = 0
    for nibble in range(16):
        table = table_1 if (key >> (4 * nibble + key_bit)) & 1 else table_0
        out |= table[(block >> (4 * nibble)) & 0xF] << (4 * nibble)
    return out


def _rotate_left(value: int, bits: int) -> int:
    bits %= _BLOCK_BITS
    return ((value << bits) | (value >> (_BLOCK_BITS - bits))) & _BLOCK_MASK


def _key_int(decoder_key: bytes) -> int:
    if not isinstance(decoder_key, bytes) or len(decoder_key) != DECODER_KEY_BYTES:
        raise StsError(f"a decoder key has {DECODER_KEY_BYTES} bytes (16 hex digits)")
    return int.from_bytes(decoder_key, "big")


def encrypt_block(decoder_key: bytes, block: int) -> int:
    """STA (EA07) encryption of a 64-bit data block."""
    _check_int("data block", block, 0, _BLOCK_MASK)
    key = _rotate_left(~_key_int(decoder_key) & _BLOCK_MASK, -_STA_KEY_ROTATE_BITS)
    t0, t1, t2, t3, t4, t5, t6, t7 = _ENCRYPT_ROUND
    for _ in range(_STA_ROUNDS):
        k = key >> 3  # bit 3 of each nibble's key bits, at bit 0 of the nibble
        block = (t0[(k & 0x11) << 8 | (block & 0xFF)]
                 | t1[(k >> 8 & 0x11) << 8 | (block >> 8 & 0xFF)]
                 | t2[(k >> 16 & 0x11) << 8 | (block >> 16 & 0xFF)]
                 | t3[(k >> 24 & 0x11) << 8 | (block >> 24 & 0xFF)]
                 | t4[(k >> 32 & 0x11) << 8 | (block >> 32 & 0xFF)]
                 | t5[(k >> 40 & 0x11) << 8 | (block >> 40 & 0xFF)]
                 | t6[(k >> 48 & 0x11) << 8 | (block >> 48 & 0xFF)]
                 | t7[(k >> 56 & 0x11) << 8 | block >> 56])
        key = ((key << 1) | (key >> 63)) & _BLOCK_MASK
    return block


def decrypt_block(decoder_key: bytes, block: int) -> int:
    """STA (EA07) decryption: the rounds of encrypt_block undone in reverse order."""
    _check_int("data block", block, 0, _BLOCK_MASK)
    # The working key of the last encryption round is the complemented key rotated by 15 - 12 = 3 bits.
    key = _rotate_left(~_key_int(decoder_key) & _BLOCK_MASK, _STA_ROUNDS - 1 - _STA_KEY_ROTATE_BITS)
    table = _DECRYPT_SUBSTITUTION
    for _ in range(_STA_ROUNDS):
        permuted = _permute(block, _UNPERMUTE_BYTES)
        k = key >> 3
        block = 0
        for shift in range(0, _BLOCK_BITS, 8):
            block |= table[(k >> shift & _KEY_BITS_OF_BYTE) << 8 | (permuted >> shift & 0xFF)] << shift
        key = _rotate_left(key, -1)
    return block


# ---------------------------------------------------------------------------------------------
# CRC-16 (IEC 62055-41): generator x^16 + x^15 + x^2 + 1 run LSB-first (0xA001), preset 0xFFFF,
# over the 50 bits class | subclass | random | TID | field as 7 bytes, most significant first;
# the result goes into the token low byte first (NectarAPI/tokens-service domain/Crc.java).
# ---------------------------------------------------------------------------------------------

_CRC_POLYNOMIAL_REFLECTED: Final = 0xA001
_CRC_PRESET: Final = 0xFFFF
_CRC_INPUT_BYTES: Final = 7


def _crc_step_bitwise(crc: int, byte: int) -> int:
    crc ^= byte
    for _ in range(8):
        crc = (crc >> 1) ^ _CRC_POLYNOMIAL_REFLECTED if crc & 1 else crc >> 1
    return crc


# The eight shift steps of one byte, for every value of the low byte: one lookup per input byte.
_CRC_TABLE: Final = tuple(_crc_step_bitwise(0, value) for value in range(256))


def _token_crc(head: int) -> int:
    crc = _CRC_PRESET
    table = _CRC_TABLE
    for byte in head.to_bytes(_CRC_INPUT_BYTES, "big"):
        crc = (crc >> 8) ^ table[(crc ^ byte) & 0xFF]
    return ((crc & 0xFF) << 8) | (crc >> 8)


# ---------------------------------------------------------------------------------------------
# Assembly: block, CRC, encryption, class-bit transposition, 20 digits.
# The class bits cannot ride in the encrypted block, so after encryption bits 28 and 27 of the
# ciphertext move to bits 65 and 64 of the token and the class takes their place (class bit 1 at
# bit 28, class bit 0 at bit 27) (NectarAPI/tokens-service TokenGenerator.transpose66BitString).
# ---------------------------------------------------------------------------------------------

_CLASS_BIT_HIGH: Final = 28
_CLASS_BIT_LOW: Final = 27


def _encode(decoder_key: bytes, token_class: TokenClass, subclass: int, random: int, tid: int, field: int) -> str:
    _key_int(decoder_key)
    _check_int("random", random, 0, RANDOM_MAX)
    _check_int("token id", tid, 0, TOKEN_ID_MAX)
    assert 0 <= subclass <= SUBCLASS_MAX and 0 <= field <= FIELD_MAX
    data = (subclass << 44) | (random << 40) | (tid << 16) | field
    block = (data << 16) | _token_crc((int(token_class) << 48) | data)
    cipher = encrypt_block(decoder_key, block)
    moved_high = (cipher >> _CLASS_BIT_HIGH) & 1
    moved_low = (cipher >> _CLASS_BIT_LOW) & 1
    cipher &= ~((1 << _CLASS_BIT_HIGH) | (1 << _CLASS_BIT_LOW)) & _BLOCK_MASK
    cipher |= ((int(token_class) >> 1) << _CLASS_BIT_HIGH) | ((int(token_class) & 1) << _CLASS_BIT_LOW)
    value = (moved_high << 65) | (moved_low << 64) | cipher
    return f"{value:0{TOKEN_DIGITS}d}"


def credit_token(decoder_key: bytes, subclass: int, token_id: int, units: int, random: int) -> str:
    """A class 0 credit token: `units` tenths of kWh (electricity) or m3 (water, gas).

    `units` is rounded up to what the amount field can hold (see rounded_units); at least 1.
    """
    if isinstance(subclass, bool) or subclass not in set(CreditSubclass):
        raise StsError(f"credit subclass must be 0 (electricity), 1 (water) or 2 (gas), not {subclass!r}")
    _check_int("units", units, 1, UNITS_MAX)
    return _encode(decoder_key, TokenClass.CREDIT, subclass, random, token_id, encode_amount(units))


def set_maximum_power_limit_token(decoder_key: bytes, token_id: int, maximum_power_limit_w: int, random: int) -> str:
    """A class 2 token setting the meter's maximum power limit, in watts (amount-field encoded, rounded up)."""
    _check_int("maximum power limit (W)", maximum_power_limit_w, 0, UNITS_MAX)
    field = encode_amount(maximum_power_limit_w)
    return _encode(decoder_key, TokenClass.MANAGEMENT, ManagementSubclass.SET_MAXIMUM_POWER_LIMIT, random, token_id,
                   field)


def clear_credit_token(decoder_key: bytes, token_id: int, random: int, register: int = REGISTER_ALL) -> str:
    """A class 2 token clearing a credit register: 0 electricity, 1 water, 2 gas ..., REGISTER_ALL every one."""
    _check_int("register", register, 0, FIELD_MAX)
    return _encode(decoder_key, TokenClass.MANAGEMENT, ManagementSubclass.CLEAR_CREDIT, random, token_id, register)


def clear_tamper_token(decoder_key: bytes, token_id: int, random: int) -> str:
    """A class 2 token clearing the meter's tamper condition (its 16-bit field is zero padding)."""
    return _encode(decoder_key, TokenClass.MANAGEMENT, ManagementSubclass.CLEAR_TAMPER_CONDITION, random, token_id, 0)


# ---------------------------------------------------------------------------------------------
# Parsing and decoding
# ---------------------------------------------------------------------------------------------

_GROUP_SEPARATORS: Final = " -"


def normalise_token(text: str) -> str:
    """The 20 digits of a token as typed or printed: spaces and hyphens between groups are dropped."""
    if not isinstance(text, str):
        raise StsError("a token is text")
    digits = "".join(char for char in text if char not in _GROUP_SEPARATORS)
    if not all(char in "0123456789" for char in digits):
        raise StsError("a token has digits only")
    if len(digits) != TOKEN_DIGITS:
        raise StsError(f"a token has {TOKEN_DIGITS} digits, not {len(digits)}")
    if int(digits) > TOKEN_VALUE_MAX:
        raise StsError(f"{TOKEN_DIGITS} digits above {TOKEN_VALUE_MAX} are no STS token")
    return digits


def format_token(token: str) -> str:
    """A token in five groups of four digits, as printed on a receipt."""
    digits = normalise_token(token)
    return " ".join(digits[i:i + 4] for i in range(0, TOKEN_DIGITS, 4))


def token_class_of(token: str) -> TokenClass:
    """The class of a token, which travels unencrypted: readable without any key."""
    value = int(normalise_token(token))
    return TokenClass(((value >> _CLASS_BIT_HIGH) & 1) << 1 | ((value >> _CLASS_BIT_LOW) & 1))


class DecodedToken(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A token decrypted with one decoder key. With the wrong key (or a mistyped digit) the fields
    are noise and crc_ok is False: nothing in it may be trusted unless crc_ok is True.

    For the class 2 key-change subclasses (3, 4, 8, 9) random, token_id and amount_field are raw
    bits of another layout.
    """

    token_class: int
    subclass: int
    random: int
    token_id: int
    amount_field: int  # the raw 16-bit field: amount, power limit, register or padding
    units: int | None  # class 0 subclasses 0-3: decode_amount(amount_field), in tenths; else None
    crc_ok: bool
    maximum_power_limit_w: int | None = None  # class 2 subclass 0
    register: int | None = None  # class 2 subclass 1


def decode_token(decoder_key: bytes, token: str) -> DecodedToken:
    """Decrypt and split a class 0 or class 2 token; check its CRC (see DecodedToken.crc_ok)."""
    _key_int(decoder_key)
    token_class = token_class_of(token)
    value = int(normalise_token(token))
    cipher = value & _BLOCK_MASK
    if token_class is TokenClass.METER_TEST:
        raise StsError("class 1 (meter test / display) tokens are not meter-specific; vendgate does not decode them")
    if token_class is TokenClass.RESERVED:
        raise StsError("token class 3 is reserved by the standard; this is no valid token")
    cipher &= ~((1 << _CLASS_BIT_HIGH) | (1 << _CLASS_BIT_LOW)) & _BLOCK_MASK
    cipher |= ((value >> 65) & 1) << _CLASS_BIT_HIGH | ((value >> 64) & 1) << _CLASS_BIT_LOW
    block = decrypt_block(decoder_key, cipher)
    data = block >> 16
    crc_ok = _token_crc((int(token_class) << 48) | data) == block & 0xFFFF
    subclass = data >> 44
    field = data & FIELD_MAX
    is_credit = token_class is TokenClass.CREDIT
    return DecodedToken(
        token_class=int(token_class),
        subclass=subclass,
        random=(data >> 40) & RANDOM_MAX,
        token_id=(data >> 16) & TOKEN_ID_MAX,
        amount_field=field,
        # Subclasses 4-7 carry currency in another encoding; subclass 3 is time, tenths of a minute.
        units=decode_amount(field) if is_credit and subclass <= 3 else None,
        crc_ok=crc_ok,
        maximum_power_limit_w=(decode_amount(field) if not is_credit
                               and subclass == ManagementSubclass.SET_MAXIMUM_POWER_LIMIT else None),
        register=field if not is_credit and subclass == ManagementSubclass.CLEAR_CREDIT else None,
    )


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise StsError(f"{name} must be an integer, not {value!r}")
    if not low <= value <= high:
        raise StsError(f"{name} must be between {low} and {high}, not {value}")
