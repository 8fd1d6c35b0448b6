"""Sans-IO sessions of wire protocol v1: the one state transition table, and both ends that obey it.

`ServerSession` and `TerminalSession` turn received bytes into events and messages to send into
bytes. They never touch a socket or a clock and never make randomness: nonces, keys and times
come from the caller. Every transition of either end is a row of `TRANSITIONS`; nothing else in
this module changes a state.

Receiving, in order: length prefix against frame_bytes_max (FrameTooLarge, before buffering);
wait for the whole frame; version (UnsupportedVersion), type code known for this direction and
terminal id (FormatError); MAC in constant time (MacFailure); sequence = previous + 1
(ReplayError); the state table (StateError); only then the body is decoded (FormatError) and the
transaction ids are checked to belong to the terminal (NotPermitted). Requests and replies are
in lock step: a terminal sends its next request only after the reply to the previous one.

How the gateway drives a `ServerSession` (one per TCP connection)::

    session = ServerSession()
    try:
        for event in session.receive_data(chunk):           # call for every chunk read
            match event:
                case LogonRequested(terminal_id=tid, key_version=version):
                    key = await load_terminal_key(tid, version)    # None: unknown or blocked
                    if key is None:
                        write(session.reject(ResponseCode.UNKNOWN_TERMINAL))  # then close
                    else:
                        write(session.challenge(key, secrets.token_bytes(16)))
                case LoggedOn(terminal_id=tid, message=proof):
                    write(session.send(LogonAccepted(server_time=now_utc(), ...)))
                case MessageReceived(message=TopUpRequest() as request):
                    write(session.send(await top_up(request)))     # exactly one reply
    except ProtocolError as error:
        write(session.send_error(error))        # closing or not, as error.close_connection says
    if session.state is ServerState.CLOSED:
        close the connection (after writing what was returned)

After an error with `close_connection` the session is FAILED: `send_error()` or `reject()`
still produces one last error frame (MACed when the terminal had proven its key; b"" when no
frame ever named a terminal) and the session is CLOSED; data received meanwhile is ignored.
A `LocalProtocolError` from `send()` is the gateway's own bug: the session is unchanged and the
gateway answers with `reject(ResponseCode.SYSTEM_ERROR)`.
Events of earlier frames in the same `receive_data` call are dropped with the error: in lock
step any frame after a request is itself a StateError, so the connection closes anyway. That
holds for a request refused without closing too: a whole frame after it in the same call makes
the session fail with that frame's closing error, and the refused request gets no reply of its
own (docs/protocol.md, "a terminal MUST NOT pipeline"). A frame not yet whole stays buffered.

A `TerminalSession` is driven the same way: `send(LogonRequest(terminal_nonce=...))`, then on
`MessageReceived(LogonChallenge)` `send(LogonProof(...))`, then `MessageReceived(LogonAccepted)`
means READY; every request's reply (or ErrorReply) arrives as `MessageReceived`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Mapping
from hmac import compare_digest
from typing import Final, Generic, NamedTuple, TypeVar, cast

import msgspec

from protocol import framing, limits
from protocol.codes import ResponseCode
from protocol.errors import (
    FormatError,
    LocalProtocolError,
    MacFailure,
    NotPermitted,
    ProtocolError,
    ReplayError,
    StateError,
    UnsupportedVersion,
    decode_failure,
)
from protocol.messages import (
    MSGPACK_ENCODER,
    REPLY_TYPE,
    REQUEST_TYPES,
    SERVER_DECODER,
    SERVER_MESSAGE_TYPES,
    SERVER_TYPE_BY_CODE,
    TERMINAL_DECODER,
    TERMINAL_MESSAGE_TYPES,
    TERMINAL_TYPE_BY_CODE,
    TRANSACTION_IDS_OF,
    AnyMessage,
    ErrorReply,
    LogoffReply,
    LogonAccepted,
    LogonChallenge,
    LogonProof,
    LogonRequest,
    ServerMessage,
    TerminalMessage,
    is_terminal_id,
)


class _FastEnum(enum.Enum):
    # Members are singletons, so identity hashing is exact; Enum's own __hash__ runs Python code
    # on every table lookup, which is most of a frame's budget.
    __hash__ = object.__hash__


class ServerState(_FastEnum):
    AWAITING_LOGON = "awaiting_logon"
    LOGON_REQUESTED = "logon_requested"  # the gateway looks the terminal key up
    AWAITING_PROOF = "awaiting_proof"
    PROVEN = "proven"  # the gateway accepts (LogonAccepted) or refuses (reject)
    READY = "ready"
    SERVING = "serving"  # one request is being answered
    REJECTING = "rejecting"  # a request was refused without closing; an ErrorReply must answer it
    FAILED = "failed"  # a closing error happened; only a closing ErrorReply remains
    CLOSED = "closed"


class TerminalState(_FastEnum):
    IDLE = "idle"
    AWAITING_CHALLENGE = "awaiting_challenge"
    CHALLENGED = "challenged"  # session keys derived; the terminal sends LogonProof
    AWAITING_ACCEPT = "awaiting_accept"
    READY = "ready"
    AWAITING_REPLY = "awaiting_reply"
    FAILED = "failed"  # a received frame was bad: hang up
    CLOSED = "closed"


class Side(_FastEnum):
    SERVER = "server"
    TERMINAL = "terminal"


class Action(_FastEnum):
    RECEIVE = "receive"
    SEND = "send"


class Auth(_FastEnum):
    NONE = "none"  # MAC trailer is 16 zero bytes; the frame carries no authority
    MAC = "mac"  # MAC under the session key of the frame's direction
    EITHER = "none or mac"  # a refusal during logon: the server may not know the key
    IF_PROVEN = "mac once proven"  # server's closing error: MACed iff the terminal proved its key


class Kind(_FastEnum):
    """Groups of messages in the table: rows too alike to spell out one message at a time."""

    REQUEST = "any request"  # REQUEST_TYPES
    REPLY = "reply to the pending request"  # REPLY_TYPE[pending request]
    OPEN_ERROR = "ErrorReply, connection_closing false"
    CLOSING_ERROR = "ErrorReply, connection_closing true"


State = ServerState | TerminalState
ANY_STATE: Final = "any state but closed"


class Transition(NamedTuple):
    side: Side
    state: State | str
    action: Action
    message: type[AnyMessage] | Kind
    auth: Auth
    next_state: State


S, T = ServerState, TerminalState
SERVER, TERMINAL, RECEIVE, SEND = Side.SERVER, Side.TERMINAL, Action.RECEIVE, Action.SEND

# THE state table: both ends, every transition. Rows naming a class win over rows naming a Kind.
# docs/protocol.md ("Session state machine") shows this table; a test keeps the two equal.
TRANSITIONS: Final[tuple[Transition, ...]] = (
    Transition(SERVER, S.AWAITING_LOGON, RECEIVE, LogonRequest, Auth.NONE, S.LOGON_REQUESTED),
    Transition(SERVER, S.LOGON_REQUESTED, SEND, LogonChallenge, Auth.NONE, S.AWAITING_PROOF),
    Transition(SERVER, S.AWAITING_PROOF, RECEIVE, LogonProof, Auth.MAC, S.PROVEN),
    Transition(SERVER, S.PROVEN, SEND, LogonAccepted, Auth.MAC, S.READY),
    Transition(SERVER, S.READY, RECEIVE, Kind.REQUEST, Auth.MAC, S.SERVING),
    Transition(SERVER, S.SERVING, SEND, LogoffReply, Auth.MAC, S.CLOSED),
    Transition(SERVER, S.SERVING, SEND, Kind.REPLY, Auth.MAC, S.READY),
    Transition(SERVER, S.SERVING, SEND, Kind.OPEN_ERROR, Auth.MAC, S.READY),
    Transition(SERVER, S.REJECTING, SEND, Kind.OPEN_ERROR, Auth.MAC, S.READY),
    Transition(SERVER, ANY_STATE, SEND, Kind.CLOSING_ERROR, Auth.IF_PROVEN, S.CLOSED),
    Transition(TERMINAL, T.IDLE, SEND, LogonRequest, Auth.NONE, T.AWAITING_CHALLENGE),
    Transition(TERMINAL, T.AWAITING_CHALLENGE, RECEIVE, LogonChallenge, Auth.NONE, T.CHALLENGED),
    Transition(TERMINAL, T.AWAITING_CHALLENGE, RECEIVE, Kind.CLOSING_ERROR, Auth.NONE, T.CLOSED),
    Transition(TERMINAL, T.CHALLENGED, SEND, LogonProof, Auth.MAC, T.AWAITING_ACCEPT),
    Transition(TERMINAL, T.CHALLENGED, RECEIVE, Kind.CLOSING_ERROR, Auth.EITHER, T.CLOSED),
    Transition(TERMINAL, T.AWAITING_ACCEPT, RECEIVE, LogonAccepted, Auth.MAC, T.READY),
    Transition(TERMINAL, T.AWAITING_ACCEPT, RECEIVE, Kind.CLOSING_ERROR, Auth.EITHER, T.CLOSED),
    Transition(TERMINAL, T.READY, SEND, Kind.REQUEST, Auth.MAC, T.AWAITING_REPLY),
    Transition(TERMINAL, T.READY, RECEIVE, Kind.CLOSING_ERROR, Auth.MAC, T.CLOSED),
    Transition(TERMINAL, T.AWAITING_REPLY, RECEIVE, LogoffReply, Auth.MAC, T.CLOSED),
    Transition(TERMINAL, T.AWAITING_REPLY, RECEIVE, Kind.REPLY, Auth.MAC, T.READY),
    Transition(TERMINAL, T.AWAITING_REPLY, RECEIVE, Kind.OPEN_ERROR, Auth.MAC, T.READY),
    Transition(TERMINAL, T.AWAITING_REPLY, RECEIVE, Kind.CLOSING_ERROR, Auth.MAC, T.CLOSED),
)

_REPLY_TYPES: Final = frozenset(REPLY_TYPE.values())
_KIND_MEMBERS: Final[dict[Kind, tuple[type[AnyMessage], ...]]] = {
    Kind.REQUEST: tuple(cls for cls in TERMINAL_MESSAGE_TYPES if cls in REQUEST_TYPES),
    Kind.REPLY: tuple(cls for cls in SERVER_MESSAGE_TYPES if cls in _REPLY_TYPES),
}
_SIDE_STATES: Final[dict[Side, tuple[State, ...]]] = {SERVER: tuple(ServerState), TERMINAL: tuple(TerminalState)}

_RowMap = dict[type[AnyMessage], Transition]


class _ErrorRows(NamedTuple):
    open: Transition | None
    closing: Transition | None


class _Compiled(NamedTuple):
    """The table of one side and action, indexed for a frame's hot path: state -> class -> row."""

    rows: dict[State, _RowMap]
    errors: dict[State, _ErrorRows]


