"""Many terminals over a GPRS-like link, and SIGTERM under load: nothing lost, nothing half-applied."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
import sys
import time

import asyncpg
import pytest

from gateway.handlers import logon_lookups_max
from gateway.records_check import check_all
from gateway.seeding import meter_number, terminal_id
from gateway.server import Gateway, Limits, connection_source
from gateway.settings import load_settings
from gateway.vending import group_id_for
from protocol.codes import ResponseCode
from protocol.errors import ProtocolError
from protocol.messages import TenderType, TopUpRequest, TopUpResult
from terminal_sim.client import LinkLost, LinkModel, PosTerminal, TerminalRefused
from terminal_sim.sim import run_simulation
from tests.gateway.conftest import Running

FAST_GPRS = LinkModel(one_way_s=0.15, jitter_s=0.1, reply_loss_probability=0.03, disconnect_probability=0.01)


async def assert_each_approved_has_one_group(pool: asyncpg.Pool, txn_ids: list[str]) -> None:
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT group_id, count(*) FILTER (WHERE kind = 'collection') AS collections "
            "FROM ledger_transfers WHERE group_id = ANY($1::uuid[]) GROUP BY group_id",
            [group_id_for(t) for t in txn_ids])
        assert len(rows) == len(set(txn_ids))
        assert all(r["collections"] == 1 for r in rows)  # each payment took money from its float once
        stored = await conn.fetchval(
            "SELECT count(*) FROM vend_transactions WHERE client_txn_id = ANY($1::text[]) AND response_code = 0",
            txn_ids)
        assert stored == len(set(txn_ids))


@pytest.mark.timeout(180)
async def test_200_terminals_over_gprs_keep_the_ledger_whole(running: Running) -> None:
    assert running.gateway.pos_port is not None
    terminals = [(terminal_id(n), running.key(n)) for n in range(7, 207)]
    summary, notes = await run_simulation(
        host="127.0.0.1", port=running.gateway.pos_port, terminals=terminals,
        meters=[meter_number(n) for n in range(13, 43)], currency="EUR", duration_s=8, link=FAST_GPRS, seed=7)
    assert summary.ok, notes
    assert summary.approved > 200
    assert summary.retries > 0  # the link model did lose replies, and retries were answered
    await assert_each_approved_has_one_group(running.pool, summary.approved_txn_ids)
    async with running.pool.acquire() as conn:
        report = await check_all(conn)
    assert report.holds, report.broken


def sample(body: str, name: str, labels: str = "") -> float:
    """The value of one sample in a Prometheus text exposition (0 when absent)."""
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", body, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def test_metrics_and_health_endpoints(running: Running) -> None:
    port = running.gateway.http_port

    async def metrics() -> str:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        body = (await reader.read()).decode()
        writer.close()
        return body

    approved = 'vendgate_requests_total', '{message_type="TopUpRequest",response_code="APPROVED"}'
    before = await metrics()
    assert running.gateway.pos_port is not None
    pos = PosTerminal(terminal_id(280), running.key(280), "127.0.0.1", running.gateway.pos_port)
    paid = await pos.top_up(meter_number(26), 900, "EUR")
    assert paid.response_code is ResponseCode.APPROVED
    await pos.logoff()
    body = await metrics()
    # The payment is counted by type and code, and its batch in the batch-size histogram.
    assert sample(body, *approved) == sample(before, *approved) + 1
    assert sample(body, "vendgate_commit_batch_size_count") >= sample(before, "vendgate_commit_batch_size_count") + 1
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert b"200 OK" in await reader.read()
    writer.close()


async def test_idle_connection_is_cut_off(running: Running) -> None:
    gateway = running.gateway
    previous = gateway.limits
    gateway.limits = Limits(idle_timeout_s=0.5, frame_deadline_s=0.3)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.pos_port)
        writer.write(b"\x00")  # the first byte of a frame, then silence
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert time.monotonic() - started < 2
        writer.close()
    finally:
        gateway.limits = previous


async def test_oversize_frame_is_refused_before_buffering(running: Running) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", running.gateway.pos_port)
    writer.write(b"\xff\xff" + b"\x00" * 64)
    await writer.drain()
    assert len(await asyncio.wait_for(reader.read(), 5)) < 1024
    writer.close()


@pytest.mark.timeout(120)
async def test_sigterm_during_load_loses_nothing(running: Running, tmp_path: os.PathLike[str]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("VENDGATE_")}
    env.update({"VENDGATE_DATABASE_URL": running.db_url, "VENDGATE_MASTER_KEY": running.master_key.hex(),
                "VENDGATE_POS_PORT": str(port), "VENDGATE_HTTP_PORT": "0", "VENDGATE_DATA_DIR": str(tmp_path),
                "VENDGATE_LOG_LEVEL": "warning"})
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway", "serve", env=env)
    try:
        for _ in range(200):
            try:
                _, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                break
            except OSError:
                await asyncio.sleep(0.1)
        approved: list[str] = []
        stop_at = time.monotonic() + 30

        async def pay(n: int) -> None:
            pos = PosTerminal(terminal_id(n), running.key(n), "127.0.0.1", port, last_sequence=900_000)
            try:
                await pos.logon()
                while time.monotonic() < stop_at:
                    txn = pos.next_transaction_id()
                    request = TopUpRequest(client_transaction_id=txn, meter_number=meter_number(13 + n % 30),
                                           amount_minor=700, currency="EUR", tender_type=TenderType.CASH)
                    # No retry here: a reply either came (and must be committed) or it did not.
                    result = await pos._exchange(request, TopUpResult)
                    if result.response_code is ResponseCode.APPROVED:
                        approved.append(txn.as_key())
            except (LinkLost, TerminalRefused, ProtocolError, ConnectionError, OSError):
                return
            finally:
                await pos.close()

        workers = [asyncio.create_task(pay(n)) for n in range(207, 257)]
        await asyncio.sleep(2.0)
        assert approved, "load was flowing before the signal"
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code = await asyncio.wait_for(process.wait(), 40)
        assert code == 0 and time.monotonic() - started < 35
        await asyncio.gather(*workers)
        await assert_each_approved_has_one_group(running.pool, approved)
        async with running.pool.acquire() as conn:
            report = await check_all(conn)
        assert report.holds, report.broken
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_connection_cap_refuses_extra_connections(running: Running) -> None:
    gateway = running.gateway
    previous = gateway.limits
    open_now = len(gateway._connections)
    gateway.limits = Limits(connections_max=open_now + 2)
    writers = []
    try:
        for _ in range(2):
            _, writer = await asyncio.open_connection("127.0.0.1", gateway.pos_port)
            writers.append(writer)
        await asyncio.sleep(0.1)
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.pos_port)
        writers.append(writer)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed at once, nothing read from it
    finally:
        gateway.limits = previous
        for w in writers:
            w.close()


async def silent_connection(port: int, address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection from `address` (any of 127.0.0.0/8 is loopback) that sends nothing."""
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(address, 0))


