"""Round trips over every field range, the amount encoding exhaustively, the TID allocator, and bad input."""

from __future__ import annotations

import ast
import random as random_module
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import sts

KEY = bytes.fromhex("e653341f9d5bf36f")  # CTSA01 decoder key (see test_sts_conformance.py)
OTHER_KEY = bytes.fromhex("0abc12def3456789")

keys = st.binary(min_size=8, max_size=8)
tids = st.integers(0, sts.TOKEN_ID_MAX)
randoms = st.integers(0, sts.RANDOM_MAX)
FAST = settings(max_examples=150, deadline=None)


# -- amount field: exhaustive, it is only 65536 values ----------------------------------------

def test_every_amount_field_decodes_and_reencodes_to_itself() -> None:
    values = [sts.decode_amount(field) for field in range(sts.AMOUNT_FIELD_MAX + 1)]
    assert values == sorted(values) and len(set(values)) == len(values)  # strictly increasing, no aliases
    for field, value in enumerate(values):
        assert sts.encode_amount(value) == field
    assert values[0] == 0 and values[-1] == sts.UNITS_MAX == 18_201_624


@pytest.mark.parametrize(("units", "field", "carried"), [
    # Each exponent's first and last value, and the values either side of each boundary.
    (0, 0x0000, 0),
    (1, 0x0001, 1),
    (16_383, 0x3FFF, 16_383),
    (16_384, 0x4000, 16_384),
    (16_385, 0x4001, 16_394),  # rounded up to the next step of 10
    (16_394, 0x4001, 16_394),
    (20_000, 0x4000 | 362, 20_004),
    (180_214, 0x7FFF, 180_214),
    (180_215, 0x8000, 180_224),  # past the last e=1 value: the first e=2 value
    (180_223, 0x8000, 180_224),
    (180_224, 0x8000, 180_224),
    (180_225, 0x8001, 180_324),
    (1_818_524, 0xBFFF, 1_818_524),
    (1_818_525, 0xC000, 1_818_624),
    (1_818_623, 0xC000, 1_818_624),
    (1_818_624, 0xC000, 1_818_624),
    (1_818_625, 0xC001, 1_819_624),
    (18_200_625, 0xFFFF, 18_201_624),
    (18_201_624, 0xFFFF, 18_201_624),
])
def test_amount_encoding_at_every_exponent_boundary(units: int, field: int, carried: int) -> None:
    assert sts.encode_amount(units) == field
    assert sts.decode_amount(field) == carried == sts.rounded_units(units)


@FAST
@given(st.integers(0, sts.UNITS_MAX))
def test_amount_rounds_up_to_the_nearest_representable_value(units: int) -> None:
    field = sts.encode_amount(units)
    carried = sts.decode_amount(field)
    assert carried >= units
    assert field == 0 or sts.decode_amount(field - 1) < units  # nothing representable in between


@pytest.mark.parametrize("bad", [-1, sts.UNITS_MAX + 1, 1.5, True, "10"])
def test_encode_amount_refuses_out_of_range(bad: object) -> None:
    with pytest.raises(sts.StsError):
        sts.encode_amount(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [-1, 0x10000])
def test_decode_amount_refuses_out_of_range(bad: int) -> None:
    with pytest.raises(sts.StsError):
        sts.decode_amount(bad)


# -- cipher and token round trips ----------------------------------------------------------------

@FAST
@given(keys, st.integers(0, (1 << 64) - 1))
def test_sta_decrypt_undoes_encrypt(key: bytes, block: int) -> None:
    cipher = sts.encrypt_block(key, block)
    assert 0 <= cipher < 1 << 64
    assert sts.decrypt_block(key, cipher) == block


def reference_encrypt(key: bytes, block: int) -> int:
    """STA encryption round by round as the standard states it: substitute, permute, rotate."""
    working = sts._rotate_left(~int.from_bytes(key, "big") & ((1 << 64) - 1), -12)
    for _ in range(16):
        block = sts._permute(sts._substitute(block, working, sts._SUBSTITUTION_1, sts._SUBSTITUTION_2, 3),
                             sts._PERMUTE_BYTES)
        working = sts._rotate_left(working, 1)
    return block


@FAST
@given(keys, st.integers(0, (1 << 64) - 1))
def test_sta_table_rounds_equal_the_stated_rounds(key: bytes, block: int) -> None:
    assert sts.encrypt_block(key, block) == reference_encrypt(key, block)


@FAST
@given(st.integers(0, (1 << 56) - 1))
def test_token_crc_table_equals_bitwise_crc(head: int) -> None:
    crc = 0xFFFF
    for byte in head.to_bytes(7, "big"):
        crc = sts._crc_step_bitwise(crc, byte)
    assert sts._token_crc(head) == ((crc & 0xFF) << 8) | (crc >> 8)


