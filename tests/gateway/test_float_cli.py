"""`vendgate float` as a back-office operator runs it: deposits under maker/checker, balance,
statement and the day's reconciliation, against an external (test) PostgreSQL."""

from __future__ import annotations

import getpass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from tests.gateway.test_registry_cli import vendgate

THRESHOLD = 100_000


@pytest.fixture
def env(db_url: str, tmp_path: Path) -> dict[str, str]:
    return {"VENDGATE_DATABASE_URL": db_url, "VENDGATE_DATA_DIR": str(tmp_path),
            "VENDGATE_DEPOSIT_APPROVAL_THRESHOLD_MINOR": str(THRESHOLD)}


def new_agent(env: dict[str, str], name: str, currency: str = "KES") -> str:
    added = vendgate(env, "agent", "add", "--name", name, "--kind", "shop", "--currency", currency,
                     "--time-zone", "Africa/Nairobi")
    assert added.returncode == 0, added.stderr
    return added.stdout.split()[1]


def float_minor(env: dict[str, str], agent: str, *at: str) -> int:
    shown = vendgate(env, "float", "balance", "--agent", agent, *(("--at", *at) if at else ()))
    assert shown.returncode == 0, shown.stderr
    return int(shown.stdout.split(": ")[1].split()[0])


def test_a_deposit_within_the_threshold_posts_once_however_often_it_is_run(env: dict[str, str]) -> None:
    agent = new_agent(env, "Threshold Shop")
    first = vendgate(env, "float", "deposit", "--agent", agent, "--amount-minor", "50000", "--ref", "BANK-1")
    assert first.returncode == 0, first.stderr
    assert ": posted;" in first.stdout and "float after posting: 50000" in first.stdout
    assert f"requested by {getpass.getuser()}" in first.stdout  # the login, when no --operator is named
    # Run again (the first answer lost, say): the same deposit, as it stands; the float credited once.
    again = vendgate(env, "float", "deposit", "--agent", agent, "--amount-minor", "50000", "--ref", "BANK-1")
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[0].split(":")[0] == first.stdout.splitlines()[0].split(":")[0]
    assert float_minor(env, agent) == 50_000
    # The reference names one payment: with another amount it is refused, and nothing moves.
    other = vendgate(env, "float", "deposit", "--agent", agent, "--amount-minor", "60000", "--ref", "BANK-1")
    assert other.returncode == 2 and "other content" in other.stderr and "Traceback" not in other.stderr
    assert float_minor(env, agent) == 50_000


def test_a_currency_named_in_the_thresholds_table_has_its_own(env: dict[str, str]) -> None:
    # UGX has no minor unit: 100,000 minor units of it are about 27 US dollars, of KES about 770.
    # One figure for both either asks a checker for pocket money or waves through large sums.
    env = {**env, "VENDGATE_DEPOSIT_APPROVAL_THRESHOLDS_MINOR": "UGX=2000000, TZS=0"}
    uganda = new_agent(env, "Kampala Shop", "UGX")
    posted = vendgate(env, "float", "deposit", "--agent", uganda, "--amount-minor", "1500000", "--ref", "UG-1")
    assert posted.returncode == 0, posted.stderr
    assert ": posted;" in posted.stdout and float_minor(env, uganda) == 1_500_000
    waits = vendgate(env, "float", "deposit", "--agent", uganda, "--amount-minor", "2000001", "--ref", "UG-2")
    assert waits.returncode == 0, waits.stderr
    assert ": pending_approval;" in waits.stdout and "approval threshold: 2000000 UGX" in waits.stdout
    # A currency not in the table keeps the single threshold, in its own decimals.
    kenya = new_agent(env, "Nairobi Shop")
    held = vendgate(env, "float", "deposit", "--agent", kenya, "--amount-minor", "150000", "--ref", "KE-1")
    assert ": pending_approval;" in held.stdout and "approval threshold: 1000.00 KES" in held.stdout
    assert float_minor(env, kenya) == 0 and float_minor(env, uganda) == 1_500_000
    for asked in (waits, held):  # the other tests of this database count what is pending
        deposit_id = asked.stdout.split()[1].rstrip(":")
        rejected = vendgate(env, "float", "reject", deposit_id, "--operator", "checker", "--reason", "test")
        assert rejected.returncode == 0, rejected.stderr


