"""What a load run aims at: one JSON file that names a deployment and the credentials to drive it.

`VENDGATE_TARGET` names this file. `make loadtest` writes one for the local gateway it starts;
for a deployment of your own, write it by hand (docs/benchmarks.md shows the fields). Secrets
are never in the file itself, only the paths of files that hold them: the seed secret that POS
terminal keys derive from (`vendgate seed` keeps it in data_dir/seed.secret), kiosks' client
certificates and keys (`vendgate kiosk cert`), and the CA that signed the gateway's certificate.

Terminals are addressed by number: T0000001.. as `vendgate seed` creates them, so a user takes
`first_terminal + n` and derives its key from the seed secret.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

from gateway.seeding import derive_terminal_key, meter_number, terminal_id

TARGET_ENV = "VENDGATE_TARGET"


class KioskCredential(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    kiosk_id: str
    cert_file: str
    key_file: str


class Target(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    pos_port: int = 7700
    kiosk_port: int | None = None
    http_port: int | None = None  # /metrics and /readyz, when reachable
    seed_secret_file: str
    first_terminal: int = 1
    terminals: int
    first_meter: int = 1
    meters: int
    currency: str = "EUR"
    ca_file: str | None = None
    kiosks: list[KioskCredential] = []

    def terminal(self, index: int) -> tuple[str, bytes]:
        """Id and key of the index-th POS terminal (0-based) of this target."""
        if not 0 <= index < self.terminals:
            raise IndexError(f"the target has {self.terminals} POS terminals; index {index} is beyond them")
        tid = terminal_id(self.first_terminal + index)
        return tid, derive_terminal_key(self.seed_secret(), tid)

    def meter(self, index: int) -> str:
        return meter_number(self.first_meter + index % self.meters)

    def seed_secret(self) -> bytes:
        return bytes.fromhex(Path(self.seed_secret_file).read_text().strip())


def load_target(path: str | os.PathLike[str]) -> Target:
    try:
        return msgspec.json.decode(Path(path).read_bytes(), type=Target)
    except OSError as exc:
        raise SystemExit(f"cannot read the load-test target {path}: {exc.strerror}") from None
    except msgspec.ValidationError as exc:
        raise SystemExit(f"load-test target {path} is invalid: {exc}") from None


def save_target(path: str | os.PathLike[str], target: Target) -> None:
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_bytes(msgspec.json.format(msgspec.json.encode(target)))
