"""The kiosk HTTPS mapping: the same message Structs as JSON, one message per request body.

A kiosk is authenticated by mutual TLS at the transport, so there is no logon, no frame, no MAC
and no sequence number here: the HTTP request body is the JSON of one request message
(`{"type": "top_up_request", ...}`), the response body the JSON of its reply or of an
ErrorReply. The kiosk's id (from its client certificate) plays the terminal id: every client
transaction id in a request must carry it. Rules of the fields are those of the wire protocol;
docs/protocol.md ("Kiosk HTTPS mapping") is the reference, with HTTP statuses.

    gateway:  message = decode_kiosk_request(body, kiosk_id=kiosk_id)    # raises ProtocolError
              reply = ... ;  status, body = http_status(reply), encode_kiosk_message(reply)
              on ProtocolError as error:  status, body = kiosk_error(error)
    kiosk:    body = encode_kiosk_message(request); reply = decode_kiosk_reply(body)
"""

from __future__ import annotations

from typing import Final

import msgspec

from protocol import limits
from protocol.codes import ResponseCode
from protocol.errors import FormatError, FrameTooLarge, NotPermitted, ProtocolError, decode_failure
from protocol.messages import (
    AnyMessage,
    EndOfDayRequest,
    ErrorReply,
    HeartbeatRequest,
    LookupRequest,
    ReprintRequest,
    ReversalRequest,
    ServerMessage,
    TerminalMessage,
    TopUpRequest,
    foreign_transaction_id,
)

KIOSK_PATH: Final = "/kiosk/v1/messages"
CONTENT_TYPE: Final = "application/json"
# A kiosk has no float of its own and never works offline: no float inquiry, no advices.
KIOSK_REQUEST_TYPES: Final = frozenset(
    {HeartbeatRequest, LookupRequest, TopUpRequest, ReversalRequest, ReprintRequest, EndOfDayRequest}
)

JSON_ENCODER: Final = msgspec.json.Encoder()
_DECODE_ERRORS: Final = (msgspec.DecodeError, UnicodeDecodeError)  # ValidationError is a DecodeError
_request_decoder: Final[msgspec.json.Decoder[TerminalMessage]] = msgspec.json.Decoder(TerminalMessage)
_reply_decoder: Final[msgspec.json.Decoder[ServerMessage]] = msgspec.json.Decoder(ServerMessage)

_STATUS_BY_CODE: Final = {
    ResponseCode.FORMAT_ERROR: 400,
    ResponseCode.UNSUPPORTED_VERSION: 400,
    ResponseCode.STATE_ERROR: 409,
    ResponseCode.AUTH_FAILED: 401,
    ResponseCode.UNKNOWN_TERMINAL: 403,
    ResponseCode.TERMINAL_BLOCKED: 403,
    ResponseCode.NOT_PERMITTED: 403,
    ResponseCode.SYSTEM_BUSY: 503,
    ResponseCode.SYSTEM_ERROR: 500,
}


def encode_kiosk_message(message: AnyMessage) -> bytes:
    """JSON of one message (a kiosk's request, or the gateway's reply)."""
    return JSON_ENCODER.encode(message)


def decode_kiosk_request(body: bytes, *, kiosk_id: str) -> TerminalMessage:
    """The request in an HTTP body from kiosk `kiosk_id`; raises FrameTooLarge, FormatError, NotPermitted."""
    if len(body) > limits.kiosk_body_bytes_max:
        raise FrameTooLarge(f"request body of {len(body)} bytes, at most {limits.kiosk_body_bytes_max} allowed")
    try:
        message = _request_decoder.decode(body)
    except _DECODE_ERRORS as exc:
        raise FormatError(decode_failure(exc), close_connection=False) from None
    if type(message) not in KIOSK_REQUEST_TYPES:
        raise NotPermitted(f"{type(message).__name__} is not part of the kiosk API")
    foreign = foreign_transaction_id(message, kiosk_id)
    if foreign is not None:
        raise NotPermitted(f"transaction {foreign.as_key()} belongs to another terminal")
    return message


def decode_kiosk_reply(body: bytes) -> ServerMessage:
    """The reply in an HTTP response body (the kiosk's side); raises FormatError."""
    if len(body) > limits.kiosk_body_bytes_max:
        raise FrameTooLarge(f"reply body of {len(body)} bytes, at most {limits.kiosk_body_bytes_max} allowed")
    try:
        return _reply_decoder.decode(body)
    except _DECODE_ERRORS as exc:
        raise FormatError(decode_failure(exc)) from None


def http_status(reply: ServerMessage) -> int:
    """200 for every reply (its response_code tells the outcome); an ErrorReply maps to 4xx/5xx."""
    if not isinstance(reply, ErrorReply):
        return 200
    return _STATUS_BY_CODE.get(reply.response_code, 400)


def kiosk_error(error: ProtocolError) -> tuple[int, bytes]:
    """HTTP status and JSON body of the ErrorReply that answers `error`."""
    reply = ErrorReply(response_code=error.response_code, detail=error.detail, connection_closing=False)
    status = 413 if isinstance(error, FrameTooLarge) else http_status(reply)
    return status, encode_kiosk_message(reply)
