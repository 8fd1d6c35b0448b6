"""The `vendgate` command. Each subcommand is one module in gateway/cli/commands/ that defines

    def register(subparsers) -> None

and sets `handler=` (a callable taking (args, settings) and returning an exit status) on the
parser it adds. Adding a command is adding one file. A VendgateError or a float ledger's
LedgerError (a deposit its maker tries to approve, say) anywhere becomes one line on stderr and
exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence
from typing import NoReturn

import asyncpg

from float_ledger.errors import LedgerError
from gateway.cli import commands
from gateway.errors import VendgateError
from gateway.jsonlog import configure_logging
from gateway.settings import load_settings


class _Parser(argparse.ArgumentParser):
    """argparse's parser, but its errors never repeat arguments it could not place: they may be
    the rest of a key or token typed in groups (`--vending-key 0123 4567 ...` where one value
    was expected), and stderr is often captured by support tooling."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments:"):
            extra = len(message.removeprefix("unrecognized arguments:").split())
            message = f"unrecognized arguments: {extra} more than the command takes (not repeated here)"
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vendgate", description="vendgate payment gateway")
    parser.add_argument("--config", help="TOML settings file (default: $VENDGATE_CONFIG)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings(config_file=args.config)
        configure_logging(settings.log_level)
        status: int = args.handler(args, settings)
        return status
    except (VendgateError, LedgerError) as exc:
        print(f"vendgate: error: {exc}", file=sys.stderr)
        return 2
    except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError) as exc:
        # A value the database cannot hold or its constraints refuse, past the checks above them;
        # the message names the constraint, never the row (its DETAIL is not printed).
        print(f"vendgate: error: the database refused a value: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
