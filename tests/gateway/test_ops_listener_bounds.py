"""Unauthenticated peers of the /metrics, /healthz, /readyz listener are bounded like any other."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import asyncpg
import pytest

from gateway.server import Gateway, Limits, ops_close_grace_s, ops_idle_timeout_s, shutdown_grace_s
from gateway.settings import load_settings
from tests.gateway.conftest import Running


@pytest.mark.timeout(90)
async def test_a_peer_that_never_finishes_its_request_head_is_cut_off(running: Running) -> None:
    """Slowloris on the operations port: a request line that never ends must not hold a socket
    (and a task) for aiohttp's default keep-alive of an hour; the kiosk listener's idle bound is
    30 s, the POS listener's logon deadline 15 s."""
    port = running.gateway.http_port
    assert port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: ops\r\nX-Slow: ")  # the head never ends
        await writer.drain()
        started = time.monotonic()
        try:
            data = await asyncio.wait_for(reader.read(65536), ops_idle_timeout_s + 10)
        except TimeoutError:
            raise AssertionError(f"still open after {time.monotonic() - started:.0f} s") from None
        assert data == b"" or data.startswith(b"HTTP/1.1 4")
    finally:
        writer.close()


@pytest.mark.timeout(90)
async def test_shutdown_is_not_held_up_by_a_metrics_peer_that_does_not_read(running: Running) -> None:
    """A scraper that pipelines GET /metrics and reads none of the answers: once the replies fill
    its socket, the handler waits on a drain with no bound, and shutdown waits for it (twice the
    ops runner's default 60 s shutdown_timeout), far beyond serve_until_signalled's
    shutdown_grace_s + 10 (the POS listener bounds such a peer by write_drain_timeout_s)."""
    settings = load_settings(environ={"VENDGATE_POS_PORT": "0", "VENDGATE_HTTP_PORT": "0"})
    gateway = Gateway(settings, running.pool, running.keystore)
    await gateway.start()
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", gateway.http_port))
        await asyncio.sleep(0.1)
        server = gateway._runners[0].server
        assert server is not None
        for handler in server.connections:  # a slow link's small kernel buffer, as in test_sessions_cut_off
            handler.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        for _ in range(50):  # pipelined requests, never a byte read
            with contextlib.suppress(BlockingIOError, OSError):
                for _ in range(100):
                    sock.send(b"GET /metrics HTTP/1.1\r\nHost: ops\r\n\r\n")
            await asyncio.sleep(0.02)
        await asyncio.sleep(1)
        started = time.monotonic()
        try:
            await asyncio.wait_for(gateway.stop(), shutdown_grace_s + 10)
        except TimeoutError:
            raise AssertionError(f"shutdown not done after {time.monotonic() - started:.0f} s") from None
    finally:
        sock.close()


async def test_a_flood_of_readiness_probes_takes_one_database_connection(running: Running,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(environ={"VENDGATE_POS_PORT": "0", "VENDGATE_HTTP_PORT": "0"})
    gateway = Gateway(settings, running.pool, running.keystore)
    acquired = {"n": 0}

    class CountingPool:
        def acquire(self, **kwargs: object) -> object:
            acquired["n"] += 1
            return running.pool.acquire(**kwargs)  # type: ignore[arg-type]

    await gateway.start()
    monkeypatch.setattr(gateway, "pool", CountingPool())

    async def readyz() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.http_port)
        writer.write(b"GET /readyz HTTP/1.1\r\nHost: ops\r\nConnection: close\r\n\r\n")
        answer = await reader.read()
        writer.close()
        return answer

    try:
        answers = await asyncio.gather(*(readyz() for _ in range(50)))
        assert all(a.startswith(b"HTTP/1.1 200") for a in answers)
        assert acquired["n"] <= 2  # one probe (the low-float watch may take one); before, each took one
    finally:
        monkeypatch.undo()
        await gateway.stop()


