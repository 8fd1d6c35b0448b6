"""docs/protocol.md cannot drift from the code: its examples, tables and lists are checked here.

- every `hex NN_name` block is the golden frame tests/protocol/vectors/NN_name.hex, and the
  frames of the worked example decode, MAC-verify and re-encode with the keys the page gives;
- every `json NN_name` block is that frame's message in the kiosk JSON mapping;
- the message, record, response-code, limit and state tables list exactly what the code has.
"""

from __future__ import annotations

import hmac
import json
import re
from pathlib import Path
from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest

from protocol import limits
from protocol.codes import ResponseCode
from protocol.messages import (
    SERVER_DECODER,
    SERVER_MESSAGE_TYPES,
    TERMINAL_DECODER,
    TERMINAL_MESSAGE_TYPES,
    Advice,
    AdviceOutcome,
    ClientTransactionId,
    Customer,
    LastPurchase,
)
from protocol.session import ANY_STATE, TRANSITIONS, Kind, Transition
from tests.protocol.test_vectors import VECTORS, parse_hex

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
RECORDS = (ClientTransactionId, Customer, LastPurchase, Advice, AdviceOutcome)
_STRING_TYPES = {
    "terminal_id": "TerminalId",
    "meter_number": "MeterNumber",
    "account_number": "AccountNumber",
    "receipt_number": "ReceiptNumber",
    "currency": "Currency",
    "tokens": "Token",
}


def render_type(info: mi.Type, field: str) -> str:
    """The type as the page writes it (docs/protocol.md, "Field types")."""
    match info:
        case mi.StrType() if field in _STRING_TYPES:
            return _STRING_TYPES[field]
        case mi.StrType(min_length=low, max_length=high):
            return f"Text({low or 0}..{high})"
        case mi.IntType(ge=low) if field.endswith("_minor"):
            return "AmountMinor" if low == 0 else f"AmountMinor ≥ {low}"
        case mi.IntType(ge=low, le=high):
            return f"int {low}..{high:_}"
        case mi.BoolType():
            return "bool"
        case mi.BytesType(min_length=low, max_length=high) if low == high:
            return f"bytes[{low}]"
        case mi.DateType():
            return "Date"
        case mi.DateTimeType():
            return "Timestamp"
        case mi.EnumType(cls=cls) | mi.StructType(cls=cls):
            return str(cls.__name__)
        case mi.ListType(item_type=item, min_length=low, max_length=high):
            return f"list of {render_type(item, field)}, {low or 0}..{high}"
        case mi.UnionType(types=(inner, mi.NoneType())):
            return f"{render_type(inner, field)} or null"
    raise NotImplementedError(f"{field}: {info!r}")


def render_default(field: mi.Field) -> str:
    if field.required:
        return "required"
    if field.default_factory is list:
        return "`[]`"
    return f"`{json.dumps(msgspec.to_builtins(field.default))}`"


def expected_rows(cls: type[msgspec.Struct]) -> list[tuple[str, str, str]]:
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    return [(f"`{f.name}`", render_type(f.type, f.name), render_default(f)) for f in info.fields]


def render_transition(row: Transition) -> tuple[str, ...]:
    state = row.state if row.state == ANY_STATE else row.state.value  # type: ignore[union-attr]
    message = row.message.value if isinstance(row.message, Kind) else row.message.__name__
    return (row.side.value, state, row.action.value, message, row.auth.value, row.next_state.value)


# ---- reading the page ----------------------------------------------------------------------------


def page() -> str:
    return DOC.read_text(encoding="utf-8")


def code_blocks(info: str) -> dict[str, str]:
    """Fenced blocks whose info string is `info NAME`, by NAME."""
    pattern = re.compile(rf"^```{info} (\S+)\n(.*?)^```", re.MULTILINE | re.DOTALL)
    return {name: body for name, body in pattern.findall(page())}


