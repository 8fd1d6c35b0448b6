"""The `vendgate` command as an operator meets it: clear one-line errors, the embedded cluster."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from gateway.seeding import meter_number, terminal_id


def vendgate(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("VENDGATE_")}
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True,
                          env={**base, **(env or {})}, timeout=timeout, check=False)


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"VENDGATE_POS_PORT": "abc"}, "VENDGATE_POS_PORT"),
        ({"VENDGATE_LOG_LEVEL": "chatty"}, "VENDGATE_LOG_LEVEL"),
        ({"VENDGATE_DATABASE_URL": "postgresql://nobody:secret-pw@127.0.0.1:1/none",
          "VENDGATE_DATABASE_CONNECT_TIMEOUT_S": "3"}, "cannot reach database at 127.0.0.1:1"),
    ],
)
def test_bad_settings_give_one_line_and_nonzero_exit(env: dict[str, str], needle: str) -> None:
    result = vendgate("migrate", env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("vendgate: error:") and needle in lines[0]
    assert "Traceback" not in result.stderr and "secret-pw" not in result.stderr


def test_embedded_cluster_lifecycle(tmp_path: Path) -> None:
    env = {"VENDGATE_DATA_DIR": str(tmp_path / "data")}
    try:
        assert vendgate("db", "status", env=env).returncode == 3
        started = vendgate("db", "start", env=env)
        assert started.returncode == 0, started.stderr
        assert "started PostgreSQL 18" in started.stdout or "started PostgreSQL" in started.stdout
        status = vendgate("db", "status", env=env)
        assert status.returncode == 0 and status.stdout.startswith("running:")
        first = vendgate("migrate", env=env)
        assert first.returncode == 0, first.stderr
        assert "applied 0001_base" in first.stdout
        again = vendgate("migrate", env=env)
        assert again.stdout.strip() == "schema up to date"
        seeded = vendgate("seed", "--agents", "1", "--terminals", "2", "--meters", "4",
                          env={**env, "VENDGATE_MASTER_KEY": "44" * 32})
        assert seeded.returncode == 0, seeded.stderr
        assert seeded.stdout.splitlines()[1:4] == [
            f"terminals {terminal_id(1)}..{terminal_id(2)}",
            f"meters {meter_number(1)}..{meter_number(4)} (a Luhn check digit ends each), accounts "
            "AC00000001..AC00000004",
            f"STS token meters: one in 3, the first {meter_number(3)}"]
        more = vendgate("seed", "--agents", "1", "--terminals", "1", "--meters", "1",
                        env={**env, "VENDGATE_MASTER_KEY": "44" * 32})
        assert more.stdout.splitlines()[1:4] == [
            f"terminals {terminal_id(3)}..{terminal_id(3)}",
            f"meters {meter_number(5)}..{meter_number(5)} (a Luhn check digit ends each), accounts "
            "AC00000005..AC00000005",
            "STS token meters: one in 3, none among these"]
        url = vendgate("db", "url", env=env)
        assert url.stdout.startswith("postgresql://vendgate:***@127.0.0.1:")
    finally:
        stopped = vendgate("db", "stop", env=env)
    assert stopped.returncode == 0 and stopped.stdout.strip() == "stopped"
    assert vendgate("db", "status", env=env).returncode == 3


@pytest.mark.timeout(180)
def test_demo_runs_the_whole_job_and_stops_cleanly(tmp_path: Path) -> None:
    env = {"VENDGATE_DATA_DIR": str(tmp_path / "demo")}
    result = vendgate("demo", "--duration", "3", "--link", "lan", env=env, timeout=170)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "migrations: 0001_base" in out and "seeded: 5 agents, 40 terminals, 300 meters" in out
    assert "protocol errors 0, inconsistencies 0" in out
    assert "ledger check:" in out and out.rstrip().endswith("database: stopped")
    assert ": holds" in out
    approved = int(out.split("sim: approved ")[1].split(",")[0])
    assert approved > 0
    # Kiosks paid over HTTPS with their client certificates, and every retry was answered the same.
    assert "kiosks https://127.0.0.1:" in out
    kiosks = out.split("kiosks: approved ")[1].splitlines()[0]
    assert int(kiosks.split(",")[0]) > 0 and kiosks.endswith("inconsistencies 0"), kiosks
    assert vendgate("db", "status", env=env).returncode == 3  # nothing left running
    # A second run reuses the data folder: its CA, kiosks and their certificates.
    again = vendgate("demo", "--duration", "2", "--link", "lan", env=env, timeout=170)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "seeded:" not in again.stdout and "migrations: schema up to date" in again.stdout
    assert int(again.stdout.split("kiosks: approved ")[1].split(",")[0]) > 0


def get(port: int, path: str) -> tuple[int, str]:
    """Status and body of a GET on the ops listener; (0, reason) when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


