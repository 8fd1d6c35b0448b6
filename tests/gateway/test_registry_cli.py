"""Registry commands as an operator runs them, against an external (test) PostgreSQL."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from gateway.keystore import KeyStore
from gateway.registry import terminal_key, terminal_key_record


def vendgate(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("VENDGATE_")}
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True,
                          env={**base, **env}, timeout=120, check=False)


@pytest.fixture
def env(db_url: str, tmp_path: Path) -> dict[str, str]:
    return {"VENDGATE_DATABASE_URL": db_url, "VENDGATE_MASTER_KEY": "11" * 32, "VENDGATE_DATA_DIR": str(tmp_path)}


async def test_agent_and_terminal_add_print_the_key_once_and_seal_it(env: dict[str, str], db_url: str) -> None:
    agent = vendgate(env, "agent", "add", "--name", "Corner Shop", "--kind", "shop", "--time-zone",
                     "Africa/Nairobi", "--commission-bp", "150")
    assert agent.returncode == 0, agent.stderr
    agent_id = agent.stdout.split()[1]
    added = vendgate(env, "terminal", "add", "--id", "P0000001", "--serial", "SN-P1", "--agent", agent_id)
    assert added.returncode == 0, added.stderr
    printed_key = bytes.fromhex(added.stdout.strip().splitlines()[-1])
    assert len(printed_key) == 16
    conn = await asyncpg.connect(db_url)
    try:
        sealed = bytes(await conn.fetchval("SELECT key_ciphertext FROM terminals WHERE terminal_id = 'P0000001'"))
        assert printed_key not in sealed  # encrypted at rest
        found = await terminal_key(conn, KeyStore(bytes.fromhex("11" * 32)), "P0000001")
        assert found == (printed_key, "active")
        assert KeyStore(bytes.fromhex("11" * 32)).open(sealed, terminal_key_record("P0000001", 1)) == printed_key
    finally:
        await conn.close()
    duplicate = vendgate(env, "terminal", "add", "--id", "P0000001", "--serial", "SN-P1", "--agent", agent_id)
    assert duplicate.returncode == 2 and "terminal P0000001 already registered" in duplicate.stderr
    same_device = vendgate(env, "terminal", "add", "--id", "P0000002", "--serial", "SN-P1", "--agent", agent_id)
    assert same_device.returncode == 2 and "serial SN-P1 belongs to a terminal in service" in same_device.stderr
    blocked = vendgate(env, "terminal", "block", "P0000001")
    assert blocked.returncode == 0 and "blocked" in blocked.stdout
    # Retirement is final: the device and its key are out of service.
    assert vendgate(env, "terminal", "retire", "P0000001").returncode == 0
    for action in ("unblock", "block"):
        again = vendgate(env, "terminal", action, "P0000001")
        assert again.returncode == 2 and "retirement is final" in again.stderr, again.stderr
    assert vendgate(env, "terminal", "retire", "P0000001").returncode == 0
    # The device put back into service: registered anew, its serial free once its old record retired.
    anew = vendgate(env, "terminal", "add", "--id", "P0000002", "--serial", "SN-P1", "--agent", agent_id)
    assert anew.returncode == 0, anew.stderr
    conn = await asyncpg.connect(db_url)
    try:
        assert await conn.fetchval("SELECT status FROM terminals WHERE terminal_id = 'P0000001'") == "retired"
    finally:
        await conn.close()


async def test_a_kiosk_is_registered_without_a_key_to_show(env: dict[str, str], db_url: str) -> None:
    """A kiosk proves itself with its client certificate alone: no key is printed, and the one its
    record must hold opens no POS logon."""
    agent = vendgate(env, "agent", "add", "--name", "Mall Hall", "--kind", "mobile_hall")
    assert agent.returncode == 0, agent.stderr
    added = vendgate(env, "terminal", "add", "--id", "K0000001", "--serial", "SN-K1", "--agent",
                     agent.stdout.split()[1], "--kind", "kiosk")
    assert added.returncode == 0, added.stderr
    assert added.stdout.strip().splitlines() == [
        "kiosk K0000001 registered; issue its client certificate with `vendgate kiosk cert K0000001`"]
    keystore = KeyStore(bytes.fromhex("11" * 32))
    conn = await asyncpg.connect(db_url)
    try:
        sealed = bytes(await conn.fetchval("SELECT key_ciphertext FROM terminals WHERE terminal_id = 'K0000001'"))
        assert keystore.open(sealed, terminal_key_record("K0000001", 1)).hex() not in added.stdout + added.stderr
        assert await terminal_key(conn, keystore, "K0000001") is None
    finally:
        await conn.close()


def test_bad_registry_input_gets_one_line(env: dict[str, str]) -> None:
    zone = vendgate(env, "agent", "add", "--name", "X", "--kind", "shop", "--time-zone", "Mars/Olympus")
    assert zone.returncode == 2
    assert zone.stderr.strip().splitlines() == [
        "vendgate: error: unknown time zone 'Mars/Olympus': an IANA name such as Africa/Nairobi"]
    bad_id = vendgate(env, "terminal", "add", "--id", "p-1", "--serial", "S", "--agent", "1")
    assert bad_id.returncode == 2 and "8 characters" in bad_id.stderr
    unknown = vendgate(env, "terminal", "block", "NOPE0000")
    assert unknown.returncode == 2 and "no terminal NOPE0000" in unknown.stderr


@pytest.mark.parametrize(("args", "said"), [
    (("--name", "N" * 201), "name is 1..200 characters"),
    (("--name", "   "), "not only spaces"),
    (("--name", "Shop", "--contact", "c" * 201), "contact is at most 200"),
    (("--name", "Shop", "--low-float-minor", "-1"), "low-float threshold is an amount"),
    (("--name", "Shop\nline 2"), "an agent's name holds the control character U+000A: one line of printable text"),
    (("--name", "Shop", "--contact", "a\u2028b"), "an agent's contact holds the control character U+2028"),
    (("--name", "Shop\udcff"), "an agent's name is not valid UTF-8 text"),
], ids=["name too long", "name of spaces", "contact too long", "negative low-float threshold", "name of two lines",
        "line separator", "not UTF-8"])
def test_an_agent_the_database_would_refuse_gets_one_line(env: dict[str, str], args: tuple[str, ...],
                                                          said: str) -> None:
    # Before, the database's CHECK refused these with a traceback and exit status 1.
    refused = vendgate(env, "agent", "add", "--kind", "shop", *args)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-600:]
    [line] = refused.stderr.strip().splitlines()
    assert line.startswith("vendgate: error: ") and said in line


@pytest.mark.parametrize("url", ["postgresql://vendgate:s3cr3t-pw@localhost:notaport/vendgate",
                                 "postgresql://vendgate:s3cr3t-pw@[::1/vendgate"], ids=["port", "IPv6 host"])
def test_a_malformed_database_url_is_one_line_without_its_password(tmp_path: Path, url: str) -> None:
    result = vendgate({"VENDGATE_DATABASE_URL": url, "VENDGATE_MASTER_KEY": "11" * 32,
                       "VENDGATE_DATA_DIR": str(tmp_path)}, "float", "pending")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-600:]
    assert result.stderr.strip().splitlines() == [
        "vendgate: error: the database URL is malformed (its host, port or parameters): see VENDGATE_DATABASE_URL"]
    assert "s3cr3t" not in result.stdout + result.stderr


def test_missing_master_key_is_a_clear_error(db_url: str, tmp_path: Path) -> None:
    env = {"VENDGATE_DATABASE_URL": db_url, "VENDGATE_DATA_DIR": str(tmp_path)}
    result = vendgate(env, "terminal", "add", "--id", "P0000009", "--serial", "SN-P9", "--agent", "1")
    assert result.returncode == 2
    assert "no master key" in result.stderr and "Traceback" not in result.stderr
    # The data folder's master.key is the demo's: no other command takes it unasked.
    (tmp_path / "master.key").write_text("55" * 32)
    for command in (("terminal", "add", "--id", "P0000009", "--serial", "SN-P9", "--agent", "1"),
                    ("seed", "--agents", "1", "--terminals", "1", "--meters", "1"), ("serve",)):
        refused = vendgate(env, *command)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert "no master key" in refused.stderr and str(tmp_path / "master.key") in refused.stderr
    named = vendgate({**env, "VENDGATE_MASTER_KEY_FILE": str(tmp_path / "master.key")}, "terminal", "add",
                     "--id", "P0000009", "--serial", "SN-P9", "--agent", "999999")
    assert named.returncode == 2 and "no master key" not in named.stderr, named.stderr
    bad = vendgate({**env, "VENDGATE_MASTER_KEY": "zz"}, "serve")
    assert bad.returncode == 2 and "VENDGATE_MASTER_KEY is not hex" in bad.stderr


def test_serve_on_a_port_in_use_says_so_in_one_line_and_exits(env: dict[str, str]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = vendgate({**env, "VENDGATE_POS_PORT": str(port), "VENDGATE_HTTP_PORT": "0"}, "serve")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("vendgate: error: cannot listen: ")
    assert str(port) in result.stderr and "Traceback" not in result.stderr
