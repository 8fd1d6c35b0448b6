"""Sessions are cut off as promised: a blocked terminal whatever it sends, a frame that dribbles in,
and every session at shutdown, within its bound, however its peer behaves."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import time
from datetime import UTC, datetime

import pytest

from gateway import committer
from gateway.seeding import meter_number, terminal_id
from gateway.server import Gateway, Limits, _Connection, goodbye_drain_s, shutdown_grace_s
from gateway.settings import load_settings
from protocol.codes import ResponseCode
from protocol.messages import (
    Advice,
    AdviceBatchRequest,
    AdviceBatchResult,
    ClientTransactionId,
    ErrorReply,
    FloatInquiryRequest,
    FloatInquiryResult,
    HeartbeatReply,
    HeartbeatRequest,
    LogonProof,
    LogonRequest,
    LookupRequest,
    ReversalReason,
    ReversalRequest,
    ReversalResult,
    TenderType,
    TopUpRequest,
    TopUpResult,
)
from protocol.session import MessageReceived, ServerState, TerminalSession, TerminalState
from terminal_sim.client import PosTerminal, TerminalRefused
from tests.gateway.conftest import Running, table_locked


def pos(running: Running, n: int) -> PosTerminal:
    assert running.gateway.pos_port is not None
    return PosTerminal(terminal_id(n), running.key(n), "127.0.0.1", running.gateway.pos_port, last_sequence=500)


async def block(running: Running, n: int) -> None:
    async with running.pool.acquire() as conn:
        await conn.execute("UPDATE terminals SET status = 'blocked' WHERE terminal_id = $1", terminal_id(n))


async def test_terminal_blocked_mid_session_gets_closing_error_on_reversal(running: Running) -> None:
    """docs/protocol.md: 'a terminal blocked since it logged on gets a MACed closing
    TERMINAL_BLOCKED to any request other than heartbeat_request and logoff_request'."""
    term = pos(running, 290)
    await term.logon()
    await block(running, 290)
    txn = ClientTransactionId(terminal_id=term.terminal_id, terminal_sequence=1, business_date=term.business_date)
    request = ReversalRequest(original_transaction_id=txn, amount_minor=500, currency="EUR",
                              reason=ReversalReason.NO_REPLY)
    try:
        with pytest.raises(TerminalRefused) as refused:
            await term._exchange(request, ReversalResult)
        assert refused.value.response_code is ResponseCode.TERMINAL_BLOCKED
    finally:
        await term.close()


async def test_terminal_blocked_mid_session_gets_closing_error_on_advices(running: Running) -> None:
    term = pos(running, 291)
    await term.logon()
    await block(running, 291)
    advice = Advice(client_transaction_id=term.next_transaction_id(), meter_number=meter_number(26),
                    amount_minor=500, currency="EUR", tender_type=TenderType.CASH, taken_at=datetime.now(UTC))
    try:
        with pytest.raises(TerminalRefused) as refused:
            await term._exchange(AdviceBatchRequest(advices=[advice]), AdviceBatchResult)
        assert refused.value.response_code is ResponseCode.TERMINAL_BLOCKED
    finally:
        await term.close()


async def set_terminal(running: Running, n: int, column: str, value: object) -> None:
    assert column in ("status", "allowed_operations")
    async with running.pool.acquire() as conn:
        await conn.execute(f"UPDATE terminals SET {column} = $2 WHERE terminal_id = $1", terminal_id(n), value)


async def recorded(running: Running, txn: ClientTransactionId) -> list[int]:
    async with running.pool.acquire() as conn:
        return [r["response_code"] for r in await conn.fetch(
            "SELECT response_code FROM vend_transactions WHERE client_txn_id = $1", txn.as_key())]


