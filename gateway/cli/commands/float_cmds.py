"""`vendgate float`: an agent's float from the back office — deposits (maker/checker), balance,
statement and the daily reconciliation.

    vendgate float deposit --agent 7 --amount-minor 500000 --ref BANK-2026-0042
    vendgate float pending
    vendgate float approve|reject DEPOSIT_ID [--reason TEXT]
    vendgate float balance --agent 7 [--at 2026-12-01T00:00:00+03:00]
    vendgate float statement --agent 7 [--limit 50] [--after CURSOR]
    vendgate float reconcile --agent 7 --day 2026-12-01

A deposit above VENDGATE_DEPOSIT_APPROVAL_THRESHOLD_MINOR waits for a second operator. The
operator is the login running the command unless --operator names another; whoever can run these
commands holds the database's credentials, so the names are what the operators assert (see
docs/THREAT_MODEL.md). A deposit's id follows from its reference (deposit_id_for_ref), so running
the same deposit again (after a lost connection, say) returns the deposit as it stands and never
credits the float twice, and the same reference with another amount or agent is refused, until
the deposit is rejected or refused: then the reference may be asked for again. A reference is one
however it is typed: BANK-7, bank-7 and " BANK-7" (or in full-width letters) are the same one, so
asking for a deposit of bank-7 while one of BANK-7 is pending or posted is refused, naming it.
"""

from __future__ import annotations

import argparse
import getpass
import uuid
from datetime import UTC, date, datetime
from typing import Any, TypeVar

import asyncpg

from float_ledger.currency import format_minor
from float_ledger.deposits import (
    approve_deposit,
    deposit_id_for_ref,
    pending_count,
    pending_deposits,
    reject_deposit,
    request_deposit,
)
from float_ledger.ledger import balance, balance_as_of, statement
from float_ledger.model import (
    AccountKind,
    Deposit,
    DepositResult,
    DepositStatus,
    StatementCursor,
    amount_minor_max,
    statement_page_size_max,
)
from float_ledger.reconciliation import reconcile_agent_day
from gateway import registry
from gateway.cli.arguments import bounded_int
from gateway.cli.runner import run_on_connection
from gateway.registry import RegistryError
from gateway.settings import Settings

EXIT_NOT_DONE = 1  # the deposit is not what was asked for: refused, or decided otherwise before
years = (1970, 9998)  # a time or day asked about: far from the calendar's ends, where offsets overflow
_Dated = TypeVar("_Dated", date, datetime)


def _within_years(text: str, value: _Dated) -> _Dated:
    if not years[0] <= value.year <= years[1]:
        raise argparse.ArgumentTypeError(f"{text!r} is not in the years {years[0]}..{years[1]}")
    return value


_agent_id = bounded_int(1, 2**63 - 1)


def _aware_time(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time") from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} needs its UTC offset (Z or +03:00, say)")
    return _within_years(text, value)


def _day(text: str) -> date:
    try:
        value = date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD)") from None
    return _within_years(text, value)


def _cursor(text: str) -> StatementCursor:
    """`<created_at>,<seq>` as a statement page prints it."""
    at, _, seq = text.rpartition(",")
    try:
        cursor = StatementCursor(created_at=_aware_time(at), seq=int(seq))
    except (ValueError, argparse.ArgumentTypeError):
        cursor = None
    if cursor is None or not 0 <= cursor.seq < 2**63:
        raise argparse.ArgumentTypeError(f"{text!r} is not a cursor a statement page printed")
    return cursor


