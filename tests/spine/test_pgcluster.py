"""The PostgreSQL cluster vendgate runs for itself (the embedded default): how it writes its WAL,
and the port it keeps."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import asyncpg
import pytest

from gateway.errors import ClusterError
from gateway.pgcluster import LocalCluster


async def test_the_durable_cluster_writes_its_wal_without_stalling_commits(tmp_path: Path) -> None:
    # Zero-filling each new 16 MB segment held the WAL write lock for tens of milliseconds while
    # every commit waited (gateway/pgcluster.py, COMMON_OPTIONS). The durable cluster of a
    # deployment, not only the tests' throw-away one, creates its segments at full size unwritten.
    cluster = LocalCluster(tmp_path / "pgdata", ephemeral=False)
    cluster.init()
    cluster.start()
    try:
        conn = await asyncpg.connect(cluster.url("postgres"))
        try:
            assert await conn.fetchval("SHOW fsync") == "on"  # durable: only the zero-fill is skipped
            assert await conn.fetchval("SHOW wal_init_zero") == "off"
            # Checkpoints spaced out and the kernel's write-back kept small: both stalled commits
            # for hundreds of milliseconds at full load with PostgreSQL's defaults.
            names = ["max_wal_size", "checkpoint_timeout", "wal_buffers", "backend_flush_after"]
            settings = {name: await conn.fetchval(f"SHOW {name}") for name in names}
            assert settings == {"max_wal_size": "4GB", "checkpoint_timeout": "15min",
                                "wal_buffers": "64MB", "backend_flush_after": "256kB"}, settings
            segment_bytes = int(await conn.fetchval(
                "SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size'"))
            await conn.execute("CREATE TABLE wal_probe (id integer PRIMARY KEY)")
            await conn.execute("SELECT pg_switch_wal()")
            await conn.execute("INSERT INTO wal_probe SELECT generate_series(1, 100)")
            name = await conn.fetchval("SELECT pg_walfile_name(pg_current_wal_insert_lsn())")
        finally:
            await conn.close()
        stat = os.stat(cluster.pgdata / "pg_wal" / name)
        assert stat.st_size == segment_bytes
        # Zero-filled, every block of the segment would be allocated; here only what was written.
        assert stat.st_blocks * 512 < segment_bytes // 4, (stat.st_blocks, segment_bytes)
    finally:
        cluster.destroy()


def test_the_cluster_keeps_its_port_across_restarts(tmp_path: Path) -> None:
    # A running `vendgate serve` and a saved `vendgate db url` keep the port they resolved: a
    # port chosen anew at every start left both pointing at nothing after a restart.
    cluster = LocalCluster(tmp_path / "one" / "pgdata")
    other = LocalCluster(tmp_path / "two" / "pgdata")
    try:
        first = cluster.start().port
        assert first is not None
        url = cluster.url("postgres")
        assert cluster.stop()
        # A new process (a new LocalCluster on the same folder) finds the same port.
        again = LocalCluster(tmp_path / "one" / "pgdata")
        assert again.start().port == first
        assert again.url("postgres") == url
        # Another data folder gets a port of its own.
        second = other.start().port
        assert second is not None and second != first
        assert cluster.stop() and other.stop()
        assert other.start().port == second
    finally:
        cluster.destroy()
        other.destroy()


def test_a_port_taken_by_another_program_is_a_clear_error(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path / "pgdata")
    try:
        port = cluster.start().port
        assert port is not None
        cluster.stop()
        with socket.create_server(("127.0.0.1", port)):
            with pytest.raises(ClusterError) as refused:
                cluster.start()
            # Never moved silently to another port: a served gateway would lose its database.
            assert not cluster.status().running
        message = str(refused.value)
        assert f"port {port}" in message and str(cluster.pgdata) in message, message
        assert "\n" not in message
        assert "VENDGATE_DATABASE_PORT" in message
        assert cluster.start().port == port  # once the port is free again
    finally:
        cluster.destroy()


def test_a_port_asked_for_is_kept(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        wanted = probe.getsockname()[1]
    cluster = LocalCluster(tmp_path / "pgdata", port=wanted)
    try:
        assert cluster.start().port == wanted
        cluster.stop()
        # Later starts without the setting keep the port the cluster was last given.
        assert LocalCluster(tmp_path / "pgdata").start().port == wanted
    finally:
        cluster.destroy()


def test_a_cluster_started_before_ports_were_recorded_keeps_its_last_port(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path / "pgdata")
    try:
        port = cluster.start().port
        cluster.stop()
        cluster.port_file.unlink()  # as an earlier vendgate left its data folder
        assert cluster.start().port == port
        assert cluster.port_file.read_text().strip() == str(port)
    finally:
        cluster.destroy()
