"""The load generators' terminals speak the real protocol to a real gateway, and report failures as such."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
import uvloop

from loadtests.aio_terminal import AioTerminal
from loadtests.bench_gateway import arrival_tick_s, closed_loop, offer_arrivals, open_loop, percentile_ms
from loadtests.pos_client import PosClient
from protocol.codes import ResponseCode
from protocol.messages import (
    FloatInquiryRequest,
    FloatInquiryResult,
    LookupRequest,
    LookupResult,
    TenderType,
    TopUpRequest,
    TopUpResult,
)
from terminal_sim.client import LinkLost, TerminalRefused
from tests.loadtests.conftest import Served


def blocking_session(served: Served, index: int) -> list[object]:
    """Log on, look up, pay, ask the float, log off: all on a blocking socket (run in a thread)."""
    tid, key = served.target.terminal(index)
    client = PosClient(tid, key, served.target.host, served.target.pos_port, first_sequence=10)
    client.logon()
    lookup = client.request(LookupRequest(meter_number=served.target.meter(0)), LookupResult)
    txn = client.next_transaction_id()
    paid = client.request(TopUpRequest(client_transaction_id=txn, meter_number=served.target.meter(0),
                                       amount_minor=1_000, currency="EUR", tender_type=TenderType.CASH), TopUpResult)
    float_left = client.request(FloatInquiryRequest(), FloatInquiryResult)
    client.logoff()
    return [lookup, txn, paid, float_left, client.connected]


async def test_blocking_client_pays_through_the_gateway(served: Served) -> None:
    lookup, txn, paid, float_left, connected = await asyncio.to_thread(blocking_session, served, 7)
    assert isinstance(lookup, LookupResult) and lookup.response_code is ResponseCode.APPROVED
    assert isinstance(paid, TopUpResult) and paid.response_code is ResponseCode.APPROVED
    assert paid.client_transaction_id == txn and txn.terminal_sequence == 11  # type: ignore[attr-defined]
    assert isinstance(float_left, FloatInquiryResult) and float_left.float_remaining_minor < 10_000_000_000
    assert connected is False


def wrong_key_logon(served: Served) -> None:
    tid, _ = served.target.terminal(6)
    PosClient(tid, b"\x00" * 16, served.target.host, served.target.pos_port).logon()


async def test_blocking_client_with_a_wrong_key_is_refused(served: Served) -> None:
    with pytest.raises(TerminalRefused) as refused:
        await asyncio.to_thread(wrong_key_logon, served)
    assert refused.value.response_code is ResponseCode.AUTH_FAILED


def unreachable(port: int) -> None:
    PosClient("T0000001", b"\x01" * 16, "127.0.0.1", port).logon()


async def test_blocking_client_reports_an_unreachable_gateway_as_link_lost(served: Served) -> None:
    with pytest.raises(LinkLost):
        await asyncio.to_thread(unreachable, 1)  # nothing listens on port 1
    client = PosClient("T0000001", b"\x01" * 16, "127.0.0.1", 1)
    with pytest.raises(LinkLost):
        client.request(FloatInquiryRequest(), FloatInquiryResult)  # never connected


def terminals(served: Served, indexes: range) -> list[AioTerminal]:
    return [AioTerminal(*served.target.terminal(i), served.target.host, served.target.pos_port,
                        first_sequence=1_000 * (1 + i)) for i in indexes]


async def test_open_loop_offers_its_rate_and_counts_queueing_in_latency(served: Served) -> None:
    meters = [served.target.meter(i) for i in range(4)]
    pool = terminals(served, range(0, 3))
    for terminal in pool:
        await terminal.logon()
    try:
        tally = await open_loop(pool, meters, rate_per_s=60.0, duration_s=1.0, seed=3)
        assert tally.errors == {}
        approved = tally.codes[ResponseCode.APPROVED.name]
        assert 25 <= approved <= 110  # Poisson arrivals: about 60 in the second
        # One terminal, arrivals far faster than a round trip: later arrivals wait, and it shows.
        backlog = await open_loop(pool[:1], meters, rate_per_s=2_000.0, duration_s=0.2, seed=4)
        ordered = sorted(backlog.latencies_s)
        assert len(ordered) > 100 and ordered[-1] > 5 * ordered[0]
        closed = await closed_loop(pool, meters, 0.5, seed=5)
        assert closed.codes[ResponseCode.APPROVED.name] > 3 and closed.errors == {}
    finally:
        for terminal in pool:
            await terminal.logoff()


async def test_loop_counts_a_refused_terminal_as_an_error(served: Served) -> None:
    tid, _ = served.target.terminal(5)
    stranger = AioTerminal(tid, bytes(16), served.target.host, served.target.pos_port)
    tally = await closed_loop([stranger], [served.target.meter(0)], 0.2, seed=1)
    assert sum(tally.errors.values()) >= 1 and not tally.latencies_s
    assert any("AUTH_FAILED" in reason for reason in tally.errors)


def test_percentile_is_nearest_rank() -> None:
    values = sorted(random.Random(1).random() for _ in range(1_000))
    assert percentile_ms(values, 0.5) == round(values[499] * 1000, 2)
    assert percentile_ms(values, 0.99) == round(values[989] * 1000, 2)
    assert percentile_ms(values, 1.0) == round(values[-1] * 1000, 2)
    assert percentile_ms([0.002], 0.99) == 2.0
    assert percentile_ms([], 0.5) is None


async def test_a_reply_that_fails_its_mac_hangs_up_and_the_terminal_logs_on_afresh(served: Served) -> None:
    """Between the terminal and the gateway, a relay flips the last byte (in the MAC) of the first
    connection's third reply: the request sees the session's ProtocolError, the terminal hangs
    up, and the next logon, on a new connection, works."""
    from protocol.errors import ProtocolError

    connections = 0

    async def relay(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        corrupt = connections == 1
        gateway_reader, gateway_writer = await asyncio.open_connection(served.target.host, served.target.pos_port)

        async def upstream() -> None:
            while data := await client_reader.read(65_536):
                gateway_writer.write(data)
            gateway_writer.close()

        async def downstream() -> None:
            replies = 0
            while data := await gateway_reader.read(65_536):
                replies += 1
                client_writer.write(data[:-1] + bytes([data[-1] ^ 0x01]) if corrupt and replies == 3 else data)
            client_writer.close()

        await asyncio.gather(upstream(), downstream(), return_exceptions=True)

    server = await asyncio.start_server(relay, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    tid, key = served.target.terminal(7)
    terminal = AioTerminal(tid, key, "127.0.0.1", port)
    try:
        await terminal.logon()
        with pytest.raises(ProtocolError):
            await terminal.request(FloatInquiryRequest(), FloatInquiryResult)
        assert not terminal.connected
        with pytest.raises(LinkLost):
            await terminal.request(FloatInquiryRequest(), FloatInquiryResult)
        await terminal.logon()
        inquiry = await terminal.request(FloatInquiryRequest(), FloatInquiryResult)
        assert inquiry.response_code == ResponseCode.APPROVED
    finally:
        await terminal.logoff()
        server.close()
        await server.wait_closed()


class _Stamped(asyncio.Queue[float | None]):
    """Remembers when each arrival went in."""

    def __init__(self) -> None:
        super().__init__()
        self.put_at: list[float] = []

    def put_nowait(self, item: float | None) -> None:
        self.put_at.append(time.perf_counter())
        super().put_nowait(item)


def test_open_loop_arrivals_go_in_on_time_without_spinning_on_uvloop() -> None:
    """At 5,000 arrivals a second (gaps of 0.2 ms, below uvloop's millisecond timers) every arrival
    goes in at or soon after its scheduled time, never before, and the generator wakes about
    once a millisecond: it does not spin on sleeps that return at once."""
    duration_s = 0.5

    async def offer() -> tuple[int, _Stamped]:
        queue = _Stamped()
        return await offer_arrivals(queue, 5_000.0, duration_s, random.Random(7)), queue

    wakeups, queue = uvloop.run(offer())
    scheduled = [queue.get_nowait() for _ in range(queue.qsize())]
    assert 2_200 <= len(scheduled) <= 2_800
    lateness = [put - at for put, at in zip(queue.put_at, scheduled, strict=True) if at is not None]
    assert min(lateness) >= 0
    assert sorted(lateness)[len(lateness) // 2] < 0.01
    assert wakeups <= duration_s / arrival_tick_s * 1.2 + 20, wakeups