def _compile(side: Side, action: Action) -> _Compiled:
    by_state: dict[State, dict[type[AnyMessage] | Kind, Transition]] = {state: {} for state in _SIDE_STATES[side]}
    for row in TRANSITIONS:
        if row.side is not side or row.action is not action:
            continue
        states = (
            [state for state in _SIDE_STATES[side] if state.value != "closed"]
            if row.state == ANY_STATE
            else [cast(State, row.state)]
        )
        for state in states:
            assert row.message not in by_state[state], f"two rows for {row.message} in {state}"
            by_state[state][row.message] = row
    rows: dict[State, _RowMap] = {}
    errors: dict[State, _ErrorRows] = {}
    for state, entries in by_state.items():
        exact: _RowMap = {key: row for key, row in entries.items() if isinstance(key, type)}
        for kind in (Kind.REQUEST, Kind.REPLY):
            if kind in entries:
                for cls in _KIND_MEMBERS[kind]:
                    exact.setdefault(cls, entries[kind])
        rows[state] = exact
        error_rows = _ErrorRows(entries.get(Kind.OPEN_ERROR), entries.get(Kind.CLOSING_ERROR))
        # Before its body is decoded a received ErrorReply's kind is unknown: both must agree on auth.
        assert action is SEND or None in error_rows or error_rows[0].auth is error_rows[1].auth  # type: ignore[union-attr]
        errors[state] = error_rows
        if action is RECEIVE and (error_rows.open or error_rows.closing):
            # Received, an ErrorReply is admitted by class (either kind, same auth); the decoded
            # body then picks the exact row. Sent, its kind is known: see lookup().
            exact[ErrorReply] = error_rows.open or error_rows.closing  # type: ignore[assignment]
    return _Compiled(rows, errors)


