"""100,000 random, bit-flipped, truncated and re-MACed frames: only the protocol's own errors come out.

Plain `random` with a fixed seed rather than hypothesis: the point is volume, and a failure
prints the seed-determined input so it can be replayed. Every frame goes to a fresh copy of a
session in a known state; a frame whose MAC fails must not have reached the body decoder.
"""

from __future__ import annotations

import copy
import random
from collections import Counter
from typing import TypeVar

from protocol import framing, limits, session
from protocol.codes import ResponseCode
from protocol.errors import MacFailure, ProtocolError
from protocol.messages import ErrorReply, LogonRequest
from protocol.session import ServerSession, TerminalSession, _Session
from tests.protocol.support import (
    REQUEST_REPLY_PAIRS,
    SERVER_NONCE,
    TERMINAL_ID,
    TERMINAL_KEY,
    TERMINAL_NONCE,
    TOP_UP_REQUEST,
    TOP_UP_RESULT,
    logged_on_pair,
)

FRAMES = 100_000
SEED = 20250301
S = TypeVar("S", bound=_Session)


def clone(original: S) -> S:
    twin = copy.copy(original)
    twin._buffer = bytearray(original._buffer)
    return twin


class Target:
    """A receiving session in a fixed state, the valid frames it accepts there, and its MAC key."""

    def __init__(self, name: str, session_: _Session, frames: list[bytes], mac_key: bytes | None) -> None:
        self.name, self.session, self.frames = name, session_, frames
        self.mac_key = framing.MacKey(mac_key) if mac_key is not None else None


def targets() -> list[Target]:
    keys = framing.derive_session_keys(TERMINAL_KEY, TERMINAL_ID, TERMINAL_NONCE, SERVER_NONCE)
    terminal, server = logged_on_pair()
    requests = [clone(terminal).send(request) for request, _ in REQUEST_REPLY_PAIRS]  # type: ignore[arg-type]
    awaiting = clone(terminal)
    serving = clone(server)
    serving.receive_data(awaiting.send(TOP_UP_REQUEST))
    replies = [
        clone(serving).send(TOP_UP_RESULT),
        clone(serving).send(ErrorReply(response_code=ResponseCode.SYSTEM_BUSY, connection_closing=False)),
        clone(serving).send(ErrorReply(response_code=ResponseCode.SYSTEM_ERROR, detail="gone")),
    ]
    logon = TerminalSession(TERMINAL_ID, TERMINAL_KEY).send(LogonRequest(terminal_nonce=TERMINAL_NONCE))
    return [
        Target("server ready", server, requests, keys.terminal_to_server),
        Target("terminal awaiting a top-up result", awaiting, replies, keys.server_to_terminal),
        Target("server awaiting logon", ServerSession(), [logon], None),
    ]


def random_bytes(rng: random.Random) -> bytes:
    size = rng.choice([0, 1, 2, 3, rng.randrange(4, 40), rng.randrange(40, 700)])
    data = rng.randbytes(size)
    if size >= 2 and rng.random() < 0.7:
        # Mostly a plausible length prefix, so the header and MAC checks are reached too.
        data = (size - 2).to_bytes(2, "big") + data[2:]
    return data


def bit_flipped(rng: random.Random, frame: bytes) -> bytes:
    data = bytearray(frame)
    for position in rng.sample(range(len(data) * 8), rng.randint(1, 4)):
        data[position // 8] ^= 1 << (position % 8)
    return bytes(data)


def remaced_garbage(rng: random.Random, frame: bytes, key: framing.MacKey | None) -> bytes:
    """A frame with a mangled body that still carries a valid MAC: only a key holder can send it."""
    header, body = frame[: limits.header_bytes], bytearray(frame[limits.header_bytes : -limits.mac_bytes])
    for _ in range(rng.randint(1, 6)):
        choice = rng.random()
        position = rng.randrange(len(body) + 1)
        if choice < 0.4 and body:
            body[min(position, len(body) - 1)] = rng.randrange(256)
        elif choice < 0.7:
            body[position:position] = rng.randbytes(rng.randint(1, 8))
        elif body:
            del body[position : position + rng.randint(1, 8)]
    if rng.random() < 0.2:
        body = bytearray(rng.randbytes(rng.randint(1, 200)))
    body = body or bytearray(b"\xc0")
    length = (limits.header_bytes - limits.length_prefix_bytes + len(body) + limits.mac_bytes).to_bytes(2, "big")
    signed = length + header[limits.length_prefix_bytes :] + bytes(body)
    return signed + (key.mac(signed) if key is not None else framing.ZERO_MAC)


def cut_or_joined(rng: random.Random, frame: bytes, frames: list[bytes]) -> bytes:
    choice = rng.random()
    if choice < 0.4:
        return frame[: rng.randrange(len(frame))]
    if choice < 0.7:
        return frame + rng.randbytes(rng.randint(1, 30))
    return frame + rng.choice(frames)


def test_random_and_damaged_frames_raise_only_protocol_errors() -> None:
    rng = random.Random(SEED)
    all_targets = targets()
    outcomes: Counter[str] = Counter()
    for index in range(FRAMES):
        target = all_targets[index % len(all_targets)]
        frame = rng.choice(target.frames)
        kind = rng.choice(["random", "bit flip", "re-MACed", "cut or joined"])
        if kind == "random":
            data = random_bytes(rng)
        elif kind == "bit flip":
            data = bit_flipped(rng, frame)
        elif kind == "re-MACed":
            data = remaced_garbage(rng, frame, target.mac_key)
        else:
            data = cut_or_joined(rng, frame, target.frames)
        receiver = clone(target.session)
        before = session.bodies_decoded()
        try:
            events = receiver.receive_data(data)  # type: ignore[attr-defined]
        except MacFailure:
            assert session.bodies_decoded() == before, f"body decoded after a MAC failure: {data.hex()}"
            outcomes["MacFailure"] += 1
        except ProtocolError as error:
            outcomes[type(error).__name__] += 1
            assert isinstance(error.response_code, ResponseCode)
        else:
            if kind == "bit flip" and target.mac_key is not None:
                # (A logon request carries no MAC: a changed nonce is only noticed at the proof.)
                assert events == [], f"a bit-flipped authenticated frame was accepted: {data.hex()}"
            outcomes["accepted" if events else "waiting"] += 1
    assert sum(outcomes.values()) == FRAMES
    # Every kind of outcome actually happened, so no branch was starved by the generator.
    for name in ["MacFailure", "FormatError", "FrameTooLarge", "UnsupportedVersion", "StateError", "waiting"]:
        assert outcomes[name] > 100, outcomes
    assert outcomes["accepted"] > 100, outcomes
