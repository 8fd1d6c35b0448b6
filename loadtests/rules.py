"""What a load user counts as a failure and how it numbers its transactions.

Kept free of locust (whose import patches the socket and ssl modules process-wide), so the
benchmarks and tests can use the same rules without gevent.
"""

from __future__ import annotations

from datetime import UTC, datetime

from protocol.codes import ResponseCode
from protocol.messages import ErrorReply, ServerMessage

sequence_per_second = 10  # first sequence = seconds since midnight x this: no id reuse across runs


def failure_reason(reply: ServerMessage) -> str | None:
    """None when the reply is a success, else why not (the response code's name)."""
    if isinstance(reply, ErrorReply):
        return f"{reply.response_code.name}: {reply.detail}"
    code = getattr(reply, "response_code", ResponseCode.APPROVED)
    return None if code is ResponseCode.APPROVED else ResponseCode(code).name


def first_sequence(now: datetime | None = None) -> int:
    """Where a terminal's transaction sequence starts today: later runs start higher, so a run
    never reuses a transaction id of an earlier run that day (at most 10 payments a second)."""
    moment = now or datetime.now(UTC)
    return (moment.hour * 3600 + moment.minute * 60 + moment.second) * sequence_per_second
