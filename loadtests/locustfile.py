"""Locust users for vendgate: POS terminals over protocol v1 (TCP) and kiosks over HTTPS with mTLS.

    VENDGATE_TARGET=target.json locust -f loadtests/locustfile.py --headless \\
        --pos-users 200 --kiosk-users 20 -u 220 -r 50 -t 60s

(`make loadtest` starts a local gateway, writes the target file and runs this for you.)

A POS user is one terminal: it logs on once (TerminalSession over a blocking socket, which
locust's gevent makes cooperative), then loops like an agent at the counter: look the customer
up, take the cash (a short pause), top up; now and then reprint the receipt, reverse the payment
(keyed in error) or ask for its float; then wait for the next customer. A kiosk user is one
kiosk: HTTPS with its client certificate, JSON messages, same loop without the float inquiry (a
kiosk has no float). Every request fires locust's request event with its response time, and a
failure names its reason: the response code, the HTTP status, a lost link or a protocol error.

Terminals are handed out without overlap: the n-th user of worker w (of --vendgate-workers)
takes POS terminal w + n * workers of the target, so a distributed run (one master, many
workers) never logs the same terminal on twice (the gateway keeps one session per terminal).
Transaction sequences start from the time of day, so runs against one deployment on one day do
not reuse a transaction id.
"""

from __future__ import annotations

import itertools
import os
import random
import time
from datetime import UTC, datetime
from typing import Any, TypeVar

from locust import HttpUser, User, events, task
from locust.env import Environment
from locust.exception import StopUser
from locust.runners import WorkerRunner

from loadtests.pos_client import PosClient
from loadtests.rules import failure_reason, first_sequence
from loadtests.target import TARGET_ENV, KioskCredential, Target, load_target
from protocol.errors import ProtocolError
from protocol.kiosk import CONTENT_TYPE, KIOSK_PATH, decode_kiosk_reply, encode_kiosk_message
from protocol.messages import (
    ClientTransactionId,
    FloatInquiryRequest,
    FloatInquiryResult,
    LogonAccepted,
    LookupRequest,
    LookupResult,
    ReprintRequest,
    ReprintResult,
    ReversalReason,
    ReversalRequest,
    ReversalResult,
    ServerMessage,
    TenderType,
    TerminalMessage,
    TopUpRequest,
    TopUpResult,
)
from terminal_sim.client import LinkLost, TerminalRefused

AMOUNTS_MINOR = (500, 1_000, 2_000, 5_000)
reprint_probability = 0.10
reversal_probability = 0.03
float_inquiry_probability = 0.10
cash_pause_s = (0.2, 1.0)  # the agent counts the cash between lookup and payment
kiosk_request_timeout_s = 30.0

R = TypeVar("R", bound=ServerMessage)
_target: Target | None = None
_pos_counter = itertools.count()
_kiosk_counter = itertools.count()


def _arguments(parser: Any) -> None:
    group = parser.add_argument_group("vendgate")
    group.add_argument("--pos-users", type=int, default=0, env_var="LOCUST_POS_USERS",
                       help="exact number of POS users (0: by weight)")
    group.add_argument("--kiosk-users", type=int, default=0, env_var="LOCUST_KIOSK_USERS",
                       help="exact number of kiosk users (0: by weight)")
    group.add_argument("--vendgate-workers", type=int, default=1, env_var="LOCUST_VENDGATE_WORKERS",
                       help="workers in a distributed run, so terminals are split without overlap")
    group.add_argument("--think-min-s", type=float, default=1.0, env_var="LOCUST_THINK_MIN_S",
                       help="shortest pause between two customers")
    group.add_argument("--think-max-s", type=float, default=3.0, env_var="LOCUST_THINK_MAX_S",
                       help="longest pause between two customers")


def _init(environment: Environment, **_: Any) -> None:
    global _target
    path = os.environ.get(TARGET_ENV)
    if not path:
        raise SystemExit(f"set {TARGET_ENV} to a target file (make loadtest writes one; see docs/benchmarks.md)")
    _target = load_target(path)
    options = environment.parsed_options
    if options is not None:
        if options.pos_users:
            PosUser.fixed_count = options.pos_users
        if options.kiosk_users:
            KioskUser.fixed_count = options.kiosk_users
    if _target.kiosk_port is not None and _target.kiosks:
        KioskUser.host = f"https://{_target.host}:{_target.kiosk_port}"
    else:
        KioskUser.weight = 0
        KioskUser.fixed_count = 0


events.init_command_line_parser.add_listener(_arguments)  # type: ignore[no-untyped-call]
events.init.add_listener(_init)  # type: ignore[no-untyped-call]


def target() -> Target:
    assert _target is not None, "the init event loads the target"
    return _target


def _slot(environment: Environment, counter: itertools.count[int]) -> int:
    """This user's index among all users of its kind across workers."""
    options = environment.parsed_options
    workers = max(1, options.vendgate_workers if options is not None else 1)
    runner = environment.runner
    worker_index = runner.worker_index if isinstance(runner, WorkerRunner) else 0
    return worker_index % workers + next(counter) * workers


def _think(user: User) -> float:
    options = user.environment.parsed_options
    low, high = (options.think_min_s, options.think_max_s) if options is not None else (1.0, 3.0)
    return random.uniform(low, max(low, high))


