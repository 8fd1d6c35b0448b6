"""Benchmark of the terminal wire codec: encode + MAC + verify + decode, through real sessions.

    python -m loadtests.bench_codec [--rounds N] [--repeats N]

One round is a top-up request from a logged-on TerminalSession to a ServerSession and the
top-up result back: two messages, each framed, MACed (HMAC-SHA256), checked against the state
table, MAC-verified and decoded. The reference, measured in the same run, is bare msgspec
encode + decode of the same two messages, so the ratio says what framing, MACs and the session
cost on this machine whatever its speed. It runs on one core (pinned where the OS allows) and
keeps the fastest of several repeats, the figure least disturbed by other processes.

The last line printed is one JSON object; the target is <= 10 µs per message.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from datetime import UTC, date, datetime

import msgspec

from protocol import limits
from protocol.codes import ResponseCode
from protocol.messages import (
    MSGPACK_ENCODER,
    SERVER_DECODER,
    TERMINAL_DECODER,
    ClientTransactionId,
    LogonAccepted,
    LogonProof,
    LogonRequest,
    TenderType,
    TopUpRequest,
    TopUpResult,
)
from protocol.session import ServerSession, TerminalSession

target_us_per_message = 10.0
rounds_default = 5_000
repeats_default = 7

TERMINAL_ID = "T0000001"
TERMINAL_KEY = bytes(range(16))
TRANSACTION = ClientTransactionId(terminal_id=TERMINAL_ID, terminal_sequence=42, business_date=date(2025, 3, 1))
REQUEST = TopUpRequest(
    client_transaction_id=TRANSACTION,
    meter_number="01234567890",
    amount_minor=5_000,
    currency="ZAR",
    tender_type=TenderType.CASH,
)
RESULT = TopUpResult(
    client_transaction_id=TRANSACTION,
    response_code=ResponseCode.APPROVED,
    currency="ZAR",
    amount_minor=5_000,
    receipt_number="R-00000042",
    receipt_lines=[
        "VENDGATE PREPAID ELECTRICITY",
        "Meter 01234567890",
        "Amount           ZAR 50.00",
        "Debt recovery    ZAR 10.00",
        "Energy 21.3 kWh  ZAR 30.00",
        "Fees             ZAR  4.78",
        "VAT              ZAR  5.22",
    ],
    tokens=["12345678901234567890"],
    units_wh=21_300,
    debt_recovery_minor=1_000,
    energy_minor=3_000,
    fees_minor=478,
    vat_minor=522,
    float_remaining_minor=995_000,
    issued_at=datetime(2025, 3, 1, 8, 1, tzinfo=UTC),
)


def logged_on_pair() -> tuple[TerminalSession, ServerSession]:
    terminal, server = TerminalSession(TERMINAL_ID, TERMINAL_KEY), ServerSession()
    server.receive_data(terminal.send(LogonRequest(terminal_nonce=b"\x11" * limits.nonce_bytes)))
    terminal.receive_data(server.challenge(TERMINAL_KEY, b"\x22" * limits.nonce_bytes))
    server.receive_data(terminal.send(LogonProof(software_version="bench")))
    accepted = LogonAccepted(
        server_time=datetime(2025, 3, 1, 8, 0, tzinfo=UTC),
        business_date=date(2025, 3, 1),
        heartbeat_interval_s=60,
        idle_timeout_s=300,
    )
    terminal.receive_data(server.send(accepted))
    return terminal, server


def session_rounds(rounds: int) -> float:
    """Seconds for `rounds` request/result exchanges through a fresh logged-on session pair."""
    terminal, server = logged_on_pair()
    request, result = REQUEST, RESULT
    terminal_send, server_receive = terminal.send, server.receive_data
    server_send, terminal_receive = server.send, terminal.receive_data
    start = time.perf_counter()
    for _ in range(rounds):
        server_receive(terminal_send(request))
        terminal_receive(server_send(result))
    return time.perf_counter() - start


def reference_rounds(rounds: int) -> float:
    """Seconds for the same messages with bare msgspec: encode and decode, nothing else."""
    encode, decode_request, decode_result = MSGPACK_ENCODER.encode, TERMINAL_DECODER.decode, SERVER_DECODER.decode
    request, result = REQUEST, RESULT
    start = time.perf_counter()
    for _ in range(rounds):
        decode_request(encode(request))
        decode_result(encode(result))
    return time.perf_counter() - start


def fastest(run: Callable[[int], float], rounds: int, repeats: int) -> float:
    """Microseconds per message of the fastest repeat (two messages per round)."""
    run(max(rounds // 10, 1))  # warm caches and allocators
    return min(run(rounds) for _ in range(repeats)) / (2 * rounds) * 1e6


def pin_to_one_core() -> int | None:
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    return cpu


def run(rounds: int = rounds_default, repeats: int = repeats_default) -> dict[str, object]:
    terminal, server = logged_on_pair()
    request_frame = terminal.send(REQUEST)
    server.receive_data(request_frame)
    result_frame = server.send(RESULT)
    # Interleave so both figures see the same machine load.
    session_us = min(fastest(session_rounds, rounds, 1) for _ in range(repeats))
    reference_us = min(fastest(reference_rounds, rounds, 1) for _ in range(repeats))
    return {
        "benchmark": "codec",
        "messages": "top_up_request + top_up_result",
        "us_per_message": round(session_us, 3),
        "messages_per_s": round(1e6 / session_us),
        "reference": "bare msgspec encode + decode of the same messages",
        "reference_us_per_message": round(reference_us, 3),
        "ratio_to_reference": round(session_us / reference_us, 2),
        "target_us_per_message": target_us_per_message,
        "meets_target": session_us <= target_us_per_message,
        "frame_bytes": {"top_up_request": len(request_frame), "top_up_result": len(result_frame)},
        "rounds": rounds,
        "repeats": repeats,
        "python": platform.python_version(),
        "msgspec": msgspec.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench_codec", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=rounds_default, help="request/result exchanges per repeat")
    parser.add_argument("--repeats", type=int, default=repeats_default, help="repeats; the fastest counts")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the process to one CPU")
    args = parser.parse_args(argv)
    cpu = None if args.no_pin else pin_to_one_core()
    figures = run(args.rounds, args.repeats)
    figures["cpu"] = cpu
    print(
        f"codec: {figures['us_per_message']} µs/message ({figures['messages_per_s']} messages/s),"
        f" bare msgspec {figures['reference_us_per_message']} µs, ratio {figures['ratio_to_reference']}"
    )
    print(json.dumps(figures, ensure_ascii=False), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
