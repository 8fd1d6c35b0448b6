"""`vendgate agent add`, `vendgate terminal add|block|unblock`, `vendgate seed`."""

from __future__ import annotations

import argparse
import secrets
from pathlib import Path

import asyncpg

from float_ledger.model import amount_minor_max
from gateway import registry, seeding
from gateway.cli.arguments import bounded_int
from gateway.cli.runner import run_on_connection
from gateway.keystore import load_keystore
from gateway.settings import Settings


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    agent = subparsers.add_parser("agent", help="manage collection agents").add_subparsers(
        dest="agent_command", required=True)
    add = agent.add_parser("add", help="register an agent and open its float")
    add.add_argument("--name", required=True)
    add.add_argument("--kind", required=True, choices=["shop", "property_manager", "village", "mobile_hall", "staff"])
    add.add_argument("--currency", default="EUR")
    add.add_argument("--contact", default="")
    add.add_argument("--commission-bp", type=int, default=0)
    add.add_argument("--low-float-minor", type=int, default=0)
    add.add_argument("--time-zone", default="UTC")
    add.set_defaults(handler=handle_agent_add)

    terminal = subparsers.add_parser("terminal", help="manage terminals").add_subparsers(
        dest="terminal_command", required=True)
    tadd = terminal.add_parser("add", help="register a terminal; prints a POS terminal's key once")
    tadd.add_argument("--id", required=True, dest="terminal_id")
    tadd.add_argument("--serial", required=True)
    tadd.add_argument("--agent", required=True, type=int)
    tadd.add_argument("--kind", choices=["pos", "kiosk"], default="pos")
    tadd.add_argument("--model", default="")
    tadd.add_argument("--location", default="")
    tadd.set_defaults(handler=handle_terminal_add)
    for action, says in (("block", "block a terminal: refused at logon and mid-session"),
                         ("unblock", "unblock a blocked terminal"),
                         ("retire", "retire a terminal for good (final: its key is out of service, its serial "
                                    "free to register anew)")):
        sub = terminal.add_parser(action, help=says)
        sub.add_argument("terminal_id")
        sub.set_defaults(handler=handle_terminal_status, status_action=action)

    seed = subparsers.add_parser("seed", help="create demo/benchmark agents, terminals and meters")
    seed.add_argument("--agents", type=bounded_int(1, seeding.agents_max), default=10)
    seed.add_argument("--terminals", type=bounded_int(1, seeding.terminals_max), default=50)
    seed.add_argument("--meters", type=bounded_int(1, seeding.meters_max), default=200)
    seed.add_argument("--float-minor", type=bounded_int(1, amount_minor_max), default=10_000_000,
                      help="each agent's opening float")
    seed.set_defaults(handler=handle_seed)


def seed_secret_path(settings: Settings) -> Path:
    return Path(settings.data_dir) / "seed.secret"


def load_seed_secret(settings: Settings) -> bytes:
    """The secret simulated terminals derive their keys from (demo data folder only)."""
    path = seed_secret_path(settings)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
    return bytes.fromhex(path.read_text().strip())


def handle_agent_add(args: argparse.Namespace, settings: Settings) -> int:
    async def go(conn: asyncpg.Connection) -> registry.Agent:
        return await registry.add_agent(conn, kind=args.kind, name=args.name, currency=args.currency,
                                        contact=args.contact, commission_rate_bp=args.commission_bp,
                                        low_float_threshold_minor=args.low_float_minor, time_zone=args.time_zone)

    agent = run_on_connection(settings, go)
    print(f"agent {agent.agent_id} {agent.name!r}: float account {agent.float_account_id} ({agent.currency})")
    return 0


def handle_terminal_add(args: argparse.Namespace, settings: Settings) -> int:
    keystore = load_keystore(settings)

    async def go(conn: asyncpg.Connection) -> bytes:
        return await registry.add_terminal(conn, keystore, terminal_id=args.terminal_id, serial=args.serial,
                                           agent_id=args.agent, kind=args.kind, model=args.model,
                                           location=args.location)

    key = run_on_connection(settings, go)
    if args.kind == "kiosk":  # it proves itself with its client certificate alone; the key is never used
        print(f"kiosk {args.terminal_id} registered; issue its client certificate with "
              f"`vendgate kiosk cert {args.terminal_id}`")
        return 0
    print(f"terminal {args.terminal_id} registered; its key (shown once, load it into the terminal):")
    print(key.hex())
    return 0


def handle_terminal_status(args: argparse.Namespace, settings: Settings) -> int:
    status = {"block": "blocked", "unblock": "active", "retire": "retired"}[args.status_action]

    async def go(conn: asyncpg.Connection) -> None:
        await registry.set_terminal_status(conn, args.terminal_id, status)  # type: ignore[arg-type]

    run_on_connection(settings, go)
    print(f"terminal {args.terminal_id}: {status}")
    return 0


def handle_seed(args: argparse.Namespace, settings: Settings) -> int:
    keystore = load_keystore(settings)
    secret = load_seed_secret(settings)

    async def go(conn: asyncpg.Connection) -> seeding.SeedSummary:
        return await seeding.seed(conn, keystore, agents=args.agents, terminals=args.terminals,
                                  meters=args.meters, seed_secret=secret, float_each_minor=args.float_minor)

    summary = run_on_connection(settings, go)
    print(f"seeded {summary.agents} agents, {summary.terminals} terminals, {summary.meters} meters; "
          f"float {summary.float_each_minor} {summary.currency} minor units each")
    for line in summary.ranges():
        print(line)
    return 0