async def test_an_advice_refused_by_a_block_is_applied_when_forwarded_after_the_unblock(running: Running) -> None:
    # The cash was taken offline: the terminal forwards the advice until it learns an outcome.
    # TERMINAL_BLOCKED holds while the block does; recorded, every later forward got it for ever.
    term = pos(running, 296)
    await term.logon()
    advice = Advice(client_transaction_id=term.next_transaction_id(), meter_number=meter_number(27),
                    amount_minor=500, currency="EUR", tender_type=TenderType.CASH, taken_at=datetime.now(UTC))
    await set_terminal(running, 296, "status", "blocked")
    try:
        with pytest.raises(TerminalRefused) as refused:
            await term._exchange(AdviceBatchRequest(advices=[advice]), AdviceBatchResult)
        assert refused.value.response_code is ResponseCode.TERMINAL_BLOCKED
        assert await recorded(running, advice.client_transaction_id) == []
    finally:
        await set_terminal(running, 296, "status", "active")
    try:
        await term.logon()
        result = await term._exchange(AdviceBatchRequest(advices=[advice]), AdviceBatchResult)
    finally:
        await term.close()
    assert [o.response_code for o in result.outcomes] == [ResponseCode.APPROVED]
    assert await recorded(running, advice.client_transaction_id) == [ResponseCode.APPROVED]


async def test_a_payment_refused_for_a_withdrawn_grant_is_applied_once_granted_again(running: Running) -> None:
    # docs/protocol.md: a request for an operation the terminal is not granted changes nothing.
    term = pos(running, 298)
    await term.logon()
    advice = Advice(client_transaction_id=term.next_transaction_id(), meter_number=meter_number(28),
                    amount_minor=600, currency="EUR", tender_type=TenderType.CASH, taken_at=datetime.now(UTC))
    everything = ["lookup", "topup", "reversal", "reprint", "float", "advice", "eod"]
    try:
        await set_terminal(running, 298, "allowed_operations", [op for op in everything if op != "advice"])
        try:
            refused = await term._exchange(AdviceBatchRequest(advices=[advice]), AdviceBatchResult)
        finally:
            await set_terminal(running, 298, "allowed_operations", everything)
        assert [o.response_code for o in refused.outcomes] == [ResponseCode.NOT_PERMITTED]
        assert await recorded(running, advice.client_transaction_id) == []
        topup = await term.top_up(meter_number(28), 700, "EUR")
        assert topup.response_code is ResponseCode.APPROVED
        again = await term._exchange(AdviceBatchRequest(advices=[advice]), AdviceBatchResult)
    finally:
        await term.close()
    assert [o.response_code for o in again.outcomes] == [ResponseCode.APPROVED]


async def test_a_top_up_refused_while_blocked_is_decided_afresh_once_active(running: Running) -> None:
    # The terminal never learnt an outcome (a closing TERMINAL_BLOCKED), so it repeats the same id.
    term = pos(running, 299)
    await term.logon()
    await set_terminal(running, 299, "status", "blocked")
    txn = term.next_transaction_id()
    try:
        with pytest.raises(TerminalRefused) as refused:
            await term.top_up(meter_number(29), 800, "EUR", txn=txn)
        assert refused.value.response_code is ResponseCode.TERMINAL_BLOCKED
    finally:
        await set_terminal(running, 299, "status", "active")
    try:
        await term.logon()
        paid = await term.top_up(meter_number(29), 800, "EUR", txn=txn)
        assert paid.response_code is ResponseCode.APPROVED
        assert await term.top_up(meter_number(29), 800, "EUR", txn=txn) == paid
    finally:
        await term.close()
    assert await recorded(running, txn) == [ResponseCode.APPROVED]


async def test_frame_started_in_the_same_read_as_the_previous_one_meets_the_frame_deadline(
        running: Running) -> None:
    gateway = running.gateway
    previous = gateway.limits
    term = pos(running, 293)
    await term.logon()
    gateway.limits = Limits(idle_timeout_s=6.0, frame_deadline_s=0.5)
    try:
        assert term._session is not None and term._writer is not None and term._reader is not None
        heartbeat = term._session.send(HeartbeatRequest())
        # A whole heartbeat and the first byte of the next frame, then silence.
        term._writer.write(heartbeat + b"\x00")
        await term._writer.drain()
        started = time.monotonic()
        seen: list[object] = []
        while True:
            data = await asyncio.wait_for(term._reader.read(65536), 10)
            if not data:
                break
            seen += [e.message for e in term._session.receive_data(data) if isinstance(e, MessageReceived)]
        elapsed = time.monotonic() - started
        errors = [m for m in seen if isinstance(m, ErrorReply)]
        assert errors and errors[-1].detail == "frame deadline passed"
        assert elapsed < 2.0, f"a frame whose first byte arrived was given {elapsed:.1f} s, deadline 0.5 s"
    finally:
        gateway.limits = previous
        await term.close()


