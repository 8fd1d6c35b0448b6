"""An in-process gateway (POS and kiosk HTTPS) on a fresh database, and a target file that names it."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest

from gateway import registry
from gateway.ca import CertificateAuthority
from gateway.cli.commands.ca_cmds import issue_kiosk_certificate
from gateway.keystore import KeyStore
from gateway.seeding import seed
from gateway.server import Gateway
from gateway.settings import load_settings
from loadtests.target import KioskCredential, Target, save_target

POS_TERMINALS = 8
METERS = 12
KIOSKS = 2


@dataclass
class Served:
    gateway: Gateway
    pool: asyncpg.Pool
    target: Target
    target_file: Path
    base: Path


@pytest.fixture(scope="module")
async def served(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Served]:
    base = tmp_path_factory.mktemp("loadtarget")
    keystore = KeyStore(secrets.token_bytes(32))
    seed_secret = secrets.token_bytes(32)
    (base / "seed.secret").write_text(seed_secret.hex())
    authority = CertificateAuthority(base / "ca")
    authority.init(now=datetime.now(UTC))
    pool = await asyncpg.create_pool(db_url, min_size=2, max_size=20)
    assert pool is not None
    kiosks = []
    async with pool.acquire() as conn:
        await seed(conn, keystore, agents=2, terminals=POS_TERMINALS, meters=METERS, seed_secret=seed_secret,
                   float_each_minor=10_000_000_000)
        for n in range(1, KIOSKS + 1):
            kid = f"K{n:07d}"
            await registry.add_terminal(conn, keystore, terminal_id=kid, serial=f"KSN{n}", agent_id=1, kind="kiosk")
            cert, key, _ = await issue_kiosk_certificate(conn, authority, kid, base / "kiosks")
            kiosks.append(KioskCredential(kiosk_id=kid, cert_file=str(cert), key_file=str(key)))
    settings = load_settings(environ={"VENDGATE_POS_PORT": "0", "VENDGATE_HTTP_PORT": "0",
                                      "VENDGATE_KIOSK_PORT": "0", "VENDGATE_LOG_LEVEL": "warning"})
    gateway = Gateway(settings, pool, keystore, kiosk_ssl=authority.server_ssl_context())
    await gateway.start()
    assert gateway.pos_port is not None
    target = Target(host="127.0.0.1", pos_port=gateway.pos_port, kiosk_port=gateway.kiosk_port,
                    http_port=gateway.http_port, seed_secret_file=str(base / "seed.secret"), terminals=POS_TERMINALS,
                    meters=METERS, ca_file=str(authority.ca_cert_path), kiosks=kiosks)
    target_file = base / "target.json"
    save_target(target_file, target)
    try:
        yield Served(gateway, pool, target, target_file, base)
    finally:
        await gateway.stop()
        await pool.close()
