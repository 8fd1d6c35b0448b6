"""Response codes: the one enum every reply, error frame and protocol error speaks.

Values are grouped: 0 approved; 10-39 business declines (nothing was debited or credited);
40-49 terminal and permission; 60-69 protocol faults; 90-99 the server's own trouble. A value
is never reused or renumbered; a new code is a new protocol version (docs/protocol.md lists
each code and what a terminal does on it, checked by a test).
"""

from __future__ import annotations

from enum import IntEnum


class ResponseCode(IntEnum):
    APPROVED = 0
    # Declines: the request was understood and refused; no money moved.
    INSUFFICIENT_FLOAT = 10
    LIMIT_EXCEEDED = 11
    INVALID_AMOUNT = 12
    CURRENCY_MISMATCH = 13
    UNKNOWN_METER = 20
    UNKNOWN_ACCOUNT = 21
    DUPLICATE_DIFFERENT_CONTENT = 30
    ORIGINAL_NOT_FOUND = 31
    ALREADY_REVERSED = 32
    TOTALS_MISMATCH = 33
    # The terminal itself.
    UNKNOWN_TERMINAL = 40
    TERMINAL_BLOCKED = 41
    NOT_PERMITTED = 42
    AUTH_FAILED = 43
    # Protocol faults.
    FORMAT_ERROR = 60
    UNSUPPORTED_VERSION = 61
    MAC_FAILURE = 62
    REPLAY = 63
    STATE_ERROR = 64
    # The server.
    SYSTEM_BUSY = 90
    SYSTEM_ERROR = 91

    @property
    def approved(self) -> bool:
        return self is ResponseCode.APPROVED