def test_a_large_deposit_waits_for_a_second_operator(env: dict[str, str]) -> None:
    agent = new_agent(env, "Checked Shop")
    asked = vendgate(env, "float", "deposit", "--agent", agent, "--amount-minor", "500000", "--ref", "BANK-2",
                     "--operator", "alice")
    assert asked.returncode == 0, asked.stderr
    assert ": pending_approval;" in asked.stdout and "float after" not in asked.stdout
    deposit_id = asked.stdout.split()[1].rstrip(":")
    assert float_minor(env, agent) == 0
    pending = vendgate(env, "float", "pending")
    assert pending.returncode == 0 and deposit_id in pending.stdout and pending.stdout.endswith("1 pending\n")

    own = vendgate(env, "float", "approve", deposit_id, "--operator", "ALICE")  # the maker, spelt otherwise
    assert own.returncode == 2 and "another operator" in own.stderr
    assert float_minor(env, agent) == 0
    approved = vendgate(env, "float", "approve", deposit_id, "--operator", "bob")
    assert approved.returncode == 0, approved.stderr
    assert ": posted by bob;" in approved.stdout and "float after posting: 500000" in approved.stdout
    twice = vendgate(env, "float", "approve", deposit_id, "--operator", "carol")
    assert twice.returncode == 0 and ": posted by bob;" in twice.stdout  # decided already: as it stands
    late_no = vendgate(env, "float", "reject", deposit_id, "--operator", "carol", "--reason", "too late")
    assert late_no.returncode == 1 and ": posted by bob;" in late_no.stdout  # not what was asked: exit 1
    assert late_no.stdout.splitlines()[-1] == "the deposit was not rejected: it stands posted"
    # The maker asking again, spelt otherwise: the same deposit, not a conflict and not a second one.
    repeat = vendgate(env, "float", "deposit", "--agent", agent, "--amount-minor", "500000", "--ref", "BANK-2",
                      "--operator", "Alice")
    assert repeat.returncode == 0 and repeat.stdout.startswith(f"deposit {deposit_id}: posted by bob;")
    assert float_minor(env, agent) == 500_000

    refused = vendgate(env, "float", "deposit", "--agent", agent, "--amount-minor", "600000", "--ref", "BANK-3",
                       "--operator", "alice")
    refused_id = refused.stdout.split()[1].rstrip(":")
    rejected = vendgate(env, "float", "reject", refused_id, "--operator", "bob", "--reason", "no such credit")
    assert rejected.returncode == 0, rejected.stderr
    assert ": rejected by bob ('no such credit');" in rejected.stdout
    late_yes = vendgate(env, "float", "approve", refused_id, "--operator", "carol")
    assert late_yes.returncode == 1 and ": rejected by bob" in late_yes.stdout
    own_no = vendgate(env, "float", "deposit", "--agent", agent, "--amount-minor", "700000", "--ref", "BANK-4",
                      "--operator", "alice")
    own_no_id = own_no.stdout.split()[1].rstrip(":")
    by_maker = vendgate(env, "float", "reject", own_no_id, "--operator", "alice", "--reason", "mine")
    assert by_maker.returncode == 2 and "another operator" in by_maker.stderr
    assert vendgate(env, "float", "reject", own_no_id, "--operator", "bob", "--reason", "dup").returncode == 0
    assert float_minor(env, agent) == 500_000
    # A rejected deposit credited nothing: its reference may be asked for again, keyed right.
    rekeyed = vendgate(env, "float", "deposit", "--agent", agent, "--amount-minor", "60000", "--ref", "BANK-3",
                       "--operator", "alice")
    assert rekeyed.returncode == 0, rekeyed.stderr
    assert ": posted;" in rekeyed.stdout and refused_id not in rekeyed.stdout
    assert float_minor(env, agent) == 560_000
    none = vendgate(env, "float", "pending")
    assert none.stdout.endswith("0 pending\n")


