"""Settings validation and the one redaction helper."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest

from gateway.errors import SettingsError
from gateway.jsonlog import configure_logging, get_logger, redact, redact_token, redact_url
from gateway.settings import load_settings


def test_defaults_are_safe() -> None:
    settings = load_settings(environ={})
    assert settings.database_url is None and settings.uses_embedded_database
    assert settings.pos_host == "127.0.0.1" and settings.kiosk_host == "127.0.0.1"


def test_environment_values_are_converted() -> None:
    settings = load_settings(environ={"VENDGATE_POS_PORT": "9000", "VENDGATE_LOG_LEVEL": "debug"})
    assert settings.pos_port == 9000 and settings.log_level == "debug"


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"VENDGATE_POS_PORT": "seventy"}, "VENDGATE_POS_PORT"),
        ({"VENDGATE_POS_PORT": "70000"}, "VENDGATE_POS_PORT"),
        ({"VENDGATE_LOG_LEVEL": "loud"}, "VENDGATE_LOG_LEVEL"),
        ({"VENDGATE_NO_SUCH_THING": "1"}, "unknown variable VENDGATE_NO_SUCH_THING"),
        # A wait is bounded: an infinite one would hang on a peer that never answers.
        ({"VENDGATE_DATABASE_CONNECT_TIMEOUT_S": "inf"}, "VENDGATE_DATABASE_CONNECT_TIMEOUT_S"),
        ({"VENDGATE_ENGINE_TIMEOUT_S": "nan"}, "VENDGATE_ENGINE_TIMEOUT_S"),
        ({"VENDGATE_ENGINE_TIMEOUT_S": "0"}, "VENDGATE_ENGINE_TIMEOUT_S"),
        ({"VENDGATE_DEPOSIT_APPROVAL_THRESHOLDS_MINOR": "KES"}, "VENDGATE_DEPOSIT_APPROVAL_THRESHOLDS_MINOR.*'KES'"),
        ({"VENDGATE_DEPOSIT_APPROVAL_THRESHOLDS_MINOR": "KES=1,KES=2"}, "KES is given twice"),
        ({"VENDGATE_DEPOSIT_APPROVAL_THRESHOLDS_MINOR": "KES=-1"}, "VENDGATE_DEPOSIT_APPROVAL_THRESHOLDS_MINOR"),
        ({"VENDGATE_DEPOSIT_APPROVAL_THRESHOLDS_MINOR": "kes=1"}, "VENDGATE_DEPOSIT_APPROVAL_THRESHOLDS_MINOR"),
        ({"VENDGATE_DEPOSIT_APPROVAL_THRESHOLDS_MINOR": "KES=lots"}, "VENDGATE_DEPOSIT_APPROVAL_THRESHOLDS_MINOR"),
        ({"VENDGATE_DEPOSIT_APPROVAL_THRESHOLDS_MINOR": "KES=1,KSE=2"},
         "VENDGATE_DEPOSIT_APPROVAL_THRESHOLDS_MINOR: KSE is no current ISO 4217 currency code"),
    ],
)
def test_bad_values_name_the_variable(environ: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings(environ=environ)


def test_toml_file_then_environment_wins(tmp_path: Path) -> None:
    config = tmp_path / "vendgate.toml"
    config.write_text('pos_port = 7001\nkiosk_port = 7002\n')
    settings = load_settings(environ={"VENDGATE_POS_PORT": "7003"}, config_file=config)
    assert (settings.pos_port, settings.kiosk_port) == (7003, 7002)


def test_approval_thresholds_per_currency_from_toml_and_environment(tmp_path: Path) -> None:
    config = tmp_path / "vendgate.toml"
    config.write_text("deposit_approval_threshold_minor = 500\n"
                      "[deposit_approval_thresholds_minor]\nUGX = 2000000\nKWD = 100000\n")
    from_file = load_settings(environ={}, config_file=config)
    assert [from_file.deposit_approval_threshold_for(c) for c in ("UGX", "KWD", "KES")] == [2_000_000, 100_000, 500]
    # The variable replaces the file's whole table (as any variable replaces its setting).
    from_env = load_settings(environ={"VENDGATE_DEPOSIT_APPROVAL_THRESHOLDS_MINOR": " UGX = 7 "}, config_file=config)
    assert [from_env.deposit_approval_threshold_for(c) for c in ("UGX", "KWD", "KES")] == [7, 500, 500]
    assert load_settings(environ={}).deposit_approval_threshold_for("UGX") == 0  # by default: every deposit waits


def test_an_empty_variable_is_not_set(tmp_path: Path) -> None:
    # Before, VENDGATE_DATABASE_URL= overrode the file's URL with none, and vendgate quietly ran
    # on the embedded database instead.
    config = tmp_path / "vendgate.toml"
    config.write_text('database_url = "postgresql://db.example/vendgate"\npos_port = 7001\n')
    settings = load_settings(environ={"VENDGATE_DATABASE_URL": "", "VENDGATE_POS_PORT": ""}, config_file=config)
    assert (settings.database_url, settings.pos_port) == ("postgresql://db.example/vendgate", 7001)
    assert load_settings(environ={"VENDGATE_POS_PORT": ""}).pos_port == load_settings(environ={}).pos_port


def test_toml_unknown_key_and_bad_syntax(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("pos_prot = 1\n")
    with pytest.raises(SettingsError, match="unknown setting 'pos_prot'"):
        load_settings(environ={}, config_file=config)
    config.write_text("pos_port = \n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(environ={}, config_file=config)


def test_redaction_of_secrets() -> None:
    assert redact("terminal_key", "00112233") == "[redacted]"
    assert redact("operator_password", "hunter2") == "[redacted]"
    assert redact("token", "1234 5678 9012 3456 7890") == "****************7890"
    assert redact_token("12") == "****"
    # Masked at the call site, then by the formatter: still the last 4 digits.
    assert redact("token", redact_token("12345678901234567890")) == "****************7890"
    assert redact("database", "postgresql://u:pw@h:5/db") == "postgresql://u:***@h:5/db"
    assert redact_url("postgresql://h/db") == "postgresql://h/db"
    assert redact("amount_minor", 500) == 500


def test_log_lines_are_json_with_secrets_redacted() -> None:
    stream = io.StringIO()
    configure_logging("info", stream)
    try:
        get_logger("vendgate.test").info("topped_up", terminal_id="T1", token="12345678901234567890",
                                         session_key=b"\x00" * 16, amount_minor=1500)
    finally:
        logging.getLogger().handlers.clear()
    line = json.loads(stream.getvalue())
    assert line["event"] == "topped_up" and line["level"] == "info"
    assert line["ts"].endswith("+00:00")
    assert line["token"] == "****************7890"
    assert line["session_key"] == "[redacted]"
    assert "12345678901234567890" not in stream.getvalue()
