"""What terminal_sim's simulator does when the link or the gateway misbehaves."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import sys
from datetime import UTC, datetime

import msgspec
import pytest

import terminal_sim.sim as sim_module
from gateway.committer import CommitterBusy
from gateway.seeding import meter_number, terminal_id
from gateway.server import Gateway
from gateway.settings import load_settings
from protocol.codes import ResponseCode
from protocol.messages import Advice, FloatInquiryResult, LogonRequest, TenderType, TopUpResult
from terminal_sim.client import LAN, LinkLost, PosTerminal
from terminal_sim.sim import run_simulation
from tests.gateway.conftest import Running
from tests.gateway.test_secrets_in_logs import gateway_log  # noqa: F401 - the fixture

METERS = [meter_number(n) for n in range(13, 43)]


async def _sim(running: Running, n: int, duration_s: float = 1.0, **kwargs: object):  # type: ignore[no-untyped-def]
    assert running.gateway.pos_port is not None
    return await run_simulation(host="127.0.0.1", port=running.gateway.pos_port,
                                terminals=[(terminal_id(n), running.key(n))], meters=METERS, currency="EUR",
                                duration_s=duration_s, link=LAN, **kwargs)  # type: ignore[arg-type]


async def test_system_busy_on_a_top_up_is_repeated_and_the_terminal_keeps_paying(
        running: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    """protocol.md: after a non-closing SYSTEM_BUSY the terminal repeats the request with the same id."""
    committer = running.gateway.committer
    real_submit = committer.submit
    calls = {"n": 0}

    async def busy_once(request, **options):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 1:
            raise CommitterBusy("queue full")
        return await real_submit(request, **options)

    monkeypatch.setattr(committer, "submit", busy_once)
    summary, notes = await _sim(running, 31, duration_s=1.5)
    assert summary.approved + summary.declined + summary.errors + summary.protocol_errors > 0, (
        f"one SYSTEM_BUSY silently ended the terminal's run: {summary}, notes={notes}")


async def test_a_first_logon_that_loses_its_reply_is_retried(
        running: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    real_exchange = PosTerminal._exchange
    lost = {"done": False}

    async def lose_first_logon(self, message, expected):  # type: ignore[no-untyped-def]
        reply = await real_exchange(self, message, expected)
        if isinstance(message, LogonRequest) and not lost["done"]:
            lost["done"] = True
            await self.close()
            raise LinkLost("reply lost")
        return reply

    monkeypatch.setattr(PosTerminal, "_exchange", lose_first_logon)
    summary, _ = await _sim(running, 32, duration_s=1.5)
    assert summary.approved > 0, f"one lost logon reply ended the terminal for the whole run: {summary}"


async def test_a_top_up_whose_replies_are_all_lost_is_reversed_or_reported(
        running: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    """protocol.md: a terminal that never learns a top-up's outcome repeats it or reverses it (no_reply);
    it never leaves a charged payment it told nobody about."""
    real_exchange = PosTerminal._exchange

    async def lose_top_up_replies(self, message, expected):  # type: ignore[no-untyped-def]
        reply = await real_exchange(self, message, expected)
        if isinstance(reply, TopUpResult):
            await self.close()
            raise LinkLost("reply lost")
        return reply

    monkeypatch.setattr(PosTerminal, "_exchange", lose_top_up_replies)
    summary, _ = await _sim(running, 33, duration_s=0.6)
    async with running.pool.acquire() as conn:
        charged_unreversed = await conn.fetchval(
            "SELECT count(*) FROM vend_transactions v WHERE v.terminal_id = $1 AND v.kind = 'topup'"
            " AND v.response_code = 0 AND NOT EXISTS (SELECT 1 FROM reversals r"
            " WHERE r.original_txn_id = v.client_txn_id)", terminal_id(33))
    assert summary.errors >= 1 and summary.approved == 0
    assert charged_unreversed == 0, (
        f"{charged_unreversed} payments were charged to the float, never reversed, and the summary "
        f"(ok={summary.ok}) reports them only as link errors")


async def test_a_second_run_on_the_same_day_makes_new_payments(running: Running) -> None:
    """Before, every run started each terminal at the same sequence: a second run was answered from
    the first run's stored replies, and no money moved."""
    first, _ = await _sim(running, 34, duration_s=0.8)
    async with running.pool.acquire() as conn:
        before = await conn.fetchval("SELECT count(*) FROM vend_transactions WHERE terminal_id = $1", terminal_id(34))
    second, _ = await _sim(running, 34, duration_s=0.8)
    async with running.pool.acquire() as conn:
        after = await conn.fetchval("SELECT count(*) FROM vend_transactions WHERE terminal_id = $1", terminal_id(34))
    assert first.approved > 0 and second.approved > 0
    replayed = set(first.approved_txn_ids) & set(second.approved_txn_ids)
    assert not replayed, (f"{len(replayed)} of the second run's {second.approved} 'approved' payments were replays "
                          f"of the first run (new vend_transactions rows: {after - before})")