_COMPILED: Final[dict[tuple[Side, Action], _Compiled]] = {
    (side, action): _compile(side, action) for side in Side for action in Action
}


def lookup(side: Side, state: State, action: Action, message: AnyMessage | type[AnyMessage]) -> Transition | None:
    """The row that allows `message` in `state`, or None. An ErrorReply instance tells its kind;
    the ErrorReply class alone matches either kind (a received frame before its body is decoded)."""
    compiled = _COMPILED[side, action]
    message_type = message if isinstance(message, type) else type(message)
    if message_type is ErrorReply:
        error_rows = compiled.errors[state]
        if isinstance(message, ErrorReply):
            return error_rows.closing if message.connection_closing else error_rows.open
        return error_rows.open or error_rows.closing
    return compiled.rows[state].get(message_type)


# ---- events --------------------------------------------------------------------------------------

M = TypeVar("M", TerminalMessage, ServerMessage)


class LogonRequested(msgspec.Struct, frozen=True, kw_only=True):
    """A terminal asks to log on (unauthenticated). Answer with challenge() or reject()."""

    terminal_id: str
    terminal_nonce: bytes
    key_version: int
    protocol_version: int
    message: LogonRequest


class LoggedOn(msgspec.Struct, frozen=True, kw_only=True):
    """The terminal proved its key. Answer with send(LogonAccepted(...)) or reject()."""

    terminal_id: str
    message: LogonProof


