"""What an operator sees when a command cannot do what was asked: one line naming the problem
and how to fix it, exit status 2, never a traceback."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest

from gateway import registry
from gateway.seeding import DEMO_CURRENCY, meter_number
from tests.conftest import create_fresh_database
from tests.gateway.test_registry_cli import vendgate

MASTER_KEY = "11" * 32


@pytest.fixture
def env(db_url: str, tmp_path: Path) -> dict[str, str]:
    return {"VENDGATE_DATABASE_URL": db_url, "VENDGATE_MASTER_KEY": MASTER_KEY, "VENDGATE_DATA_DIR": str(tmp_path)}


def one_line(result: object, said: str) -> None:
    stderr = getattr(result, "stderr", "")
    assert getattr(result, "returncode", None) == 2, stderr
    assert "Traceback" not in stderr, stderr[-800:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("vendgate") and "error: " in last and said in last, stderr


@pytest.fixture
async def unmigrated_url(pg_server_url: str) -> str:
    """What a mistyped VENDGATE_DATABASE_URL or data folder gives a command: a database without vendgate's schema."""
    return await create_fresh_database(pg_server_url, "template0", "unmigrated")


@pytest.mark.parametrize("args", [
    ("agent", "add", "--name", "Corner Shop", "--kind", "shop"),
    ("terminal", "block", "P0000001"),
    ("float", "pending"),
    ("float", "balance", "--agent", "1"),
    ("kiosk", "revoke", "K0000001"),
], ids=lambda args: " ".join(args[:2]))
def test_a_database_without_vendgates_tables_says_run_migrate(unmigrated_url: str, tmp_path: Path,
                                                              args: tuple[str, ...]) -> None:
    # Before, each of these printed asyncpg's UndefinedTableError with its traceback, exit 1.
    env = {"VENDGATE_DATABASE_URL": unmigrated_url, "VENDGATE_MASTER_KEY": MASTER_KEY,
           "VENDGATE_DATA_DIR": str(tmp_path)}
    one_line(vendgate(env, *args), "run `vendgate migrate`")


def test_an_unknown_option_is_named_with_the_commands_usage_and_no_value_is_repeated(env: dict[str, str]) -> None:
    result = vendgate(env, "float", "deposit", "--agent", "1", "--amount-minor", "100", "--ref", "R-1",
                      "--opertor", "bob-the-checker")
    one_line(result, "unknown option --opertor; 1 value more than the command takes (not repeated here)")
    assert "usage: vendgate float deposit" in result.stderr
    assert "bob-the-checker" not in result.stderr  # a value may be part of a key typed in groups
    spelled = vendgate(env, "float", "pending", "--limit=5", "--oldest=3")
    one_line(spelled, "unknown option --oldest")
    assert "=3" not in spelled.stderr


@pytest.mark.parametrize(("args", "said"), [
    (("seed", "--agents", "0"), "argument --agents: 0 is not in 1..100000"),
    (("seed", "--terminals", "-3"), "argument --terminals: -3 is not in 1..1000000"),
    (("seed", "--float-minor", "0"), "argument --float-minor: 0 is not in 1..1000000000000000"),
    (("sim", "--terminals", "0"), "argument --terminals: 0 is not in 1..5000"),
    (("sim", "--duration", "nan"), "argument --duration: nan seconds is not more than 0"),
    (("sim", "--port", "99999"), "argument --port: 99999 is not in 1..65535"),
    (("demo", "--duration", "-1"), "argument --duration: -1 seconds"),
], ids=lambda value: " ".join(value) if isinstance(value, tuple) else "")
def test_counts_and_durations_out_of_range_are_one_line(env: dict[str, str], args: tuple[str, ...],
                                                         said: str) -> None:
    # Before: an AssertionError or ValueError traceback (seed, sim), or a seed that failed half-way.
    one_line(vendgate(env, *args), said)


async def test_a_seed_that_fails_half_way_leaves_nothing_behind(env: dict[str, str], db_url: str) -> None:
    conn = await asyncpg.connect(db_url)
    try:
        # The number the seed's second meter would get is taken: it fails after its agents, its
        # terminals and its first meter.
        meters = int(await conn.fetchval("SELECT count(*) FROM meters"))
        await registry.add_tariff(conn, tariff_code="TAKEN", valid_from=datetime(2020, 1, 1, tzinfo=UTC),
                                  currency=DEMO_CURRENCY, energy_price_minor_per_mwh=25_000, energy_vat_rate_bp=0,
                                  fee_per_purchase_minor=0, fee_vat_rate_bp=0)
        customer = await registry.add_customer(conn, account_number="AC-TAKEN", name="Taken", currency=DEMO_CURRENCY)
        await registry.add_meter(conn, meter_number=meter_number(meters + 2), customer_id=customer,
                                 supply_mode="smart", tariff_code="TAKEN")
        before = await conn.fetchrow("SELECT (SELECT count(*) FROM agents) AS agents, "
                                     "(SELECT count(*) FROM terminals) AS terminals, "
                                     "(SELECT count(*) FROM meters) AS meters, "
                                     "(SELECT count(*) FROM ledger_transfers) AS transfers")
        failed = vendgate(env, "seed", "--agents", "2", "--terminals", "2", "--meters", "3")
        one_line(failed, meter_number(meters + 2))
        after = await conn.fetchrow("SELECT (SELECT count(*) FROM agents) AS agents, "
                                    "(SELECT count(*) FROM terminals) AS terminals, "
                                    "(SELECT count(*) FROM meters) AS meters, "
                                    "(SELECT count(*) FROM ledger_transfers) AS transfers")
        assert dict(after) == dict(before)
    finally:
        await conn.close()