async def until_no_unproven_connections(gateway: Gateway) -> None:
    async with asyncio.timeout(5):
        while gateway.unproven_connections:  # noqa: ASYNC110 - bounded poll
            await asyncio.sleep(0.01)


async def test_one_address_holding_its_share_of_unproven_connections_leaves_room_for_other_terminals(
        running: Running) -> None:
    # Before, connections_max was one pool for every peer: one host opening connections and
    # sending nothing (each held until the logon deadline, then opened again) kept every terminal
    # of the deployment from logging on.
    gateway = running.gateway
    assert gateway.pos_port is not None
    previous = gateway.limits
    per_source = 5
    gateway.limits = Limits(connections_max=len(gateway._connections) + 20, unproven_connections_max=10,
                            unproven_connections_per_source_max=per_source)
    hostile: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    honest = PosTerminal(terminal_id(300), running.key(300), "127.0.0.1", gateway.pos_port, last_sequence=700)
    try:
        for _ in range(20):  # one host, on another address than the terminal's
            hostile.append(await silent_connection(gateway.pos_port, "127.0.0.2"))
        for reader, _ in hostile[per_source:]:  # past the address's share: closed at once, nothing read
            assert await asyncio.wait_for(reader.read(), 5) == b""
        assert gateway.unproven_connections == per_source
        accepted = await asyncio.wait_for(honest.logon(), 5)
        assert accepted.idle_timeout_s > 0
        inquiry = await asyncio.wait_for(honest.float_inquiry(), 5)
        assert inquiry.response_code is ResponseCode.APPROVED
    finally:
        gateway.limits = previous
        for _, writer in hostile:
            writer.close()
        await honest.logoff()
    await until_no_unproven_connections(gateway)