async def test_a_frame_in_pieces_after_a_quiet_spell_gets_the_whole_frame_deadline(running: Running) -> None:
    """docs/protocol.md: a frame must be complete within the frame deadline of its first bytes.
    After a quiet spell longer than the deadline (a heartbeat interval is one), a frame that comes
    in two pieces, as on GPRS, is answered; one whose rest comes after the deadline is cut off."""
    settings = load_settings(environ={"VENDGATE_POS_PORT": "0", "VENDGATE_HTTP_PORT": "0"})
    gateway = Gateway(settings, running.pool, running.keystore,
                      limits=Limits(idle_timeout_s=6.0, frame_deadline_s=0.5))
    await gateway.start()
    assert gateway.pos_port is not None
    term = PosTerminal(terminal_id(295), running.key(295), "127.0.0.1", gateway.pos_port, last_sequence=500)
    try:
        await term.logon()
        assert term._session is not None and term._writer is not None
        for _ in range(2):
            await asyncio.sleep(1.0)  # quiet for twice the frame deadline
            heartbeat = term._session.send(HeartbeatRequest())
            term._writer.write(heartbeat[:10])
            await term._writer.drain()
            await asyncio.sleep(0.2)  # well within the deadline of the frame's first bytes
            term._writer.write(heartbeat[10:])
            await term._writer.drain()
            reply = await asyncio.wait_for(term._read_reply(), 5)
            assert isinstance(reply, HeartbeatReply), reply
        await asyncio.sleep(1.0)
        heartbeat = term._session.send(HeartbeatRequest())
        term._writer.write(heartbeat[:10])  # and the rest never in time
        await term._writer.drain()
        started = time.monotonic()
        reply = await asyncio.wait_for(term._read_reply(), 5)
        elapsed = time.monotonic() - started
        assert isinstance(reply, ErrorReply) and reply.connection_closing, reply
        assert reply.detail == "frame deadline passed"
        assert 0.3 < elapsed < 2.0, f"a frame was cut off {elapsed:.1f} s after its first bytes, deadline 0.5 s"
    finally:
        await term.close()
        await gateway.stop()


