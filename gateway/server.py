"""The gateway server: the only place a socket meets a session.

One asyncio process: a TCP listener for POS terminals (protocol v1 frames), an HTTPS listener
for kiosks (mutual TLS, JSON), and an HTTP listener for /metrics, /healthz and /readyz.

The POS read loop owns every limit of a connection: a cap on open connections (and a smaller one,
in all and per source address, on connections that have not yet proven a terminal key), an idle
timeout between frames, an absolute deadline for a frame once its first byte arrived, a
bounded write drain and a bounded close, one live session per terminal (a new logon closes the
old one) and lock step (one request in flight per session, by the protocol). A slow or hostile
client costs one task and is cut off by its own deadlines, never by slowing anyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import secrets
import signal
import socket
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway import committer as committer_module
from gateway import registry
from gateway.committer import Committer
from gateway.errors import ListenError
from gateway.handlers import Handlers
from gateway.jsonlog import get_logger
from gateway.keystore import KeyStore
from gateway.metrics import GatewayMetrics
from gateway.outbox import OutboxRelay
from gateway.settings import Settings
from gateway.vending import VendingService, business_date
from protocol.codes import ResponseCode
from protocol.errors import ProtocolError
from protocol.messages import ErrorReply, LogoffRequest, LogonAccepted, ServerMessage
from protocol.session import LoggedOn, LogonRequested, MessageReceived, ServerSession, ServerState

log = get_logger("vendgate.server")
# A request whose terminal's turn did not come within its bound: repeat it with the same id.
_TURN_BUSY = ErrorReply(response_code=ResponseCode.SYSTEM_BUSY, detail="busy, retry with the same id",
                        connection_closing=False)

connections_max = 10_000
# Connections that have not yet proven a terminal key (no logon accepted yet): anyone who reaches
# the listener can open them, so together they take at most this share of connections_max, and
# the rest is for sessions that proved a key. Each source (an IPv4 address, an IPv6 /64: what one
# host, or one customer of a provider, holds) takes at most unproven_connections_per_source_max of
# them, so one host cannot take the share of every other. GPRS terminals often reach vendgate
# through one carrier NAT address, hence not a handful: more than 256 terminals behind one address
# in the middle of a logon at the same moment (a logon is proven within a few round trips) are
# closed at once and log on again. A host holding many addresses (a botnet; an IPv6 /48 has
# 65,536 /64s) is bounded by the share alone: it can delay new logons, never take the slots of
# proven sessions.
unproven_connections_max = connections_max // 2
unproven_connections_per_source_max = 256
kiosk_connections_max = 256  # kiosks are few; a flood of them must not take the POS listener's descriptors
kiosk_handshake_timeout_s = 10.0  # accept to a finished TLS handshake, client certificate included
# No request for this long (the first one included): the connection is closed. Longer than HTTP
# clients keep idle connections (aiohttp's 15 s), so a kiosk reusing one does not meet the close.
kiosk_idle_timeout_s = 30.0
kiosk_connection_lifetime_s = 300.0  # then closed after the request in hand: a slow sender cannot keep a slot
kiosk_body_timeout_s = 10.0  # an accepted kiosk's request body, from its head on
kiosk_close_grace_s = 35.0  # for that request to be answered (a payment may take 30 s), then dropped
kiosk_tls_shutdown_timeout_s = 5.0  # for the peer's TLS close, so a closed connection frees its slot
kiosk_runner_shutdown_timeout_s = 5.0  # at shutdown, after kiosk requests in flight were waited for
# The ops listener (/metrics, /healthz, /readyz): a connection idle this long, or whose request head
# is not in by then, is closed (aiohttp's default is an hour); at shutdown its handlers get this
# long, so a scraper that stops reading its answers cannot hold the gateway past its stop bound.
ops_idle_timeout_s = 15.0
ops_shutdown_timeout_s = 2.0
# Connections to the ops listener at once; one more is answered 503 and closed. Scrapers and
# probes need a few; a peer opening hundreds must not take the process's descriptors.
ops_connections_max = 64
# An ops connection is dropped this long after its accept, whatever it is doing: the idle bound
# cuts only a connection waiting for a request, and one whose peer stopped reading its answers
# waits on the write without end, holding its slot (scrapers open another).
ops_connection_lifetime_s = 60.0
ops_close_grace_s = 5.0  # then, for the request in hand to be answered, before the connection is dropped
_OPS_FULL_REPLY = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
readyz_probe_interval_s = 1.0  # /readyz reuses the last database probe for this long
read_chunk_bytes = 16_384
idle_timeout_s = 300.0
frame_deadline_s = 30.0
logon_deadline_s = 15.0  # from accept to a proven logon: an unauthenticated socket holds a slot briefly
write_drain_timeout_s = 10.0
heartbeat_interval_s = 60
shutdown_grace_s = 20.0
goodbye_drain_s = 2.0  # a session's goodbye frame must leave within this, or the connection is dropped
abort_close_timeout_s = 1.0  # an aborted connection is closed on the loop's next turn: this only bounds the wait
float_watch_interval_s = 5.0
listen_port_attempts = 5  # listening_sockets() with port 0 on several address families
SQL_FLOATS_BELOW = """
SELECT count(*) FROM agents a JOIN ledger_accounts l ON l.id = a.float_account_id
WHERE a.low_float_threshold_minor > 0 AND l.balance_minor < a.low_float_threshold_minor"""
assert frame_deadline_s < idle_timeout_s and logon_deadline_s < idle_timeout_s
assert unproven_connections_per_source_max <= unproven_connections_max < connections_max
assert kiosk_handshake_timeout_s < kiosk_connection_lifetime_s and kiosk_idle_timeout_s < kiosk_connection_lifetime_s


def listening_sockets(host: str, port: int, backlog: int = 1024) -> list[socket.socket]:
    """Non-blocking listening sockets on every address `host` resolves to, as asyncio binds its
    servers: an empty host is every interface, IPv4 and IPv6; an address family the machine has
    not enabled is passed over (and logged). With port 0 all take the port the first one was
    given, tried again with a new port while another socket holds it on the other family."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    addresses = list(dict.fromkeys((info[0], info[4]) for info in infos))
    for attempt in range(listen_port_attempts):
        sockets: list[socket.socket] = []
        try:
            for family, address in addresses:
                if sockets and port == 0:
                    address = (address[0], sockets[0].getsockname()[1], *address[2:])
                try:
                    listener = socket.create_server(address, family=family, backlog=backlog)
                except OSError as exc:
                    if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                        log.warning("listen_address_skipped", address=str(address[0]), errno=exc.errno)
                        continue  # IPv6 disabled, say
                    raise
                listener.setblocking(False)
                sockets.append(listener)
        except BaseException as exc:
            for listener in sockets:
                listener.close()
            if (isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE and port == 0 and sockets
                    and attempt + 1 < listen_port_attempts):
                continue  # the port the first family was given is taken on another: a new one
            raise
        if not sockets:
            raise OSError(errno.EADDRNOTAVAIL, f"no address of {host!r} can be bound")
        return sockets
    raise AssertionError("unreachable: the last attempt returns or raises")