def section(heading: str) -> str:
    """The text under a heading (any level) up to the next heading of the same or a higher level."""
    text = page()
    match = re.search(rf"^(#+) {re.escape(heading)}\s*$", text, re.MULTILINE)
    assert match, f"heading {heading!r} missing from docs/protocol.md"
    level = len(match.group(1))
    end = re.compile(rf"^#{{1,{level}}} ", re.MULTILINE).search(text, match.end())
    return text[match.end() : end.start() if end else len(text)]


def table_rows(text: str) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not re.match(r"^\|[\s:|-]+\|$", line):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows[1:] if rows else rows  # drop the header row


# ---- the checks ----------------------------------------------------------------------------------


def test_every_hex_block_is_a_golden_frame() -> None:
    blocks = code_blocks("hex")
    assert len(blocks) >= 6, "the worked example shows the logon and a top-up"
    for name, body in blocks.items():
        path = VECTORS / f"{name}.hex"
        assert path.exists(), f"docs show {name}, which is not a vector"
        assert parse_hex(body) == parse_hex(path.read_text()), name


def test_every_json_block_is_its_frame_s_message() -> None:
    blocks = code_blocks("json")
    assert blocks
    for name, body in blocks.items():
        assert json.loads(body) == json.loads((VECTORS / f"{name}.json").read_text()), name


def test_the_worked_example_verifies_with_the_keys_on_the_page() -> None:
    """What a vendor does with the page alone: derive nothing, check MACs and bodies with stdlib tools."""
    keys_block = code_blocks("text")["keys"]
    keys = dict(line.split(": ", 1) for line in keys_block.strip().splitlines())
    assert keys_block.strip() + "\n" == (VECTORS / "keys.txt").read_text()
    for name, body in code_blocks("hex").items():
        frame = parse_hex(body)
        signed, mac = frame[:-16], frame[-16:]
        assert int.from_bytes(frame[:2], "big") == len(frame) - 2
        if mac != bytes(16):
            key = keys["terminal_to_server_key" if frame[3] % 2 else "server_to_terminal_key"]
            assert hmac.new(bytes.fromhex(key), signed, "sha256").digest()[:16] == mac, name
        decoder: Any = TERMINAL_DECODER if frame[3] % 2 else SERVER_DECODER
        message = decoder.decode(frame[16:-16])
        assert message.message_type == frame[3]


@pytest.mark.parametrize("cls", TERMINAL_MESSAGE_TYPES + SERVER_MESSAGE_TYPES + RECORDS, ids=lambda cls: cls.__name__)
def test_every_message_and_record_table_lists_its_fields(cls: type[msgspec.Struct]) -> None:
    tag = cls.__struct_config__.tag
    if tag is None:
        heading = f"{cls.__name__} (record)"
    else:
        code = cls.message_type  # type: ignore[attr-defined]
        direction = "terminal → server" if code % 2 else "server → terminal"
        heading = f"`{tag}` 0x{code:02X}: {cls.__name__}, {direction}"
    rows = [tuple(row[:3]) for row in table_rows(section(heading))]
    assert rows == expected_rows(cls)


def test_response_code_table_lists_every_code() -> None:
    rows = table_rows(section("Response codes"))
    assert [(row[0], row[1]) for row in rows] == [(str(code.value), f"`{code.name}`") for code in ResponseCode]
    assert all(row[2] for row in rows), "each code says what it means"


def test_limits_table_lists_every_limit_with_its_value() -> None:
    rows = table_rows(section("Limits"))
    documented = {row[0].strip("`"): row[1].replace("_", "").replace(",", "") for row in rows}
    names = [name for name in vars(limits) if not name.startswith("_") and isinstance(getattr(limits, name), int)]
    assert set(documented) == set(names)
    for name in names:
        assert documented[name] == str(getattr(limits, name)), name


def test_state_table_is_the_code_s_table() -> None:
    rows = [tuple(row) for row in table_rows(section("State table"))]
    assert rows == [render_transition(row) for row in TRANSITIONS]


def test_frame_layout_constants_on_the_page() -> None:
    text = section("Frames")
    for value in (limits.header_bytes, limits.mac_bytes, limits.frame_bytes_max):
        assert str(value) in text.replace(",", "").replace("_", "")
