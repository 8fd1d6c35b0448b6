"""Sessions: the logon handshake, lock-step requests, and a clear outcome for every kind of bad input."""

from __future__ import annotations

import hmac
from collections.abc import Callable

import msgspec
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from protocol import framing, limits, session
from protocol.codes import ResponseCode
from protocol.errors import (
    FormatError,
    FrameTooLarge,
    LocalProtocolError,
    MacFailure,
    NotPermitted,
    ProtocolError,
    ReplayError,
    StateError,
    UnsupportedVersion,
)
from protocol.messages import (
    MSGPACK_ENCODER,
    ClientTransactionId,
    ErrorReply,
    HeartbeatReply,
    HeartbeatRequest,
    LogoffReply,
    LogoffRequest,
    LogonAccepted,
    LogonChallenge,
    LogonProof,
    LogonRequest,
    TopUpRequest,
)
from protocol.session import (
    Auth,
    LoggedOn,
    LogonRequested,
    MessageReceived,
    ServerSession,
    ServerState,
    TerminalSession,
    TerminalState,
)
from tests.protocol.support import (
    LOGON_ACCEPTED,
    LOGON_PROOF,
    REQUEST_REPLY_PAIRS,
    SERVER_NONCE,
    TERMINAL_ID,
    TERMINAL_KEY,
    TERMINAL_NONCE,
    TOP_UP_REQUEST,
    TOP_UP_RESULT,
    TXID,
    logged_on_pair,
    nonce,
)


def forge(sender: session._Session, message: object, auth: Auth = Auth.MAC) -> bytes:
    """A frame the sender's table would refuse: what a buggy or hostile peer can send."""
    return sender._encode(message, auth)  # type: ignore[arg-type]


def flip(frame: bytes, index: int) -> bytes:
    data = bytearray(frame)
    data[index] ^= 0x01
    return bytes(data)


def with_mac(frame: bytes, key: bytes) -> bytes:
    """Recompute the MAC trailer after tampering, as an attacker holding the key could."""
    signed = frame[: -limits.mac_bytes]
    return signed + framing.MacKey(key).mac(signed)


# ---- logon ---------------------------------------------------------------------------------------


def test_logon_handshake_step_by_step() -> None:
    terminal, server = TerminalSession(TERMINAL_ID, TERMINAL_KEY), ServerSession()
    assert (terminal.state, server.state) == (TerminalState.IDLE, ServerState.AWAITING_LOGON)

    request = terminal.send(LogonRequest(terminal_nonce=TERMINAL_NONCE))
    assert request.endswith(framing.ZERO_MAC)
    [requested] = server.receive_data(request)
    assert requested == LogonRequested(
        terminal_id=TERMINAL_ID,
        terminal_nonce=TERMINAL_NONCE,
        key_version=1,
        protocol_version=1,
        message=LogonRequest(terminal_nonce=TERMINAL_NONCE),
    )
    assert server.state is ServerState.LOGON_REQUESTED and server.terminal_id == TERMINAL_ID

    challenge = server.challenge(TERMINAL_KEY, SERVER_NONCE)
    assert challenge.endswith(framing.ZERO_MAC)
    [challenged] = terminal.receive_data(challenge)
    assert challenged == MessageReceived(
        message=LogonChallenge(server_nonce=SERVER_NONCE), sequence=1, authenticated=False
    )
    assert terminal.state is TerminalState.CHALLENGED

    proof = terminal.send(LOGON_PROOF)
    assert not proof.endswith(framing.ZERO_MAC)
    [logged_on] = server.receive_data(proof)
    assert logged_on == LoggedOn(terminal_id=TERMINAL_ID, message=LOGON_PROOF)
    assert server.state is ServerState.PROVEN

    [accepted] = terminal.receive_data(server.send(LOGON_ACCEPTED))
    assert accepted == MessageReceived(message=LOGON_ACCEPTED, sequence=2, authenticated=True)
    assert (terminal.state, server.state) == (TerminalState.READY, ServerState.READY)
    assert (terminal.send_sequence, terminal.receive_sequence) == (2, 2)


def test_session_keys_are_hkdf_of_the_terminal_key_and_both_nonces() -> None:
    keys = framing.derive_session_keys(TERMINAL_KEY, TERMINAL_ID, TERMINAL_NONCE, SERVER_NONCE)
    okm = HKDF(
        algorithm=hashes.SHA256(),
        length=64,
        salt=TERMINAL_NONCE + SERVER_NONCE,
        info=b"vendgate/1 session keys T0000001",
    ).derive(TERMINAL_KEY)
    assert keys == (okm[:32], okm[32:])
    assert keys.terminal_to_server != keys.server_to_terminal
    other = framing.derive_session_keys(TERMINAL_KEY, TERMINAL_ID, TERMINAL_NONCE, nonce(0xB1))
    assert other.terminal_to_server != keys.terminal_to_server, "a fresh server nonce gives fresh keys"