def connection_source(peername: object) -> str:
    """What a connection's unproven slot is counted under: its IPv4 address (also when it came as
    an IPv4-mapped IPv6 address), or its IPv6 /64; "" when its address is not known."""
    if not isinstance(peername, tuple) or not peername or not isinstance(peername[0], str):
        return ""
    try:
        address = ipaddress.ip_address(peername[0])
    except ValueError:
        return ""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))
    return str(address)


@dataclass
class Limits:
    connections_max: int = connections_max
    unproven_connections_max: int = unproven_connections_max
    unproven_connections_per_source_max: int = unproven_connections_per_source_max
    idle_timeout_s: float = idle_timeout_s
    frame_deadline_s: float = frame_deadline_s
    logon_deadline_s: float = logon_deadline_s
    write_drain_timeout_s: float = write_drain_timeout_s
    kiosk_connections_max: int = kiosk_connections_max
    kiosk_handshake_timeout_s: float = kiosk_handshake_timeout_s
    kiosk_idle_timeout_s: float = kiosk_idle_timeout_s
    kiosk_connection_lifetime_s: float = kiosk_connection_lifetime_s
    ops_connections_max: int = ops_connections_max
    ops_connection_lifetime_s: float = ops_connection_lifetime_s


class _OpsHandler(RequestHandler):
    """aiohttp's request handler for one ops connection, holding one of its listener's slots until
    lost, and dropped lifetime_s after the accept."""

    __slots__ = ("_expiry", "_lifetime_s", "_live")

    def __init__(self, manager: Server, *, live: set[RequestHandler], lifetime_s: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._live = live
        self._lifetime_s = lifetime_s
        self._expiry: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._expiry = asyncio.get_running_loop().call_later(self._lifetime_s, self._expire, transport)

    def _expire(self, transport: asyncio.BaseTransport) -> None:
        # The request in hand is answered, then the connection closes; should that answer not be
        # taken within the grace (a peer that does not read), it is dropped: abort, not close,
        # which would wait for those unsent answers.
        self.close()
        self._expiry = asyncio.get_running_loop().call_later(ops_close_grace_s, transport.abort)  # type: ignore[attr-defined]

    def connection_lost(self, exc: BaseException | None) -> None:
        try:
            super().connection_lost(exc)
        finally:
            if self._expiry is not None:
                self._expiry.cancel()
            self._live.discard(self)


class _OpsFull(asyncio.Protocol):
    """A connection past the ops listener's cap: told so, then closed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(_OPS_FULL_REPLY)
        transport.close()


class _KioskHandler(RequestHandler):
    """aiohttp's request handler for one kiosk connection, resolving `closed` once it is lost."""

    __slots__ = ("_closed", "close_after_reply", "requests_in_hand")

    def __init__(self, manager: Server, *, closed: asyncio.Future[None], **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._closed = closed
        self.requests_in_hand = 0  # its head in and not yet answered (Gateway.kiosk_request)
        self.close_after_reply = False  # the connection's lifetime is over: its next reply is its last

    def connection_lost(self, exc: BaseException | None) -> None:
        try:
            super().connection_lost(exc)
        finally:
            if not self._closed.done():
                self._closed.set_result(None)


@dataclass(eq=False)
class _Connection:
    writer: asyncio.StreamWriter
    session: ServerSession
    terminal_id: str | None = None
    context: registry.TerminalContext | None = None
    busy: bool = False
    closing: bool = False
    logon_by: float = 0.0  # time.monotonic() by which the terminal must have proven its logon
    unproven_source: str | None = None  # the source its unproven slot counts under; None once proven
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Gateway:
    def __init__(self, settings: Settings, pool: asyncpg.Pool, keystore: KeyStore, *,
                 limits: Limits | None = None, kiosk_ssl: object | None = None) -> None:
        self.settings = settings
        self.pool = pool
        self.keystore = keystore
        self.limits = limits or Limits()
        self.metrics = GatewayMetrics()
        self.vending = VendingService(keystore)
        self.committer = Committer(pool, self.vending, on_batch=self.metrics.observe_batch,
                                   on_decided_ahead=self.metrics.observe_decided_ahead)
        self.handlers = Handlers(pool, keystore, self.committer, self.metrics)
        self._connections: set[_Connection] = set()
        self._unproven_by_source: dict[str, int] = {}  # connection_source() -> unproven connections
        self.unproven_connections = 0  # open connections that have not proven a terminal key
        self._by_terminal: dict[str, _Connection] = {}
        self._pos_server: asyncio.Server | None = None
        self._runners: list[web.AppRunner] = []
        self._kiosk_ssl = kiosk_ssl
        self.pos_port: int | None = None
        self.kiosk_port: int | None = None
        self._kiosk_listeners: list[socket.socket] = []
        self._kiosk_accept_tasks: list[asyncio.Task[None]] = []
        self._kiosk_connections: set[asyncio.Task[None]] = set()
        self._ops_server: asyncio.AbstractServer | None = None
        self._ops_connections: set[RequestHandler] = set()
        self.kiosk_requests_in_flight = 0  # see kiosk_request(); shutdown waits for them as for POS requests
        self.http_port: int | None = None
        self._stopping = False
        self._background: set[asyncio.Task[None]] = set()
        self.relay = OutboxRelay(pool, settings.engine_url, timeout_s=settings.engine_timeout_s) \
            if settings.engine_url else None
        self._watch_task: asyncio.Task[None] | None = None
        self._terminal_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._ready_lock = asyncio.Lock()
        self._ready = False
        self._ready_probed_at = -readyz_probe_interval_s

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self.committer.start()
        if self.relay is not None:
            self.relay.start()
        self._watch_task = asyncio.get_running_loop().create_task(self._watch_floats())
        self._pos_server = await asyncio.start_server(
            self._serve_pos, self.settings.pos_host, self.settings.pos_port, limit=read_chunk_bytes,
            backlog=1024)
        self.pos_port = self._pos_server.sockets[0].getsockname()[1]
        self.http_port = await self._start_ops_listener(self._ops_app(), self.settings.http_host,
                                                        self.settings.http_port)
        if self._kiosk_ssl is not None:
            from gateway.kiosk import kiosk_app

            await self._start_kiosk_listener(kiosk_app(self))
        log.info("gateway_started", pos_port=self.pos_port, kiosk_port=self.kiosk_port, http_port=self.http_port)

    async def _start_ops_listener(self, app: web.Application, host: str, port: int) -> int:
        """The ops listener, accepting at most limits.ops_connections_max connections at once;
        returns its port. Its own server, so each accepted connection is counted from the start."""
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=ops_shutdown_timeout_s)
        await runner.setup()
        self._runners.append(runner)
        server = runner.server
        assert server is not None, "the runner is set up"
        loop = asyncio.get_running_loop()
        live = self._ops_connections

        def connection() -> asyncio.BaseProtocol:
            # Open while stopping too: /readyz then answers 503 "stopping", and /metrics is scraped.
            if len(live) >= self.limits.ops_connections_max:
                self.metrics.connections_refused.labels("ops_capacity").inc()
                return _OpsFull()
            # As the runner's server would make it, with the ops idle bound as its keep-alive (it
            # runs from the accept to the first request's head too).
            handler = _OpsHandler(server, live=live, lifetime_s=self.limits.ops_connection_lifetime_s, loop=loop,
                                  access_log=None, keepalive_timeout=ops_idle_timeout_s)
            live.add(handler)
            return handler

        self._ops_server = await loop.create_server(connection, host, port, backlog=1024)
        return int(self._ops_server.sockets[0].getsockname()[1])

    async def _start_kiosk_listener(self, app: web.Application) -> None:
        """The kiosk listener accepts connections itself, so it can count them from the accept on.

        aiohttp's own site would count a connection only once its TLS handshake was done (the
        handler sees nothing before), so stalled handshakes would be uncounted; here each accepted
        socket holds one of limits.kiosk_connections_max slots until it closes, and its handshake
        must finish within limits.kiosk_handshake_timeout_s.
        """
        runner = web.AppRunner(app, access_log=None, handle_signals=False,
                               shutdown_timeout=kiosk_runner_shutdown_timeout_s)
        await runner.setup()
        self._runners.append(runner)
        self._kiosk_listeners = listening_sockets(self.settings.kiosk_host, self.settings.kiosk_port)
        self.kiosk_port = int(self._kiosk_listeners[0].getsockname()[1])
        loop = asyncio.get_running_loop()
        self._kiosk_accept_tasks = [loop.create_task(self._accept_kiosks(runner, listener))
                                    for listener in self._kiosk_listeners]

    async def _accept_kiosks(self, runner: web.AppRunner, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                client, _ = await loop.sock_accept(listener)
            except OSError as exc:  # out of descriptors, say: the listener stays, the next accept may work
                if self._stopping or listener.fileno() < 0:
                    return
                log.warning("kiosk_accept_failed", error=type(exc).__name__, errno=exc.errno)
                await asyncio.sleep(0.1)
                continue
            if self._stopping or len(self._kiosk_connections) >= self.limits.kiosk_connections_max:
                self.metrics.connections_refused.labels("kiosk_capacity" if not self._stopping else "stopping").inc()
                client.close()
                continue
            task = loop.create_task(self._serve_kiosk(runner, client))
            self._kiosk_connections.add(task)
            task.add_done_callback(self._kiosk_connections.discard)

    async def _serve_kiosk(self, runner: web.AppRunner, client: socket.socket) -> None:
        """One kiosk connection: TLS handshake within the bound, then aiohttp serves it until it closes."""
        loop = asyncio.get_running_loop()
        server = runner.server
        assert server is not None, "the runner is set up"
        closed = loop.create_future()
        # As the runner's server would make it (AppRunner(access_log=None) above), with the kiosk
        # idle timeout as its keep-alive (it runs from the handshake to the first request too),
        # told to resolve `closed` when its connection is gone.
        protocol = _KioskHandler(server, loop=loop, access_log=None,
                                 keepalive_timeout=self.limits.kiosk_idle_timeout_s, closed=closed)
        try:
            # This protocol, not the one returned: with TLS, uvloop returns its own TLS protocol.
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol, client, ssl=self._kiosk_ssl,  # type: ignore[arg-type]
                ssl_handshake_timeout=self.limits.kiosk_handshake_timeout_s,
                ssl_shutdown_timeout=kiosk_tls_shutdown_timeout_s)
        except Exception as exc:  # no certificate, another CA's, a stalled or broken handshake
            self.metrics.connections_refused.labels("kiosk_handshake").inc()
            log.info("kiosk_handshake_failed", error=type(exc).__name__)
            client.close()
            return
        if self._stopping:  # the handshake ended after shutdown began: nothing will serve it
            transport.abort()
            return
        self.metrics.sessions_open.labels("kiosk").inc()
        try:
            try:
                await asyncio.wait_for(asyncio.shield(closed), self.limits.kiosk_connection_lifetime_s)
            except TimeoutError:
                # The kiosk connects again. A request in hand is answered first, with
                # `Connection: close` (Gateway.kiosk_request); one not yet whole (a slow sender) is
                # not waited for.
                protocol.close_after_reply = True
                if not protocol.requests_in_hand:
                    protocol.force_close()
                try:
                    await asyncio.wait_for(asyncio.shield(closed), kiosk_close_grace_s)
                except TimeoutError:
                    transport.abort()
        except asyncio.CancelledError:
            transport.abort()  # shutdown: aiohttp's cleanup is over, so this connection would outlive it
            raise
        finally:
            self.metrics.sessions_open.labels("kiosk").dec()

    async def stop(self) -> None:
        """Stop accepting, finish in-flight work, say goodbye to idle sessions, close."""
        if self._stopping:
            return
        self._stopping = True
        if self._pos_server is not None:
            self._pos_server.close()
        # No new kiosk connections; requests on those open are still answered until the
        # committer stops, and the runner's cleanup below closes them.
        for task in self._kiosk_accept_tasks:
            task.cancel()
        for task in self._kiosk_accept_tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for listener in self._kiosk_listeners:
            listener.close()
        deadline = time.monotonic() + shutdown_grace_s
        # Requests already read are answered; then every session is told goodbye.
        while self._requests_in_flight() and time.monotonic() < deadline:  # noqa: ASYNC110 - bounded poll
            await asyncio.sleep(0.01)
        await self.committer.stop()
        # Handlers whose payment was in the last batches now write their replies.
        while self._requests_in_flight() and time.monotonic() < deadline:  # noqa: ASYNC110 - bounded poll
            await asyncio.sleep(0.01)
        # Every session at once, each within goodbye_drain_s: a peer that does not read delays
        # neither the others nor the end of shutdown.
        goodbyes = [asyncio.create_task(self._goodbye(conn)) for conn in list(self._connections)]
        if goodbyes:
            await asyncio.wait(goodbyes, timeout=goodbye_drain_s + 1)
        if self._ops_server is not None:
            self._ops_server.close()  # the runner's cleanup closes the connections still open
        for runner in self._runners:
            await runner.cleanup()
        for task in list(self._kiosk_connections):  # a handshake still running when the runner closed
            task.cancel()
        if self._kiosk_connections:
            await asyncio.wait(list(self._kiosk_connections), timeout=1)
        if self.relay is not None:
            await self.relay.stop()
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
        if self._pos_server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pos_server.wait_closed(), 5)
        log.info("gateway_stopped")

    async def kiosk_request(self, request: web.Request, refusal: Callable[[], Awaitable[web.StreamResponse | None]],
                            respond: Callable[[], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        """A kiosk request, from its head to its answer: shutdown and the lifetime bound wait for it.

        `refusal` (the certificate and the kiosk's status) runs on the head alone: a refused kiosk
        is answered before any of its body is read, so one that never sends the body it announced
        holds nothing. An accepted kiosk's body must be in within kiosk_body_timeout_s (else 408),
        so a slow sender holds up shutdown no longer than that.

        An answer with `Connection: close` is sent here, then the connection closed at once:
        aiohttp would otherwise first read, for up to its lingering time (10 s), the rest of a body
        that will never be served, and the socket would keep its kiosk slot all that time.
        """
        kiosk = request.protocol
        assert isinstance(kiosk, _KioskHandler), "kiosk requests come through the kiosk listener alone"
        self.kiosk_requests_in_flight += 1
        kiosk.requests_in_hand += 1
        try:
            response = await refusal()
            if response is None:
                try:
                    await asyncio.wait_for(request.read(), kiosk_body_timeout_s)
                except TimeoutError:
                    response = web.Response(status=408, content_type="text/plain",
                                            text=f"request body not received within {kiosk_body_timeout_s:.0f} s")
                    response.force_close()
                else:
                    response = await respond()
            if kiosk.close_after_reply:
                response.force_close()  # `Connection: close`, and closed once it is written
            if response.keep_alive is False:
                with contextlib.suppress(ConnectionError):  # the kiosk went first: nothing to send
                    await response.prepare(request)
                    await response.write_eof()
                kiosk.force_close()  # the answer is in the transport, which sends it before its TLS close
        finally:
            self.kiosk_requests_in_flight -= 1
            kiosk.requests_in_hand -= 1
        return response

    def _requests_in_flight(self) -> bool:
        return self.kiosk_requests_in_flight > 0 or any(c.busy for c in self._connections)

    async def _goodbye(self, conn: _Connection, detail: str = "server shutting down") -> None:
        """Tell a session it ends; what it left unread, the goodbye included, must leave within
        goodbye_drain_s, or the connection is dropped. Its read loop then sees the end."""
        if conn.closing:
            return
        conn.closing = True
        try:
            if conn.session.state not in (ServerState.CLOSED, ServerState.FAILED):
                conn.writer.write(conn.session.reject(ResponseCode.SYSTEM_BUSY, detail))
        except Exception:
            conn.writer.transport.abort()  # unwritable: nothing more is owed to it
            return
        await self._close(conn, goodbye_drain_s)

    # -- POS connections ---------------------------------------------------------------------

    async def _serve_pos(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        source = connection_source(writer.get_extra_info("peername"))
        refusal = self._pos_refusal(source)
        if refusal is not None:  # closed at once, nothing read from it
            self.metrics.connections_refused.labels(refusal).inc()
            writer.close()
            return
        conn = _Connection(writer=writer, session=ServerSession(), unproven_source=source)
        self._unproven_by_source[source] = self._unproven_by_source.get(source, 0) + 1
        self.unproven_connections += 1
        self._connections.add(conn)
        self.metrics.sessions_open.labels("pos").inc()
        try:
            await self._read_loop(reader, conn)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:
            log.exception("connection_failed", terminal_id=conn.terminal_id)
        finally:
            conn.closing = True
            if conn.terminal_id and self._by_terminal.get(conn.terminal_id) is conn:
                del self._by_terminal[conn.terminal_id]
            # Counted until its socket is closed: one whose peer does not read holds a slot while
            # its last frames may still leave, then it is dropped (also should this task be
            # cancelled while it waits).
            try:
                await self._close(conn, self.limits.write_drain_timeout_s)
            finally:
                self._no_longer_unproven(conn)
                self._connections.discard(conn)
                self.metrics.sessions_open.labels("pos").dec()

    def _pos_refusal(self, source: str) -> str | None:
        """Why a new POS connection from `source` is refused (the metric's reason), or None."""
        if self._stopping:
            return "stopping"
        if len(self._connections) >= self.limits.connections_max:
            return "capacity"
        if self.unproven_connections >= self.limits.unproven_connections_max:
            return "unproven_capacity"
        if self._unproven_by_source.get(source, 0) >= self.limits.unproven_connections_per_source_max:
            return "unproven_per_source"
        return None

    def _no_longer_unproven(self, conn: _Connection) -> None:
        """The connection proved a terminal key, or is gone: its unproven slot is free."""
        source = conn.unproven_source
        if source is None:
            return
        conn.unproven_source = None
        self.unproven_connections -= 1
        left = self._unproven_by_source[source] - 1
        if left:
            self._unproven_by_source[source] = left
        else:
            del self._unproven_by_source[source]
        assert self.unproven_connections >= 0 and left >= 0

    async def _read_loop(self, reader: asyncio.StreamReader, conn: _Connection) -> None:
        frame_started: float | None = None
        conn.logon_by = time.monotonic() + self.limits.logon_deadline_s
        while not conn.closing:
            now = time.monotonic()
            if frame_started is None:
                timeout = self.limits.idle_timeout_s
            else:
                timeout = frame_started + self.limits.frame_deadline_s - now
            if conn.terminal_id is None:
                timeout = min(timeout, conn.logon_by - now)
            try:
                # asyncio.timeout, not wait_for: no task per read (Python 3.11's wait_for makes one).
                async with asyncio.timeout(max(timeout, 0.001)):
                    data = await reader.read(read_chunk_bytes)
            except TimeoutError:
                self.metrics.protocol_errors.labels("timeout").inc()
                reason = ("logon deadline passed" if conn.terminal_id is None
                          else "frame deadline passed" if frame_started else "idle timeout")
                await self._send_final(conn, ResponseCode.FORMAT_ERROR, reason)
                return
            if not data:
                return
            # When these bytes were read, not when the wait for them began: after a quiet spell
            # (a heartbeat interval, say) a frame's clock starts with its own first bytes.
            read_at = time.monotonic()
            try:
                events = conn.session.receive_data(data)
            except ProtocolError as error:
                self.metrics.protocol_errors.labels(type(error).__name__).inc()
                if error.close_connection:
                    await self._send_final(conn, error.response_code, error.detail)
                    return
                await self._write(conn, conn.session.send(ErrorReply(
                    response_code=error.response_code, detail=error.detail, connection_closing=False)))
                frame_started = read_at if conn.session.buffered_bytes else None
                continue
            # The frame deadline runs from the read that brought a frame's first bytes, also when
            # they came in the same read as a whole frame before them.
            if events:
                frame_started = read_at if conn.session.buffered_bytes else None
            elif frame_started is None:
                frame_started = read_at
            for event in events:
                if not await self._handle_event(conn, event):
                    return
            if conn.session.state in (ServerState.CLOSED, ServerState.FAILED):
                return

    async def _handle_event(self, conn: _Connection, event: object) -> bool:
        """Answer one event; False ends the connection."""
        session = conn.session
        if isinstance(event, LogonRequested):
            # The lookup waits its turn among unproven logons (Handlers.logon_lookups), within the
            # logon deadline: a flood of them delays logons, never payments.
            try:
                async with asyncio.timeout(max(conn.logon_by - time.monotonic(), 0.001)):
                    found = await self.handlers.terminal_key(event.terminal_id, event.key_version)
            except TimeoutError:  # the deadline, or no database connection in time
                self.metrics.connections_refused.labels("logon_busy").inc()
                await self._send_final(conn, ResponseCode.SYSTEM_BUSY, "server busy; log on again")
                return False
            if conn.closing:  # told goodbye (shutdown) while the lookup waited its turn
                return False
            if found is None:  # no POS terminal of this id: unknown, or a kiosk's (HTTPS only)
                await self._send_final(conn, ResponseCode.UNKNOWN_TERMINAL, "unknown terminal")
                return False
            key, status = found
            if status != "active":
                await self._send_final(conn, ResponseCode.TERMINAL_BLOCKED, f"terminal {status}")
                return False
            await self._write(conn, session.challenge(key, secrets.token_bytes(16)))
            return True
        if isinstance(event, LoggedOn):
            self._no_longer_unproven(conn)  # it holds the key: a slot of its own from now on
            previous = self._by_terminal.get(event.terminal_id)
            if previous is not None and previous is not conn:
                # One live session per terminal: the newer logon wins.
                task = asyncio.get_running_loop().create_task(self._goodbye(previous, "replaced by a newer logon"))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
            conn.terminal_id = event.terminal_id
            self._by_terminal[event.terminal_id] = conn
            context = await self.handlers.terminal_context(event.terminal_id)
            if conn.closing:  # replaced by a newer logon (or told goodbye at shutdown) meanwhile
                return False
            conn.context = context
            now = datetime.now(UTC)
            accepted = LogonAccepted(server_time=now,
                                     business_date=business_date(now, context.time_zone if context else "UTC"),
                                     heartbeat_interval_s=heartbeat_interval_s,
                                     idle_timeout_s=int(self.limits.idle_timeout_s))
            await self._write(conn, session.send(accepted))
            log.info("terminal_logged_on", terminal_id=event.terminal_id,
                     software_version=event.message.software_version)
            return True
        if isinstance(event, MessageReceived):
            assert conn.terminal_id is not None
            message = event.message
            conn.busy = True
            started = time.perf_counter()
            # Answered within submit_timeout_s of being read, the wait for the terminal's turn
            # included (docs/protocol.md), so a repeat after a lost link is not kept waiting for
            # the replaced session's request and then for its own batch.
            answer_by = time.monotonic() + committer_module.submit_timeout_s
            turn = self._terminal_turn(conn.terminal_id)
            try:
                # One request in flight per terminal, however often it logs on: a request on a
                # newer session waits for the replaced session's one to be served (a repeat of it
                # then gets its stored outcome), so a key used on many sockets cannot multiply them.
                try:
                    async with asyncio.timeout(max(answer_by - time.monotonic(), 0.001)):
                        await turn.acquire()
                except TimeoutError:
                    log.info("terminal_turn_timed_out", terminal_id=conn.terminal_id,
                             message_type=type(message).__name__)
                    reply: ServerMessage = _TURN_BUSY
                else:
                    try:
                        if conn.closing:
                            # Replaced (or told goodbye at shutdown) while it waited: not served,
                            # the newer session's repeat of it decides it (else both would be, one
                            # after the other).
                            log.info("request_not_served", terminal_id=conn.terminal_id,
                                     message_type=type(message).__name__, reason="session ended while it waited")
                            return False
                        reply = await self.handlers.handle(conn.terminal_id, message, conn.context,
                                                           answer_by=answer_by)
                    finally:
                        turn.release()
            finally:
                conn.busy = False
            self.metrics.observe_request(type(message).__name__,
                                         getattr(reply, "response_code", ResponseCode.APPROVED).name,
                                         time.perf_counter() - started)
            closing = isinstance(reply, ErrorReply) and reply.connection_closing
            if conn.closing:
                return False  # said goodbye while this request ran: it is committed, the reply is not sent
            await self._write(conn, session.send(reply))
            if self._stopping:
                # Shutting down: this request was answered; the session gets its goodbye now.
                await self._goodbye(conn)
                return False
            return not (closing or isinstance(message, LogoffRequest))
        raise AssertionError(f"unexpected event {event!r}")

    async def _write(self, conn: _Connection, data: bytes) -> None:
        conn.writer.write(data)
        if not conn.writer.transport.get_write_buffer_size():
            return  # all of it went to the socket: nothing to wait for (the common case)
        try:
            async with asyncio.timeout(self.limits.write_drain_timeout_s):
                await conn.writer.drain()
        except TimeoutError:
            # A peer that does not read: dropped, with what it left unread (closing would wait to
            # send that first).
            conn.writer.transport.abort()
            log.warning("write_drain_timed_out", terminal_id=conn.terminal_id)
            raise ConnectionResetError("the peer did not read its replies") from None

    async def _close(self, conn: _Connection, timeout_s: float) -> None:
        """Close a connection, giving what is still buffered for it timeout_s to leave; then drop it.

        A closing transport keeps its socket until its buffer is written, which a peer that does
        not read (a zero receive window) would put off forever, with the waiting task.
        """
        conn.writer.close()
        # Waited for with asyncio.wait, which cancels nothing on its timeout: a cancelled
        # wait_closed() cancels the protocol's own close future, and the close is never seen.
        closed = asyncio.ensure_future(conn.writer.wait_closed())
        closed.add_done_callback(_close_outcome_seen)
        await asyncio.wait([closed], timeout=timeout_s)
        if not closed.done():
            conn.writer.transport.abort()  # closes the socket on the loop's next turn, with what is unsent
            log.warning("close_timed_out", terminal_id=conn.terminal_id)
            await asyncio.wait([closed], timeout=abort_close_timeout_s)

    def _terminal_turn(self, terminal_id: str) -> asyncio.Lock:
        """The lock a terminal's requests are served under (kept while any session holds or awaits it)."""
        lock = self._terminal_locks.get(terminal_id)
        if lock is None:
            lock = self._terminal_locks[terminal_id] = asyncio.Lock()
        return lock

    async def _send_final(self, conn: _Connection, code: ResponseCode, detail: str) -> None:
        with contextlib.suppress(Exception):
            await self._write(conn, conn.session.reject(code, detail[:200]))

    async def _watch_floats(self) -> None:
        """Keep the floats-below-threshold gauge current (the low-float warning's metric)."""
        while True:
            with contextlib.suppress(Exception):
                async with self.pool.acquire(timeout=5) as conn:
                    count = await conn.fetchval(SQL_FLOATS_BELOW, timeout=5)
                self.metrics.floats_below_threshold.set(int(count))
            await asyncio.sleep(float_watch_interval_s)

    # -- operations endpoints ----------------------------------------------------------------

    async def _database_ready(self) -> bool:
        """Whether the database answers: probed at most once per readyz_probe_interval_s, one probe
        at a time, so a flood of /readyz takes no more than one of the pool's connections from
        payments."""
        async with self._ready_lock:
            if time.monotonic() - self._ready_probed_at >= readyz_probe_interval_s:
                try:
                    async with self.pool.acquire(timeout=2) as conn:
                        await conn.fetchval("SELECT 1", timeout=2)
                    self._ready = True
                except Exception:
                    self._ready = False
                self._ready_probed_at = time.monotonic()
            return self._ready

    def _ops_app(self) -> web.Application:
        app = web.Application(client_max_size=1024)

        async def metrics(_: web.Request) -> web.Response:
            return web.Response(body=generate_latest(self.metrics.registry),
                                headers={"Content-Type": CONTENT_TYPE_LATEST})

        async def healthz(_: web.Request) -> web.Response:
            return web.json_response({"status": "ok"})

        async def readyz(_: web.Request) -> web.Response:
            if self._stopping:
                return web.json_response({"status": "stopping"}, status=503)
            if not await self._database_ready():
                return web.json_response({"status": "database unavailable"}, status=503)
            return web.json_response({"status": "ready", "sessions": len(self._connections),
                                      "queued": self.committer.queued})

        app.router.add_get("/metrics", metrics)
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        return app


def _close_outcome_seen(closed: asyncio.Future[None]) -> None:
    """A connection lost with an error (a reset, say) is closed all the same."""
    if not closed.cancelled():
        closed.exception()


async def serve_until_signalled(gateway: Gateway) -> None:
    """Run until SIGTERM or SIGINT, then stop within the shutdown bound."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await gateway.start()
    except OSError as exc:  # a port in use, say: what did start is stopped, and the operator told why
        await gateway.stop()
        raise ListenError(f"cannot listen: {exc}") from None
    await stop.wait()
    log.info("shutdown_requested")
    await asyncio.wait_for(gateway.stop(), shutdown_grace_s + 10)
