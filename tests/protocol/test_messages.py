"""The message catalogue: its invariants, the rules of every field, and that the largest messages fit."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

import msgspec
import pytest

from protocol import errors, limits
from protocol.codes import ResponseCode
from protocol.messages import (
    MSGPACK_ENCODER,
    REPLY_TYPE,
    SERVER_DECODER,
    SERVER_MESSAGE_TYPES,
    SERVER_TYPE_BY_CODE,
    TERMINAL_DECODER,
    TERMINAL_MESSAGE_TYPES,
    TERMINAL_TYPE_BY_CODE,
    Advice,
    AdviceBatchRequest,
    AdviceOutcome,
    ClientTransactionId,
    Customer,
    ErrorReply,
    LastPurchase,
    LogonProof,
    LookupRequest,
    LookupResult,
    ReprintRequest,
    ReprintResult,
    SupplyMode,
    TenderType,
    TopUpRequest,
    TopUpResult,
    is_terminal_id,
)
from tests.protocol.support import TOP_UP_REQUEST, TOP_UP_RESULT, TXID

ALL_TYPES = TERMINAL_MESSAGE_TYPES + SERVER_MESSAGE_TYPES


def test_type_codes_and_tags_are_unique_and_follow_the_direction_rule() -> None:
    codes = [cls.message_type for cls in ALL_TYPES]
    tags = [cls.__struct_config__.tag for cls in ALL_TYPES]
    assert len(set(codes)) == len(codes) and len(set(tags)) == len(tags)
    assert all(code % 2 == 1 for code in TERMINAL_TYPE_BY_CODE)
    assert all(code % 2 == 0 for code in SERVER_TYPE_BY_CODE)
    assert all(0 < code < 0x80 for code in codes)
    for request, reply in REPLY_TYPE.items():
        assert reply.message_type == request.message_type + 1


@pytest.mark.parametrize("cls", ALL_TYPES, ids=lambda cls: cls.__name__)
def test_every_message_is_frozen_keyword_only_and_strict(cls: type[msgspec.Struct]) -> None:
    config = cls.__struct_config__
    assert config.frozen and config.forbid_unknown_fields
    assert config.tag_field == "type" and isinstance(config.tag, str)
    assert cls.__match_args__ == (), "keyword-only: no positional fields"


def test_unknown_fields_are_refused() -> None:
    body = msgspec.msgpack.encode({**msgspec.to_builtins(TOP_UP_REQUEST), "tip_minor": 5})
    with pytest.raises(msgspec.ValidationError):
        TERMINAL_DECODER.decode(body)


def encode_as(message: msgspec.Struct, **changes: Any) -> bytes:
    """The MessagePack of `message` with fields changed, bypassing the Struct's own checks."""
    return msgspec.msgpack.encode({**msgspec.to_builtins(message), **changes})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("meter_number", "0404040404A"),
        ("meter_number", "٠٤٠٤٠٤٠٤٠٤٠"),  # Arabic-Indic digits are digits, but not ASCII ones
        ("meter_number", "12345"),
        ("currency", "zar"),
        ("currency", "ZA"),
        ("amount_minor", 0),
        ("amount_minor", limits.amount_minor_max + 1),
        ("tender_type", "cheque"),
        ("client_transaction_id", {"terminal_id": "t0000001", "terminal_sequence": 1, "business_date": "2025-03-01"}),
        ("client_transaction_id", {"terminal_id": "T0000001", "terminal_sequence": 0, "business_date": "2025-03-01"}),
        ("client_transaction_id", {"terminal_id": "T0000001", "terminal_sequence": 1, "business_date": "2025-02-30"}),
    ],
)
def test_top_up_request_field_rules(field: str, value: object) -> None:
    with pytest.raises(msgspec.ValidationError):
        TERMINAL_DECODER.decode(encode_as(TOP_UP_REQUEST, **{field: value}))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("receipt_lines", ["ok", "\x1b@"]),  # a printer escape sequence
        ("receipt_lines", ["\u202eevil"]),  # a right-to-left override
        ("receipt_lines", ["x" * (limits.receipt_line_chars_max + 1)]),
        ("receipt_lines", ["x"] * (limits.receipt_lines_max + 1)),
        ("tokens", ["1234567890123456789"]),
        ("tokens", ["1234567890123456789X"]),
        ("receipt_number", "R 1"),
        ("receipt_number", None),
        ("vat_minor", 523),  # the split no longer adds up
        ("issued_at", "2025-03-01T08:01:05"),  # no time zone
    ],
)
def test_top_up_result_field_rules(field: str, value: object) -> None:
    with pytest.raises(msgspec.ValidationError):
        SERVER_DECODER.decode(encode_as(TOP_UP_RESULT, **{field: value}))


