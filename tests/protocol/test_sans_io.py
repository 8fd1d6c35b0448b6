"""protocol/ is sans-IO: no network, event loop, clock or randomness is imported or read there."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PROTOCOL_DIR = Path(__file__).resolve().parents[2] / "protocol"
# Modules that do I/O, wait, or read the clock or a random source.
FORBIDDEN_MODULES = {
    "asyncio",
    "socket",
    "ssl",
    "time",
    "selectors",
    "select",
    "threading",
    "subprocess",
    "random",
    "secrets",
    "urllib",
    "http",
    "trio",
    "anyio",
    "uvloop",
}
# Calls that read the clock or a random source whatever module they come from.
FORBIDDEN_CALLS = {"now", "utcnow", "today", "time", "monotonic", "perf_counter", "urandom", "token_bytes", "getrandom"}


def protocol_modules() -> list[Path]:
    modules = sorted(PROTOCOL_DIR.rglob("*.py"))
    assert modules, "protocol/ has no modules?"
    return modules


def violations(source: str) -> list[str]:
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.split(".")[0] in FORBIDDEN_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] in FORBIDDEN_MODULES:
                found.append(node.module)
            found += [f"{node.module}.{alias.name}" for alias in node.names if alias.name in FORBIDDEN_CALLS]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in FORBIDDEN_CALLS:
                found.append(f"call .{node.func.attr}()")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "__import__":
            found.append("__import__()")
    return found


@pytest.mark.parametrize("path", protocol_modules(), ids=lambda path: path.name)
def test_protocol_module_is_sans_io(path: Path) -> None:
    assert violations(path.read_text(encoding="utf-8")) == [], f"{path.name} does I/O or reads a clock"


@pytest.mark.parametrize(
    "source",
    [
        "import asyncio",
        "import socket as s",
        "from ssl import SSLContext",
        "import time",
        "from time import monotonic",
        "from datetime import datetime\nx = datetime.now()",
        "import datetime\nx = datetime.datetime.now(datetime.UTC)",
        "from datetime import date\nd = date.today()",
        "import os\nk = os.urandom(16)",
        "import secrets",
        "from asyncio.streams import StreamReader",
        "m = __import__('socket')",
    ],
)
def test_the_scan_catches_each_forbidden_pattern(source: str) -> None:
    assert violations(source) != []


def test_the_scan_allows_what_protocol_needs() -> None:
    assert violations("import hmac\nimport struct\nfrom datetime import UTC, date, datetime\nimport msgspec") == []