@pytest.mark.parametrize("block", [0, 1, 1 << 63, (1 << 64) - 1, 0x0123456789ABCDEF])
@pytest.mark.parametrize("key", [bytes(8), b"\xff" * 8, bytes.fromhex("e653341f9d5bf36f")])
def test_sta_table_rounds_at_the_edges(key: bytes, block: int) -> None:
    cipher = sts.encrypt_block(key, block)
    assert cipher == reference_encrypt(key, block)
    assert sts.decrypt_block(key, cipher) == block


@FAST
@given(keys, st.sampled_from(list(sts.CreditSubclass)), tids, st.integers(1, sts.UNITS_MAX), randoms)
def test_credit_token_round_trip(key: bytes, subclass: int, tid: int, units: int, rnd: int) -> None:
    token = sts.credit_token(key, subclass, tid, units, rnd)
    assert len(token) == 20 and token.isdigit()
    decoded = sts.decode_token(key, token)
    assert decoded == sts.DecodedToken(token_class=0, subclass=subclass, random=rnd, token_id=tid,
                                       amount_field=sts.encode_amount(units), units=sts.rounded_units(units),
                                       crc_ok=True)


@FAST
@given(keys, tids, st.integers(0, sts.UNITS_MAX), randoms)
def test_maximum_power_limit_round_trip(key: bytes, tid: int, watts: int, rnd: int) -> None:
    decoded = sts.decode_token(key, sts.set_maximum_power_limit_token(key, tid, watts, rnd))
    assert (decoded.crc_ok, decoded.token_class, decoded.subclass) == (True, 2, 0)
    assert (decoded.token_id, decoded.random) == (tid, rnd)
    assert decoded.maximum_power_limit_w == sts.rounded_units(watts) and decoded.units is None


@FAST
@given(keys, tids, randoms, st.integers(0, 0xFFFF))
def test_clear_credit_round_trip(key: bytes, tid: int, rnd: int, register: int) -> None:
    decoded = sts.decode_token(key, sts.clear_credit_token(key, tid, rnd, register=register))
    assert (decoded.crc_ok, decoded.token_class, decoded.subclass) == (True, 2, 1)
    assert (decoded.token_id, decoded.random, decoded.register) == (tid, rnd, register)


@FAST
@given(keys, tids, randoms)
def test_clear_tamper_round_trip(key: bytes, tid: int, rnd: int) -> None:
    decoded = sts.decode_token(key, sts.clear_tamper_token(key, tid, rnd))
    assert (decoded.crc_ok, decoded.token_class, decoded.subclass, decoded.amount_field) == (True, 2, 5, 0)
    assert (decoded.token_id, decoded.random) == (tid, rnd)


def test_single_digit_changes_fail_the_crc_at_the_crc_16_rate() -> None:
    # A customer mistypes one digit. The 64-bit block then decrypts to noise, and noise passes a 16-bit
    # CRC once in 65536: the standard's own limit, not something a vendor can improve. What we can
    # prove is that the CRC catches typos at that rate (a broken CRC would let ~all of them through),
    # and that the rare survivor is noise (random subclass, TID, amount), which the meter's class,
    # subclass and TID checks face next (tests/sts/test_meter.py).
    rng = random_module.Random(6)
    typos = survivors = 0
    for _ in range(60):
        token = sts.credit_token(KEY, 0, rng.randrange(1 << 24), rng.randrange(1, sts.UNITS_MAX), rng.randrange(16))
        for position in range(20):
            for digit in "0123456789":
                typo = token[:position] + digit + token[position + 1:]
                if digit == token[position] or int(typo) > sts.TOKEN_VALUE_MAX:
                    continue
                typos += 1
                try:
                    decoded = sts.decode_token(KEY, typo)
                except sts.StsError:
                    continue  # the typo made it a class 1 or class 3 token: refused before decryption
                survivors += decoded.crc_ok
    assert typos > 10_000
    assert survivors <= 5  # expected typos / 65536 ~ 0.16; P(> 5) under a sound CRC is below 1e-6


def test_the_one_typo_in_this_sample_that_passes_the_crc_is_noise() -> None:
    # Found by the test above (seed 6): one digit changed, CRC holds by chance; it decodes to a
    # currency subclass, so an electricity meter refuses it on the subclass.
    decoded = sts.decode_token(KEY, "64088033791899706642")
    original = sts.decode_token(KEY, "64088033791899766642")
    assert decoded.crc_ok and original.crc_ok
    assert (original.subclass, decoded.subclass) == (0, 5)


def test_a_token_for_another_key_fails_its_crc() -> None:
    token = sts.credit_token(KEY, 0, 123_456, 256, 7)
    assert not sts.decode_token(OTHER_KEY, token).crc_ok