class MessageReceived(msgspec.Struct, Generic[M], frozen=True, kw_only=True):
    """A message that passed every check. `authenticated` is False only for logon frames."""

    message: M
    sequence: int
    authenticated: bool


ServerEvent = LogonRequested | LoggedOn | MessageReceived[TerminalMessage]
TerminalEvent = MessageReceived[ServerMessage]


# ---- the common engine ---------------------------------------------------------------------------

_bodies_decoded = 0


def bodies_decoded() -> int:
    """How many frame bodies this process handed to a decoder: a test proves none follows a bad MAC."""
    return _bodies_decoded


# Module constants rather than attribute lookups: a frame's whole budget is a few microseconds.
_HEADER: Final = framing.HEADER
_ZERO_MAC: Final = framing.ZERO_MAC
_MAC_BYTES: Final = limits.mac_bytes
_HEADER_BYTES: Final = limits.header_bytes
_PREFIX_BYTES: Final = limits.length_prefix_bytes
_FRAME_BYTES_MIN: Final = limits.frame_bytes_min
_FRAME_BYTES_MAX: Final = limits.frame_bytes_max
_VERSION: Final = limits.protocol_version
_SEQUENCE_MAX: Final = limits.sequence_max
# msgspec raises UnicodeDecodeError, not DecodeError, for some invalid UTF-8 (found by the fuzz test).
_DECODE_ERRORS: Final = (msgspec.DecodeError, UnicodeDecodeError)
_encode_body: Final = MSGPACK_ENCODER.encode
_pack_header: Final = framing.HEADER.pack
_unpack_header: Final = framing.HEADER.unpack_from
_MAC: Final = Auth.MAC
_NONE: Final = Auth.NONE
_EITHER: Final = Auth.EITHER
_REQUEST: Final = Kind.REQUEST
_TRANSACTION_IDS: Final = TRANSACTION_IDS_OF
_REPLY_OF: Final[Mapping[type[AnyMessage], type[ServerMessage]]] = REPLY_TYPE  # type: ignore[assignment]
_REPLY: Final = Kind.REPLY