def registered_kiosk(env: dict[str, str], kiosk: str) -> None:
    agent = vendgate(env, "agent", "add", "--name", "Mall", "--kind", "mobile_hall")
    assert agent.returncode == 0, agent.stderr
    added = vendgate(env, "terminal", "add", "--id", kiosk, "--serial", f"SN-{kiosk}", "--agent",
                     agent.stdout.split()[1], "--kind", "kiosk")
    assert added.returncode == 0, added.stderr
    assert vendgate(env, "ca", "init").returncode == 0


def test_a_file_that_cannot_be_written_is_one_line_naming_it(env: dict[str, str], tmp_path: Path) -> None:
    registered_kiosk(env, "K0000077")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    one_line(vendgate(env, "kiosk", "cert", "K0000077", "--out", str(blocker / "certs")), str(blocker))


def test_kiosk_revoke_says_what_it_revoked_and_refuses_what_is_no_kiosk(env: dict[str, str],
                                                                         tmp_path: Path) -> None:
    registered_kiosk(env, "K0000078")
    issued = vendgate(env, "kiosk", "cert", "K0000078", "--out", str(tmp_path / "issued"))
    assert issued.returncode == 0, issued.stderr
    revoked = vendgate(env, "kiosk", "revoke", "K0000078")
    assert revoked.returncode == 0 and revoked.stdout.startswith("kiosk K0000078: revoked 1 certificate(s): ")
    again = vendgate(env, "kiosk", "revoke", "K0000078")
    assert again.returncode == 1 and "no certificate left to revoke" in again.stdout
    # Before: "revoked 0 certificate(s)", as for a kiosk whose certificates were all revoked.
    one_line(vendgate(env, "kiosk", "revoke", "ZZZZZZZZ"), "ZZZZZZZZ is not a registered kiosk terminal")


async def test_serve_without_a_ca_says_kiosks_are_not_served(env: dict[str, str], tmp_path: Path) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("VENDGATE_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        env={**base, **env, "VENDGATE_DATA_DIR": str(tmp_path / "no-ca"), "VENDGATE_POS_PORT": "0",
             "VENDGATE_HTTP_PORT": "0", "VENDGATE_KIOSK_PORT": "0"})
    assert process.stderr is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(30):
            while not any("gateway_started" in line for line in lines):
                line = (await process.stderr.readline()).decode()
                assert line, lines
                lines.append(line)
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 30)
    [warning] = [json.loads(line) for line in lines if "kiosk_listener_off" in line]
    assert warning["level"] == "warning" and "run `vendgate ca init`" in warning["reason"]
    assert process.returncode == 0


@pytest.mark.parametrize("currency", ["XYZ", "HRK", "XXX"], ids=["no such code", "withdrawn", "no currency"])
def test_an_agent_in_a_code_that_is_no_current_currency_is_refused(env: dict[str, str], currency: str) -> None:
    # An agent cannot be deleted: a typo would leave a float no tariff can ever meet.
    one_line(vendgate(env, "agent", "add", "--name", "Typo Shop", "--kind", "shop", "--currency", currency),
             f"currency must be a current ISO 4217 code like EUR, not {currency!r}")
    accepted = vendgate(env, "agent", "add", "--name", "Dar Shop", "--kind", "shop", "--currency", "TZS")
    assert accepted.returncode == 0 and "(TZS)" in accepted.stdout, accepted.stderr


@pytest.mark.parametrize("field", ["name", "address", "phone", "account_number"])
async def test_a_customer_field_of_two_lines_is_refused(db_url: str, field: str) -> None:
    conn = await asyncpg.connect(db_url)
    try:
        fields = {"account_number": f"AC-LINES-{field}", "name": "Amina", "address": "1 Grid St", "phone": "+2547"}
        fields[field] += "\r\nforged line"
        with pytest.raises(registry.RegistryError, match="holds the control character U\\+000D"):
            await registry.add_customer(conn, currency="EUR", **fields)  # type: ignore[arg-type]
        assert await conn.fetchval("SELECT count(*) FROM customers WHERE account_number LIKE 'AC-LINES-%'") == 0
    finally:
        await conn.close()