def test_class_bits_sit_at_bits_28_and_27_of_the_66() -> None:
    for token, token_class in ((sts.credit_token(KEY, 0, 1, 1, 0), 0), (sts.clear_tamper_token(KEY, 1, 0), 2)):
        value = int(token)
        assert ((value >> 28) & 1, (value >> 27) & 1) == (token_class >> 1, token_class & 1)


# -- token id ------------------------------------------------------------------------------------

def test_token_id_counts_whole_minutes_from_the_base_date() -> None:
    assert sts.token_id(datetime(1993, 1, 1, tzinfo=UTC)) == 0
    assert sts.token_id(datetime(1993, 1, 1, 0, 1, 59, 999_999, tzinfo=UTC)) == 1
    assert sts.token_id(datetime(2014, 1, 1, tzinfo=UTC), 2014) == 0
    assert sts.token_id(datetime(2035, 1, 1, 0, 10, tzinfo=UTC), 2035) == 10
    # Zones are honoured: 03:00 in UTC+3 is midnight UTC.
    assert sts.token_id(datetime(1993, 1, 1, 3, 0, tzinfo=timezone(timedelta(hours=3)))) == 0


def test_base_date_1993_rolls_over_on_24_november_2024() -> None:
    last = sts.token_issued_at(sts.TOKEN_ID_MAX, 1993)
    assert last == datetime(2024, 11, 24, 20, 15, tzinfo=UTC)  # tidrollover.com / STS Association
    assert sts.token_id(last) == sts.TOKEN_ID_MAX
    with pytest.raises(sts.StsError, match="use a later base date"):
        sts.token_id(last + timedelta(minutes=1))
    assert sts.token_id(last + timedelta(minutes=1), 2014) > 0


@pytest.mark.parametrize(("issued", "base_year", "message"), [
    (datetime(2020, 1, 1), 1993, "time zone"),
    (datetime(1992, 12, 31, 23, 59, tzinfo=UTC), 1993, "before the 1993 base date"),
    (datetime(2013, 12, 31, 23, 59, tzinfo=UTC), 2014, "before the 2014 base date"),
    (datetime(2020, 1, 1, tzinfo=UTC), 2000, "base year must be one of"),
])
def test_token_id_refuses_bad_times(issued: datetime, base_year: int, message: str) -> None:
    with pytest.raises(sts.StsError, match=message):
        sts.token_id(issued, base_year)


@FAST
@given(st.datetimes(min_value=datetime(2014, 1, 1), max_value=datetime(2045, 1, 1), timezones=st.just(UTC)))
def test_token_issued_at_inverts_token_id_to_the_minute(issued: datetime) -> None:
    tid = sts.token_id(issued, 2014) if issued < sts.token_issued_at(sts.TOKEN_ID_MAX, 2014) else None
    if tid is not None:
        assert sts.token_issued_at(tid, 2014) == issued.replace(second=0, microsecond=0)


def test_next_token_id_never_repeats_within_a_minute() -> None:
    minute = datetime(2024, 6, 1, 12, 0, 5, tzinfo=UTC)
    first = sts.next_token_id(minute, None, 1993)
    second = sts.next_token_id(minute + timedelta(seconds=30), first, 1993)
    third = sts.next_token_id(minute + timedelta(seconds=40), second, 1993)
    assert (second, third) == (first + 1, first + 2)
    # Once the clock passes the allocated minutes, the TID is the clock again.
    assert sts.next_token_id(minute + timedelta(minutes=10), third, 1993) == first + 10


def test_next_token_id_moves_forward_when_the_clock_steps_back() -> None:
    now = datetime(2025, 3, 1, 8, 0, tzinfo=UTC)
    last = sts.token_id(now + timedelta(hours=1), 2014)
    assert sts.next_token_id(now, last, 2014) == last + 1


@FAST
@given(st.lists(st.integers(0, 600), min_size=1, max_size=40))
def test_next_token_id_is_strictly_increasing_for_any_clock(offsets_s: list[int]) -> None:
    start = datetime(2025, 1, 1, tzinfo=UTC)
    last: int | None = None
    for offset in offsets_s:
        tid = sts.next_token_id(start + timedelta(seconds=offset), last, 2014)
        assert last is None or tid > last
        last = tid


def test_next_token_id_refuses_when_the_tid_space_is_used_up() -> None:
    with pytest.raises(sts.StsError, match="key change"):
        sts.next_token_id(datetime(2024, 11, 24, tzinfo=UTC), sts.TOKEN_ID_MAX, 1993)
    with pytest.raises(sts.StsError, match="last token id"):
        sts.next_token_id(datetime(2024, 11, 24, tzinfo=UTC), -1, 1993)


# -- bad input ------------------------------------------------------------------------------------