def wait_for_status(port: int, path: str, wanted: int, *, within_s: float) -> tuple[int, str]:
    deadline = time.monotonic() + within_s
    while True:
        answer = get(port, path)
        if answer[0] == wanted or time.monotonic() > deadline:
            return answer
        time.sleep(0.2)


@pytest.mark.timeout(180)
def test_a_served_gateway_is_ready_again_after_the_embedded_database_restarts(tmp_path: Path) -> None:
    # `vendgate serve` resolves the database's URL once, at its start; the embedded cluster keeps
    # its port across `db stop` / `db start`, so the gateway's pool reconnects to it.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        http_port = probe.getsockname()[1]
    env = {"VENDGATE_DATA_DIR": str(tmp_path / "data"), "VENDGATE_MASTER_KEY": "22" * 32,
           "VENDGATE_POS_PORT": "0", "VENDGATE_HTTP_PORT": str(http_port), "VENDGATE_LOG_LEVEL": "warning"}
    try:
        started = vendgate("db", "start", env=env)
        assert started.returncode == 0, started.stderr
        assert vendgate("migrate", env=env).returncode == 0
        url = vendgate("db", "url", "--show-password", env=env).stdout.strip()
        base = {k: v for k, v in os.environ.items() if not k.startswith("VENDGATE_")}
        log = tmp_path / "serve.log"
        with log.open("w") as log_file:
            server = subprocess.Popen([sys.executable, "-m", "gateway", "serve"], env={**base, **env},
                                      stdout=log_file, stderr=subprocess.STDOUT)
        try:
            assert wait_for_status(http_port, "/readyz", 200, within_s=30)[0] == 200, log.read_text()[-2000:]
            assert vendgate("db", "stop", env=env).stdout.strip() == "stopped"
            assert wait_for_status(http_port, "/readyz", 503, within_s=10)[0] == 503
            restarted = vendgate("db", "start", env=env)
            assert restarted.returncode == 0, restarted.stderr
            status, body = wait_for_status(http_port, "/readyz", 200, within_s=20)
            assert status == 200 and '"ready"' in body, (status, body)
            assert vendgate("db", "url", "--show-password", env=env).stdout.strip() == url
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=40)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        assert server.returncode == 0, log.read_text()[-2000:]
    finally:
        vendgate("db", "stop", env=env)


def test_only_the_demo_makes_a_master_key(tmp_path: Path) -> None:
    # A master key written beside the database, and picked up from there by every later command,
    # would seal terminal keys under a key that is no secret from whoever reads the data folder.
    data = tmp_path / "data"
    env = {"VENDGATE_DATA_DIR": str(data)}
    try:
        assert vendgate("migrate", env=env).returncode == 0
        seeded = vendgate("seed", "--agents", "1", "--terminals", "1", "--meters", "1", env=env)
        assert seeded.returncode == 2, seeded.stdout + seeded.stderr
        [line] = seeded.stderr.strip().splitlines()
        assert line.startswith("vendgate: error: no master key: set VENDGATE_MASTER_KEY"), line
        assert not (data / "master.key").exists()
        added = vendgate("terminal", "add", "--id", "P0000001", "--serial", "SN-1", "--agent", "1", env=env)
        assert added.returncode == 2 and "no master key" in added.stderr, added.stdout + added.stderr
        # A key file in the data folder (the demo's, or one an earlier vendgate's `seed` wrote)
        # is used only when named.
        (data / "master.key").write_text("33" * 32)
        for command in (["terminal", "add", "--id", "P0000001", "--serial", "SN-1", "--agent", "1"], ["serve"]):
            refused = vendgate(*command, env=env)
            assert refused.returncode == 2, refused.stdout + refused.stderr
            [line] = refused.stderr.strip().splitlines()
            assert "no master key" in line and "VENDGATE_MASTER_KEY_FILE" in line, line
            assert str(data / "master.key") in line, line
    finally:
        vendgate("db", "stop", env=env)
