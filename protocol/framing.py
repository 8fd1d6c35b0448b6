"""Frames, MACs and session keys of wire protocol v1: bytes only, no state machine.

    offset size  field
    0      2     length      uint16 big-endian: bytes after this field (header rest + body + MAC)
    2      1     version     1
    3      1     type        message type code (protocol.messages)
    4      8     terminal    terminal id, 8 ASCII characters [0-9A-Z]
    12     4     sequence    uint32 big-endian, per session and direction, first frame 1
    16     n     body        MessagePack map of the message
    16+n   16    MAC         HMAC-SHA256(direction key, bytes 0 .. 16+n)[:16], or 16 zero bytes
                             in the few unauthenticated logon frames

Rules: the length is checked against `frame_bytes_max` as soon as its two bytes are in, before
anything else is buffered; a MAC is compared in constant time; no body byte is decoded before
the MAC has been verified. protocol.session applies these rules (and counts decoded bodies in
`bodies_decoded()`, so a test can prove the last one); this module holds the pieces.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Final, NamedTuple

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from protocol import limits
from protocol.errors import FormatError, FrameTooLarge

HEADER: Final = struct.Struct(">HBB8sI")
ZERO_MAC: Final = bytes(limits.mac_bytes)
KDF_INFO_PREFIX: Final = b"vendgate/1 session keys "
_SHA256_BLOCK_BYTES: Final = 64
_MAC_BYTES: Final = limits.mac_bytes

assert HEADER.size == limits.header_bytes


class MacKey:
    """HMAC-SHA256 (RFC 2104) with the key schedule done once, truncated to mac_bytes.

    Copying the two pre-keyed SHA-256 states costs about half of `hmac.digest`, which would
    redo the key padding for every frame; the output is the same (a test checks it).
    """

    __slots__ = ("inner_copy", "outer_copy")

    def __init__(self, key: bytes) -> None:
        if len(key) > _SHA256_BLOCK_BYTES:
            key = hashlib.sha256(key).digest()
        padded = key.ljust(_SHA256_BLOCK_BYTES, b"\x00")
        # Fresh copies of SHA-256 states that have absorbed key XOR ipad / key XOR opad.
        self.inner_copy = hashlib.sha256(bytes(byte ^ 0x36 for byte in padded)).copy
        self.outer_copy = hashlib.sha256(bytes(byte ^ 0x5C for byte in padded)).copy

    def mac(self, data: bytes | bytearray | memoryview) -> bytes:
        inner = self.inner_copy()
        inner.update(data)
        outer = self.outer_copy()
        outer.update(inner.digest())
        return outer.digest()[:_MAC_BYTES]


class SessionKeys(NamedTuple):
    terminal_to_server: bytes
    server_to_terminal: bytes


def derive_session_keys(
    terminal_key: bytes, terminal_id: str, terminal_nonce: bytes, server_nonce: bytes
) -> SessionKeys:
    """HKDF-SHA256: IKM terminal key, salt the two nonces, info the label and terminal id."""
    assert limits.terminal_key_bytes_min <= len(terminal_key) <= limits.terminal_key_bytes_max
    assert len(terminal_nonce) == limits.nonce_bytes and len(server_nonce) == limits.nonce_bytes
    okm = HKDF(
        algorithm=hashes.SHA256(),
        length=2 * limits.session_key_bytes,
        salt=terminal_nonce + server_nonce,
        info=KDF_INFO_PREFIX + terminal_id.encode("ascii"),
    ).derive(terminal_key)
    return SessionKeys(okm[: limits.session_key_bytes], okm[limits.session_key_bytes :])


def frame_length(prefix: bytes | bytearray) -> int:
    """Total frame size announced by a 2-byte length prefix, checked against the limits."""
    total = int.from_bytes(prefix[: limits.length_prefix_bytes], "big") + limits.length_prefix_bytes
    if total > limits.frame_bytes_max:
        raise FrameTooLarge(f"frame of {total} bytes announced, at most {limits.frame_bytes_max} allowed")
    if total < limits.frame_bytes_min:
        raise FormatError(f"frame of {total} bytes announced, at least {limits.frame_bytes_min} needed")
    return total