async def sock_logon(running: Running, port: int, n: int) -> tuple[socket.socket, TerminalSession]:
    """Log terminal n on over a bare socket that the test then never reads from."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    session = TerminalSession(terminal_id(n), running.key(n))
    for message in (LogonRequest(terminal_nonce=secrets.token_bytes(16)), LogonProof(software_version="review")):
        await loop.sock_sendall(sock, session.send(message))
        done = False
        while not done:
            data = await asyncio.wait_for(loop.sock_recv(sock, 65536), 5)
            assert data
            done = any(isinstance(e, MessageReceived) for e in session.receive_data(data))
    return sock, session


async def fill_write_buffer(running: Running, gateway: Gateway, n: int, socks: list[socket.socket],
                            buffered_bytes_above: int = 65_536) -> socket.socket:
    """Log terminal n on, then send lookups in lock step (each once the gateway took the one
    before) and never read a reply, until the gateway holds more than buffered_bytes_above of
    replies for it (by default: its write buffer is full, above the high-water mark)."""
    loop = asyncio.get_running_loop()
    assert gateway.pos_port is not None
    sock, session = await sock_logon(running, gateway.pos_port, n)
    socks.append(sock)
    conn = next(c for c in gateway._connections if c.terminal_id == terminal_id(n))
    # A slow link's small kernel buffer (so that ~70 kB of replies, not megabytes, fill it).
    conn.writer.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    for _ in range(5000):
        if conn.writer.transport.get_write_buffer_size() > buffered_bytes_above:
            return sock  # above 65,536, the transport's high-water mark, a drain on it waits
        sent = conn.session.receive_sequence
        await loop.sock_sendall(sock, session.send(LookupRequest(meter_number=meter_number(20))))
        session._state = TerminalState.READY  # the terminal never reads its replies
        session._pending = session._expected_reply = None
        for _ in range(1000):
            if conn.session.receive_sequence > sent and conn.session.state is ServerState.READY:
                break
            await asyncio.sleep(0.001)
    raise AssertionError("the write buffer never filled")


@pytest.mark.timeout(120)
async def test_a_terminal_that_does_not_read_is_dropped_and_slows_no_one(running: Running) -> None:
    settings = load_settings(environ={"VENDGATE_POS_PORT": "0", "VENDGATE_HTTP_PORT": "0"})
    gateway = Gateway(settings, running.pool, running.keystore)
    gateway.limits = Limits(write_drain_timeout_s=0.5)
    await gateway.start()
    socks: list[socket.socket] = []
    honest = PosTerminal(terminal_id(264), running.key(264), "127.0.0.1", gateway.pos_port or 0, last_sequence=500)
    try:
        await honest.logon()
        await fill_write_buffer(running, gateway, 263, socks)
        # Its next reply cannot be written: the gateway waits out write_drain_timeout_s, then drops it.
        dropped_by = time.monotonic() + 5
        while any(c.terminal_id == terminal_id(263) for c in gateway._connections):
            started = time.monotonic()
            await honest.lookup(meter_number(21))  # meanwhile everyone else is served at once
            assert time.monotonic() - started < 0.4
            assert time.monotonic() < dropped_by, "the terminal that does not read was never dropped"
            await asyncio.sleep(0.05)
        # Dropped with the replies the gateway held for it (over 64 KiB), not kept open to send
        # them first: reading now, the terminal gets what the kernel had taken, then the end.
        loop = asyncio.get_running_loop()
        received = 0
        while data := await asyncio.wait_for(loop.sock_recv(socks[0], 65536), 5):
            received += len(data)
        assert received < 65_536, received
    finally:
        await honest.close()
        await gateway.stop()
        for s in socks:
            s.close()


async def wait_until_closed(gateway: Gateway, conn: _Connection, server_socket: socket.socket, bound_s: float,
                            ) -> float:
    """Seconds until the gateway closed a connection's socket and counts it no more (its task is
    done with it then), failing past bound_s."""
    started = time.monotonic()
    while conn in gateway._connections or server_socket.fileno() != -1:
        waited = time.monotonic() - started
        assert waited < bound_s, f"the connection was not closed within {bound_s} s"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def read_to_the_end(sock: socket.socket) -> None:
    """Read what the kernel still holds for the peer, then the end of the stream (or a reset)."""
    loop = asyncio.get_running_loop()
    with contextlib.suppress(ConnectionResetError):
        while await asyncio.wait_for(loop.sock_recv(sock, 65536), 5):
            pass


def held_for(gateway: Gateway, n: int) -> tuple[_Connection, socket.socket]:
    """Terminal n's connection, with the gateway holding replies for it that wait for its peer to
    read (below the high-water mark: no write waits for them), and the gateway's end of it."""
    conn = next(c for c in gateway._connections if c.terminal_id == terminal_id(n))
    assert 0 < conn.writer.transport.get_write_buffer_size() < 65_536
    return conn, conn.writer.transport.get_extra_info("socket")


