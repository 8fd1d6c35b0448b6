"""Settings: one frozen, typed object read from VENDGATE_* variables and an optional TOML file.

Precedence: environment variable > TOML file (VENDGATE_CONFIG or --config) > default. An
empty variable counts as not set.
Every default is safe: listeners bind to loopback, the database is the embedded one.
Unknown VENDGATE_* names are refused, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from float_ledger.currency import ISO_4217_CODES
from gateway.errors import SettingsError

Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
# A wait, in seconds: bounded (an infinite one would wait for ever on a peer that never answers).
TimeoutSeconds = Annotated[float, msgspec.Meta(gt=0, le=3600)]
CurrencyCode = Annotated[str, msgspec.Meta(pattern="^[A-Z]{3}$")]
AmountMinor = Annotated[int, msgspec.Meta(ge=0)]

ENV_PREFIX = "VENDGATE_"
# Variables read by tools around the server rather than by the server itself.
ENV_NOT_SETTINGS = frozenset({"VENDGATE_CONFIG", "VENDGATE_TARGET"})


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # Unset: the embedded PostgreSQL with its data under data_dir/pgdata.
    database_url: str | None = None
    data_dir: str = ".vendgate"
    # The embedded PostgreSQL's port from its next start on (kept for later starts); unset: the
    # port it was last given, else one chosen at its first start. Ignored with database_url.
    database_port: Annotated[int, msgspec.Meta(ge=1, le=65535)] | None = None
    database_name: str = "vendgate"
    database_connect_timeout_s: TimeoutSeconds = 10.0
    database_pool_size_max: Annotated[int, msgspec.Meta(ge=1, le=200)] = 20
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    pos_host: str = "127.0.0.1"
    pos_port: Port = 7700
    kiosk_host: str = "127.0.0.1"
    kiosk_port: Port = 7443
    http_host: str = "127.0.0.1"
    http_port: Port = 7780
    # The prepayment engine's event endpoint; unset: events wait in the outbox.
    engine_url: str | None = None
    engine_timeout_s: TimeoutSeconds = 5.0
    # A float deposit above this many minor units waits for a second operator (`vendgate float
    # approve`); 0: every deposit does. A currency named in deposit_approval_thresholds_minor has
    # its own (a minor unit of UGX is worth about a three-thousandth of a KWD's: one figure cannot
    # suit both); every other currency has deposit_approval_threshold_minor.
    deposit_approval_threshold_minor: AmountMinor = 0
    # In TOML a table (KES = 5000000); in the environment "KES=5000000,UGX=200000".
    deposit_approval_thresholds_minor: dict[CurrencyCode, AmountMinor] = {}
    # Hex of a 32-byte key that encrypts terminal and vending keys at rest.
    master_key: str | None = None
    master_key_file: str | None = None

    def deposit_approval_threshold_for(self, currency: str) -> int:
        """The amount above which a deposit in `currency` waits for a second operator."""
        return self.deposit_approval_thresholds_minor.get(currency, self.deposit_approval_threshold_minor)

    @property
    def pgdata_dir(self) -> Path:
        return Path(self.data_dir) / "pgdata"

    @property
    def uses_embedded_database(self) -> bool:
        return self.database_url is None


_FIELDS = frozenset(Settings.__struct_fields__)
# Settings that are tables: in the environment, "KEY=value" pairs separated by commas.
_TABLE_FIELDS = frozenset({"deposit_approval_thresholds_minor"})


def load_settings(
    environ: Mapping[str, str] | None = None, config_file: str | os.PathLike[str] | None = None
) -> Settings:
    """Build Settings, raising SettingsError with the offending variable named."""
    env = os.environ if environ is None else environ
    values: dict[str, object] = {}
    source: dict[str, str] = {}

    config_path = config_file or env.get("VENDGATE_CONFIG")
    if config_path:
        try:
            with open(config_path, "rb") as handle:
                table = tomllib.load(handle)
        except OSError as exc:
            raise SettingsError(f"cannot read config file {config_path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"config file {config_path} is not valid TOML: {exc}") from None
        for key, value in table.items():
            if key not in _FIELDS:
                raise SettingsError(f"config file {config_path}: unknown setting {key!r}")
            values[key] = value
            source[key] = f"{config_path}:{key}"

    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name in ENV_NOT_SETTINGS:
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key not in _FIELDS:
            raise SettingsError(f"unknown variable {name}")
        if raw == "":
            continue  # an empty variable is not set: the file's value or the default stands
        values[key] = _table_from_pairs(name, raw) if key in _TABLE_FIELDS else raw
        source[key] = name

    try:
        settings = msgspec.convert(values, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise SettingsError(_describe(exc, source)) from None
    # A mistyped code (KSE) would never match a float's currency: its threshold would silently not apply.
    if unknown := sorted(set(settings.deposit_approval_thresholds_minor) - ISO_4217_CODES):
        where = source.get("deposit_approval_thresholds_minor", "deposit_approval_thresholds_minor")
        raise SettingsError(f"invalid value for {where}: {', '.join(unknown)} is no current ISO 4217 currency code")
    return settings


def _table_from_pairs(name: str, raw: str) -> dict[str, str]:
    """KES=5000000,UGX=200000 as a table; its values are converted with the others."""
    table: dict[str, str] = {}
    for pair in raw.split(","):
        key, equals, value = (part.strip() for part in pair.partition("="))
        if not equals or not key or not value:
            raise SettingsError(f"invalid value for {name}: expected KEY=value pairs separated by commas, "
                                f"got {pair.strip()!r}")
        if key in table:
            raise SettingsError(f"invalid value for {name}: {key} is given twice")
        table[key] = value
    return table


def _describe(exc: msgspec.ValidationError, source: Mapping[str, str]) -> str:
    message = str(exc)
    # "<reason> - at `$.<setting>...`", or for a table's key "<reason> - at `key` in `$.<setting>`"
    reason, marker, where_text = message.partition(" - at `")
    if marker and "$." in where_text:
        key = where_text.partition("$.")[2].rstrip("`").split("[")[0].split(".")[0]
        where = source.get(key, ENV_PREFIX + key.upper())
        in_key = " (in a key)" if where_text.startswith("key`") else ""
        return f"invalid value for {where}{in_key}: {reason}"
    return f"invalid settings: {message}"