def _deposit_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a deposit id") from None


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    floats = subparsers.add_parser("float", help="agents' floats: deposits, balance, statement, reconciliation")
    actions = floats.add_subparsers(dest="float_action", metavar="ACTION", required=True)
    operator_help = "the operator acting (default: this login)"

    deposit = actions.add_parser("deposit", help="credit money an agent paid in; above the threshold it waits "
                                                 "for a second operator")
    deposit.add_argument("--agent", required=True, type=_agent_id)
    deposit.add_argument("--amount-minor", required=True, type=bounded_int(1, amount_minor_max))
    deposit.add_argument("--ref", required=True, dest="external_ref", help="bank or cash-office reference")
    deposit.add_argument("--operator", help=operator_help)
    deposit.set_defaults(handler=handle_deposit)

    pending = actions.add_parser("pending", help="deposits waiting for a second operator, oldest first")
    pending.add_argument("--limit", type=bounded_int(1, 1000), default=100)
    pending.set_defaults(handler=handle_pending)

    for name, text in (("approve", "post a pending deposit"), ("reject", "refuse a pending deposit")):
        decide = actions.add_parser(name, help=f"{text} (not its maker)")
        decide.add_argument("deposit_id", type=_deposit_id)
        decide.add_argument("--operator", help=operator_help)
        if name == "reject":
            decide.add_argument("--reason", required=True)
        decide.set_defaults(handler=handle_decide, decision=name)

    shown = actions.add_parser("balance", help="an agent's float now, or as of a time")
    shown.add_argument("--agent", required=True, type=_agent_id)
    shown.add_argument("--at", type=_aware_time,
                       help="ISO 8601 time with its UTC offset; the balance after every transfer at or before it "
                            "(a day's opening float, in `float reconcile`, leaves out those at its midnight); "
                            "final: postings begun by then and still committing are waited for (at most 10 s)")
    shown.set_defaults(handler=handle_balance)

    page = actions.add_parser("statement", help="an agent's float movements in posting order, a page at a time")
    page.add_argument("--agent", required=True, type=_agent_id)
    page.add_argument("--limit", type=bounded_int(1, statement_page_size_max), default=50)
    page.add_argument("--after", type=_cursor, help="the cursor the previous page printed")
    page.set_defaults(handler=handle_statement)

    day = actions.add_parser("reconcile", help="an agent's business day in its time zone, from transfers alone "
                                               "(final once the day has ended: postings begun within it and still "
                                               "committing are waited for, at most 10 s)")
    day.add_argument("--agent", required=True, type=_agent_id)
    day.add_argument("--day", required=True, type=_day, help="YYYY-MM-DD in the agent's time zone")
    day.set_defaults(handler=handle_reconcile)