@pytest.mark.timeout(60)
async def test_a_session_ending_with_replies_its_peer_does_not_read_is_closed_within_its_bound(
        running: Running) -> None:
    """A peer with a zero receive window and replies still queued for it: when its session ends
    (here by its idle timeout), the socket is closed within write_drain_timeout_s, not kept open,
    with a task waiting on it, for as long as the peer does not read."""
    settings = load_settings(environ={"VENDGATE_POS_PORT": "0", "VENDGATE_HTTP_PORT": "0"})
    gateway = Gateway(settings, running.pool, running.keystore,
                      limits=Limits(idle_timeout_s=2.0, write_drain_timeout_s=0.5))
    await gateway.start()
    socks: list[socket.socket] = []
    try:
        sock = await fill_write_buffer(running, gateway, 296, socks, buffered_bytes_above=0)
        conn, server_socket = held_for(gateway, 296)
        await wait_until_closed(gateway, conn, server_socket, bound_s=2.0 + 0.5 + 3)
        await read_to_the_end(sock)
        assert gateway.metrics.registry.get_sample_value("vendgate_sessions_open", {"channel": "pos"}) == 0
    finally:
        await gateway.stop()
        for s in socks:
            s.close()


@pytest.mark.timeout(60)
async def test_a_session_replaced_while_its_peer_does_not_read_is_closed_within_the_goodbye_bound(
        running: Running) -> None:
    settings = load_settings(environ={"VENDGATE_POS_PORT": "0", "VENDGATE_HTTP_PORT": "0"})
    gateway = Gateway(settings, running.pool, running.keystore)
    await gateway.start()
    assert gateway.pos_port is not None
    socks: list[socket.socket] = []
    newer = PosTerminal(terminal_id(297), running.key(297), "127.0.0.1", gateway.pos_port, last_sequence=500)
    try:
        sock = await fill_write_buffer(running, gateway, 297, socks, buffered_bytes_above=0)
        older, server_socket = held_for(gateway, 297)
        await newer.logon()
        # Its goodbye joins the replies it did not read; within goodbye_drain_s, not the idle timeout.
        await wait_until_closed(gateway, older, server_socket, bound_s=goodbye_drain_s + 3)
        await read_to_the_end(sock)
        await newer.lookup(meter_number(21))  # the newer session is served
        assert [c for c in gateway._connections if c.terminal_id == terminal_id(297)] == [
            gateway._by_terminal[terminal_id(297)]]
    finally:
        await newer.logoff()
        await gateway.stop()
        for s in socks:
            s.close()


@pytest.mark.timeout(60)
async def test_shutdown_closes_the_socket_of_a_peer_that_does_not_read(running: Running) -> None:
    settings = load_settings(environ={"VENDGATE_POS_PORT": "0", "VENDGATE_HTTP_PORT": "0"})
    gateway = Gateway(settings, running.pool, running.keystore)
    await gateway.start()
    socks: list[socket.socket] = []
    try:
        await fill_write_buffer(running, gateway, 298, socks, buffered_bytes_above=0)
        conn, server_socket = held_for(gateway, 298)
        started = time.monotonic()
        await gateway.stop()
        assert time.monotonic() - started < goodbye_drain_s + 3
        await wait_until_closed(gateway, conn, server_socket, bound_s=1.0)
    finally:
        await gateway.stop()
        for s in socks:
            s.close()


@pytest.mark.timeout(300)
async def test_shutdown_is_not_held_up_by_terminals_that_do_not_read(running: Running) -> None:
    settings = load_settings(environ={"VENDGATE_POS_PORT": "0", "VENDGATE_HTTP_PORT": "0"})
    gateway = Gateway(settings, running.pool, running.keystore)
    await gateway.start()
    assert gateway.pos_port is not None
    loop = asyncio.get_running_loop()
    hostile = list(range(266, 266 + 20))
    socks: list[socket.socket] = []
    try:
        # An honest terminal, idle, logged on: it should hear its goodbye promptly on shutdown.
        honest_sock, honest = await sock_logon(running, gateway.pos_port, 265)
        socks.append(honest_sock)


        await asyncio.gather(*(fill_write_buffer(running, gateway, n, socks) for n in hostile))
        started = time.monotonic()
        stop = asyncio.create_task(gateway.stop())
        data = await asyncio.wait_for(loop.sock_recv(honest_sock, 65536), 120)  # the honest goodbye
        honest_waited = time.monotonic() - started
        await stop
        took = time.monotonic() - started
        goodbye = [e.message for e in honest.receive_data(data) if isinstance(e, MessageReceived)]
        assert goodbye and isinstance(goodbye[0], ErrorReply)
        # Goodbyes go out together: the honest one at once, the unread ones dropped after their bound.
        assert honest_waited < goodbye_drain_s, honest_waited
        assert took < goodbye_drain_s + 3 < shutdown_grace_s + 10, f"stop() took {took:.1f} s"
    finally:
        if not gateway._stopping:
            await gateway.stop()
        for s in socks:
            s.close()


