"""The simulated POS terminal never hangs on its peer: sends, replies and closes are bounded, and
a reply that ends the session, or breaks the protocol, ends the connection with it.

The peers here are real TCP listeners on loopback: one that accepts and never reads, with small
socket buffers, so the terminal's writes back up for real (a zero receive window); one that
dribbles its reply; and small gateways built on protocol/'s ServerSession.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from protocol.codes import ResponseCode
from protocol.messages import HeartbeatReply, HeartbeatRequest, LogonAccepted, LogonChallenge, LogonRequest
from protocol.session import LoggedOn, LogonRequested, MessageReceived, ServerSession, TerminalSession
from terminal_sim import client as sim_client
from terminal_sim.client import LinkLost, PosTerminal

TERMINAL_ID = "T0000001"
BACKLOG_BYTES = 8 * 1024 * 1024  # far more than loopback buffers hold once the peer stops reading


@pytest.fixture
async def deaf_peer() -> AsyncIterator[tuple[int, list[asyncio.StreamWriter]]]:
    """A listener that accepts connections and never reads from them."""
    held: list[asyncio.StreamWriter] = []

    async def accept(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield port, held
    finally:
        for writer in held:
            writer.transport.abort()
        server.close()
        await server.wait_closed()


async def connected_terminal(port: int) -> PosTerminal:
    terminal = PosTerminal(TERMINAL_ID, bytes(16), "127.0.0.1", port)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    terminal._reader, terminal._writer = reader, writer
    terminal._session = TerminalSession(TERMINAL_ID, bytes(16))
    return terminal


async def test_close_is_bounded_when_the_peer_stops_reading(
        deaf_peer: tuple[int, list[asyncio.StreamWriter]], monkeypatch: pytest.MonkeyPatch) -> None:
    port, _held = deaf_peer
    monkeypatch.setattr(sim_client, "close_timeout_s", 0.3)
    terminal = await connected_terminal(port)
    writer = terminal._writer
    assert writer is not None
    writer.write(b"\x00" * BACKLOG_BYTES)  # stays buffered: the peer reads nothing
    await asyncio.sleep(0.1)
    assert writer.transport.get_write_buffer_size() > 0

    started = time.monotonic()
    await asyncio.wait_for(terminal.close(), 5.0)  # before the bound: waited for wait_closed forever
    assert time.monotonic() - started < 2.0
    assert writer.transport.is_closing()
    assert terminal._writer is None and terminal._session is None


async def test_a_send_the_peer_never_takes_is_a_lost_link(
        deaf_peer: tuple[int, list[asyncio.StreamWriter]], monkeypatch: pytest.MonkeyPatch) -> None:
    port, _held = deaf_peer
    monkeypatch.setattr(sim_client, "write_timeout_s", 0.3)
    monkeypatch.setattr(sim_client, "close_timeout_s", 0.3)
    terminal = await connected_terminal(port)
    writer = terminal._writer
    assert writer is not None
    writer.write(b"\x00" * BACKLOG_BYTES)

    started = time.monotonic()
    with pytest.raises(LinkLost, match="while sending"):
        await asyncio.wait_for(terminal._exchange(LogonRequest(terminal_nonce=bytes(16)), LogonChallenge), 5.0)
    assert time.monotonic() - started < 2.0
    assert writer.transport.is_closing()
    assert terminal._session is None  # the next request logs on afresh (same transaction id)


async def test_a_reply_dribbled_a_byte_at_a_time_is_cut_off_at_the_reply_timeout(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The reply timeout bounds the whole reply: before, it bounded each read, so a peer (or the
    # GPRS path) sending a byte now and then held the terminal for ever.
    monkeypatch.setattr(sim_client, "reply_timeout_s", 0.5)
    stop = asyncio.Event()

    async def dribble(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)  # the logon request
        writer.write(b"\x00\x53")  # a challenge's length prefix, then one byte at a time
        while not stop.is_set():
            await asyncio.sleep(0.2)
            writer.write(b"\x01")
        writer.close()

    server = await asyncio.start_server(dribble, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    terminal = PosTerminal(TERMINAL_ID, bytes(16), "127.0.0.1", port)
    started = time.monotonic()
    try:
        with pytest.raises(LinkLost):
            await asyncio.wait_for(terminal.logon(), 5)
        assert time.monotonic() - started < 2
        assert terminal._writer is None and terminal._session is None
    finally:
        stop.set()
        await terminal.close()
        server.close()
        await server.wait_closed()


async def test_a_reply_that_breaks_the_protocol_closes_the_link_and_is_a_lost_link() -> None:
    # Before, the ProtocolError left the terminal with a failed session on an open socket.
    peer_saw_the_close = asyncio.Event()

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)  # the logon request
        writer.write(b"\x00\x1f\x02" + bytes(30))  # a frame of version 2
        if not await reader.read(65536):
            peer_saw_the_close.set()
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    terminal = PosTerminal(TERMINAL_ID, bytes(16), "127.0.0.1", port)
    try:
        with pytest.raises(LinkLost, match="UnsupportedVersion"):
            await asyncio.wait_for(terminal.logon(), 5)
        assert terminal._writer is None and terminal._session is None
        await asyncio.wait_for(peer_saw_the_close.wait(), 5)
    finally:
        await terminal.close()
        server.close()
        await server.wait_closed()


async def test_a_goodbye_read_with_its_reply_closes_the_link_and_the_next_request_logs_on_again() -> None:
    # A gateway shutting down writes a request's reply and its goodbye back to back. Before, the
    # terminal returned the reply and kept the closed session on an open socket: its next request
    # raised LocalProtocolError instead of logging on again.
    logons = 0

    async def gateway(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal logons
        session = ServerSession()
        now = datetime.now(UTC)
        while data := await reader.read(65536):
            for event in session.receive_data(data):
                if isinstance(event, LogonRequested):
                    writer.write(session.challenge(bytes(16), secrets.token_bytes(16)))
                elif isinstance(event, LoggedOn):
                    logons += 1
                    writer.write(session.send(LogonAccepted(server_time=now, business_date=now.date(),
                                                            heartbeat_interval_s=60, idle_timeout_s=300)))
                elif isinstance(event, MessageReceived):
                    writer.write(session.send(HeartbeatReply(server_time=now))
                                 + session.reject(ResponseCode.SYSTEM_BUSY, "server shutting down"))
        writer.close()

    server = await asyncio.start_server(gateway, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    terminal = PosTerminal(TERMINAL_ID, bytes(16), "127.0.0.1", port)
    try:
        await asyncio.wait_for(terminal.logon(), 5)
        reply = await asyncio.wait_for(terminal._request(HeartbeatRequest(), HeartbeatReply), 5)
        assert isinstance(reply, HeartbeatReply)  # the reply is returned, the link closed
        assert terminal._writer is None and terminal._session is None
        again = await asyncio.wait_for(terminal._request(HeartbeatRequest(), HeartbeatReply), 5)
        assert isinstance(again, HeartbeatReply) and logons == 2
    finally:
        await terminal.close()
        server.close()
        await server.wait_closed()