async def test_unproven_connections_take_at_most_their_share_and_a_proven_one_stops_counting(
        running: Running) -> None:
    gateway = running.gateway
    assert gateway.pos_port is not None
    previous = gateway.limits
    gateway.limits = Limits(connections_max=len(gateway._connections) + 10, unproven_connections_max=2,
                            unproven_connections_per_source_max=1)
    terminals = [PosTerminal(terminal_id(n), running.key(n), "127.0.0.1", gateway.pos_port, last_sequence=700)
                 for n in (301, 302, 303)]
    silent: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        # One address, one unproven connection at a time: each terminal that proved its key and
        # stays connected leaves the slot to the next.
        for term in terminals:
            await asyncio.wait_for(term.logon(), 5)
        assert gateway.unproven_connections == 0
        # The share of every address together: two silent hosts take it, a third is closed at once.
        silent = [await silent_connection(gateway.pos_port, address) for address in ("127.0.0.3", "127.0.0.4")]
        await asyncio.sleep(0.1)
        assert gateway.unproven_connections == 2
        reader, writer = await silent_connection(gateway.pos_port, "127.0.0.5")
        silent.append((reader, writer))
        assert await asyncio.wait_for(reader.read(), 5) == b""
        # The sessions that proved their key are served on.
        for term in terminals:
            inquiry = await asyncio.wait_for(term.float_inquiry(), 5)
            assert inquiry.response_code is ResponseCode.APPROVED
    finally:
        gateway.limits = previous
        for _, writer in silent:
            writer.close()
        for term in terminals:
            await term.logoff()
    await until_no_unproven_connections(gateway)


@pytest.mark.parametrize(("peername", "source"), [
    (("192.0.2.7", 40000), "192.0.2.7"),
    (("2001:db8:1:2:aaaa::1", 40000, 0, 0), "2001:db8:1:2::/64"),
    (("2001:db8:1:2:bbbb:cccc:dddd:eeee", 40001, 0, 0), "2001:db8:1:2::/64"),
    (("2001:db8:1:3::1", 40000, 0, 0), "2001:db8:1:3::/64"),
    (("::ffff:192.0.2.7", 40000, 0, 0), "192.0.2.7"),  # IPv4 on a dual-stack socket counts as IPv4
    (("fe80::1%eth0", 40000, 0, 2), "fe80::/64"),
    (None, ""),
])
def test_unproven_connections_are_counted_per_ipv4_address_and_per_ipv6_64(
        peername: tuple[object, ...] | None, source: str) -> None:
    assert connection_source(peername) == source


async def test_new_logon_replaces_the_old_session(running: Running) -> None:
    assert running.gateway.pos_port is not None
    old = PosTerminal(terminal_id(262), running.key(262), "127.0.0.1", running.gateway.pos_port)
    await old.logon()
    new = PosTerminal(terminal_id(262), running.key(262), "127.0.0.1", running.gateway.pos_port, last_sequence=50)
    await new.logon()
    with pytest.raises((LinkLost, TerminalRefused, ProtocolError)):
        await old._exchange(TopUpRequest(client_transaction_id=old.next_transaction_id(),
                                         meter_number=meter_number(25), amount_minor=500, currency="EUR",
                                         tender_type=TenderType.CASH), TopUpResult)
    paid = await new.top_up(meter_number(25), 500, "EUR")
    assert paid.response_code is ResponseCode.APPROVED
    await new.logoff()
    await old.close()