async def test_sim_against_a_stopped_gateway_is_not_ok() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    summary, notes = await run_simulation(host="127.0.0.1", port=port, terminals=[("T0000001", bytes(16))],
                                          meters=["1"], currency="EUR", duration_s=0.3, link=LAN)
    assert summary.approved == 0 and summary.errors == 1
    [note] = notes
    assert note.startswith("T0000001: stopped: ConnectionRefusedError(") and str(port) in note
    assert not summary.ok, "every terminal failed and nothing was paid, yet `vendgate sim` exits 0"


@pytest.mark.timeout(60)
async def test_duration_bounds_the_run_against_a_gateway_that_stops_answering() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 20)
        await asyncio.sleep(3600)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    task = asyncio.ensure_future(run_simulation(host="127.0.0.1", port=port, terminals=[("T0000001", bytes(16))],
                                                meters=["1"], currency="EUR", duration_s=0.5, link=LAN))
    try:
        await asyncio.wait({task}, timeout=10)
        assert task.done(), "--duration 0.5 still running after 10 s (6 x 30 s reply timeouts, then logoff)"
    finally:
        task.cancel()
        await asyncio.wait({task})
        if not task.cancelled():
            task.exception()
        server.close()


@pytest.mark.timeout(60)
async def test_a_gateway_that_stops_mid_run_is_not_called_in_a_tight_loop(running: Running) -> None:
    """Before, each terminal went on to its next payment at once after one that failed: with the
    gateway gone, connections were refused as fast as they were opened (thousands a second)."""
    settings = load_settings(environ={"VENDGATE_POS_PORT": "0", "VENDGATE_HTTP_PORT": "0"})
    gateway = Gateway(settings, running.pool, running.keystore)
    await gateway.start()
    assert gateway.pos_port is not None
    terminals = [(terminal_id(n), running.key(n)) for n in (33, 34)]
    run = asyncio.ensure_future(run_simulation(host="127.0.0.1", port=gateway.pos_port, terminals=terminals,
                                               meters=METERS, currency="EUR", duration_s=4.0, link=LAN))
    await asyncio.sleep(1.0)
    await gateway.stop()
    summary, _ = await run
    assert summary.approved > 0 and summary.errors > 0
    # Each failed payment: a top-up and its reversal, each with its retries_max reconnects, then a
    # pause of at least failure_pause_s[0]: in about 3 s without a gateway, a few per terminal.
    assert summary.errors <= 2 * (3.0 / sim_module.failure_pause_s[0] + 2), summary
    assert summary.retries <= 2 * 12 * (3.0 / sim_module.failure_pause_s[0] + 2), summary