@pytest.mark.timeout(120)
async def test_kiosk_listener_stops_accepting_when_shutdown_begins(
        running: Running, tmp_path_factory: pytest.TempPathFactory) -> None:
    import aiohttp

    from gateway import registry
    from gateway.ca import CertificateAuthority
    from gateway.cli.commands.ca_cmds import issue_kiosk_certificate
    from protocol.messages import HeartbeatReply
    from terminal_sim.kiosk import Kiosk, client_ssl_context

    base = tmp_path_factory.mktemp("review-kiosk")
    authority = CertificateAuthority(base / "ca")
    authority.init(now=datetime.now(UTC))
    async with running.pool.acquire() as conn:
        await registry.add_terminal(conn, running.keystore, terminal_id="K0000009", serial="KSN9", agent_id=1,
                                    kind="kiosk")
        cert, key, _ = await issue_kiosk_certificate(conn, authority, "K0000009", base / "issued")
    settings = load_settings(environ={"VENDGATE_POS_PORT": "0", "VENDGATE_HTTP_PORT": "0",
                                      "VENDGATE_KIOSK_PORT": "0"})
    gateway = Gateway(settings, running.pool, running.keystore, kiosk_ssl=authority.server_ssl_context())
    await gateway.start()
    assert gateway.pos_port is not None
    term = PosTerminal(terminal_id(294), running.key(294), "127.0.0.1", gateway.pos_port, last_sequence=500)
    locker = await running.pool.acquire()
    stop: asyncio.Task[None] | None = None
    try:
        await term.logon()
        # A POS lookup held up in the database keeps one session busy, so stop() waits for it.
        lock = locker.transaction()
        await lock.start()
        await locker.execute("LOCK TABLE meters IN ACCESS EXCLUSIVE MODE")
        busy = asyncio.create_task(term.lookup(meter_number(21)))
        await asyncio.sleep(0.3)
        stop = asyncio.create_task(gateway.stop())
        await asyncio.sleep(0.3)
        assert gateway._stopping
        # A new kiosk connection, after shutdown began.
        kiosk = Kiosk("K0000009", f"https://127.0.0.1:{gateway.kiosk_port}",
                      client_ssl_context(str(authority.ca_cert_path), str(cert), str(key)), datetime.now(UTC).date())
        try:
            status, reply = await kiosk.send(HeartbeatRequest())
            accepted = status == 200 and isinstance(reply, HeartbeatReply)
        except (aiohttp.ClientError, OSError):
            accepted = False
        await lock.rollback()
        await busy
        await stop
        assert not accepted, "a new kiosk connection was accepted and served after shutdown began"
    finally:
        await running.pool.release(locker)
        if stop is None:
            await gateway.stop()
        await term.close()


async def test_a_session_replaced_by_a_newer_logon_is_told_so(running: Running) -> None:
    old, new = pos(running, 262), pos(running, 262)
    await old.logon()
    await new.logon()
    try:
        assert old._reader is not None and old._session is not None
        data = await asyncio.wait_for(old._reader.read(65536), 5)
        [goodbye] = [e.message for e in old._session.receive_data(data) if isinstance(e, MessageReceived)]
        assert isinstance(goodbye, ErrorReply) and goodbye.connection_closing
        assert goodbye.response_code is ResponseCode.SYSTEM_BUSY and goodbye.detail == "replaced by a newer logon"
    finally:
        await old.close()
        await new.logoff()