def _operator(args: argparse.Namespace) -> str:
    if args.operator is not None:
        return str(args.operator)
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name (a container's numeric user, say)
        raise RegistryError("this login has no name: say who acts with --operator") from None


def _deposit_line(deposit: Deposit) -> str:
    decided = f" by {deposit.checker}" if deposit.checker else ""
    reason = f" ({deposit.reason!r})" if deposit.reason else ""
    return (f"deposit {deposit.id}: {deposit.status.value}{decided}{reason}; {deposit.amount_minor} "
            f"{deposit.currency} minor units to float account {deposit.float_account_id}, ref "
            f"{deposit.external_ref!r}, requested by {deposit.maker} at {deposit.requested_at.isoformat()}")


def _result_lines(result: DepositResult) -> list[str]:
    lines = [_deposit_line(result.deposit)]
    if result.post is not None and result.post.transfer is not None:
        lines.append(f"float after posting: {result.post.transfer.credit_balance_after_minor}")
    return lines


def handle_deposit(args: argparse.Namespace, settings: Settings) -> int:
    async def body(conn: asyncpg.Connection) -> DepositResult:
        agent = await registry.get_agent(conn, args.agent)
        source = await registry.system_account(conn, AccountKind.float_deposits, agent.currency)
        return await request_deposit(
            conn, deposit_id=await deposit_id_for_ref(conn, source_account_id=source, external_ref=args.external_ref),
            float_account_id=agent.float_account_id,
            source_account_id=source, amount_minor=args.amount_minor, currency=agent.currency,
            external_ref=args.external_ref, maker=_operator(args),
            approval_threshold_minor=settings.deposit_approval_threshold_for(agent.currency),
            metadata={"agent_id": str(agent.agent_id)})

    result = run_on_connection(settings, body)
    for line in _result_lines(result):
        print(line)
    if result.deposit.status is DepositStatus.pending_approval:
        threshold_minor = settings.deposit_approval_threshold_for(result.deposit.currency)
        print(f"awaiting another operator's approve or reject (this command's approval threshold: "
              f"{format_minor(threshold_minor, result.deposit.currency)})")
    # A script reads the status: 0 when the deposit is posted or awaits its checker.
    return 0 if result.deposit.status in (DepositStatus.posted, DepositStatus.pending_approval) else EXIT_NOT_DONE


def handle_pending(args: argparse.Namespace, settings: Settings) -> int:
    async def body(conn: asyncpg.Connection) -> tuple[list[Deposit], int]:
        async with conn.transaction(isolation="repeatable_read", readonly=True):  # the list and its count agree
            return await pending_deposits(conn, limit=args.limit), await pending_count(conn)

    deposits, waiting = run_on_connection(settings, body)
    for deposit in deposits:
        print(_deposit_line(deposit))
    if waiting > len(deposits):
        print(f"{waiting} pending, the oldest {len(deposits)} shown (--limit)")
    else:
        print(f"{waiting} pending")
    return 0


def handle_decide(args: argparse.Namespace, settings: Settings) -> int:
    async def body(conn: asyncpg.Connection) -> DepositResult:
        if args.decision == "approve":
            return await approve_deposit(conn, deposit_id=args.deposit_id, checker=_operator(args))
        return await reject_deposit(conn, deposit_id=args.deposit_id, checker=_operator(args), reason=args.reason)

    result = run_on_connection(settings, body)
    for line in _result_lines(result):
        print(line)
    # Decided before (approving a rejected deposit, say): it stands as it was, and the exit says so.
    wanted = DepositStatus.posted if args.decision == "approve" else DepositStatus.rejected
    if result.deposit.status is wanted:
        return 0
    verb = "approved" if args.decision == "approve" else "rejected"
    print(f"the deposit was not {verb}: it stands {result.deposit.status.value}"
          + (f" ({result.deposit.reason})" if result.deposit.reason else ""))
    return EXIT_NOT_DONE


def handle_balance(args: argparse.Namespace, settings: Settings) -> int:
    async def body(conn: asyncpg.Connection) -> tuple[registry.Agent, int]:
        agent = await registry.get_agent(conn, args.agent)
        if args.at is None:
            return agent, await balance(conn, agent.float_account_id)
        return agent, await balance_as_of(conn, agent.float_account_id, args.at)

    agent, minor = run_on_connection(settings, body)
    when = f" as of {args.at.isoformat()}" if args.at is not None else ""
    print(f"agent {agent.agent_id} float{when}: {minor} {agent.currency} minor units")
    return 0


def handle_statement(args: argparse.Namespace, settings: Settings) -> int:
    async def body(conn: asyncpg.Connection) -> Any:
        agent = await registry.get_agent(conn, args.agent)
        return agent, await statement(conn, agent.float_account_id, after=args.after, limit=args.limit)

    agent, page = run_on_connection(settings, body)
    print(f"agent {agent.agent_id} float account {page.account_id} ({agent.currency} minor units)")
    for entry in page.entries:
        terminal = entry.metadata.get("terminal_id")
        where = f" terminal {terminal}" if terminal else ""
        print(f"{entry.created_at.isoformat()} #{entry.seq} {entry.kind} {entry.amount_minor:+d} -> "
              f"{entry.balance_after_minor} (account {entry.counterparty_account_id}{where})")
    if page.next_cursor is not None:
        print(f"more: --after {page.next_cursor.created_at.isoformat()},{page.next_cursor.seq}")
    return 0


def handle_reconcile(args: argparse.Namespace, settings: Settings) -> int:
    async def body(conn: asyncpg.Connection) -> Any:
        agent = await registry.get_agent(conn, args.agent)
        return await reconcile_agent_day(conn, float_account_id=agent.float_account_id, business_day=args.day,
                                         time_zone=agent.time_zone)

    day = run_on_connection(settings, body)
    print(f"agent {args.agent} business day {day.business_day.isoformat()} ({day.time_zone}, "
          f"{day.starts_at.isoformat()} to {day.ends_at.isoformat()}), {day.currency} minor units")
    now = datetime.now(UTC)
    if now < day.ends_at:
        # Final only once the day is over: payments may still come, and the closing float is the float now.
        state = "has not begun" if now < day.starts_at else "is not over"
        print(f"PROVISIONAL: the day {state}; these are the figures so far, the closing float is the float now")
    print(f"opening float {day.opening_float_minor}")
    print(f"deposits      {day.deposits_count} for {day.deposits_minor}")
    print(f"collections   {day.collections_count} for {day.collections_minor}")
    print(f"reversals     {day.reversals_count} for {day.reversals_minor}")
    print(f"other         {day.other_count} net {day.other_net_minor}")
    print(f"commission    {day.commission_minor}")
    print(f"closing float {day.closing_float_minor}")
    for terminal in day.terminals:
        print(f"terminal {terminal.terminal_id or '(none)'}: collections {terminal.collections_count} for "
              f"{terminal.collections_minor}, reversals {terminal.reversals_count} for {terminal.reversals_minor}, "
              f"commission {terminal.commission_minor}")
    return 0