async def test_a_reply_failing_its_mac_is_counted_and_its_payment_repeated(running: Running) -> None:
    """A relay flips a MAC byte of the third reply (the first top-up's): the simulator must count a
    protocol error and return its summary. The terminal closes the connection, as docs/protocol.md
    asks of a frame it cannot accept, logs on again and repeats the payment with the same id."""
    assert running.gateway.pos_port is not None
    gateway_port = running.gateway.pos_port
    replies = 0  # across connections: only the first top-up's reply is altered

    async def relay(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", gateway_port)

        async def up() -> None:
            while data := await client_reader.read(65_536):
                upstream_writer.write(data)
            upstream_writer.close()

        async def down() -> None:
            nonlocal replies
            while data := await upstream_reader.read(65_536):
                replies += 1
                client_writer.write(data[:-1] + bytes([data[-1] ^ 1]) if replies == 3 else data)
            client_writer.close()

        await asyncio.gather(up(), down(), return_exceptions=True)

    server = await asyncio.start_server(relay, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        summary, notes = await run_simulation(host="127.0.0.1", port=port,
                                              terminals=[(terminal_id(36), running.key(36))], meters=METERS,
                                              currency="EUR", duration_s=0.5, link=LAN)
        assert summary.protocol_errors == 1 and not summary.ok, summary
        assert any("MacFailure" in note for note in notes), notes
        assert summary.approved > 0 and summary.retries >= 1 and summary.unresolved == 0, summary
    finally:
        server.close()


@pytest.mark.timeout(60)
async def test_the_terminal_logs_on_again_after_a_goodbye_that_came_with_its_reply(running: Running) -> None:
    """protocol.md: after a closing error 'both ends then close the connection', and the terminal
    logs on again. At SIGTERM the gateway writes a busy session's reply and its goodbye back to
    back, so the terminal reads both at once. Before, PosTerminal returned the reply and kept the
    closed session on an open socket, and its next request raised LocalProtocolError instead of
    logging on again (here to the gateway started again on the same port)."""
    settings = load_settings(environ={"VENDGATE_POS_PORT": "0", "VENDGATE_HTTP_PORT": "0"})
    first = Gateway(settings, running.pool, running.keystore)
    await first.start()
    port = first.pos_port
    assert port is not None
    term = PosTerminal(terminal_id(300), running.key(300), "127.0.0.1", port, last_sequence=700)
    second: Gateway | None = None
    try:
        await term.logon()
        async with running.pool.acquire() as holder:
            lock = holder.transaction()
            await lock.start()
            await holder.execute("LOCK TABLE vend_transactions IN ACCESS EXCLUSIVE MODE")  # the commit stalls
            paying = asyncio.create_task(term.top_up(meter_number(24), 800, "EUR"))
            await asyncio.sleep(0.3)
            stopping = asyncio.create_task(first.stop())  # SIGTERM with the payment in flight
            await asyncio.sleep(0.3)
            await lock.rollback()
        paid = await asyncio.wait_for(paying, 10)
        assert isinstance(paid, TopUpResult) and paid.response_code is ResponseCode.APPROVED
        await asyncio.wait_for(stopping, 30)
        assert term._writer is None and term._session is None  # the goodbye closed the connection
        second = Gateway(load_settings(environ={"VENDGATE_POS_PORT": str(port), "VENDGATE_HTTP_PORT": "0"}),
                         running.pool, running.keystore)
        await second.start()
        result = await asyncio.wait_for(term.float_inquiry(), 10)
        assert isinstance(result, FloatInquiryResult) and result.response_code is ResponseCode.APPROVED
    finally:
        await term.close()
        if second is not None:
            await second.stop()
        await first.stop()


async def interrupted_sim(tmp_path, sigints: int) -> tuple[dict[str, object], float]:  # type: ignore[no-untyped-def]
    """`vendgate sim` against a gateway that never answers, sent `sigints` Ctrl-Cs (half a second
    apart) 3 s into its run: its summary, and the seconds from the last Ctrl-C to its exit 130."""
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 20)
        await asyncio.sleep(3600)

    server = await asyncio.start_server(slow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    (tmp_path / "seed.secret").write_text("00" * 32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VENDGATE_")}
    env.update(VENDGATE_DATA_DIR=str(tmp_path), VENDGATE_LOG_LEVEL="warning")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "sim", "--terminals", "3", "--duration", "30", "--port", str(port),
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    loop = asyncio.get_running_loop()
    try:
        await asyncio.sleep(3)
        for n in range(sigints):
            if n:
                await asyncio.sleep(0.5)
            proc.send_signal(signal.SIGINT)
        last = loop.time()
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 20)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            pytest.fail("vendgate sim still running 20 s after SIGINT")
    finally:
        server.close()
    assert b"Traceback" not in err, err.decode()[-600:]
    assert proc.returncode == 130
    return msgspec.json.decode(out.decode().strip().splitlines()[-1]), loop.time() - last


@pytest.mark.timeout(60)
async def test_sigint_stops_vendgate_sim_cleanly_while_a_reply_is_awaited(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Ctrl-C while the terminals wait for a slow gateway's reply: exit 130 with the summary of the
    run so far, no traceback."""
    summary, _ = await interrupted_sim(tmp_path, 1)
    assert summary["interrupted"] is True and summary["terminals"] == 3, summary
    assert summary["approved"] == 0 and not summary["approved_txn_ids"]
    assert 2 < summary["duration_s"] < 10, summary  # type: ignore[operator]  # the time it ran, not the 30 s asked


@pytest.mark.timeout(60)
async def test_a_second_sigint_stops_vendgate_sim_at_once(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The first Ctrl-C gives the payments in flight the grace period; a second one ends it now."""
    summary, took_s = await interrupted_sim(tmp_path, 2)
    assert took_s < sim_module.stop_grace_s - 1, f"{took_s:.1f} s after the second Ctrl-C"
    assert summary["interrupted"] is True


# -- what the simulator checks in a reply ----------------------------------------------------------


class _FakeTerminal:
    """Stands in for PosTerminal: answers every top-up with what `answer` makes of it."""

    answer = staticmethod(lambda request_amount, txn, n: None)  # type: ignore[var-annotated]

    def __init__(self, terminal_id: str, key: bytes, host: str, port: int, **_: object) -> None:
        self.terminal_id = terminal_id
        self.retries = 0
        self.business_date = datetime.now(UTC).date()
        self._sequence = 0
        self._n = 0
        self._replies: dict[int, TopUpResult] = {}

    async def logon(self) -> None:
        return None

    async def connect(self) -> None:
        return None

    @property
    def last_sequence(self) -> int:
        return self._sequence

    async def close(self) -> None:
        return None

    async def logoff(self) -> None:
        return None

    def next_transaction_id(self):  # type: ignore[no-untyped-def]
        from protocol.messages import ClientTransactionId

        self._sequence += 1
        return ClientTransactionId(terminal_id=self.terminal_id, terminal_sequence=self._sequence,
                                   business_date=self.business_date)

    async def top_up(self, meter, amount, currency, txn=None):  # type: ignore[no-untyped-def]
        if txn.terminal_sequence not in self._replies:
            self._n += 1
            self._replies[txn.terminal_sequence] = type(self).answer(amount, txn, self._n)
        return self._replies[txn.terminal_sequence]

    async def float_inquiry(self) -> None:
        return None

    async def reverse(self, *args: object, **kwargs: object) -> None:
        raise AssertionError("not reached")


def _approved(txn, amount: int, float_remaining: int) -> TopUpResult:  # type: ignore[no-untyped-def]
    return TopUpResult(client_transaction_id=txn, response_code=ResponseCode.APPROVED, currency="EUR",
                       amount_minor=amount, receipt_number=f"{txn.terminal_id}-{txn.terminal_sequence:06d}",
                       energy_minor=amount, float_remaining_minor=float_remaining)


@pytest.mark.parametrize("case", ["amount_not_the_request", "currency_not_the_request", "reply_for_another_txn"])
async def test_an_inconsistent_approved_reply_is_flagged(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def answer(amount: int, txn, n: int) -> TopUpResult:  # type: ignore[no-untyped-def]
        if case == "amount_not_the_request":  # the split adds up, to 1 more than was paid
            return _approved(txn, amount + 1, 10_000_000 - n * 10_000)
        if case == "currency_not_the_request":
            return msgspec.structs.replace(_approved(txn, amount, 10_000_000 - n * 10_000), currency="KES")
        other = msgspec.structs.replace(txn, terminal_sequence=txn.terminal_sequence + 1000)
        return msgspec.structs.replace(_approved(txn, amount, 10_000_000 - n * 10_000), client_transaction_id=other)

    monkeypatch.setattr(_FakeTerminal, "answer", staticmethod(answer))
    monkeypatch.setattr(sim_module, "PosTerminal", _FakeTerminal)
    monkeypatch.setattr(sim_module, "think_time_s", (0.001, 0.002))
    summary, _notes = await run_simulation(host="x", port=1, terminals=[("T0000001", bytes(16))], meters=["1"],
                                          currency="EUR", duration_s=0.2, link=LAN, reversal_every=10**9)
    assert summary.approved >= 3
    assert summary.inconsistencies > 0, f"{case}: {summary.approved} inconsistent replies, none flagged"


async def test_p99_of_a_hundred_latencies_is_the_99th(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nearest rank: the p99 of 1..100 ms is 99 ms, not the maximum."""
    now = {"t": 0.0}

    class Clock:
        @staticmethod
        def monotonic() -> float:
            return now["t"]

    class Timed(_FakeTerminal):
        async def top_up(self, meter, amount, currency, txn=None):  # type: ignore[no-untyped-def]
            if txn.terminal_sequence not in self._replies:
                now["t"] += txn.terminal_sequence / 1000  # the k-th payment takes k ms
            return await super().top_up(meter, amount, currency, txn)

    monkeypatch.setattr(Timed, "answer", staticmethod(lambda amount, txn, n: _approved(txn, amount, 10**9 - n)))
    monkeypatch.setattr(sim_module, "PosTerminal", Timed)
    monkeypatch.setattr(sim_module, "time", Clock)
    monkeypatch.setattr(sim_module, "think_time_s", (0.0, 0.0))
    summary, _ = await run_simulation(host="x", port=1, terminals=[("T0000001", bytes(16))], meters=["1"],
                                      currency="EUR", duration_s=5.0, link=LAN, reversal_every=10**9)
    assert summary.approved == 100
    assert summary.latency_p99_ms == 99.0


# -- one log line per transaction -------------------------------------------------------------------


async def test_each_advice_gets_its_transaction_log_line(running: Running, gateway_log: io.StringIO) -> None:  # noqa: F811
    assert running.gateway.pos_port is not None
    pos = PosTerminal(terminal_id(35), running.key(35), "127.0.0.1", running.gateway.pos_port)
    await pos.logon()
    advices = [Advice(client_transaction_id=pos.next_transaction_id(), meter_number=meter_number(14 + n),
                      amount_minor=1_000, currency="EUR", tender_type=TenderType.CASH, taken_at=datetime.now(UTC))
               for n in range(2)]
    result = await pos.send_advices(advices)
    await pos.logoff()
    assert [o.response_code for o in result.outcomes] == [ResponseCode.APPROVED] * 2
    lines = [msgspec.json.decode(line) for line in gateway_log.getvalue().splitlines()]
    keys = {a.client_transaction_id.as_key() for a in advices}
    logged = {line.get("client_txn_id") for line in lines} & keys
    assert logged == keys, f"2 approved offline payments moved money; log lines: {[ln['event'] for ln in lines]}"
