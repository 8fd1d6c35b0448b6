"""The simulated POS terminal never hangs on a gateway that stops reading: sends and closes are bounded.

The peer here is a real TCP listener on loopback that accepts and never reads, with small socket
buffers, so the terminal's writes back up for real (a zero receive window).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import pytest

from protocol.messages import LogonChallenge, LogonRequest
from protocol.session import TerminalSession
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