class PosUser(User):
    """One POS terminal of the target, logged on for the whole run."""

    weight = 10

    def wait_time(self) -> float:
        return _think(self)

    def on_start(self) -> None:
        slot = _slot(self.environment, _pos_counter)
        if slot >= target().terminals:
            raise StopUser(f"the target has {target().terminals} POS terminals; user {slot} has none")
        terminal_id, key = target().terminal(slot)
        self.terminal = PosClient(terminal_id, key, target().host, target().pos_port,
                                  first_sequence=first_sequence())
        self.last_approved: tuple[ClientTransactionId, int] | None = None
        self._logon()

    def on_stop(self) -> None:
        self.terminal.logoff()

    def _logon(self) -> bool:
        return self._call("logon", None, LogonAccepted) is not None

    def _call(self, name: str, message: TerminalMessage | None, expected: type[R]) -> R | None:
        """One exchange, reported to locust; None when it failed (the failure is reported)."""
        if message is not None and not self.terminal.connected and not self._logon():
            return None
        started = time.perf_counter()
        received_before = self.terminal.bytes_received
        reply: ServerMessage | None = None
        exception: Exception | None = None
        try:
            reply = self.terminal.logon() if message is None else self.terminal.request(message, expected)
        except TerminalRefused as refused:
            exception = Exception(f"{refused.response_code.name}: {refused}")
        except LinkLost as lost:
            exception = Exception(f"link lost: {lost}")
        except ProtocolError as error:
            self.terminal.close()
            exception = Exception(f"protocol error {type(error).__name__}: {error.detail}")
        if reply is not None:
            reason = failure_reason(reply)
            if reason is not None:
                exception = Exception(reason)
        self.environment.events.request.fire(
            request_type="POS", name=name, response_time=(time.perf_counter() - started) * 1000,
            response_length=self.terminal.bytes_received - received_before, exception=exception, context={},
            url=None)
        return reply if exception is None else None  # type: ignore[return-value]

    @task
    def serve_customer(self) -> None:
        meter = target().meter(random.randrange(target().meters))
        if self._call("lookup", LookupRequest(meter_number=meter), LookupResult) is None:
            return
        time.sleep(random.uniform(*cash_pause_s))
        if not self.terminal.connected and not self._logon():
            return
        amount = random.choice(AMOUNTS_MINOR)
        txn = self.terminal.next_transaction_id()
        result = self._call("top_up", TopUpRequest(client_transaction_id=txn, meter_number=meter,
                                                   amount_minor=amount, currency=target().currency,
                                                   tender_type=TenderType.CASH), TopUpResult)
        if result is None:
            return
        self.last_approved = (txn, amount)
        draw = random.random()
        if draw < reversal_probability:
            self._call("reversal", ReversalRequest(original_transaction_id=txn, amount_minor=amount,
                                                   currency=target().currency, reason=ReversalReason.AGENT_CANCELLED
                                                   ), ReversalResult)
            self.last_approved = None
        elif draw < reversal_probability + reprint_probability:
            self._call("reprint", ReprintRequest(client_transaction_id=txn), ReprintResult)
        if random.random() < float_inquiry_probability:
            self._call("float_inquiry", FloatInquiryRequest(), FloatInquiryResult)


class KioskUser(HttpUser):
    """One self-service kiosk: HTTPS with its client certificate, one JSON message per POST."""

    weight = 1
    host = "https://127.0.0.1"

    def wait_time(self) -> float:
        return _think(self)

    def on_start(self) -> None:
        slot = _slot(self.environment, _kiosk_counter)
        kiosks = target().kiosks
        if slot >= len(kiosks):
            raise StopUser(f"the target has {len(kiosks)} kiosk certificates; user {slot} has none")
        credential: KioskCredential = kiosks[slot]
        self.kiosk_id = credential.kiosk_id
        self.client.cert = (credential.cert_file, credential.key_file)
        self.client.verify = target().ca_file or True
        self.client.headers["Content-Type"] = CONTENT_TYPE
        self.sequence = first_sequence()
        self.business_date = datetime.now(UTC).date()

    def _send(self, name: str, message: TerminalMessage) -> ServerMessage | None:
        with self.client.post(KIOSK_PATH, data=encode_kiosk_message(message), name=f"kiosk {name}",
                              catch_response=True, timeout=kiosk_request_timeout_s) as response:
            try:
                reply = decode_kiosk_reply(response.content or b"")
            except ProtocolError:
                response.failure(f"HTTP {response.status_code}: body is not a kiosk reply")
                return None
            reason = failure_reason(reply)
            if reason is not None or response.status_code != 200:
                response.failure(f"HTTP {response.status_code} {reason or ''}".strip())
                return None
            response.success()
            return reply

    @task
    def serve_customer(self) -> None:
        meter = target().meter(random.randrange(target().meters))
        if self._send("lookup", LookupRequest(meter_number=meter)) is None:
            return
        time.sleep(random.uniform(*cash_pause_s))  # the cash acceptor counts the notes
        self.sequence += 1
        txn = ClientTransactionId(terminal_id=self.kiosk_id, terminal_sequence=self.sequence,
                                  business_date=self.business_date)
        amount = random.choice(AMOUNTS_MINOR)
        if self._send("top_up", TopUpRequest(client_transaction_id=txn, meter_number=meter, amount_minor=amount,
                                             currency=target().currency, tender_type=TenderType.CASH)) is None:
            return
        draw = random.random()
        if draw < reversal_probability:
            self._send("reversal", ReversalRequest(original_transaction_id=txn, amount_minor=amount,
                                                   currency=target().currency, reason=ReversalReason.NO_REPLY))
        elif draw < reversal_probability + reprint_probability:
            self._send("reprint", ReprintRequest(client_transaction_id=txn))