async def test_the_ops_listener_serves_at_most_its_connection_cap(running: Running) -> None:
    """A peer holding many idle connections to the ops port: past the cap each new one is answered
    503 and closed at once (before, every one held a descriptor and a handler for up to
    ops_idle_timeout_s); one freed slot serves the next scraper."""
    settings = load_settings(environ={"VENDGATE_POS_PORT": "0", "VENDGATE_HTTP_PORT": "0"})
    gateway = Gateway(settings, running.pool, running.keystore, limits=Limits(ops_connections_max=3))
    await gateway.start()
    held = []
    try:
        for _ in range(3):
            held.append(await asyncio.open_connection("127.0.0.1", gateway.http_port))
        await asyncio.sleep(0.1)
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.http_port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: ops\r\n\r\n")
        refused = await asyncio.wait_for(reader.read(), 5)  # answered and closed: read() meets the end
        writer.close()
        assert refused.startswith(b"HTTP/1.1 503 "), refused
        refusals = gateway.metrics.registry.get_sample_value("vendgate_connections_refused_total",
                                                             {"reason": "ops_capacity"})
        assert refusals == 1.0
        _, first = held.pop(0)
        first.close()
        await first.wait_closed()
        await asyncio.sleep(0.1)
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.http_port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: ops\r\nConnection: close\r\n\r\n")
        served = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert served.startswith(b"HTTP/1.1 200 ") and b'"ok"' in served, served
    finally:
        for _, held_writer in held:
            held_writer.close()
        await gateway.stop()


@pytest.mark.timeout(90)
async def test_scrapers_that_stop_reading_do_not_hold_the_ops_cap(running: Running) -> None:
    """A scraper that asks for /metrics and stops reading waits on the write with no bound, and the
    idle bound never cuts a connection with a request in hand: before the connection lifetime,
    ops_connections_max of them made every /healthz and /readyz answer 503 for good."""
    settings = load_settings(environ={"VENDGATE_POS_PORT": "0", "VENDGATE_HTTP_PORT": "0"})
    gateway = Gateway(settings, running.pool, running.keystore,
                      limits=Limits(ops_connections_max=2, ops_connection_lifetime_s=3.0))
    await gateway.start()
    loop = asyncio.get_running_loop()
    stalled = []
    try:
        for _ in range(2):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", gateway.http_port))
            stalled.append(sock)
        await asyncio.sleep(0.1)
        server = gateway._runners[0].server
        assert server is not None
        for handler in server.connections:  # a slow link's small kernel buffer
            handler.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        for _ in range(50):  # pipelined scrapes, never a byte read
            for sock in stalled:
                with contextlib.suppress(BlockingIOError, OSError):
                    for _ in range(100):
                        sock.send(b"GET /metrics HTTP/1.1\r\nHost: ops\r\n\r\n")
            await asyncio.sleep(0.02)

        async def healthz() -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", gateway.http_port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: ops\r\nConnection: close\r\n\r\n")
            try:
                return await asyncio.wait_for(reader.read(), 5)
            finally:
                writer.close()

        assert (await healthz()).startswith(b"HTTP/1.1 503 ")  # both slots held by the stalled scrapers
        await asyncio.sleep(3.0 + ops_close_grace_s + 1)  # past the lifetime and the grace for the answer in hand
        answer = await healthz()
        assert answer.startswith(b"HTTP/1.1 200 "), answer
    finally:
        for sock in stalled:
            sock.close()
        await gateway.stop()


async def test_an_ops_request_in_hand_at_the_connection_lifetime_is_answered(running: Running) -> None:
    """At the lifetime a connection closes after answering the request in hand (a keep-alive
    prober's /readyz waiting for a busy pool gets its 503), instead of being dropped unanswered."""
    pool = await asyncpg.create_pool(running.db_url, min_size=1, max_size=1)
    assert pool is not None
    settings = load_settings(environ={"VENDGATE_POS_PORT": "0", "VENDGATE_HTTP_PORT": "0"})
    gateway = Gateway(settings, pool, running.keystore, limits=Limits(ops_connection_lifetime_s=1.5))
    await gateway.start()
    held = await pool.acquire()  # payments hold the pool's only connection for a while
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.http_port)
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: ops\r\n\r\n")  # keep-alive: a prober reusing it
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200 "), head
            length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            await reader.readexactly(length)
            await asyncio.sleep(1.0)  # 0.5 s of the lifetime left
            writer.write(b"GET /readyz HTTP/1.1\r\nHost: ops\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(65536), 10)
            assert answer.startswith(b"HTTP/1.1 503 "), f"the request in hand got {answer!r}"
        finally:
            writer.close()
    finally:
        await pool.release(held)
        await gateway.stop()
        await pool.close()
