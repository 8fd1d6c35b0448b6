"""`vendgate sts credit|decode` as an operator meets it: the token on stdout, one line per error."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from protocol import sts
from terminal_sim.meter import Meter

CTSA01 = ["--vending-key", "abababababababab", "--pan", "600727000000000009", "--sgc", "123456", "--ti", "01",
          "--krn", "1", "--kt", "2"]
CTSA01_DECODER_KEY = "e653341f9d5bf36f"


def vendgate(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VENDGATE_")}
    return subprocess.run([sys.executable, "-m", "gateway", "sts", *args], capture_output=True, text=True, env=env,
                          input=stdin, timeout=60, check=False)


def test_credit_prints_the_conformance_token() -> None:
    # STS 531-1-0-02 CTSA01 step1, as published by NectarAPI/tokens-service (see test_sts_conformance.py).
    result = vendgate("credit", *CTSA01, "--units", "1", "--issued", "2004-03-01T13:55:00Z", "--base-year", "1993",
                      "--random", "5")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "23716100501183194197\n" and result.stderr == ""


def test_credit_with_a_dkga04_key_and_base_date_2014() -> None:
    # CTSA25 step5 (NectarAPI/tokens-service STSComplianceTests_STS_531_1_0_02_CTSA25.java).
    result = vendgate("credit", "--vending-key", "abababababababab949494949494949401234567", "--dkga", "04",
                      "--pan", "600727000000000009", "--sgc", "123457", "--ti", "01", "--krn", "4", "--kt", "2",
                      "--units", "1", "--issued", "2014-01-01T08:00:00+00:00", "--base-year", "2014", "--random", "5")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "20324881626382980759"


def test_credit_now_loads_on_the_meter_and_notes_rounding() -> None:
    result = vendgate("credit", *CTSA01, "--units", "20001")
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "note: --units 20001 rounded up to 20004, the next amount a token can carry"
    meter = Meter(bytes.fromhex(CTSA01_DECODER_KEY))
    response = meter.enter(result.stdout.strip())
    assert response.accepted and response.units_credited == 20_004


def test_decode_prints_the_fields() -> None:
    result = vendgate("decode", "--decoder-key", CTSA01_DECODER_KEY, "--base-year", "1993", "2371 6100 5011 8319 4197")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "class: 0 (credit)",
        "subclass: 0 (electricity)",
        "random: 5",
        "token id: 5871715 (issued 2004-03-01T13:55:00+00:00 on base date 1993)",
        "amount field: 0x0001",
        "units: 1 (0.1 kWh)",
        "crc: ok",
    ]


def test_decode_of_a_management_token() -> None:
    # CTSA12 step9: maximum power limit 18201624 W.
    result = vendgate("decode", "--decoder-key", CTSA01_DECODER_KEY, "--base-year", "1993", "64902502692705103624")
    assert result.returncode == 0
    assert "subclass: 0 (set maximum power limit)" in result.stdout
    assert "maximum power limit: 18201624 W" in result.stdout


def test_decode_with_the_wrong_key_says_the_crc_failed() -> None:
    result = vendgate("decode", "--decoder-key", "0abc12def3456789", "23716100501183194197")
    assert result.returncode == 1
    assert result.stdout.splitlines()[-1].startswith("crc: FAILED")


@pytest.mark.parametrize(("args", "needle"), [
    (("decode", "--decoder-key", CTSA01_DECODER_KEY, "2371610050118319419"), "20 digits, not 19"),
    (("decode", "--decoder-key", CTSA01_DECODER_KEY, "2371610050118319419x"), "digits only"),
    (("decode", "--decoder-key", "e653341f9d5bf3", "23716100501183194197"), "decoder key has 8 bytes"),
    (("decode", "--decoder-key", "zz53341f9d5bf36f", "23716100501183194197"), "--decoder-key must be hex"),
    (("credit", *CTSA01, "--units", "18201625"), "units must be between 1 and 18201624"),
    (("credit", *CTSA01, "--units", "0"), "units must be between 1 and 18201624"),
    (("credit", *CTSA01, "--units", "2.5"), "--units must be a whole number"),
    (("credit", *CTSA01[:2], "abababab", *CTSA01[2:], "--units", "1"), "unrecognized arguments: 1 value more"),
    (("credit", "--vending-key", "abababab", *CTSA01[2:], "--units", "1"), "vending key has 8 bytes"),
    (("credit", *CTSA01[:3], "600727000000000008", *CTSA01[4:], "--units", "1"), "fails its check digit"),
    (("credit", *CTSA01, "--units", "1", "--issued", "2025-01-01T08:00"), "must say its zone"),
    (("credit", *CTSA01, "--units", "1", "--issued", "yesterday"), "ISO 8601"),
    (("credit", *CTSA01, "--units", "1", "--issued", "2025-01-01T08:00Z", "--base-year", "1993"),
     "past the last TID of the 1993 base date"),
    (("credit", *CTSA01, "--units", "1", "--base-year", "2035"), "--base-year must be one of 1993, 2014"),
    (("credit", *CTSA01, "--units", "1", "--random", "16"), "random must be between 0 and 15"),
])
def test_bad_input_is_one_line_and_a_nonzero_exit(args: tuple[str, ...], needle: str) -> None:
    result = vendgate(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert needle in lines[-1], result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    if not needle.startswith("unrecognized arguments"):  # argparse's own errors add its usage line
        assert len(lines) == 1 and lines[0].startswith("vendgate: error:")


def test_errors_never_echo_the_vending_key() -> None:
    result = vendgate("credit", "--vending-key", "abababababababab", "--pan", "600727000000000008",
                      "--sgc", "123456", "--ti", "01", "--krn", "1", "--kt", "2", "--units", "1")
    assert result.returncode == 2 and "abababababababab" not in result.stderr


def test_describe_names_every_credit_unit() -> None:
    from gateway.cli.commands.sts import describe

    key = bytes.fromhex(CTSA01_DECODER_KEY)
    water = sts.decode_token(key, sts.credit_token(key, 1, 10, 25, 3))
    assert "units: 25 (2.5 m3)" in describe(water, 2014)
    cleared = sts.decode_token(key, sts.clear_credit_token(key, 11, 3))
    assert "register: all" in describe(cleared, 2014)


CTSA01_STEP1 = ["--units", "1", "--issued", "2004-03-01T13:55:00Z", "--base-year", "1993", "--random", "5"]


@pytest.mark.parametrize("key", ["abab abab abab abab", "ABAB ABAB\tabab abab"])
def test_a_key_may_be_typed_in_groups(key: str) -> None:
    """As keys are written down and printed: in groups (quoted)."""
    result = vendgate("credit", "--vending-key", key, *CTSA01[2:], *CTSA01_STEP1)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "23716100501183194197\n"


def test_a_key_may_come_from_stdin_out_of_the_process_list() -> None:
    result = vendgate("credit", "--vending-key", "-", *CTSA01[2:], *CTSA01_STEP1, stdin="abab abab abab abab\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "23716100501183194197\n"
    decoded = vendgate("decode", "--decoder-key", "-", "--base-year", "1993", "23716100501183194197",
                       stdin=CTSA01_DECODER_KEY + "\n")
    assert decoded.returncode == 0 and "units: 1 (0.1 kWh)" in decoded.stdout


def test_a_token_may_be_typed_in_groups_unquoted() -> None:
    result = vendgate("decode", "--decoder-key", CTSA01_DECODER_KEY, "--base-year", "1993",
                      "2371", "6100", "5011", "8319", "4197")
    assert result.returncode == 0, result.stderr
    assert "token id: 5871715" in result.stdout


@pytest.mark.parametrize("args", [
    ("credit", "--vending-key", "abab", "4567", "89AB", "CDEF", *CTSA01[2:], "--units", "1"),
    ("decode", "--decoder-key", "e653", "4567", "89AB", "CDEF", "2371", "6100", "5011", "8319", "4197"),
])
def test_a_key_typed_in_groups_unquoted_is_not_repeated(args: tuple[str, ...]) -> None:
    """The groups after the first are arguments the command cannot place (credit), or taken for
    the token (decode): either way the error repeats none of them. Before, argparse printed them."""
    result = vendgate(*args)
    assert result.returncode == 2 and result.stdout == ""
    assert not {"4567", "89AB", "CDEF"} & set(result.stderr.split())
