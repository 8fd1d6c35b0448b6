"""Round trips of every message type (hypothesis): the codecs alone, then through the sessions,
fed whole, one byte at a time, and followed by the first bytes of another frame."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import kiosk
from protocol.messages import (
    MSGPACK_ENCODER,
    REPLY_TYPE,
    SERVER_DECODER,
    SERVER_MESSAGE_TYPES,
    TERMINAL_DECODER,
    TERMINAL_MESSAGE_TYPES,
    AnyMessage,
    ErrorReply,
    LogonAccepted,
    LogonChallenge,
    LogonProof,
    LogonRequest,
)
from protocol.session import MessageReceived, ServerSession, TerminalSession, _Session
from tests.protocol.strategies import messages
from tests.protocol.support import (
    LOGON_PROOF,
    REQUEST_REPLY_PAIRS,
    SERVER_NONCE,
    TERMINAL_ID,
    TERMINAL_KEY,
    TERMINAL_NONCE,
    logged_on_pair,
)

ALL_TYPES = TERMINAL_MESSAGE_TYPES + SERVER_MESSAGE_TYPES
EXAMPLE_REQUEST = {type(request): request for request, _ in REQUEST_REPLY_PAIRS}
REQUEST_FOR_REPLY = {reply: request for request, reply in REPLY_TYPE.items()}
round_trip_settings = settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


@pytest.mark.parametrize("cls", ALL_TYPES, ids=lambda cls: cls.__name__)
@round_trip_settings
@given(data=st.data())
def test_codec_round_trip(cls: type[AnyMessage], data: st.DataObject) -> None:
    message = data.draw(messages(cls))
    decoder = TERMINAL_DECODER if cls in TERMINAL_MESSAGE_TYPES else SERVER_DECODER
    assert decoder.decode(MSGPACK_ENCODER.encode(message)) == message
    json = kiosk.encode_kiosk_message(message)
    if cls in TERMINAL_MESSAGE_TYPES:
        assert kiosk._request_decoder.decode(json) == message
    else:
        assert kiosk.decode_kiosk_reply(json) == message


Scenario = Callable[[], tuple[_Session, _Session, Callable[[], bytes]]]


def scenario(message: AnyMessage) -> Scenario:
    """Builds a (sender, receiver, send) triple in the state where `message` is the next frame."""

    def build() -> tuple[_Session, _Session, Callable[[], bytes]]:
        terminal, server = TerminalSession(TERMINAL_ID, TERMINAL_KEY), ServerSession()
        match message:
            case LogonRequest():
                return terminal, server, lambda: terminal.send(message)
            case LogonChallenge():
                server.receive_data(terminal.send(LogonRequest(terminal_nonce=TERMINAL_NONCE)))
                return server, terminal, lambda: server.challenge(TERMINAL_KEY, message.server_nonce)
        server.receive_data(terminal.send(LogonRequest(terminal_nonce=TERMINAL_NONCE)))
        terminal.receive_data(server.challenge(TERMINAL_KEY, SERVER_NONCE))
        if isinstance(message, LogonProof):
            return terminal, server, lambda: terminal.send(message)
        if isinstance(message, LogonAccepted):
            server.receive_data(terminal.send(LOGON_PROOF))
            return server, terminal, lambda: server.send(message)
        terminal, server = logged_on_pair()
        if type(message) in TERMINAL_MESSAGE_TYPES:
            return terminal, server, lambda: terminal.send(message)  # type: ignore[arg-type]
        request_type = REQUEST_FOR_REPLY.get(type(message), next(iter(EXAMPLE_REQUEST)))  # type: ignore[call-overload]
        server.receive_data(terminal.send(EXAMPLE_REQUEST[request_type]))
        return server, terminal, lambda: server.send(message)  # type: ignore[arg-type]

    return build


def receive(receiver: _Session, data: bytes) -> list[object]:
    return receiver.receive_data(data)  # type: ignore[attr-defined,no-any-return]


def message_of(event: object) -> object:
    return event.message  # type: ignore[attr-defined]


@pytest.mark.parametrize("cls", ALL_TYPES, ids=lambda cls: cls.__name__)
@round_trip_settings
@given(data=st.data())
def test_round_trip_through_sessions(cls: type[AnyMessage], data: st.DataObject) -> None:
    message = data.draw(messages(cls, TERMINAL_ID))
    build = scenario(message)

    _, whole_receiver, send = build()
    frame = send()
    [event] = receive(whole_receiver, frame)
    assert message_of(event) == message
    if isinstance(event, MessageReceived):
        assert event.authenticated == (cls not in (LogonRequest, LogonChallenge) and not _unauthenticated(frame))

    _, bytewise_receiver, send = build()
    assert send() == frame, "the same state and message give the same bytes"
    events = [event for byte in frame for event in receive(bytewise_receiver, bytes([byte]))]
    assert [message_of(event) for event in events] == [message]

    _, trailing_receiver, send = build()
    assert send() == frame
    trailing = frame[: data.draw(st.integers(min_value=1, max_value=len(frame) - 1))]
    [event] = receive(trailing_receiver, frame + trailing)
    assert message_of(event) == message
    assert bytes(trailing_receiver._buffer) == trailing, "the next frame's first bytes wait in the buffer"


def _unauthenticated(frame: bytes) -> bool:
    return frame.endswith(bytes(16))


def test_every_message_type_has_a_scenario_and_an_example() -> None:
    assert {type(request) for request, _ in REQUEST_REPLY_PAIRS} == set(REPLY_TYPE)
    assert ErrorReply in SERVER_MESSAGE_TYPES