class _Session:
    """Framing, MACs, sequence numbers and table lookups shared by both ends."""

    __slots__ = (
        "_buffer",
        "_expected_reply",
        "_pending",
        "_receive_key",
        "_receive_rows",
        "_receive_sequence",
        "_send_key",
        "_send_rows",
        "_send_sequence",
        "_state",
        "_terminal_id",
        "_terminal_id_bytes",
        "_terminal_nonce",
    )
    _side: Side
    _type_by_code: Mapping[int, type[AnyMessage]]

    def __init__(self, state: State) -> None:
        self._state: State = state
        self._receive_rows = _COMPILED[self._side, RECEIVE].rows
        self._send_rows = _COMPILED[self._side, SEND].rows
        self._buffer = bytearray()
        self._terminal_id: str | None = None
        self._terminal_id_bytes = b""
        self._terminal_nonce = b""
        self._send_key: framing.MacKey | None = None
        self._receive_key: framing.MacKey | None = None
        self._send_sequence = 0
        self._receive_sequence = 0
        # The request awaiting its reply, and the one reply type that answers it.
        self._pending: type[TerminalMessage] | None = None
        self._expected_reply: type[ServerMessage] | None = None

    @property
    def terminal_id(self) -> str | None:
        return self._terminal_id

    @property
    def send_sequence(self) -> int:
        """Sequence number of the last frame sent (0 before the first)."""
        return self._send_sequence

    @property
    def receive_sequence(self) -> int:
        """Sequence number of the last frame accepted (0 before the first)."""
        return self._receive_sequence

    @property
    def buffered_bytes(self) -> int:
        """Bytes received of a frame not yet whole (0 between frames)."""
        return len(self._buffer)

    @property
    def pending_request(self) -> type[TerminalMessage] | None:
        """The request awaiting its reply (server SERVING, terminal AWAITING_REPLY), else None."""
        return self._pending

    # -- sending --

    def _send_row(self, message: AnyMessage) -> Transition:
        message_type = type(message)
        if message_type is ErrorReply:
            row = lookup(self._side, self._state, SEND, message)
        else:
            row = self._send_rows[self._state].get(message_type)
        if row is None:
            raise LocalProtocolError(f"{message_type.__name__} may not be sent in state {self._state.value}")
        if message_type in _REPLY_TYPES and message_type is not self._expected_reply:
            pending = "nothing" if self._pending is None else self._pending.__name__
            raise LocalProtocolError(f"{message_type.__name__} does not answer {pending}")
        return row

    def _proven(self) -> bool:
        return False

    def _encode(self, message: AnyMessage, auth: Auth) -> bytes:
        """The frame of `message`; the caller changes state only once this returned."""
        sequence = self._send_sequence + 1
        if sequence > _SEQUENCE_MAX:
            raise LocalProtocolError("sequence numbers exhausted: log on again")
        if auth is Auth.IF_PROVEN:
            auth = _MAC if self._proven() else _NONE
        body = _encode_body(message)
        total = _HEADER_BYTES + len(body) + _MAC_BYTES
        if total > _FRAME_BYTES_MAX:
            raise LocalProtocolError(f"{type(message).__name__} needs {total} bytes, above frame_bytes_max")
        signed = (
            _pack_header(total - _PREFIX_BYTES, _VERSION, message.message_type, self._terminal_id_bytes, sequence)
            + body
        )
        self._send_sequence = sequence
        if auth is _NONE:
            return signed + _ZERO_MAC
        key = self._send_key
        assert key is not None, "a MACed row is reachable only with session keys"
        # framing.MacKey.mac inlined: one Python call less on every frame.
        inner = key.inner_copy()
        inner.update(signed)
        outer = key.outer_copy()
        outer.update(inner.digest())
        return signed + outer.digest()[:_MAC_BYTES]

    # -- receiving --

    def _whole_frames(self, data: bytes) -> Iterable[bytes]:
        """Every whole frame buffered so far, with `data` added."""
        size = len(data)
        if (
            not self._buffer
            and size >= _PREFIX_BYTES
            and ((data[0] << 8) | data[1]) + _PREFIX_BYTES == size
            and _FRAME_BYTES_MIN <= size <= _FRAME_BYTES_MAX
        ):
            # The usual case: nothing is buffered and this read is exactly one frame.
            return [bytes(data)]
        return self._frames(data)

    def _frames(self, data: bytes) -> Iterator[bytes]:
        """Whole frames received so far, each taken out of the buffer only when the caller asks for
        it: a frame after one that raised stays buffered for the caller to deal with. A bad length
        prefix raises before its body is buffered."""
        buffer = self._buffer
        buffer += data
        while len(buffer) >= _PREFIX_BYTES:
            total = framing.frame_length(buffer)
            if len(buffer) < total:
                return
            frame = bytes(buffer[:total])
            del buffer[:total]
            yield frame

    def _check_frame(self, frame: bytes) -> tuple[type[AnyMessage], Transition, bool, int]:
        """Header, MAC, sequence and state checks of one frame: all before its body is touched."""
        _length, version, code, raw_terminal_id, sequence = _unpack_header(frame)
        if version != _VERSION:
            if self._terminal_id is None and is_terminal_id(raw_terminal_id.decode("ascii", errors="replace")):
                # Every version keeps the terminal id at bytes 4-11: the refusal can be addressed.
                self._adopt_terminal_id(raw_terminal_id)
            raise UnsupportedVersion(f"protocol version {version} is not supported; this end speaks 1")
        message_type = self._type_by_code.get(code)
        if message_type is None:
            raise FormatError(f"message type 0x{code:02x} is not one the {self._side.value} receives")
        if raw_terminal_id != self._terminal_id_bytes:
            self._adopt_terminal_id(raw_terminal_id)
        row = self._receive_rows[self._state].get(message_type)
        cut = len(frame) - _MAC_BYTES
        mac = frame[cut:]
        key = self._receive_key
        if row is None:
            if key is not None:
                if not compare_digest(key.mac(frame[:cut]), mac):
                    raise MacFailure("MAC does not verify", response_code=self._mac_failure_code())
                self._check_sequence(sequence)
            raise StateError(f"{message_type.__name__} is not allowed in state {self._state.value}")
        auth = row.auth
        authenticated = True
        if auth is _MAC or (auth is _EITHER and mac != _ZERO_MAC):
            if key is None:
                raise MacFailure("MAC does not verify", response_code=self._mac_failure_code())
            # framing.MacKey.mac inlined: one Python call less on every frame.
            inner = key.inner_copy()
            inner.update(frame[:cut])
            outer = key.outer_copy()
            outer.update(inner.digest())
            if not compare_digest(outer.digest()[:_MAC_BYTES], mac):
                raise MacFailure("MAC does not verify", response_code=self._mac_failure_code())
        elif mac == _ZERO_MAC:
            authenticated = False
        else:
            raise FormatError(f"{message_type.__name__} is sent unauthenticated, with a zero MAC")
        if sequence != self._receive_sequence + 1:
            self._check_sequence(sequence)
        self._receive_sequence = sequence
        return message_type, row, authenticated, sequence

    def _adopt_terminal_id(self, raw: bytes) -> None:
        if self._terminal_id is not None:
            raise FormatError("terminal id differs from the one this session logged on with")
        text = raw.decode("ascii", errors="replace")
        if not is_terminal_id(text):
            raise FormatError("terminal id must be 8 characters 0-9 A-Z")
        self._terminal_id, self._terminal_id_bytes = text, raw

    def _mac_failure_code(self) -> ResponseCode:
        return ResponseCode.MAC_FAILURE

    def _check_sequence(self, sequence: int) -> None:
        if sequence != self._receive_sequence + 1:
            raise ReplayError(f"sequence {sequence} received, {self._receive_sequence + 1} expected")


