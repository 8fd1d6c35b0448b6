"""Secrets at rest: terminal keys, vending keys and issued tokens, sealed under the master key.

AES-256-GCM with a fresh 96-bit nonce per seal; the record's identity (for example
"terminal:T0001:v1") is the associated data, so a ciphertext copied onto another row fails to
open. The master key comes from VENDGATE_MASTER_KEY (64 hex digits) or VENDGATE_MASTER_KEY_FILE.
Only `vendgate demo` takes one from its data folder unasked (data_dir/master.key), and only it
creates one there (mode 0600): every other command refuses to run without one configured, so a
key lying beside the database seals no operator's terminal keys. Nothing here logs a key.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.errors import VendgateError
from gateway.settings import Settings

master_key_bytes = 32
nonce_bytes = 12
_VERSION = b"\x01"


class KeyStoreError(VendgateError):
    pass


class KeyStore:
    __slots__ = ("_aead",)

    def __init__(self, master_key: bytes) -> None:
        if len(master_key) != master_key_bytes:
            raise KeyStoreError(f"the master key must be {master_key_bytes} bytes ({2 * master_key_bytes} hex digits)")
        self._aead = AESGCM(master_key)

    def seal(self, secret: bytes, record: str) -> bytes:
        nonce = secrets.token_bytes(nonce_bytes)
        return _VERSION + nonce + self._aead.encrypt(nonce, secret, record.encode())

    def open(self, sealed: bytes, record: str) -> bytes:
        if len(sealed) < 1 + nonce_bytes + 16 or sealed[:1] != _VERSION:
            raise KeyStoreError(f"sealed secret for {record} is malformed")
        nonce = sealed[1 : 1 + nonce_bytes]
        try:
            return self._aead.decrypt(nonce, sealed[1 + nonce_bytes :], record.encode())
        except InvalidTag:
            raise KeyStoreError(f"sealed secret for {record} does not open under this master key") from None


def _parse_hex(text: str, source: str) -> bytes:
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise KeyStoreError(f"{source} is not hex") from None
    if len(key) != master_key_bytes:
        raise KeyStoreError(f"{source} must be {2 * master_key_bytes} hex digits")
    return key


def demo_master_key_path(settings: Settings) -> Path:
    return Path(settings.data_dir) / "master.key"


def load_keystore(settings: Settings, *, demo: bool = False) -> KeyStore:
    """The KeyStore for these settings; a missing master key is a clear error outside the demo,
    which alone uses (and creates, when missing) data_dir/master.key."""
    if settings.master_key:
        return KeyStore(_parse_hex(settings.master_key, "VENDGATE_MASTER_KEY"))
    if settings.master_key_file:
        path = Path(settings.master_key_file)
        if not path.exists():
            raise KeyStoreError(f"master key file {path} does not exist")
        return KeyStore(_parse_hex(path.read_text(), f"master key file {path}"))
    path = demo_master_key_path(settings)
    if not demo:
        found = (f" (`vendgate demo` alone uses {path}; name it in VENDGATE_MASTER_KEY_FILE to use it here)"
                 if path.exists() else " (`vendgate demo` creates one for the demo data folder)")
        raise KeyStoreError(
            "no master key: set VENDGATE_MASTER_KEY (64 hex digits) or VENDGATE_MASTER_KEY_FILE" + found)
    if path.exists():
        return KeyStore(_parse_hex(path.read_text(), f"master key file {path}"))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(master_key_bytes))
    return KeyStore(bytes.fromhex(path.read_text()))
