"""Locust drives POS terminals and kiosks through the locustfile and reports requests and failures."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import msgspec
import pytest

from loadtests import run_locust
from loadtests.rules import failure_reason, first_sequence
from loadtests.target import TARGET_ENV, load_target, save_target
from protocol.codes import ResponseCode
from protocol.messages import ErrorReply, FloatInquiryResult, LookupResult
from tests.loadtests.conftest import Served

REPO = Path(__file__).resolve().parent.parent.parent


async def locust(served: Served, target_file: Path, reports: Path, *, pos: int, kiosk: int, seconds: int) -> int:
    args = run_locust.parse_args(["--pos-users", str(pos), "--kiosk-users", str(kiosk), "--duration-s", str(seconds),
                                  "--spawn-rate", "20", "--reports-dir", str(reports)])
    env = {**os.environ, TARGET_ENV: str(target_file)}
    # A subprocess, awaited: the gateway serves from this event loop meanwhile.
    process = await asyncio.create_subprocess_exec(*run_locust.locust_command(args, reports), env=env, cwd=REPO,
                                                   stdout=asyncio.subprocess.DEVNULL,
                                                   stderr=asyncio.subprocess.PIPE)
    _, stderr = await asyncio.wait_for(process.communicate(), seconds + 60)
    assert process.returncode is not None
    if process.returncode != 0:
        sys.stderr.write(stderr.decode()[-3000:])
    return process.returncode


@pytest.mark.timeout(90)
async def test_pos_and_kiosk_users_pay_without_failures(served: Served, tmp_path: Path) -> None:
    assert await locust(served, served.target_file, tmp_path, pos=3, kiosk=2, seconds=4) == 0
    stats = run_locust.read_stats(tmp_path)
    assert stats["total"]["failures"] == 0 and stats["failures"] == [], stats["failures"]
    for name in ("POS logon", "POS lookup", "POS top_up", "POST kiosk lookup", "POST kiosk top_up"):
        assert stats["requests"][name]["requests"] >= 1, name
    assert stats["requests"]["POS logon"]["requests"] == 3
    assert (tmp_path / "loadtest.html").stat().st_size > 1_000


@pytest.mark.timeout(90)
async def test_a_wrong_seed_secret_fails_the_run_with_its_reason(served: Served, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "wrong.secret"
    secret.write_text(bytes(32).hex())
    target = msgspec.structs.replace(served.target, seed_secret_file=str(secret), kiosks=[])
    target_file = tmp_path / "target.json"
    save_target(target_file, target)
    monkeypatch.setenv(TARGET_ENV, str(target_file))
    reports = tmp_path / "reports"
    code = await asyncio.to_thread(run_locust.main, ["--pos-users", "2", "--kiosk-users", "0", "--duration-s", "2",
                                                     "--reports-dir", str(reports)])
    assert code == 1
    stats = run_locust.read_stats(reports)
    assert stats["total"]["failures"] >= 2
    assert any("AUTH_FAILED" in failure["error"] for failure in stats["failures"])


def test_target_file_round_trip_and_bounds(tmp_path: Path, served: Served) -> None:
    path = tmp_path / "t.json"
    save_target(path, served.target)
    again = load_target(path)
    assert again == served.target
    assert again.terminal(0)[0] == "T0000001" and again.terminal(7)[0] == "T0000008"
    with pytest.raises(IndexError):
        again.terminal(8)
    assert again.meter(0) == again.meter(again.meters)  # meters wrap around
    path.write_text(json.dumps({"host": "127.0.0.1"}))
    with pytest.raises(SystemExit, match="invalid"):
        load_target(path)
    with pytest.raises(SystemExit, match="cannot read"):
        load_target(tmp_path / "missing.json")


def test_failure_reason_names_the_response_code() -> None:
    assert failure_reason(FloatInquiryResult(response_code=ResponseCode.APPROVED, currency="EUR")) is None
    assert failure_reason(LookupResult(response_code=ResponseCode.UNKNOWN_METER)) == "UNKNOWN_METER"
    assert failure_reason(ErrorReply(response_code=ResponseCode.SYSTEM_BUSY, detail="busy")) == "SYSTEM_BUSY: busy"


def test_first_sequence_grows_with_the_time_of_day() -> None:
    from datetime import UTC, datetime

    assert first_sequence(datetime(2025, 1, 1, 0, 0, 0, tzinfo=UTC)) == 0
    late = first_sequence(datetime(2025, 1, 1, 23, 59, 59, tzinfo=UTC))
    assert first_sequence(datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)) < late <= 999_999 - 100_000