def test_statement_balance_as_of_and_the_days_reconciliation(env: dict[str, str]) -> None:
    agent = new_agent(env, "Statement Shop")
    before = datetime.now(UTC)
    for ref, amount in (("CASH-1", "30000"), ("CASH-2", "20000")):
        paid = vendgate(env, "float", "deposit", "--agent", agent, "--amount-minor", amount, "--ref", ref)
        assert paid.returncode == 0, paid.stderr
    assert float_minor(env, agent, before.isoformat()) == 0
    assert float_minor(env, agent, datetime.now(UTC).isoformat()) == 50_000

    first = vendgate(env, "float", "statement", "--agent", agent, "--limit", "1")
    assert first.returncode == 0, first.stderr
    entries = [line for line in first.stdout.splitlines() if " deposit " in line]
    assert len(entries) == 1 and entries[0].endswith(")") and " +30000 -> 30000 " in entries[0]
    more = first.stdout.splitlines()[-1]
    assert more.startswith("more: --after ")
    rest = vendgate(env, "float", "statement", "--agent", agent, "--after", more.split()[-1])
    assert rest.returncode == 0, rest.stderr
    assert " +20000 -> 50000 " in rest.stdout and "more:" not in rest.stdout

    today = datetime.now(ZoneInfo("Africa/Nairobi")).date()
    day = vendgate(env, "float", "reconcile", "--agent", agent, "--day", today.isoformat())
    assert day.returncode == 0, day.stderr
    lines = day.stdout.splitlines()
    assert "opening float 0" in lines and "deposits      2 for 50000" in lines and "closing float 50000" in lines
    assert lines[1].startswith("PROVISIONAL: the day is not over;")  # payments may still come today
    yesterday = vendgate(env, "float", "reconcile", "--agent", agent, "--day",
                         (today - timedelta(days=1)).isoformat())
    assert "deposits      0 for 0" in yesterday.stdout.splitlines() and "PROVISIONAL" not in yesterday.stdout
    tomorrow = vendgate(env, "float", "reconcile", "--agent", agent, "--day", (today + timedelta(days=1)).isoformat())
    assert tomorrow.stdout.splitlines()[1].startswith("PROVISIONAL: the day has not begun;")


def test_bad_float_input_gets_one_line(env: dict[str, str]) -> None:
    unknown = vendgate(env, "float", "balance", "--agent", "999999")
    assert unknown.returncode == 2 and unknown.stderr.strip() == "vendgate: error: no agent 999999"
    naive = vendgate(env, "float", "balance", "--agent", "1", "--at", "2026-12-01T00:00:00")
    assert naive.returncode == 2 and "needs its UTC offset" in naive.stderr
    nothing = vendgate(env, "float", "deposit", "--agent", "1", "--amount-minor", "0", "--ref", "R")
    assert nothing.returncode == 2 and "not in 1.." in nothing.stderr
    not_an_id = vendgate(env, "float", "approve", "not-a-uuid", "--operator", "bob")
    assert not_an_id.returncode == 2 and "not a deposit id" in not_an_id.stderr
    missing = vendgate(env, "float", "approve", "5d1c2b0e-8f7a-4c3e-9b61-0a7e4f2d9c10", "--operator", "bob")
    assert missing.returncode == 2 and "no deposit" in missing.stderr and "Traceback" not in missing.stderr
    agent = new_agent(env, "Input Shop")
    for args, said in (
            (("balance", "--agent", agent, "--at", "9999-12-31T23:59:59-12:00"), "not in the years"),
            (("reconcile", "--agent", agent, "--day", "0001-01-01"), "not in the years"),
            (("statement", "--agent", agent, "--after", "2026-12-01T00:00:00+00:00,99999999999999999999"),
             "not a cursor"),
            # Bytes that are no text (argv as the OS passes it), and a line break in a reference.
            (("deposit", "--agent", agent, "--amount-minor", "5", "--ref", "REF-\udcff"), "invisible"),
            (("deposit", "--agent", agent, "--amount-minor", "5", "--ref", "REF\n2"), "invisible")):
        refused = vendgate(env, "float", *args)
        assert refused.returncode == 2 and said in refused.stderr, (args, refused.stderr)
        assert "Traceback" not in refused.stderr
    assert float_minor(env, agent) == 0


def test_pending_says_how_many_wait_beyond_the_page(env: dict[str, str]) -> None:
    """Before, the closing line counted the rows shown (--limit): with 3 waiting, --limit 2 said
    "2 pending", and the checker never learnt of the third."""
    agent = new_agent(env, "Queue Shop")
    for ref in ("Q-1", "Q-2", "Q-3"):
        asked = vendgate(env, "float", "deposit", "--agent", agent, "--amount-minor", "300000", "--ref", ref,
                         "--operator", "alice")
        assert asked.returncode == 0 and ": pending_approval;" in asked.stdout, asked.stderr
    page = vendgate(env, "float", "pending", "--limit", "2")
    assert page.returncode == 0, page.stderr
    lines = page.stdout.splitlines()
    assert len(lines) == 3 and "Q-1" in lines[0] and "Q-2" in lines[1]
    assert lines[-1] == "3 pending, the oldest 2 shown (--limit)"
    assert vendgate(env, "float", "pending").stdout.splitlines()[-1] == "3 pending"
