"""Golden frames: a whole conversation with fixed keys and nonces, stored as hex under vectors/.

Another implementation checks itself against these files (vectors/README.md says how). This
test replays the conversation through the sessions and requires byte equality, and decodes each
stored frame on the receiving side. After a deliberate protocol change, regenerate them with

    .venv/bin/python -m tests.protocol.test_vectors --write
"""

from __future__ import annotations

import hmac
import json
import sys
from pathlib import Path

from protocol import framing, kiosk, limits
from protocol.codes import ResponseCode
from protocol.messages import (
    AnyMessage,
    ErrorReply,
    LogonChallenge,
    LogonRequest,
    ReprintRequest,
    TerminalMessage,
    TopUpRequest,
)
from protocol.session import LoggedOn, LogonRequested, MessageReceived, ServerSession, TerminalSession
from tests.protocol.support import (
    LOGON_ACCEPTED,
    LOGON_PROOF,
    REQUEST_REPLY_PAIRS,
    SERVER_NONCE,
    TERMINAL_ID,
    TERMINAL_KEY,
    TERMINAL_NONCE,
)

VECTORS = Path(__file__).parent / "vectors"


class Vector:
    def __init__(self, number: int, direction: str, message: AnyMessage, frame: bytes) -> None:
        self.number, self.direction, self.message, self.frame = number, direction, message, frame

    @property
    def name(self) -> str:
        return f"{self.number:02d}_{type(self.message).__struct_config__.tag}"


def conversation() -> list[Vector]:
    """Logon, a top-up, one exchange of every other request, a non-closing error, then logoff."""
    terminal, server = TerminalSession(TERMINAL_ID, TERMINAL_KEY), ServerSession()
    vectors: list[Vector] = []

    def to_server(message: TerminalMessage) -> None:
        frame = terminal.send(message)
        server.receive_data(frame)
        vectors.append(Vector(len(vectors) + 1, "terminal -> server", message, frame))

    def to_terminal(message: AnyMessage, frame: bytes) -> None:
        terminal.receive_data(frame)
        vectors.append(Vector(len(vectors) + 1, "server -> terminal", message, frame))

    to_server(LogonRequest(terminal_nonce=TERMINAL_NONCE))
    to_terminal(LogonChallenge(server_nonce=SERVER_NONCE), server.challenge(TERMINAL_KEY, SERVER_NONCE))
    to_server(LOGON_PROOF)
    to_terminal(LOGON_ACCEPTED, server.send(LOGON_ACCEPTED))
    # The top-up first, so the worked example in docs/protocol.md is frames 01-06 in a row.
    exchanges = [pair for pair in REQUEST_REPLY_PAIRS[:-1] if isinstance(pair[0], TopUpRequest)]
    exchanges += [pair for pair in REQUEST_REPLY_PAIRS[:-1] if not isinstance(pair[0], TopUpRequest)]
    for request, reply in exchanges:
        to_server(request)  # type: ignore[arg-type]
        to_terminal(reply, server.send(reply))  # type: ignore[arg-type]
    busy = ErrorReply(response_code=ResponseCode.SYSTEM_BUSY, detail="busy, retry", connection_closing=False)
    to_server(ReprintRequest(receipt_number="R-00000099"))
    to_terminal(busy, server.send(busy))
    request, reply = REQUEST_REPLY_PAIRS[-1]
    to_server(request)  # type: ignore[arg-type]
    to_terminal(reply, server.send(reply))  # type: ignore[arg-type]
    return vectors


def keys_text() -> str:
    keys = framing.derive_session_keys(TERMINAL_KEY, TERMINAL_ID, TERMINAL_NONCE, SERVER_NONCE)
    return (
        f"terminal_id: {TERMINAL_ID}\n"
        f"terminal_key: {TERMINAL_KEY.hex()}\n"
        f"terminal_nonce: {TERMINAL_NONCE.hex()}\n"
        f"server_nonce: {SERVER_NONCE.hex()}\n"
        f"terminal_to_server_key: {keys.terminal_to_server.hex()}\n"
        f"server_to_terminal_key: {keys.server_to_terminal.hex()}\n"
    )


