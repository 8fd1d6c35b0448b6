"""Errors the protocol raises, each with the response code to report and whether to hang up.

    ProtocolError                 response_code        close_connection
     ├── FrameTooLarge            FORMAT_ERROR         yes  length prefix above frame_bytes_max
     ├── FormatError              FORMAT_ERROR         yes  bad header, length, body or field
     │    └── UnsupportedVersion  UNSUPPORTED_VERSION  yes  header version is not 1
     ├── MacFailure               MAC_FAILURE          yes  MAC trailer wrong (AUTH_FAILED at logon)
     ├── ReplayError              REPLAY               yes  sequence number not previous + 1
     ├── StateError               STATE_ERROR          yes  message not allowed in this state
     ├── NotPermitted             NOT_PERMITTED        no   a transaction id of another terminal
     └── LocalProtocolError       SYSTEM_ERROR         no   our own side asked to send a message
                                                            the protocol forbids (a bug here)

A receiving session raises the first five and NotPermitted for what the peer sent; `send` raises
LocalProtocolError and leaves the session unchanged. `close_connection` is per instance: a body
that fails to decode in an authenticated, in-sequence frame is a FormatError that does not close
(the session is still in step; the server answers with an error frame and carries on).

`detail` is short, plain text about the peer's input, safe to put in an error frame as it is
(printable ASCII, at most detail_chars_max characters): it never holds key material, MACs or
body bytes.
"""

from __future__ import annotations

import re
from typing import ClassVar

import msgspec

from protocol import limits, messages
from protocol.codes import ResponseCode


class ProtocolError(Exception):
    default_response_code: ClassVar[ResponseCode] = ResponseCode.FORMAT_ERROR
    default_close_connection: ClassVar[bool] = True

    def __init__(
        self,
        detail: str,
        *,
        response_code: ResponseCode | None = None,
        close_connection: bool | None = None,
    ) -> None:
        # Bounded, printable ASCII: fit to go straight into an ErrorReply's `detail`.
        detail = "".join(char if char.isascii() and char.isprintable() else "?" for char in detail)
        detail = detail[: limits.detail_chars_max]
        super().__init__(detail)
        self.detail = detail
        self.response_code = self.default_response_code if response_code is None else response_code
        self.close_connection = self.default_close_connection if close_connection is None else close_connection

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.detail!r}, response_code={self.response_code.name},"
            f" close_connection={self.close_connection})"
        )


class FrameTooLarge(ProtocolError):
    pass


class FormatError(ProtocolError):
    pass


class UnsupportedVersion(FormatError):
    default_response_code = ResponseCode.UNSUPPORTED_VERSION


class MacFailure(ProtocolError):
    default_response_code = ResponseCode.MAC_FAILURE


class ReplayError(ProtocolError):
    default_response_code = ResponseCode.REPLAY


class StateError(ProtocolError):
    default_response_code = ResponseCode.STATE_ERROR


class NotPermitted(ProtocolError):
    default_response_code = ResponseCode.NOT_PERMITTED
    default_close_connection = False


class LocalProtocolError(ProtocolError):
    default_response_code = ResponseCode.SYSTEM_ERROR
    default_close_connection = False


# msgspec's messages that quote what the peer sent: the value, or the name of a field it added.
_QUOTING_PREFIXES: tuple[tuple[str, str], ...] = (
    ("Invalid enum value ", "invalid enum value"),
    ("Invalid value ", "invalid value"),
    ("Object contains unknown field ", "unknown field"),
)
# A path as msgspec writes it: `$`, `$.field`, `$[3]`, `$.map[...]`.
_PATH = re.compile(r"`\$((?:\.[A-Za-z_][A-Za-z0-9_]*|\[\d+\]|\[\.\.\.\])*)`")
_PATH_FIELD = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)")
_STRUCTS = [obj for obj in vars(messages).values() if isinstance(obj, type) and issubclass(obj, msgspec.Struct)]
# Every field name of every protocol message, tag fields included.
_SCHEMA_FIELDS = frozenset(name for obj in _STRUCTS for name in obj.__struct_encode_fields__) | {
    obj.__struct_config__.tag_field for obj in _STRUCTS if obj.__struct_config__.tag_field}


def _in_schema(path: str) -> bool:
    """True when `path` is a path whose every field is a field of some protocol message: so it
    says where, and holds nothing the peer made up (a quoted value could end like a path)."""
    match = _PATH.fullmatch(path)
    return match is not None and all(name in _SCHEMA_FIELDS for name in _PATH_FIELD.findall(match.group(1)))


def decode_failure(exc: msgspec.DecodeError | UnicodeDecodeError) -> str:
    """The detail for a body that does not decode: what is wrong and where (the path in the
    message's own schema), never the value or field name the peer sent."""
    if isinstance(exc, UnicodeDecodeError):
        return "body does not decode: not UTF-8"
    text = str(exc)
    for prefix, said in _QUOTING_PREFIXES:
        if text.startswith(prefix):
            # The value may hold " - at " itself: only a schema path at the very end is kept.
            _, at, path = text.rpartition(" - at ")
            return f"body does not decode: {said}" + (f" - at {path}" if at and _in_schema(path) else "")
    return f"body does not decode: {text}"
