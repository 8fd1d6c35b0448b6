"""Kiosk traffic in the gateway's /metrics, as a POS terminal's is."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime

from protocol.codes import ResponseCode
from protocol.messages import TopUpResult
from terminal_sim.kiosk import Kiosk, client_ssl_context
from tests.loadtests.conftest import Served


async def _metrics(port: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    body = (await reader.read()).decode()
    writer.close()
    return body


def _sample(body: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", body, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def test_a_kiosk_top_up_is_in_the_request_latency_histogram(served: Served) -> None:
    assert served.gateway.http_port is not None and served.target.kiosk_port is not None
    credential = served.target.kiosks[0]
    assert served.target.ca_file is not None
    kiosk = Kiosk(credential.kiosk_id, f"https://127.0.0.1:{served.target.kiosk_port}",
                  client_ssl_context(served.target.ca_file, credential.cert_file, credential.key_file),
                  datetime.now(UTC).date(), last_sequence=900_000)
    counted = 'vendgate_requests_total{message_type="TopUpRequest",response_code="APPROVED"}'
    timed = 'vendgate_request_duration_seconds_count{message_type="TopUpRequest"}'
    before = await _metrics(served.gateway.http_port)
    status, reply = await kiosk.top_up(served.target.meter(1), 1_000, "EUR")
    assert status == 200 and isinstance(reply, TopUpResult) and reply.response_code is ResponseCode.APPROVED
    after = await _metrics(served.gateway.http_port)
    assert _sample(after, counted) == _sample(before, counted) + 1  # counted ...
    assert _sample(after, timed) == _sample(before, timed) + 1, "... but its latency is never observed"
