"""The `vendgate` command. Each subcommand is one module in gateway/cli/commands/ that defines

    def register(subparsers) -> None

and sets `handler=` (a callable taking (args, settings) and returning an exit status) on the
parser it adds. Adding a command is adding one file. A VendgateError or a float ledger's
LedgerError (a deposit its maker tries to approve, say) anywhere becomes one line on stderr and
exit status 2; so do a value the database refuses, a database without vendgate's tables (run
`vendgate migrate`) and a file or folder that cannot be used (with its path).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import re
import sys
from collections.abc import Sequence
from typing import NoReturn

import asyncpg

from float_ledger.errors import LedgerError
from gateway.cli import commands
from gateway.errors import VendgateError
from gateway.jsonlog import configure_logging
from gateway.settings import load_settings

# What an option's name looks like: named in an error, unlike the values beside it.
_OPTION_NAME = re.compile(r"--?[A-Za-z][A-Za-z0-9-]*")


class _Parser(argparse.ArgumentParser):
    """argparse's parser, but its errors repeat no value it could not place, only option names:
    a value may be the rest of a key or token typed in groups (`--vending-key 0123 4567 ...` where
    one value was expected), and stderr is often captured by support tooling. The error and usage
    shown are the command's own (`vendgate float deposit`), not the top level's."""

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        # The innermost command's parser sets it first (its namespace is copied into its parent's).
        if not hasattr(parsed, "_command_parser"):
            parsed._command_parser = self
        return parsed, extras

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments:"):
            message = _unrecognized(message.removeprefix("unrecognized arguments:").split())
        super().error(message)


def _unrecognized(extras: Sequence[str]) -> str:
    names = [name for extra in extras if (name := extra.partition("=")[0]) and _OPTION_NAME.fullmatch(name)]
    values = len(extras) - len(names)
    parts = [f"unknown option{'s' if len(names) > 1 else ''} {', '.join(names)}"] if names else []
    if values:
        parts.append(f"{values} value{'s' if values > 1 else ''} more than the command takes (not repeated here)")
    return "unrecognized arguments: " + "; ".join(parts)


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
    args, extras = parser.parse_known_args(argv)
    if extras:
        getattr(args, "_command_parser", parser).error("unrecognized arguments: " + " ".join(extras))
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
    except (asyncpg.UndefinedTableError, asyncpg.UndefinedColumnError, asyncpg.UndefinedFunctionError):
        # The database is not vendgate's, or not migrated as far as this vendgate: no traceback.
        print("vendgate: error: the database lacks vendgate's tables or their latest form: run `vendgate migrate` "
              "(and check VENDGATE_DATABASE_URL or VENDGATE_DATA_DIR name the database meant)", file=sys.stderr)
        return 2
    except OSError as exc:
        # A file or folder that cannot be made, read or written (a full disk, a read-only mount, a
        # path through a file), or a server that cannot be reached: its reason and path, one line.
        where = f": {exc.filename}" if exc.filename else ""
        print(f"vendgate: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