@pytest.mark.parametrize("key_bytes", [16, 32, 64, 65, 200])
def test_mac_key_is_truncated_hmac_sha256(key_bytes: int) -> None:
    key = bytes(range(key_bytes % 256)) * (key_bytes // 256 + 1)
    key = key[:key_bytes]
    for data in (b"", b"x", bytes(range(256)) * 3):
        assert framing.MacKey(key).mac(data) == hmac.new(key, data, "sha256").digest()[: limits.mac_bytes]


def test_wrong_terminal_key_fails_the_proof_and_the_terminal_learns_it_unauthenticated() -> None:
    terminal, server = TerminalSession(TERMINAL_ID, TERMINAL_KEY), ServerSession()
    server.receive_data(terminal.send(LogonRequest(terminal_nonce=TERMINAL_NONCE)))
    terminal.receive_data(server.challenge(bytes(16), SERVER_NONCE))  # the server holds another key
    before = session.bodies_decoded()
    with pytest.raises(MacFailure) as caught:
        server.receive_data(terminal.send(LOGON_PROOF))
    assert caught.value.response_code is ResponseCode.AUTH_FAILED and caught.value.close_connection
    assert session.bodies_decoded() == before, "no body decoded after a failed MAC"
    assert server.state is ServerState.FAILED
    refusal = server.send_error(caught.value)
    assert refusal.endswith(framing.ZERO_MAC), "the terminal never proved its key: nothing to MAC with"
    assert server.state is ServerState.CLOSED
    [event] = terminal.receive_data(refusal)
    assert event.authenticated is False and isinstance(event.message, ErrorReply)
    assert event.message.response_code is ResponseCode.AUTH_FAILED
    assert terminal.state is TerminalState.CLOSED


def test_server_with_wrong_key_cannot_pass_as_the_server() -> None:
    terminal, server = TerminalSession(TERMINAL_ID, TERMINAL_KEY), ServerSession()
    server.receive_data(terminal.send(LogonRequest(terminal_nonce=TERMINAL_NONCE)))
    impostor = ServerSession()
    impostor.receive_data(TerminalSession(TERMINAL_ID, bytes(16)).send(LogonRequest(terminal_nonce=TERMINAL_NONCE)))
    terminal.receive_data(impostor.challenge(bytes(16), SERVER_NONCE))
    impostor._proven_key = True  # pretend the proof passed
    impostor._state = ServerState.PROVEN
    impostor._receive_sequence = 2
    with pytest.raises(MacFailure):
        terminal.receive_data(impostor.send(LOGON_ACCEPTED))
    assert terminal.state is TerminalState.FAILED


def test_unknown_terminal_is_refused_before_any_key_exists() -> None:
    terminal, server = TerminalSession(TERMINAL_ID, TERMINAL_KEY), ServerSession()
    server.receive_data(terminal.send(LogonRequest(terminal_nonce=TERMINAL_NONCE)))
    refusal = server.reject(ResponseCode.UNKNOWN_TERMINAL, "no such terminal")
    assert server.state is ServerState.CLOSED
    [event] = terminal.receive_data(refusal)
    assert event.message == ErrorReply(response_code=ResponseCode.UNKNOWN_TERMINAL, detail="no such terminal")
    assert terminal.state is TerminalState.CLOSED


def test_blocked_terminal_is_refused_after_proof_with_a_macd_error() -> None:
    terminal, server = TerminalSession(TERMINAL_ID, TERMINAL_KEY), ServerSession()
    server.receive_data(terminal.send(LogonRequest(terminal_nonce=TERMINAL_NONCE)))
    terminal.receive_data(server.challenge(TERMINAL_KEY, SERVER_NONCE))
    server.receive_data(terminal.send(LOGON_PROOF))
    refusal = server.reject(ResponseCode.TERMINAL_BLOCKED)
    assert not refusal.endswith(framing.ZERO_MAC)
    [event] = terminal.receive_data(refusal)
    assert event.authenticated and event.message.response_code is ResponseCode.TERMINAL_BLOCKED
    assert terminal.state is TerminalState.CLOSED


def test_an_unauthenticated_error_is_refused_once_logged_on() -> None:
    terminal, server = logged_on_pair()
    forged = forge(server, ErrorReply(response_code=ResponseCode.SYSTEM_BUSY), Auth.NONE)
    with pytest.raises(MacFailure):
        terminal.receive_data(forged)


def test_reject_with_nobody_to_address_says_nothing() -> None:
    server = ServerSession()
    with pytest.raises(FrameTooLarge) as caught:
        server.receive_data(b"\xff\xff")
    assert server.send_error(caught.value) == b""
    assert server.state is ServerState.CLOSED


def test_challenge_refuses_bad_key_and_nonce_sizes() -> None:
    terminal, server = TerminalSession(TERMINAL_ID, TERMINAL_KEY), ServerSession()
    server.receive_data(terminal.send(LogonRequest(terminal_nonce=TERMINAL_NONCE)))
    with pytest.raises(LocalProtocolError):
        server.challenge(bytes(15), SERVER_NONCE)
    with pytest.raises(LocalProtocolError):
        server.challenge(TERMINAL_KEY, bytes(8))
    assert server.state is ServerState.LOGON_REQUESTED
    with pytest.raises(LocalProtocolError):
        server.send(LogonChallenge(server_nonce=SERVER_NONCE))
    with pytest.raises(LocalProtocolError):
        TerminalSession("t0000001", TERMINAL_KEY)
    with pytest.raises(LocalProtocolError):
        TerminalSession(TERMINAL_ID, bytes(8))


# ---- requests in lock step -----------------------------------------------------------------------


@pytest.mark.parametrize(("request_message", "reply"), REQUEST_REPLY_PAIRS, ids=lambda m: type(m).__name__)
def test_every_request_and_reply_through_the_sessions(request_message: object, reply: object) -> None:
    terminal, server = logged_on_pair()
    [received] = server.receive_data(terminal.send(request_message))  # type: ignore[arg-type]
    assert isinstance(received, MessageReceived) and received.message == request_message
    assert server.state is ServerState.SERVING and server.pending_request is type(request_message)
    assert terminal.state is TerminalState.AWAITING_REPLY
    [answered] = terminal.receive_data(server.send(reply))  # type: ignore[arg-type]
    assert answered.message == reply and answered.authenticated
    expected = TerminalState.CLOSED if isinstance(reply, LogoffReply) else TerminalState.READY
    assert terminal.state is expected
    assert server.state is (ServerState.CLOSED if expected is TerminalState.CLOSED else ServerState.READY)


def test_many_requests_keep_sequence_numbers_in_step() -> None:
    terminal, server = logged_on_pair()
    for _ in range(50):
        server.receive_data(terminal.send(HeartbeatRequest()))
        terminal.receive_data(server.send(HeartbeatReply(server_time=LOGON_ACCEPTED.server_time)))
    assert terminal.send_sequence == server.receive_sequence == 52
    assert server.send_sequence == terminal.receive_sequence == 52


def recorded_conversation() -> tuple[list[bytes], list[bytes]]:
    """Terminal frames and server frames of: top-up, heartbeat, logoff (after the logon)."""
    terminal, server = logged_on_pair()
    to_server, to_terminal = [], []
    for request, reply in [
        (TOP_UP_REQUEST, TOP_UP_RESULT),
        (HeartbeatRequest(), HeartbeatReply(server_time=LOGON_ACCEPTED.server_time)),
        (LogoffRequest(), LogoffReply()),
    ]:
        to_server.append(terminal.send(request))
        server.receive_data(to_server[-1])
        to_terminal.append(server.send(reply))
        terminal.receive_data(to_terminal[-1])
    return to_server, to_terminal


REPLIES = [TOP_UP_RESULT, HeartbeatReply(server_time=LOGON_ACCEPTED.server_time), LogoffReply()]


def test_frames_fed_one_byte_at_a_time() -> None:
    to_server, to_terminal = recorded_conversation()
    terminal, server = logged_on_pair()  # same keys and nonces as the recording: same bytes
    for index, (request, reply) in enumerate(zip(to_server, to_terminal, strict=True)):
        assert terminal.send(request_of(index)) == request  # type: ignore[arg-type]
        events = [event for byte in request for event in server.receive_data(bytes([byte]))]
        assert len(events) == 1 and isinstance(events[0], MessageReceived)
        assert server.send(REPLIES[index]) == reply  # type: ignore[arg-type]
        events = [event for byte in reply for event in terminal.receive_data(bytes([byte]))]
        assert [event.message for event in events] == [REPLIES[index]]
    assert (terminal.state, server.state) == (TerminalState.CLOSED, ServerState.CLOSED)


@pytest.mark.parametrize("split", [1, 2, 5, 16, 40])
def test_a_frame_with_the_next_frame_s_first_bytes_attached(split: int) -> None:
    to_server, _ = recorded_conversation()
    terminal, server = logged_on_pair()
    carry = b""
    for index, request in enumerate(to_server):
        terminal.send(request_of(index))  # type: ignore[arg-type]
        following = to_server[index + 1][:split] if index + 1 < len(to_server) else b""
        events = server.receive_data(request[len(carry) :] + following)
        assert [event.message for event in events] == [request_of(index)]  # type: ignore[union-attr]
        carry = following
        [_reply] = terminal.receive_data(server.send(REPLIES[index]))  # type: ignore[arg-type]
    assert server.state is ServerState.CLOSED


def request_of(index: int) -> object:
    return [TOP_UP_REQUEST, HeartbeatRequest(), LogoffRequest()][index]


def test_a_second_request_before_the_reply_is_a_state_error() -> None:
    terminal, server = logged_on_pair()
    first = terminal.send(TOP_UP_REQUEST)
    terminal._state = TerminalState.READY  # a terminal that does not wait for the reply
    second = terminal.send(HeartbeatRequest())
    with pytest.raises(StateError) as caught:
        server.receive_data(first + second)
    assert caught.value.close_connection and caught.value.response_code is ResponseCode.STATE_ERROR
    assert server.state is ServerState.FAILED
    assert server.receive_data(b"anything") == [], "a failed session ignores what follows"


def test_sending_what_the_table_forbids_is_a_local_error_and_changes_nothing() -> None:
    terminal, server = logged_on_pair()
    with pytest.raises(LocalProtocolError):
        server.send(TOP_UP_RESULT)  # nothing is pending
    server.receive_data(terminal.send(TOP_UP_REQUEST))
    with pytest.raises(LocalProtocolError):
        server.send(HeartbeatReply(server_time=LOGON_ACCEPTED.server_time))  # not the top-up's reply
    with pytest.raises(LocalProtocolError):
        server.send(LogoffReply())
    with pytest.raises(LocalProtocolError):
        terminal.send(HeartbeatRequest())  # still awaiting the reply
    with pytest.raises(LocalProtocolError):
        TerminalSession(TERMINAL_ID, TERMINAL_KEY).send(TOP_UP_REQUEST)  # not logged on
    assert server.state is ServerState.SERVING and server.send_sequence == 2
    terminal.receive_data(server.send(TOP_UP_RESULT))
    assert terminal.state is TerminalState.READY


def test_sequence_numbers_run_out_cleanly() -> None:
    terminal, _server = logged_on_pair()
    terminal._send_sequence = limits.sequence_max
    with pytest.raises(LocalProtocolError):
        terminal.send(HeartbeatRequest())
    assert terminal.state is TerminalState.READY


def test_an_error_reply_answers_a_request_without_closing() -> None:
    terminal, server = logged_on_pair()
    server.receive_data(terminal.send(TOP_UP_REQUEST))
    busy = ErrorReply(response_code=ResponseCode.SYSTEM_BUSY, detail="retry", connection_closing=False)
    [event] = terminal.receive_data(server.send(busy))
    assert event.message == busy
    assert (terminal.state, server.state) == (TerminalState.READY, ServerState.READY)


def test_a_closing_error_ends_both_sessions_at_any_time() -> None:
    terminal, server = logged_on_pair()
    [event] = terminal.receive_data(server.reject(ResponseCode.SYSTEM_BUSY, "shutting down"))
    assert event.message.connection_closing  # type: ignore[union-attr]
    assert (terminal.state, server.state) == (TerminalState.CLOSED, ServerState.CLOSED)
    with pytest.raises(LocalProtocolError):
        server.reject(ResponseCode.SYSTEM_BUSY)


def test_logoff_closes_both_ends() -> None:
    terminal, server = logged_on_pair()
    server.receive_data(terminal.send(LogoffRequest()))
    terminal.receive_data(server.send(LogoffReply()))
    assert (terminal.state, server.state) == (TerminalState.CLOSED, ServerState.CLOSED)
    assert terminal.receive_data(b"\x00\x10") == [] and server.receive_data(b"\x00") == []


# ---- bad input: a clear outcome, never a crash ---------------------------------------------------


def test_oversize_length_fails_on_the_prefix_before_the_body_arrives() -> None:
    server = ServerSession()
    too_long = (limits.frame_bytes_max - limits.length_prefix_bytes + 1).to_bytes(2, "big")
    with pytest.raises(FrameTooLarge) as caught:
        server.receive_data(too_long)
    assert caught.value.close_connection and caught.value.response_code is ResponseCode.FORMAT_ERROR
    assert server.state is ServerState.FAILED


def test_the_largest_allowed_length_is_buffered_until_complete() -> None:
    server = ServerSession()
    prefix = (limits.frame_bytes_max - limits.length_prefix_bytes).to_bytes(2, "big")
    assert server.receive_data(prefix + bytes(100)) == []
    assert server.state is ServerState.AWAITING_LOGON


def test_too_short_length_is_a_format_error() -> None:
    with pytest.raises(FormatError):
        ServerSession().receive_data((limits.frame_bytes_min - 3).to_bytes(2, "big"))


def test_truncated_frame_waits_for_more() -> None:
    terminal = TerminalSession(TERMINAL_ID, TERMINAL_KEY)
    server = ServerSession()
    frame = terminal.send(LogonRequest(terminal_nonce=TERMINAL_NONCE))
    assert server.receive_data(frame[:1]) == []
    assert server.receive_data(frame[1:-1]) == []
    assert len(server.receive_data(frame[-1:])) == 1


@pytest.mark.parametrize("index", [16, 30, -17, -1, 12, 15])
def test_bad_mac_is_refused_before_any_body_field_is_decoded(index: int) -> None:
    terminal, server = logged_on_pair()
    before = session.bodies_decoded()
    with pytest.raises(MacFailure) as caught:
        server.receive_data(flip(terminal.send(TOP_UP_REQUEST), index))
    assert caught.value.response_code is ResponseCode.MAC_FAILURE and caught.value.close_connection
    assert session.bodies_decoded() == before
    refusal = server.send_error(caught.value)
    [event] = terminal.receive_data(refusal)
    assert event.authenticated and event.message.response_code is ResponseCode.MAC_FAILURE  # type: ignore[union-attr]


def test_the_decode_counter_counts_accepted_bodies() -> None:
    terminal, server = logged_on_pair()
    before = session.bodies_decoded()
    server.receive_data(terminal.send(TOP_UP_REQUEST))
    assert session.bodies_decoded() == before + 1


def test_unknown_version_is_a_format_error_with_its_own_code() -> None:
    terminal, server = logged_on_pair()
    frame = bytearray(terminal.send(HeartbeatRequest()))
    frame[2] = 2
    with pytest.raises(UnsupportedVersion) as caught:
        server.receive_data(bytes(frame))
    assert isinstance(caught.value, FormatError)
    assert caught.value.response_code is ResponseCode.UNSUPPORTED_VERSION


def test_a_logon_in_an_unknown_version_is_refused_in_version_1_framing() -> None:
    terminal, server = TerminalSession(TERMINAL_ID, TERMINAL_KEY), ServerSession()
    frame = bytearray(terminal.send(LogonRequest(terminal_nonce=TERMINAL_NONCE)))
    frame[2] = 2
    with pytest.raises(UnsupportedVersion) as caught:
        server.receive_data(bytes(frame))
    refusal = server.send_error(caught.value)
    assert refusal[2] == 1 and refusal.endswith(framing.ZERO_MAC)
    [event] = terminal.receive_data(refusal)
    assert event.message.response_code is ResponseCode.UNSUPPORTED_VERSION  # type: ignore[union-attr]
    assert terminal.state is TerminalState.CLOSED


@pytest.mark.parametrize("code", [0x00, 0x02, 0x0A, 0x17, 0x7E, 0xFF])
def test_unknown_or_wrong_direction_message_type_is_a_format_error(code: int) -> None:
    terminal, server = logged_on_pair()
    frame = bytearray(terminal.send(HeartbeatRequest()))
    frame[3] = code
    with pytest.raises(FormatError):
        server.receive_data(bytes(frame))


def test_a_server_frame_reflected_back_to_the_server_is_refused() -> None:
    terminal, server = logged_on_pair()
    server.receive_data(terminal.send(HeartbeatRequest()))
    reply = server.send(HeartbeatReply(server_time=LOGON_ACCEPTED.server_time))
    with pytest.raises(FormatError):
        server.receive_data(reply)


def test_replayed_frame_is_a_replay_error() -> None:
    terminal, server = logged_on_pair()
    request = terminal.send(HeartbeatRequest())
    server.receive_data(request)
    terminal.receive_data(server.send(HeartbeatReply(server_time=LOGON_ACCEPTED.server_time)))
    with pytest.raises(ReplayError) as caught:
        server.receive_data(request)
    assert caught.value.response_code is ResponseCode.REPLAY and caught.value.close_connection


def test_skipped_sequence_number_is_a_replay_error() -> None:
    terminal, server = logged_on_pair()
    terminal._send_sequence += 1  # a frame went missing
    with pytest.raises(ReplayError):
        server.receive_data(terminal.send(HeartbeatRequest()))


def test_a_frame_from_an_earlier_session_fails_its_mac() -> None:
    terminal, _server = logged_on_pair()
    old = terminal.send(TOP_UP_REQUEST)
    fresh_terminal, fresh_server = TerminalSession(TERMINAL_ID, TERMINAL_KEY), ServerSession()
    fresh_server.receive_data(fresh_terminal.send(LogonRequest(terminal_nonce=TERMINAL_NONCE)))
    fresh_terminal.receive_data(fresh_server.challenge(TERMINAL_KEY, nonce(0x77)))
    fresh_server.receive_data(fresh_terminal.send(LOGON_PROOF))
    fresh_terminal.receive_data(fresh_server.send(LOGON_ACCEPTED))
    with pytest.raises(MacFailure):
        fresh_server.receive_data(old)


def test_a_request_before_logon_is_a_state_error() -> None:
    terminal, _ = logged_on_pair()
    with pytest.raises(StateError):
        ServerSession().receive_data(terminal.send(HeartbeatRequest()))


def test_an_out_of_state_frame_is_mac_checked_first_then_a_state_error() -> None:
    terminal, server = logged_on_pair()
    proof_again = forge(terminal, LOGON_PROOF)
    with pytest.raises(MacFailure):
        server.receive_data(flip(proof_again, 20))
    terminal2, server2 = logged_on_pair()
    with pytest.raises(StateError):
        server2.receive_data(forge(terminal2, LOGON_PROOF))


def test_logon_request_must_carry_a_zero_mac() -> None:
    frame = TerminalSession(TERMINAL_ID, TERMINAL_KEY).send(LogonRequest(terminal_nonce=TERMINAL_NONCE))
    with pytest.raises(FormatError):
        ServerSession().receive_data(flip(frame, -1))


@pytest.mark.parametrize("terminal_id", [b"t0000001", b"T000 001", b"\xff0000001"])
def test_malformed_terminal_id_is_a_format_error(terminal_id: bytes) -> None:
    frame = TerminalSession(TERMINAL_ID, TERMINAL_KEY).send(LogonRequest(terminal_nonce=TERMINAL_NONCE))
    with pytest.raises(FormatError):
        ServerSession().receive_data(frame[:4] + terminal_id + frame[12:])


def test_another_terminal_id_within_a_session_is_a_format_error() -> None:
    terminal, server = logged_on_pair()
    other = TerminalSession("T0000002", TERMINAL_KEY)
    other._send_key = terminal._send_key
    other._state = TerminalState.READY
    other._send_sequence = 2
    with pytest.raises(FormatError):
        server.receive_data(other.send(HeartbeatRequest()))


def test_header_type_and_body_tag_must_agree() -> None:
    terminal, server = logged_on_pair()
    frame = terminal.send(HeartbeatRequest())
    keys = framing.derive_session_keys(TERMINAL_KEY, TERMINAL_ID, TERMINAL_NONCE, SERVER_NONCE)
    relabelled = bytearray(frame)
    relabelled[3] = LogoffRequest.message_type
    with pytest.raises(FormatError):
        server.receive_data(with_mac(bytes(relabelled), keys.terminal_to_server))


def undecodable_top_up(terminal: TerminalSession) -> bytes:
    """A top-up request, MACed and in sequence, whose body does not decode; the terminal then
    awaits its reply, as the terminal that sent it would."""
    keys = framing.derive_session_keys(TERMINAL_KEY, TERMINAL_ID, TERMINAL_NONCE, SERVER_NONCE)
    good = terminal.send(TOP_UP_REQUEST)
    body = MSGPACK_ENCODER.encode(TOP_UP_REQUEST).replace(b"ZAR", b"zar")
    tampered = framing.HEADER.pack(
        limits.header_bytes - 2 + len(body) + limits.mac_bytes,
        1,
        TopUpRequest.message_type,
        TERMINAL_ID.encode("ascii"),
        terminal.send_sequence,
    )
    bad = with_mac(tampered + body + bytes(limits.mac_bytes), keys.terminal_to_server)
    assert len(bad) == len(good)
    return bad


def foreign_top_up(terminal: TerminalSession) -> bytes:
    """A top-up request naming another terminal's transaction id: NOT_PERMITTED, without closing."""
    foreign = ClientTransactionId(terminal_id="T0000002", terminal_sequence=1, business_date=TXID.business_date)
    request = TopUpRequest(
        client_transaction_id=foreign,
        meter_number=TOP_UP_REQUEST.meter_number,
        amount_minor=100,
        currency="ZAR",
        tender_type=TOP_UP_REQUEST.tender_type,
    )
    return terminal.send(request)


def test_bad_body_in_an_authenticated_request_is_answered_and_the_session_goes_on() -> None:
    terminal, server = logged_on_pair()
    bad = undecodable_top_up(terminal)
    with pytest.raises(FormatError) as caught:
        server.receive_data(bad)
    assert not caught.value.close_connection and server.state is ServerState.REJECTING
    [event] = terminal.receive_data(server.send_error(caught.value))
    assert event.message == ErrorReply(
        response_code=ResponseCode.FORMAT_ERROR, detail=caught.value.detail[:200], connection_closing=False
    )
    assert (terminal.state, server.state) == (TerminalState.READY, ServerState.READY)
    [again] = server.receive_data(terminal.send(HeartbeatRequest()))
    assert isinstance(again, MessageReceived)


def test_a_bad_body_s_error_frame_names_the_field_but_not_the_value_sent() -> None:
    terminal, server = logged_on_pair()
    keys = framing.derive_session_keys(TERMINAL_KEY, TERMINAL_ID, TERMINAL_NONCE, SERVER_NONCE)
    body = MSGPACK_ENCODER.encode(msgspec.to_builtins(TOP_UP_REQUEST) | {"tender_type": "S3CR3T"})
    terminal.send(TOP_UP_REQUEST)  # the sequence number the tampered frame takes
    header = framing.HEADER.pack(limits.header_bytes - 2 + len(body) + limits.mac_bytes, 1,
                                 TopUpRequest.message_type, TERMINAL_ID.encode("ascii"), terminal.send_sequence)
    with pytest.raises(FormatError) as caught:
        server.receive_data(with_mac(header + body + bytes(limits.mac_bytes), keys.terminal_to_server))
    assert "`$.tender_type`" in caught.value.detail and "S3CR3T" not in caught.value.detail
    [event] = terminal.receive_data(server.send_error(caught.value))
    assert event.message.response_code is ResponseCode.FORMAT_ERROR  # type: ignore[union-attr]
    assert "S3CR3T" not in event.message.detail  # type: ignore[union-attr]


def test_a_bad_body_fed_one_byte_at_a_time_is_answered_and_the_session_goes_on() -> None:
    terminal, server = logged_on_pair()
    bad = undecodable_top_up(terminal)
    for byte in bad[:-1]:
        assert server.receive_data(bytes([byte])) == []
    with pytest.raises(FormatError) as caught:
        server.receive_data(bad[-1:])
    assert not caught.value.close_connection and server.state is ServerState.REJECTING
    [event] = terminal.receive_data(server.send_error(caught.value))
    assert event.message.response_code is ResponseCode.FORMAT_ERROR  # type: ignore[union-attr]
    assert (terminal.state, server.state) == (TerminalState.READY, ServerState.READY)


@pytest.mark.parametrize("refused", [undecodable_top_up, foreign_top_up], ids=["bad body", "not permitted"])
@pytest.mark.parametrize("following", [1, 2], ids=["one frame", "two frames"])
def test_frames_after_a_request_refused_without_closing_in_the_same_read_fail_the_session(
    refused: Callable[[TerminalSession], bytes], following: int
) -> None:
    # As with a second request after an accepted one: neither is answered on its own, and the
    # terminal learns with a closing STATE_ERROR instead of a reply that leaves the rest unanswered.
    terminal, server = logged_on_pair()
    first = refused(terminal)
    pipelined = b""
    for _ in range(following):
        terminal._state = TerminalState.READY  # a terminal that does not wait for the reply
        pipelined += terminal.send(HeartbeatRequest())
    with pytest.raises(StateError) as caught:
        server.receive_data(first + pipelined)
    assert caught.value.close_connection and caught.value.response_code is ResponseCode.STATE_ERROR
    assert caught.value.detail == "HeartbeatRequest is not allowed in state rejecting"
    assert server.state is ServerState.FAILED and server.buffered_bytes == 0
    assert server.receive_data(pipelined) == [], "a failed session ignores what follows"
    [event] = terminal.receive_data(server.send_error(caught.value))
    assert event.authenticated and event.message == ErrorReply(
        response_code=ResponseCode.STATE_ERROR, detail=caught.value.detail, connection_closing=True
    )
    assert (terminal.state, server.state) == (TerminalState.CLOSED, ServerState.CLOSED)


def test_a_frame_after_a_refused_request_is_mac_checked_before_the_state_error() -> None:
    terminal, server = logged_on_pair()
    first = undecodable_top_up(terminal)
    terminal._state = TerminalState.READY
    with pytest.raises(MacFailure) as caught:
        server.receive_data(first + flip(terminal.send(HeartbeatRequest()), 20))
    assert caught.value.close_connection and server.state is ServerState.FAILED


@pytest.mark.parametrize("split", [1, 2, 20])
def test_the_first_bytes_of_the_next_frame_after_a_refused_request_wait_for_the_rest(split: int) -> None:
    # A frame not yet whole has not been pipelined within this read: the refusal is answered,
    # then the frame is served once the rest arrives.
    terminal, server = logged_on_pair()
    first = undecodable_top_up(terminal)
    terminal._state = TerminalState.READY  # sent before the reply arrived; the server reads it later
    heartbeat = terminal.send(HeartbeatRequest())
    with pytest.raises(FormatError) as caught:
        server.receive_data(first + heartbeat[:split])
    assert not caught.value.close_connection and server.state is ServerState.REJECTING
    assert server.buffered_bytes == split
    server.send_error(caught.value)
    assert server.state is ServerState.READY
    [event] = server.receive_data(heartbeat[split:])
    assert isinstance(event, MessageReceived) and event.message == HeartbeatRequest()


def test_a_transaction_id_of_another_terminal_is_not_permitted() -> None:
    terminal, server = logged_on_pair()
    with pytest.raises(NotPermitted) as caught:
        server.receive_data(foreign_top_up(terminal))
    assert not caught.value.close_connection and caught.value.response_code is ResponseCode.NOT_PERMITTED
    [event] = terminal.receive_data(server.send_error(caught.value))
    assert event.message.response_code is ResponseCode.NOT_PERMITTED  # type: ignore[union-attr]
    assert terminal.state is TerminalState.READY and server.state is ServerState.READY


def test_terminal_refuses_a_reply_that_does_not_answer_its_request() -> None:
    terminal, server = logged_on_pair()
    server.receive_data(terminal.send(TOP_UP_REQUEST))
    with pytest.raises(StateError):
        terminal.receive_data(forge(server, HeartbeatReply(server_time=LOGON_ACCEPTED.server_time)))
    assert terminal.state is TerminalState.FAILED


def test_terminal_refuses_an_unsolicited_reply_and_a_stray_logoff_reply() -> None:
    terminal, server = logged_on_pair()
    with pytest.raises(StateError):
        terminal.receive_data(forge(server, TOP_UP_RESULT))
    terminal, server = logged_on_pair()
    server.receive_data(terminal.send(HeartbeatRequest()))
    with pytest.raises(StateError):
        terminal.receive_data(forge(server, LogoffReply()))


def test_terminal_errors_always_close() -> None:
    terminal, server = logged_on_pair()
    server.receive_data(terminal.send(HeartbeatRequest()))
    with pytest.raises(ProtocolError) as caught:
        terminal.receive_data(flip(server.send(HeartbeatReply(server_time=LOGON_ACCEPTED.server_time)), 20))
    assert caught.value.close_connection and terminal.state is TerminalState.FAILED


def test_logon_accepted_before_the_proof_is_a_state_error_for_the_terminal() -> None:
    terminal, server = TerminalSession(TERMINAL_ID, TERMINAL_KEY), ServerSession()
    server.receive_data(terminal.send(LogonRequest(terminal_nonce=TERMINAL_NONCE)))
    terminal.receive_data(server.challenge(TERMINAL_KEY, SERVER_NONCE))
    with pytest.raises(StateError):
        terminal.receive_data(
            forge(server, LogonAccepted(**{f: getattr(LOGON_ACCEPTED, f) for f in LOGON_ACCEPTED.__struct_fields__}))
        )


def test_proof_is_bound_to_this_session_s_nonces() -> None:
    terminal, server = TerminalSession(TERMINAL_ID, TERMINAL_KEY), ServerSession()
    server.receive_data(terminal.send(LogonRequest(terminal_nonce=TERMINAL_NONCE)))
    terminal.receive_data(server.challenge(TERMINAL_KEY, SERVER_NONCE))
    recorded_proof = terminal.send(LogonProof(software_version="x"))
    replay_target, replayer = ServerSession(), TerminalSession(TERMINAL_ID, TERMINAL_KEY)
    replay_target.receive_data(replayer.send(LogonRequest(terminal_nonce=TERMINAL_NONCE)))
    replay_target.challenge(TERMINAL_KEY, nonce(0x99))
    with pytest.raises(MacFailure) as caught:
        replay_target.receive_data(recorded_proof)
    assert caught.value.response_code is ResponseCode.AUTH_FAILED