# ---- server --------------------------------------------------------------------------------------


class ServerSession(_Session):
    """The gateway's end of one terminal connection (see the module docstring for how to drive it)."""

    __slots__ = ("_proven_key",)
    _side = SERVER
    _type_by_code = TERMINAL_TYPE_BY_CODE

    def __init__(self) -> None:
        super().__init__(ServerState.AWAITING_LOGON)
        self._proven_key = False

    @property
    def state(self) -> ServerState:
        return cast(ServerState, self._state)

    def _proven(self) -> bool:
        return self._proven_key

    def _mac_failure_code(self) -> ResponseCode:
        # A wrong proof means a wrong terminal key: the terminal is told it failed to authenticate.
        return ResponseCode.AUTH_FAILED if self._state is ServerState.AWAITING_PROOF else ResponseCode.MAC_FAILURE

    def receive_data(self, data: bytes) -> list[ServerEvent]:
        """Events of every whole frame received so far; raises ProtocolError (see the module doc)."""
        state = self._state
        if state is ServerState.FAILED or state is ServerState.CLOSED:
            return []
        try:
            return [self._receive_frame(frame) for frame in self._whole_frames(data)]
        except ProtocolError as error:
            if error.close_connection:
                self._state = ServerState.FAILED
                self._buffer.clear()
            else:
                self._fail_if_a_frame_follows()
            raise

    def _fail_if_a_frame_follows(self) -> None:
        """After a request refused without closing: a whole frame that came in the same read was
        pipelined, so the session fails with that frame's closing error (a StateError once its MAC
        and sequence pass), as a second request after an accepted one does; the refused request
        is not answered on its own."""
        following = None
        try:
            following = next(self._frames(b""), None)
            if following is not None:
                self._check_frame(following)
        except ProtocolError:
            self._state = ServerState.FAILED
            self._buffer.clear()
            raise
        assert following is None, "REJECTING receives nothing: _check_frame raised"

    def _receive_frame(self, frame: bytes) -> ServerEvent:
        global _bodies_decoded
        state_before = self._state
        message_type, row, authenticated, sequence = self._check_frame(frame)
        _bodies_decoded += 1
        try:
            message = TERMINAL_DECODER.decode(frame[_HEADER_BYTES:-_MAC_BYTES])
        except _DECODE_ERRORS as exc:
            # An authenticated, in-sequence request with a bad body leaves the session in step:
            # the server answers it with an ErrorReply and carries on.
            if state_before is ServerState.READY:
                self._state = ServerState.REJECTING
                raise FormatError(decode_failure(exc), close_connection=False) from None
            raise FormatError(decode_failure(exc)) from None
        if type(message) is not message_type:
            raise FormatError(f"header says {message_type.__name__}, body says {type(message).__name__}")
        terminal_id = self._terminal_id
        assert terminal_id is not None, "the header check adopted it"
        if row.message is _REQUEST:
            owned = _TRANSACTION_IDS.get(message_type)
            if owned is not None:
                for txid in owned(message):
                    if txid.terminal_id != terminal_id:
                        self._state = ServerState.REJECTING
                        raise NotPermitted(f"transaction {txid.as_key()} belongs to another terminal")
            self._state = row.next_state
            self._pending = message_type
            self._expected_reply = _REPLY_OF[message_type]
            return MessageReceived(message=message, sequence=sequence, authenticated=authenticated)
        self._state = row.next_state
        if isinstance(message, LogonRequest):
            self._terminal_nonce = message.terminal_nonce
            return LogonRequested(
                terminal_id=terminal_id,
                terminal_nonce=message.terminal_nonce,
                key_version=message.key_version,
                protocol_version=_VERSION,
                message=message,
            )
        assert isinstance(message, LogonProof), "the table admits no other non-request"
        self._proven_key = True
        return LoggedOn(terminal_id=terminal_id, message=message)

    def challenge(self, terminal_key: bytes, server_nonce: bytes) -> bytes:
        """Answer LogonRequested: derive the session keys from the terminal's key and send the nonce."""
        if not limits.terminal_key_bytes_min <= len(terminal_key) <= limits.terminal_key_bytes_max:
            raise LocalProtocolError(
                f"terminal key must be {limits.terminal_key_bytes_min}-{limits.terminal_key_bytes_max} bytes"
            )
        if len(server_nonce) != limits.nonce_bytes:
            raise LocalProtocolError(f"server nonce must be {limits.nonce_bytes} bytes")
        message = LogonChallenge(server_nonce=server_nonce)
        row = self._send_row(message)
        assert self._terminal_id is not None, "LOGON_REQUESTED is reached only through a logon request"
        keys = framing.derive_session_keys(terminal_key, self._terminal_id, self._terminal_nonce, server_nonce)
        frame = self._encode(message, row.auth)
        self._receive_key = framing.MacKey(keys.terminal_to_server)
        self._send_key = framing.MacKey(keys.server_to_terminal)
        self._state = row.next_state
        return frame

    def send(self, message: ServerMessage) -> bytes:
        """Frame bytes of `message`; raises LocalProtocolError (session unchanged) if the table forbids it."""
        message_type = type(message)
        row = self._send_rows[self._state].get(message_type)
        if (
            row is None
            or message_type is LogonChallenge
            or not self._terminal_id_bytes
            or (message_type in _REPLY_TYPES and message_type is not self._expected_reply)
        ):
            return self._send_unusual(message)
        frame = self._encode(message, row.auth)
        # The server never sends into SERVING: whatever was pending has been answered.
        self._state = row.next_state
        self._pending = self._expected_reply = None
        return frame

    def _send_unusual(self, message: ServerMessage) -> bytes:
        """Error frames, refusals of what the table forbids, and a reject with nobody to address."""
        if type(message) is LogonChallenge:
            raise LocalProtocolError("send the challenge with challenge(terminal_key, server_nonce)")
        row = self._send_row(message)
        if not self._terminal_id_bytes:
            # No frame ever named a terminal: there is nobody to address, so nothing to say.
            assert row.message is Kind.CLOSING_ERROR, "only a closing error is allowed before a logon request"
            self._state = row.next_state
            return b""
        frame = self._encode(message, row.auth)
        self._state = row.next_state
        self._pending = self._expected_reply = None
        return frame

    def reject(self, response_code: ResponseCode, detail: str = "") -> bytes:
        """A last ErrorReply with connection_closing; the session is CLOSED. b"" if nobody to address."""
        return self.send(ErrorReply(response_code=response_code, detail=_clean_detail(detail)))

    def send_error(self, error: ProtocolError) -> bytes:
        """The ErrorReply that answers `error` raised by receive_data: closing or not, as it says."""
        if error.close_connection or self._state is not ServerState.REJECTING:
            return self.reject(error.response_code, error.detail)
        reply = ErrorReply(
            response_code=error.response_code, detail=_clean_detail(error.detail), connection_closing=False
        )
        return self.send(reply)