def test_cross_field_rules_hold_for_constructed_messages_too() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        LookupRequest()
    with pytest.raises(ValueError, match="exactly one"):
        LookupRequest(meter_number="04040404040", account_number="A-1")
    with pytest.raises(ValueError, match="exactly one"):
        ReprintRequest(client_transaction_id=TXID, receipt_number="R-1")
    with pytest.raises(ValueError, match="customer"):
        LookupResult(response_code=ResponseCode.APPROVED)
    with pytest.raises(ValueError, match="no token"):
        TopUpResult(
            client_transaction_id=TXID,
            response_code=ResponseCode.INSUFFICIENT_FLOAT,
            currency="ZAR",
            tokens=["12345678901234567890"],
        )
    with pytest.raises(ValueError, match="receipt number"):
        ReprintResult(response_code=ResponseCode.APPROVED)
    with pytest.raises(ValueError, match="no token"):
        AdviceOutcome(client_transaction_id=TXID, response_code=ResponseCode.LIMIT_EXCEEDED, tokens=["1" * 20])
    with pytest.raises(ValueError, match="never says APPROVED"):
        ErrorReply(response_code=ResponseCode.APPROVED)
    with pytest.raises(ValueError, match="printable"):
        LogonProof(software_version="1.0\n")
    advice = Advice(
        client_transaction_id=TXID,
        meter_number="04040404040",
        amount_minor=100,
        currency="ZAR",
        tender_type=TenderType.CASH,
        taken_at=datetime(2025, 3, 1, tzinfo=UTC),
    )
    with pytest.raises(ValueError, match="distinct"):
        AdviceBatchRequest(advices=[advice, advice])


def test_client_transaction_id_text_form() -> None:
    assert TXID.as_key() == "T0000001-20250301-000042"
    assert ClientTransactionId.from_key(TXID.as_key()) == TXID
    for bad in ["T0000001-20250301-42", "t0000001-20250301-000042", "T0000001-20250230-000042", "x"]:
        with pytest.raises(ValueError):
            ClientTransactionId.from_key(bad)
    assert is_terminal_id("K00000A9") and not is_terminal_id("K00000a9") and not is_terminal_id("K0000")