async def test_one_request_per_terminal_is_in_flight_however_often_it_logs_on(
        running: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    # Before, each new logon replaced the session and added a request of its own: five logons
    # with one key held five of that terminal's requests in flight while commits were slow.
    gateway, n = running.gateway, 282
    serving = {"now": 0, "most": 0}
    handle = gateway.handlers.handle

    async def counted(terminal: str, message: object, context: object, **options: object) -> object:
        if terminal != terminal_id(n):
            return await handle(terminal, message, context, **options)  # type: ignore[arg-type]
        serving["now"] += 1
        serving["most"] = max(serving["most"], serving["now"])
        try:
            return await handle(terminal, message, context, **options)  # type: ignore[arg-type]
        finally:
            serving["now"] -= 1

    monkeypatch.setattr(gateway.handlers, "handle", counted)
    terminals = [pos(running, n) for _ in range(4)]
    payments = []
    async with table_locked(running.pool, "vend_transactions"):  # commits stall
        for k, term in enumerate(terminals):
            await term.logon()  # replaces the previous session, whose request stays in flight
            txn = ClientTransactionId(terminal_id=term.terminal_id, terminal_sequence=900 + k,
                                      business_date=term.business_date)
            payments.append(asyncio.create_task(term.top_up(meter_number(23), 1_000, "EUR", txn=txn)))
            await asyncio.sleep(0.2)
        assert len([c for c in gateway._connections if c.terminal_id == terminal_id(n) and c.busy]) == 4
        assert serving["now"] == 1  # one served, the newer sessions' requests wait their turn
    outcomes = await asyncio.gather(*payments, return_exceptions=True)
    assert serving["most"] == 1
    # The replaced sessions were told goodbye; the newest one's payment is answered.
    assert isinstance(outcomes[-1], TopUpResult) and outcomes[-1].response_code is ResponseCode.APPROVED
    for term in terminals:
        await term.close()


@pytest.mark.timeout(60)
async def test_a_repeat_on_a_newer_session_is_answered_within_the_submit_bound(
        running: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    # docs/protocol.md: a payment's reply comes within 30 s. Before, a repeat on a newer session
    # (the link was lost, the terminal logged on again) first waited for the replaced session's
    # request to time out, then for its own batch: twice the bound, beyond the reference client's
    # reply timeout. submit_timeout_s is shortened to 2 s; the commit stalls on a table lock.
    bound_s = 2.0
    monkeypatch.setattr(committer, "submit_timeout_s", bound_s)
    older, newer = pos(running, 286), pos(running, 286)
    await older.logon()
    async with table_locked(running.pool, "vend_transactions"):
        request = TopUpRequest(client_transaction_id=older.next_transaction_id(), meter_number=meter_number(25),
                               amount_minor=900, currency="EUR", tender_type=TenderType.CASH)
        lost = asyncio.create_task(older._exchange(request, TopUpResult))  # its reply will never come
        await asyncio.sleep(0.5)
        await newer.logon()  # the link was lost: log on again, repeat with the same id
        started = time.monotonic()
        with pytest.raises(TerminalRefused) as busy:  # the commit is still stalled
            await asyncio.wait_for(newer._exchange(request, TopUpResult), 10)
        elapsed = time.monotonic() - started
    await asyncio.gather(lost, return_exceptions=True)
    assert busy.value.response_code is ResponseCode.SYSTEM_BUSY and not busy.value.closing, busy.value
    assert elapsed < bound_s + 0.5, f"the repeat was answered after {elapsed:.1f} s; the bound is {bound_s:.0f} s"
    repeated = await asyncio.wait_for(newer._exchange(request, TopUpResult), 10)  # the session goes on
    assert repeated.response_code is ResponseCode.APPROVED
    assert await recorded(running, request.client_transaction_id) == [ResponseCode.APPROVED]
    await older.close()
    await newer.logoff()


@pytest.mark.timeout(60)
async def test_a_request_kept_from_its_turn_past_the_submit_bound_is_told_busy_and_the_session_goes_on(
        running: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    # The replaced session's request is a lookup stalled on a table lock: it keeps the terminal's
    # turn longer than the newer session's request may wait for it.
    bound_s = 1.0
    monkeypatch.setattr(committer, "submit_timeout_s", bound_s)
    older, newer = pos(running, 287), pos(running, 287)
    await older.logon()
    async with table_locked(running.pool, "meters"):
        looking = asyncio.create_task(older.lookup(meter_number(23)))
        await asyncio.sleep(0.3)
        await newer.logon()
        started = time.monotonic()
        with pytest.raises(TerminalRefused) as busy:
            await asyncio.wait_for(newer._exchange(FloatInquiryRequest(), FloatInquiryResult), 5)
        elapsed = time.monotonic() - started
    await asyncio.gather(looking, return_exceptions=True)
    assert busy.value.response_code is ResponseCode.SYSTEM_BUSY and not busy.value.closing, busy.value
    assert bound_s - 0.1 < elapsed < bound_s + 0.5, elapsed
    inquiry = await asyncio.wait_for(newer.float_inquiry(), 5)
    assert inquiry.response_code is ResponseCode.APPROVED
    await older.close()
    await newer.logoff()


@pytest.mark.timeout(60)
async def test_a_request_whose_session_was_replaced_while_it_waited_for_its_turn_is_not_served(
        running: Running) -> None:
    # Three sessions of one terminal: the first one's payment holds the terminal's turn (its commit
    # stalls), the second one's waits for it, and a third logon replaces the second. The second's
    # payment is left to the third session's repeat, which decides it once.
    first, second, third = pos(running, 288), pos(running, 288), pos(running, 288)
    await first.logon()
    txn = ClientTransactionId(terminal_id=first.terminal_id, terminal_sequence=950, business_date=first.business_date)
    request = TopUpRequest(client_transaction_id=txn, meter_number=meter_number(23), amount_minor=800,
                           currency="EUR", tender_type=TenderType.CASH)
    async with table_locked(running.pool, "vend_transactions"):
        serving = asyncio.create_task(first.top_up(meter_number(23), 700, "EUR"))
        await asyncio.sleep(0.3)
        await second.logon()
        waiting = asyncio.create_task(second._exchange(request, TopUpResult))
        await asyncio.sleep(0.3)
        await third.logon()
        await asyncio.sleep(0.3)
    outcomes = await asyncio.gather(serving, waiting, return_exceptions=True)
    assert all(isinstance(o, TerminalRefused) and o.closing for o in outcomes), outcomes  # both replaced
    await asyncio.sleep(0.5)  # the turn has passed on: the second session's request was dropped
    assert await recorded(running, txn) == []
    repeated = await asyncio.wait_for(third._exchange(request, TopUpResult), 10)
    assert repeated.response_code is ResponseCode.APPROVED
    assert await recorded(running, txn) == [ResponseCode.APPROVED]
    await first.close()
    await second.close()
    await third.logoff()


async def test_a_logon_replaced_while_it_awaited_its_terminal_context_ends_without_an_error_log(
        running: Running, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # A newer logon that proves its key while the older one reads its terminal context tells the
    # older one goodbye. Before, the older one then sent LogonAccepted into its closed session, and
    # the gateway logged the LocalProtocolError as connection_failed at ERROR: a normal race paged
    # as a crash.
    gateway = running.gateway
    context = gateway.handlers.terminal_context
    calls = 0

    async def slow_first(terminal: str) -> object:
        nonlocal calls
        calls += 1
        if terminal == terminal_id(289) and calls == 1:
            await asyncio.sleep(0.5)
        return await context(terminal)

    monkeypatch.setattr(gateway.handlers, "terminal_context", slow_first)
    older, newer = pos(running, 289), pos(running, 289)
    with caplog.at_level(logging.INFO, logger="vendgate"):
        first = asyncio.create_task(older.logon())
        await asyncio.sleep(0.2)
        await newer.logon()
        [outcome] = await asyncio.gather(first, return_exceptions=True)
        await asyncio.sleep(1.0)  # the older connection's task finishes its logon
    assert isinstance(outcome, TerminalRefused) and outcome.closing, outcome  # its goodbye
    await older.close()
    inquiry = await asyncio.wait_for(newer.float_inquiry(), 5)
    assert inquiry.response_code is ResponseCode.APPROVED
    await newer.logoff()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors
