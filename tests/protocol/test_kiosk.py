"""The kiosk HTTPS mapping: the same Structs as JSON, with the kiosk's id standing for the terminal's."""

from __future__ import annotations

import json

import pytest

from protocol import kiosk, limits
from protocol.codes import ResponseCode
from protocol.errors import FormatError, FrameTooLarge, NotPermitted
from protocol.messages import (
    ErrorReply,
    FloatInquiryRequest,
    LogoffRequest,
    LogonRequest,
    TopUpResult,
)
from tests.protocol.support import REQUEST_REPLY_PAIRS, TERMINAL_ID, TERMINAL_NONCE, TOP_UP_REQUEST, TOP_UP_RESULT

KIOSK_PAIRS = [(request, reply) for request, reply in REQUEST_REPLY_PAIRS if type(request) in kiosk.KIOSK_REQUEST_TYPES]


@pytest.mark.parametrize(("request_message", "reply"), KIOSK_PAIRS, ids=lambda m: type(m).__name__)
def test_kiosk_requests_and_replies_round_trip_as_json(request_message: object, reply: object) -> None:
    body = kiosk.encode_kiosk_message(request_message)  # type: ignore[arg-type]
    assert json.loads(body)["type"] == type(request_message).__struct_config__.tag  # type: ignore[attr-defined]
    assert kiosk.decode_kiosk_request(body, kiosk_id=TERMINAL_ID) == request_message
    assert kiosk.decode_kiosk_reply(kiosk.encode_kiosk_message(reply)) == reply  # type: ignore[arg-type]
    assert kiosk.http_status(reply) == 200  # type: ignore[arg-type]


def test_top_up_json_is_readable_field_by_field() -> None:
    assert json.loads(kiosk.encode_kiosk_message(TOP_UP_REQUEST)) == {
        "type": "top_up_request",
        "client_transaction_id": {"terminal_id": "T0000001", "terminal_sequence": 42, "business_date": "2025-03-01"},
        "meter_number": "04040404040",
        "amount_minor": 5000,
        "currency": "ZAR",
        "tender_type": "cash",
    }
    decoded = json.loads(kiosk.encode_kiosk_message(TOP_UP_RESULT))
    assert decoded["response_code"] == 0 and decoded["issued_at"] == "2025-03-01T08:01:05Z"


@pytest.mark.parametrize(
    "message", [LogonRequest(terminal_nonce=TERMINAL_NONCE), FloatInquiryRequest(), LogoffRequest()]
)
def test_messages_outside_the_kiosk_api_are_not_permitted(message: object) -> None:
    with pytest.raises(NotPermitted) as caught:
        kiosk.decode_kiosk_request(kiosk.encode_kiosk_message(message), kiosk_id=TERMINAL_ID)  # type: ignore[arg-type]
    status, body = kiosk.kiosk_error(caught.value)
    assert status == 403
    assert kiosk.decode_kiosk_reply(body) == ErrorReply(
        response_code=ResponseCode.NOT_PERMITTED, detail=caught.value.detail, connection_closing=False
    )


def test_a_transaction_id_of_another_kiosk_is_not_permitted() -> None:
    with pytest.raises(NotPermitted):
        kiosk.decode_kiosk_request(kiosk.encode_kiosk_message(TOP_UP_REQUEST), kiosk_id="K0000009")


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b"[]",
        b'{"type": "top_up_request"}',
        b'{"type": "no_such_message"}',
        b'{"type": "heartbeat_request", "extra": 1}',
        json.dumps({**json.loads(kiosk.encode_kiosk_message(TOP_UP_REQUEST)), "amount_minor": 1.5}).encode(),
        json.dumps({**json.loads(kiosk.encode_kiosk_message(TOP_UP_REQUEST)), "amount_minor": -1}).encode(),
        json.dumps({**json.loads(kiosk.encode_kiosk_message(TOP_UP_REQUEST)), "currency": "zar"}).encode(),
        b'{"type": "heartbeat_request"\xff}',
    ],
)
def test_malformed_requests_are_format_errors(body: bytes) -> None:
    with pytest.raises(FormatError) as caught:
        kiosk.decode_kiosk_request(body, kiosk_id=TERMINAL_ID)
    status, reply_body = kiosk.kiosk_error(caught.value)
    assert status == 400
    assert kiosk.decode_kiosk_reply(reply_body).response_code is ResponseCode.FORMAT_ERROR  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("changed", "where"),
    [
        ({"type": "S3CR3T_request"}, "`$.type`"),
        ({"tender_type": "S3CR3T"}, "`$.tender_type`"),
        ({"S3CR3T": 1}, ""),
        ({"type": "x - at S3CR3T"}, "`$.type`"),
        ({"tender_type": "x - at `$.S3CR3T`"}, "`$.tender_type`"),
        ({"x - at S3CR3T": 1}, ""),
        ({"x - at `$.S3CR3T": 1}, ""),
        ({"client_transaction_id": {"terminal_id": "T0000001", "terminal_sequence": 42,
                                    "business_date": "2025-03-01", "S3CR3T": 1}}, "`$.client_transaction_id`"),
    ],
    ids=["type tag", "enum value", "unknown field", "tag holding a path", "enum value holding a path",
         "unknown field holding a path", "unknown field ending as a path", "nested unknown field"],
)
def test_a_format_error_names_where_but_never_repeats_what_was_sent(changed: dict[str, object], where: str) -> None:
    body = json.dumps({**json.loads(kiosk.encode_kiosk_message(TOP_UP_REQUEST)), **changed}).encode()
    with pytest.raises(FormatError) as caught:
        kiosk.decode_kiosk_request(body, kiosk_id=TERMINAL_ID)
    assert caught.value.detail.startswith("body does not decode: ") and where in caught.value.detail
    assert "S3CR3T" not in caught.value.detail and "S3CR3T" not in kiosk.kiosk_error(caught.value)[1].decode()


def test_oversize_body_is_refused_before_decoding() -> None:
    with pytest.raises(FrameTooLarge) as caught:
        kiosk.decode_kiosk_request(b" " * (limits.kiosk_body_bytes_max + 1), kiosk_id=TERMINAL_ID)
    assert kiosk.kiosk_error(caught.value)[0] == 413


@pytest.mark.parametrize(
    ("code", "status"),
    [(ResponseCode.SYSTEM_BUSY, 503), (ResponseCode.SYSTEM_ERROR, 500), (ResponseCode.TERMINAL_BLOCKED, 403)],
)
def test_error_replies_map_to_http_statuses(code: ResponseCode, status: int) -> None:
    assert kiosk.http_status(ErrorReply(response_code=code)) == status


def test_a_declined_reply_is_still_http_200() -> None:
    declined = TopUpResult(
        client_transaction_id=TOP_UP_REQUEST.client_transaction_id,
        response_code=ResponseCode.INSUFFICIENT_FLOAT,
        currency="ZAR",
    )
    assert kiosk.http_status(declined) == 200