def _clean_detail(detail: str) -> str:
    printable = "".join(char if char.isprintable() else "?" for char in detail)
    return printable[: limits.detail_chars_max]


# ---- terminal ------------------------------------------------------------------------------------


class TerminalSession(_Session):
    """A terminal's end of one connection: what a terminal vendor implements."""

    __slots__ = ("_terminal_key",)
    _side = TERMINAL
    _type_by_code = SERVER_TYPE_BY_CODE

    def __init__(self, terminal_id: str, terminal_key: bytes) -> None:
        if not is_terminal_id(terminal_id):
            raise LocalProtocolError("terminal id must be 8 characters 0-9 A-Z")
        if not limits.terminal_key_bytes_min <= len(terminal_key) <= limits.terminal_key_bytes_max:
            raise LocalProtocolError(
                f"terminal key must be {limits.terminal_key_bytes_min}-{limits.terminal_key_bytes_max} bytes"
            )
        super().__init__(TerminalState.IDLE)
        self._terminal_id = terminal_id
        self._terminal_id_bytes = terminal_id.encode("ascii")
        self._terminal_key = terminal_key

    @property
    def state(self) -> TerminalState:
        return cast(TerminalState, self._state)

    def send(self, message: TerminalMessage) -> bytes:
        """Frame bytes of `message`; raises LocalProtocolError (session unchanged) if the table forbids it."""
        row = self._send_rows[self._state].get(type(message))
        if row is None:
            row = self._send_row(message)  # raises: the table has no row for it
        frame = self._encode(message, row.auth)
        self._state = row.next_state
        if row.message is _REQUEST:
            request_type = type(message)
            self._pending = request_type
            self._expected_reply = _REPLY_OF[request_type]
        elif isinstance(message, LogonRequest):
            self._terminal_nonce = message.terminal_nonce
        return frame

    def receive_data(self, data: bytes) -> list[TerminalEvent]:
        """Events of every whole frame; raises ProtocolError, after which the terminal hangs up."""
        state = self._state
        if state is TerminalState.FAILED or state is TerminalState.CLOSED:
            return []
        try:
            return [self._receive_frame(frame) for frame in self._whole_frames(data)]
        except ProtocolError as error:
            error.close_connection = True  # a terminal that lost step reconnects and logs on again
            self._state = TerminalState.FAILED
            self._buffer.clear()
            raise

    def _receive_frame(self, frame: bytes) -> TerminalEvent:
        global _bodies_decoded
        message_type, row, authenticated, sequence = self._check_frame(frame)
        _bodies_decoded += 1
        try:
            message = SERVER_DECODER.decode(frame[_HEADER_BYTES:-_MAC_BYTES])
        except _DECODE_ERRORS as exc:
            raise FormatError(decode_failure(exc)) from None
        if type(message) is not message_type:
            raise FormatError(f"header says {message_type.__name__}, body says {type(message).__name__}")
        if row.message is not _REPLY:
            row = self._special_frame(message, row)
        elif message_type is not self._expected_reply:
            raise StateError(f"{message_type.__name__} does not answer the pending request")
        self._state = row.next_state
        # A terminal receives nothing that leaves it awaiting a reply: whatever was pending is answered.
        self._pending = self._expected_reply = None
        return MessageReceived(message=message, sequence=sequence, authenticated=authenticated)

    def _special_frame(self, message: ServerMessage, row: Transition) -> Transition:
        """Checks and side effects of the logon, logoff and error frames; returns the row to follow."""
        if isinstance(message, ErrorReply):
            # The row was found by class; now the body tells which kind of error frame this is.
            exact = lookup(TERMINAL, self._state, RECEIVE, message)
            if exact is None:
                raise StateError(f"this ErrorReply is not allowed in state {self._state.value}")
            return exact
        if isinstance(message, LogoffReply) and self._expected_reply is not LogoffReply:
            raise StateError("LogoffReply does not answer the pending request")
        if isinstance(message, LogonChallenge):
            assert self._terminal_id is not None
            keys = framing.derive_session_keys(
                self._terminal_key, self._terminal_id, self._terminal_nonce, message.server_nonce
            )
            self._send_key = framing.MacKey(keys.terminal_to_server)
            self._receive_key = framing.MacKey(keys.server_to_terminal)
        return row
