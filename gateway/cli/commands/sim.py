"""`vendgate sim`: simulated POS terminals against a running gateway (seeded demo data)."""

from __future__ import annotations

import argparse

import msgspec

from gateway import seeding
from gateway.cli.arguments import bounded_int, bounded_seconds
from gateway.cli.commands.registry_cmds import load_seed_secret
from gateway.cli.runner import run
from gateway.seeding import DEMO_CURRENCY, derive_terminal_key, meter_number, terminal_id
from gateway.settings import Settings
from terminal_sim.client import LINKS
from terminal_sim.sim import run_simulation, sim_terminals_max

sim_duration_s_max = 86_400.0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("sim", help="drive simulated POS terminals at a gateway")
    parser.add_argument("--terminals", type=bounded_int(1, sim_terminals_max), default=20)
    parser.add_argument("--meters", type=bounded_int(1, seeding.meters_max), default=200,
                        help="seeded meters to pay into")
    parser.add_argument("--duration", type=bounded_seconds(0, sim_duration_s_max), default=20.0, help="seconds")
    parser.add_argument("--link", choices=sorted(LINKS), default="lan")
    parser.add_argument("--host", default=None)
    parser.add_argument("--port", type=bounded_int(1, 65535), default=None)
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace, settings: Settings) -> int:
    secret = load_seed_secret(settings)
    terminals = [(terminal_id(n), derive_terminal_key(secret, terminal_id(n))) for n in range(1, args.terminals + 1)]
    summary, notes = run(run_simulation(
        host=args.host or settings.pos_host, port=args.port or settings.pos_port, terminals=terminals,
        meters=[meter_number(n) for n in range(1, args.meters + 1)], currency=DEMO_CURRENCY,
        duration_s=args.duration, link=LINKS[args.link], stop_on_sigint=True))
    for note in notes[:20]:
        print(f"note: {note}")
    printable = msgspec.structs.replace(summary, approved_txn_ids=[])
    print(msgspec.json.encode(printable).decode())
    if summary.interrupted:
        return 130  # as for any command stopped by Ctrl-C, with the summary of what it did
    return 0 if summary.ok else 1