async def test_unauthenticated_connection_must_log_on_quickly(running: Running) -> None:
    gateway = running.gateway
    previous = gateway.limits
    gateway.limits = Limits(logon_deadline_s=0.5)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.pos_port)
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # silent socket: cut at the logon deadline
        assert 0.4 < time.monotonic() - started < 2
        writer.close()
    finally:
        gateway.limits = previous


async def test_a_flood_of_unproven_logons_waits_its_turn_and_payments_go_on(running: Running) -> None:
    gateway = running.gateway
    assert gateway.pos_port is not None
    payer = PosTerminal(terminal_id(271), running.key(271), "127.0.0.1", gateway.pos_port)
    await payer.logon()
    lookups = gateway.handlers.logon_lookups
    for _ in range(logon_lookups_max):  # every key lookup slot taken, as by a flood already running
        await lookups.acquire()
    released = False
    try:
        strangers = [PosTerminal(terminal_id(9_000_000 + i), bytes(32), "127.0.0.1", gateway.pos_port)
                     for i in range(50)]
        pending = [asyncio.create_task(s.logon()) for s in strangers]
        await asyncio.sleep(0.3)
        assert not any(task.done() for task in pending)  # waiting for a lookup slot, not answered
        paid = await asyncio.wait_for(payer.top_up(meter_number(26), 600, "EUR"), 5)
        assert paid.response_code is ResponseCode.APPROVED
        for _ in range(logon_lookups_max):
            lookups.release()
        released = True
        results = await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 10)
        assert all(isinstance(r, TerminalRefused) and r.response_code is ResponseCode.UNKNOWN_TERMINAL
                   for r in results), results
    finally:
        if not released:
            for _ in range(logon_lookups_max):
                lookups.release()
        await payer.logoff()


async def test_a_logon_still_waiting_for_its_lookup_at_the_deadline_is_told_to_come_back(running: Running) -> None:
    gateway = running.gateway
    assert gateway.pos_port is not None
    previous = gateway.limits
    gateway.limits = Limits(logon_deadline_s=0.5)
    lookups = gateway.handlers.logon_lookups
    for _ in range(logon_lookups_max):
        await lookups.acquire()
    try:
        waiting = PosTerminal(terminal_id(272), running.key(272), "127.0.0.1", gateway.pos_port)
        with pytest.raises(TerminalRefused) as refused:
            await asyncio.wait_for(waiting.logon(), 5)
        assert refused.value.response_code is ResponseCode.SYSTEM_BUSY
    finally:
        gateway.limits = previous
        for _ in range(logon_lookups_max):
            lookups.release()
    accepted = await waiting.logon()  # its turn now
    assert accepted.idle_timeout_s > 0
    await waiting.logoff()


async def test_a_logon_waiting_for_its_lookup_at_shutdown_ends_quietly(running: Running,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    settings = load_settings(environ={"VENDGATE_POS_PORT": "0", "VENDGATE_HTTP_PORT": "0"})
    gateway = Gateway(settings, running.pool, running.keystore)
    await gateway.start()
    assert gateway.pos_port is not None
    lookups = gateway.handlers.logon_lookups
    for _ in range(logon_lookups_max):
        await lookups.acquire()
    waiting = PosTerminal(terminal_id(273), running.key(273), "127.0.0.1", gateway.pos_port)
    logging_on = asyncio.create_task(waiting.logon())
    await asyncio.sleep(0.2)
    with caplog.at_level(logging.INFO, logger="vendgate"):
        stopping = asyncio.create_task(gateway.stop())
        with pytest.raises(TerminalRefused) as refused:
            await asyncio.wait_for(logging_on, 10)  # told goodbye, not challenged
        for _ in range(logon_lookups_max):
            lookups.release()
        await asyncio.wait_for(stopping, 25)
        await asyncio.sleep(0.1)
    assert refused.value.response_code is ResponseCode.SYSTEM_BUSY
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