def annotated_hex(vector: Vector) -> str:
    """The frame as commented hex: header fields, body 32 bytes a line, MAC."""
    frame = vector.frame
    header = framing.HEADER.unpack_from(frame)
    body = frame[limits.header_bytes : -limits.mac_bytes]
    mac = frame[-limits.mac_bytes :]
    mac_note = "zero MAC: unauthenticated" if mac == framing.ZERO_MAC else "HMAC-SHA256, first 16 bytes"
    lines = [
        f"# {vector.name}: {vector.direction}, sequence {header[4]}",
        "# length | version | type | terminal id | sequence",
        f"{frame[0:2].hex()} {frame[2:3].hex()} {frame[3:4].hex()} {frame[4:12].hex()} {frame[12:16].hex()}",
        f"# body: MessagePack, {len(body)} bytes",
        *(body[start : start + 32].hex() for start in range(0, len(body), 32)),
        f"# MAC ({mac_note})",
        mac.hex(),
    ]
    return "\n".join(lines) + "\n"


def parse_hex(text: str) -> bytes:
    """Hex with whitespace and `#` comments, as in vectors/*.hex and docs/protocol.md."""
    return bytes.fromhex("".join(line.split("#", 1)[0] for line in text.splitlines()).replace(" ", ""))


def message_json(message: AnyMessage) -> str:
    return json.dumps(json.loads(kiosk.encode_kiosk_message(message)), indent=2, ensure_ascii=False) + "\n"


def write() -> None:
    VECTORS.mkdir(exist_ok=True)
    for old in [*VECTORS.glob("*.hex"), *VECTORS.glob("*.json")]:
        old.unlink()
    (VECTORS / "keys.txt").write_text(keys_text())
    for vector in conversation():
        (VECTORS / f"{vector.name}.hex").write_text(annotated_hex(vector))
        (VECTORS / f"{vector.name}.json").write_text(message_json(vector.message))


def test_vector_files_match_the_sessions_byte_for_byte() -> None:
    assert (VECTORS / "keys.txt").read_text() == keys_text()
    vectors = conversation()
    assert sorted(path.stem for path in VECTORS.glob("*.hex")) == [vector.name for vector in vectors]
    for vector in vectors:
        assert parse_hex((VECTORS / f"{vector.name}.hex").read_text()) == vector.frame, vector.name
        assert (VECTORS / f"{vector.name}.hex").read_text() == annotated_hex(vector)
        assert json.loads((VECTORS / f"{vector.name}.json").read_text()) == json.loads(message_json(vector.message))


def test_stored_macs_verify_with_stdlib_hmac_and_the_stored_keys() -> None:
    keys = dict(line.split(": ", 1) for line in (VECTORS / "keys.txt").read_text().splitlines())
    sequences = {0: 0, 1: 0}
    for path in sorted(VECTORS.glob("*.hex")):
        frame = parse_hex(path.read_text())
        direction = frame[3] % 2  # 1: terminal to server
        sequences[direction] += 1
        assert int.from_bytes(frame[12:16], "big") == sequences[direction], path.name
        assert frame[4:12] == keys["terminal_id"].encode()
        signed, mac = frame[:-16], frame[-16:]
        if path.name.startswith(("01_", "02_")):
            assert mac == bytes(16)
            continue
        key = bytes.fromhex(keys["terminal_to_server_key" if direction else "server_to_terminal_key"])
        assert hmac.new(key, signed, "sha256").digest()[:16] == mac, path.name


def test_stored_frames_decode_on_the_receiving_side() -> None:
    """Drive both receiving ends from the files alone, as another implementation's frames would."""
    terminal, server = TerminalSession(TERMINAL_ID, TERMINAL_KEY), ServerSession()
    for path in sorted(VECTORS.glob("*.hex")):
        frame = parse_hex(path.read_text())
        expected = json.loads((path.with_suffix(".json")).read_text())
        if frame[3] % 2:  # odd type code: terminal to server
            [event] = server.receive_data(frame)
            if isinstance(event, LogonRequested):
                terminal.send(event.message)  # keep the terminal end in step
                server_message: AnyMessage = event.message
            elif isinstance(event, LoggedOn):
                terminal.send(event.message)
                server_message = event.message
            else:
                assert isinstance(event, MessageReceived)
                terminal.send(event.message)
                server_message = event.message
            assert json.loads(kiosk.encode_kiosk_message(server_message)) == expected, path.name
        else:
            [received] = terminal.receive_data(frame)
            if isinstance(received.message, LogonChallenge):
                server.challenge(TERMINAL_KEY, received.message.server_nonce)
            else:
                server.send(received.message)
            assert json.loads(kiosk.encode_kiosk_message(received.message)) == expected, path.name


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write()
        print(f"wrote {VECTORS}")
    else:
        print(__doc__)
