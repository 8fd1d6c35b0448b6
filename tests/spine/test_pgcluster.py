"""The PostgreSQL cluster vendgate runs for itself (the embedded default): how it writes its WAL."""

from __future__ import annotations

import os
from pathlib import Path

import asyncpg

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
