"""The kiosk HTTPS listener: mutual TLS, then one JSON message per POST (protocol.kiosk).

TLS itself refuses a kiosk without a client certificate or with one from another CA. A
middleware then binds the certificate to its kiosk record by SHA-256 fingerprint and refuses a
revoked, expired or unknown certificate, or a kiosk that is not active, before any handler runs.
When the database cannot say (busy, unreachable, failing), the kiosk is answered an `error` as a
message handler would answer it, so it retries as it does after any SYSTEM_BUSY or SYSTEM_ERROR.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import asyncpg
from aiohttp import HttpVersion11, hdrs, web

from gateway.ca import fingerprint_of_der
from gateway.jsonlog import get_logger
from protocol import limits
from protocol.codes import ResponseCode
from protocol.errors import ProtocolError
from protocol.kiosk import (
    CONTENT_TYPE,
    KIOSK_PATH,
    decode_kiosk_request,
    encode_kiosk_message,
    http_status,
    kiosk_error,
)
from protocol.messages import ErrorReply

if TYPE_CHECKING:
    from gateway.server import Gateway

log = get_logger("vendgate.kiosk")
KIOSK_KEY = web.RequestKey("kiosk_id", str)

# The wait for a pool connection and the certificate's lookup together, as long as a message
# handler waits for its connection: a kiosk hears SYSTEM_BUSY well within its own timeout.
certificate_check_timeout_s = 10.0
# What makes the certificate check a "retry later" (503 SYSTEM_BUSY) rather than a failure (500
# SYSTEM_ERROR): the pool or the query out of time, the database unreachable or full.
_DATABASE_BUSY = (TimeoutError, OSError, asyncpg.PostgresConnectionError, asyncpg.TooManyConnectionsError,
                  asyncpg.CannotConnectNowError)

SQL_KIOSK_BY_FINGERPRINT = """
SELECT c.terminal_id, t.status, t.kind FROM kiosk_certificates c JOIN terminals t USING (terminal_id)
WHERE c.fingerprint = $1 AND c.revoked_at IS NULL AND c.not_after > now()"""


def _refuse(code: ResponseCode, detail: str, status: int) -> web.Response:
    """A refused kiosk's answer; its connection closes after it, so it holds no slot on the listener."""
    body = encode_kiosk_message(ErrorReply(response_code=code, detail=detail, connection_closing=False))
    response = web.Response(status=status, body=body, content_type=CONTENT_TYPE)
    response.force_close()
    return response


def _unchecked(error: Exception) -> web.Response:
    """The answer when the certificate could not be checked: an `error` body like a message
    handler's, never aiohttp's own text page (which no kiosk decodes). The connection stays open,
    as after any SYSTEM_BUSY: the kiosk may repeat its request on it."""
    busy = isinstance(error, _DATABASE_BUSY)
    reply = ErrorReply(response_code=ResponseCode.SYSTEM_BUSY if busy else ResponseCode.SYSTEM_ERROR,
                       detail="busy, retry with the same id" if busy else "system error, retry",
                       connection_closing=False)
    return web.Response(status=http_status(reply), body=encode_kiosk_message(reply), content_type=CONTENT_TYPE)


def kiosk_app(gateway: Gateway) -> web.Application:
    @web.middleware
    async def authenticate(request: web.Request,
                           handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        # All from the head, before any of the body is read: a kiosk refused (a revoked or unknown
        # certificate, a blocked or retired kiosk, a body declared too large) gets its answer at
        # once, and never holds a connection slot by not sending the body it announced.
        if (declared := _declared_too_large(request)) is not None:
            return declared
        return await gateway.kiosk_request(request, lambda: _refusal(request), lambda: handler(request))

    async def _refusal(request: web.Request) -> web.Response | None:
        """Why this request's certificate or kiosk may not be served (None: it may, and
        request[KIOSK_KEY] names the kiosk)."""
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        der = ssl_object.getpeercert(binary_form=True) if isinstance(ssl_object, ssl.SSLObject) else None
        if not der:
            return _refuse(ResponseCode.AUTH_FAILED, "client certificate required", 401)
        try:
            async with asyncio.timeout(certificate_check_timeout_s), gateway.pool.acquire() as conn:
                row = await conn.fetchrow(SQL_KIOSK_BY_FINGERPRINT, fingerprint_of_der(der))
        except (*_DATABASE_BUSY, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.error("kiosk_certificate_check_failed", error=type(exc).__name__)
            return _unchecked(exc)
        if row is None or row["kind"] != "kiosk":
            gateway.metrics.connections_refused.labels("kiosk_certificate").inc()
            return _refuse(ResponseCode.AUTH_FAILED, "certificate unknown or revoked", 403)
        if row["status"] != "active":
            return _refuse(ResponseCode.TERMINAL_BLOCKED, f"kiosk {row['status']}", 403)
        request[KIOSK_KEY] = row["terminal_id"]
        return None

    async def message(request: web.Request) -> web.Response:
        kiosk_id = request[KIOSK_KEY]
        body = await request.read()
        try:
            decoded = decode_kiosk_request(body, kiosk_id=kiosk_id)
        except ProtocolError as error:
            status, payload = kiosk_error(error)
            return web.Response(status=status, body=payload, content_type=CONTENT_TYPE)
        started = time.perf_counter()
        reply = await gateway.handlers.handle(kiosk_id, decoded)
        # Counted and timed as a POS terminal's request is (latency histogram included).
        gateway.metrics.observe_request(type(decoded).__name__,
                                        getattr(reply, "response_code", ResponseCode.APPROVED).name,
                                        time.perf_counter() - started)
        response = web.Response(status=http_status(reply), body=encode_kiosk_message(reply), content_type=CONTENT_TYPE)
        if isinstance(reply, ErrorReply) and reply.connection_closing:
            # The kiosk was found blocked, or no longer known, while its request was served: as
            # when the middleware finds it so, the connection ends, and the body says the same.
            response.force_close()
        return response

    async def expect_continue(request: web.Request) -> web.StreamResponse | None:
        """`Expect: 100-continue`: a body declared too large is refused before it is sent."""
        if (declared := _declared_too_large(request)) is not None:
            return declared
        # Otherwise as aiohttp's own: 100 Continue over HTTP/1.1, 417 for any other expectation.
        if request.version == HttpVersion11:
            if request.headers.get(hdrs.EXPECT, "").lower() != "100-continue":
                raise web.HTTPExpectationFailed(text="only Expect: 100-continue is understood")
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # the response proper has not started
        return None

    app = web.Application(middlewares=[authenticate], client_max_size=limits.kiosk_body_bytes_max)
    app.router.add_post(KIOSK_PATH, message, expect_handler=expect_continue)
    return app


def _declared_too_large(request: web.Request) -> web.Response | None:
    """413 for a Content-Length above the limit, before any of the body is read. The connection
    closes after the answer (aiohttp first reads and drops, for up to its lingering time of 10 s,
    what the kiosk still sends). A chunked body, without a Content-Length, is refused as soon as
    the limit is passed."""
    if request.content_length is None or request.content_length <= limits.kiosk_body_bytes_max:
        return None
    response = web.Response(status=413, content_type="text/plain",
                            text=f"Maximum request body size {limits.kiosk_body_bytes_max} exceeded")
    response.force_close()
    return response