def test_the_largest_messages_fit_one_frame() -> None:
    wide = "😀"  # four bytes in UTF-8: the worst case per character
    result = TopUpResult(
        client_transaction_id=TXID,
        response_code=ResponseCode.APPROVED,
        currency="ZAR",
        amount_minor=limits.amount_minor_max,
        receipt_number="R" * limits.receipt_number_chars_max,
        receipt_lines=[wide * limits.receipt_line_chars_max] * limits.receipt_lines_max,
        tokens=["9" * limits.token_digits] * limits.tokens_per_result_max,
        units_wh=limits.units_wh_max,
        debt_recovery_minor=limits.amount_minor_max,
        issued_at=datetime(2099, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    )
    reprint = ReprintResult(
        response_code=ResponseCode.APPROVED,
        client_transaction_id=TXID,
        receipt_number="R" * limits.receipt_number_chars_max,
        receipt_lines=result.receipt_lines,
        tokens=result.tokens,
    )
    advices = AdviceBatchRequest(
        advices=[
            Advice(
                client_transaction_id=ClientTransactionId(
                    terminal_id="T0000001", terminal_sequence=limits.terminal_sequence_max - n, business_date=date.max
                ),
                meter_number="9" * limits.meter_number_chars_max,
                amount_minor=limits.amount_minor_max,
                currency="ZAR",
                tender_type=TenderType.MOBILE_MONEY,
                taken_at=datetime(2099, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
            )
            for n in range(limits.advices_per_batch_max)
        ]
    )
    lookup = LookupResult(
        response_code=ResponseCode.APPROVED,
        customer=Customer(
            meter_number="9" * limits.meter_number_chars_max,
            account_number="A" * limits.account_number_chars_max,
            masked_name=wide * limits.customer_name_chars_max,
            address=wide * limits.address_chars_max,
            supply_mode=SupplyMode.SMART,
            debt_minor=limits.amount_minor_max,
            currency="ZAR",
            last_purchase=LastPurchase(
                amount_minor=limits.amount_minor_max,
                units_wh=limits.units_wh_max,
                purchased_at=datetime(2099, 1, 1, tzinfo=UTC),
            ),
        ),
    )
    error = ErrorReply(response_code=ResponseCode.SYSTEM_ERROR, detail=wide * limits.detail_chars_max)
    for message in (result, reprint, advices, lookup, error):
        size = len(MSGPACK_ENCODER.encode(message))
        assert size <= limits.body_bytes_max, f"{type(message).__name__}: {size} bytes"
        assert len(msgspec.json.encode(message)) <= limits.kiosk_body_bytes_max


def test_response_codes_are_stable_and_grouped() -> None:
    values = [code.value for code in ResponseCode]
    assert len(values) == len(set(values)) and ResponseCode.APPROVED == 0
    assert ResponseCode.APPROVED.approved and not ResponseCode.INSUFFICIENT_FLOAT.approved
    assert all(10 <= code < 40 for code in [ResponseCode.INSUFFICIENT_FLOAT, ResponseCode.TOTALS_MISMATCH])
    assert all(60 <= code < 70 for code in [ResponseCode.FORMAT_ERROR, ResponseCode.STATE_ERROR])


@pytest.mark.parametrize(
    ("error_class", "code", "closes"),
    [
        (errors.FrameTooLarge, ResponseCode.FORMAT_ERROR, True),
        (errors.FormatError, ResponseCode.FORMAT_ERROR, True),
        (errors.UnsupportedVersion, ResponseCode.UNSUPPORTED_VERSION, True),
        (errors.MacFailure, ResponseCode.MAC_FAILURE, True),
        (errors.ReplayError, ResponseCode.REPLAY, True),
        (errors.StateError, ResponseCode.STATE_ERROR, True),
        (errors.NotPermitted, ResponseCode.NOT_PERMITTED, False),
        (errors.LocalProtocolError, ResponseCode.SYSTEM_ERROR, False),
    ],
)
def test_error_tree_defaults(error_class: type[errors.ProtocolError], code: ResponseCode, closes: bool) -> None:
    error = error_class("why")
    assert isinstance(error, errors.ProtocolError)
    assert (error.response_code, error.close_connection, error.detail) == (code, closes, "why")
    overridden = error_class("why", response_code=ResponseCode.AUTH_FAILED, close_connection=not closes)
    assert (overridden.response_code, overridden.close_connection) == (ResponseCode.AUTH_FAILED, not closes)
    assert "AUTH_FAILED" in repr(overridden)


def test_error_detail_is_always_fit_for_an_error_frame() -> None:
    error = errors.FormatError("bad\nbody \x1b" + "x" * 500)
    assert len(error.detail) == limits.detail_chars_max and error.detail.isprintable()
    assert ErrorReply(response_code=error.response_code, detail=error.detail).detail == error.detail


def test_top_up_request_example_is_valid() -> None:
    assert TopUpRequest.message_type == 0x09 and TOP_UP_REQUEST.tender_type is TenderType.CASH