VK = bytes.fromhex("abababababababab")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"vending_key": b"\x00" * 7}, "8 bytes"),
    ({"vending_key": "abababababababab"}, "8 bytes"),
    ({"key_type": 3}, "key type"),
    ({"key_type": -1}, "key type"),
    ({"supply_group_code": "12345"}, "supply group code"),
    ({"supply_group_code": "12345a"}, "supply group code"),
    ({"tariff_index": "1"}, "tariff index"),
    ({"key_revision": 0}, "key revision"),
    ({"key_revision": 10}, "key revision"),
    ({"pan": "600727000000000008"}, "check digit"),  # last digit changed
    ({"pan": "00000000001"}, "check digit"),  # meter number with a wrong check digit
    ({"pan": "6007270000000000"}, "11 or 13 digits"),
    ({"pan": "60072700000000000x"}, "digits only"),
    ({"pan": "123456000000000009"}, "issuer"),  # valid check digit, unknown issuer
])
def test_dkga02_refuses_bad_parameters(kwargs: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {"vending_key": VK, "key_type": 2, "supply_group_code": "123456",
                                    "tariff_index": "01", "key_revision": 1, "pan": "600727000000000009"}
    arguments.update(kwargs)
    with pytest.raises(sts.StsError, match=message):
        sts.derive_decoder_key_dkga02(**arguments)  # type: ignore[arg-type]


def test_dkga04_refuses_a_64_bit_key_and_a_bad_base_year() -> None:
    with pytest.raises(sts.StsError, match="20 bytes"):
        sts.derive_decoder_key_dkga04(VK, 2, "123457", "01", 1, "600727000000000009", 1993)
    with pytest.raises(sts.StsError, match="base year"):
        sts.derive_decoder_key_dkga04(VK * 2 + VK[:4], 2, "123457", "01", 1, "600727000000000009", 2000)


@pytest.mark.parametrize(("call", "message"), [
    (lambda: sts.credit_token(KEY, 3, 1, 1, 0), "subclass"),
    (lambda: sts.credit_token(KEY, True, 1, 1, 0), "subclass"),
    (lambda: sts.credit_token(KEY, 0, 1, 1, False), "random"),
    (lambda: sts.credit_token(KEY, 0, 1, 0, 0), "units"),
    (lambda: sts.credit_token(KEY, 0, 1, sts.UNITS_MAX + 1, 0), "units"),
    (lambda: sts.credit_token(KEY, 0, 1 << 24, 1, 0), "token id"),
    (lambda: sts.credit_token(KEY, 0, -1, 1, 0), "token id"),
    (lambda: sts.credit_token(KEY, 0, 1, 1, 16), "random"),
    (lambda: sts.credit_token(KEY[:7], 0, 1, 1, 0), "decoder key"),
    (lambda: sts.set_maximum_power_limit_token(KEY, 1, -1, 0), "power limit"),
    (lambda: sts.clear_credit_token(KEY, 1, 0, register=0x10000), "register"),
    (lambda: sts.decode_token(KEY[:7], "23716100501183194197"), "decoder key"),
])
def test_token_builders_refuse_out_of_range_fields(call: object, message: str) -> None:
    with pytest.raises(sts.StsError, match=message):
        call()  # type: ignore[operator]


@pytest.mark.parametrize(("text", "message"), [
    ("2371610050118319419", "20 digits, not 19"),
    ("237161005011831941970", "20 digits, not 21"),
    ("2371610050118319419x", "digits only"),
    ("".join(chr(0xFF10 + int(d)) for d in "23716100501183194197"), "digits only"),  # full-width digits
    ("99999999999999999999", "no STS token"),  # above 2**66 - 1
    ("", "20 digits, not 0"),
])
def test_decode_token_refuses_malformed_text(text: str, message: str) -> None:
    with pytest.raises(sts.StsError, match=message):
        sts.decode_token(KEY, text)


def test_separators_are_accepted_and_tokens_format_in_groups() -> None:
    assert sts.normalise_token("2371-6100-5011-8319-4197") == "23716100501183194197"
    assert sts.format_token("23716100501183194197") == "2371 6100 5011 8319 4197"
    assert sts.decode_token(KEY, "2371 6100 5011 8319 4197").crc_ok


def test_class_1_and_class_3_tokens_are_refused_by_name() -> None:
    # CTSA11 step1 class 1 test token (NectarAPI/tokens-service ..._CTSA11.java): not meter-specific.
    with pytest.raises(sts.StsError, match="class 1"):
        sts.decode_token(KEY, "00000000000150997584")
    value = int(sts.credit_token(KEY, 0, 1, 1, 0)) | (1 << 28) | (1 << 27)
    with pytest.raises(sts.StsError, match="class 3"):
        sts.decode_token(KEY, f"{value:020d}")


def test_protocol_sts_is_sans_io() -> None:
    tree = ast.parse(Path(sts.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"asyncio", "socket", "ssl", "time", "random", "secrets", "os", "logging"}
    assert "now(" not in Path(sts.__file__).read_text()
