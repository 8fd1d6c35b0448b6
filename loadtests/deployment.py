"""A throw-away local deployment for load runs: its own data folder, PostgreSQL and `vendgate serve`.

Everything lives under one folder made for the run: the PostgreSQL cluster (durable settings
unless asked otherwise, as in production), the seed secret, the kiosk CA and certificates, the
gateway's log and the target file the load generators read. The gateway runs as its own process
(`python -m gateway serve`), configured only through VENDGATE_* variables like any deployment,
so its CPU and memory are its own and its RSS can be read from /proc. Listeners bind 127.0.0.1.

Rules: every wait is bounded (readiness, shutdown); the master key is made for the run and
passed in the child's environment only; nothing here prints a secret.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from gateway import registry
from gateway.ca import CertificateAuthority
from gateway.cli.commands.ca_cmds import issue_kiosk_certificate
from gateway.database import ensure_database, with_database
from gateway.keystore import KeyStore
from gateway.migrate import migrate
from gateway.pgcluster import LocalCluster, binaries_dir, free_port
from gateway.seeding import DEMO_CURRENCY, seed
from loadtests.target import KioskCredential, Target

T = TypeVar("T")

DATABASE = "vendgate"
ready_timeout_s = 60.0
stop_timeout_s = 45.0
http_timeout_s = 5.0
connect_timeout_s = 10.0
kiosk_id_prefix = "K"
kiosks_max = 9_999


@dataclass(frozen=True, slots=True)
class Population:
    """Terminals created by one seeding: numbers first_terminal .. first_terminal + terminals - 1."""

    first_terminal: int
    terminals: int
    first_meter: int
    meters: int
    agents: int


def kiosk_id(n: int) -> str:
    return f"{kiosk_id_prefix}{n:07d}"


class LocalDeployment:
    def __init__(self, data_dir: Path, *, durable: bool = True) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.cluster = LocalCluster(self.data_dir / "pgdata", ephemeral=not durable)
        self.master_key = secrets.token_bytes(32)
        self.keystore = KeyStore(self.master_key)
        self.seed_secret_file = self.data_dir / "seed.secret"
        self.seed_secret_file.write_text(secrets.token_hex(32))
        self.seed_secret_file.chmod(0o600)
        self.url: str | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.pos_port = 0
        self.http_port = 0
        self.kiosk_port: int | None = None
        self.log_file = self.data_dir / "gateway.log"

    # -- database ------------------------------------------------------------------------------

    async def start_database(self) -> str:
        self.cluster.init()
        self.cluster.start()
        server_url = self.cluster.url("postgres")
        await ensure_database(server_url, DATABASE, timeout_s=connect_timeout_s)
        self.url = with_database(server_url, DATABASE)
        conn = await self.connect()
        try:
            await migrate(conn)
        finally:
            await conn.close()
        return self.url

    async def connect(self) -> asyncpg.Connection:
        assert self.url is not None, "start the database first"
        return await asyncpg.connect(self.url, timeout=connect_timeout_s)

    def postgres_version(self) -> str:
        output = subprocess.run([str(binaries_dir() / "postgres"), "--version"], capture_output=True, text=True,
                                timeout=30, check=False).stdout
        match = re.search(r"(\d+(?:\.\d+)*)", output)
        return match.group(1) if match else output.strip()

    async def seed_population(self, *, agents: int, terminals: int, meters: int,
                              float_each_minor: int) -> Population:
        """Seed agents with their terminals and meters; POS terminals must be seeded before kiosks."""
        conn = await self.connect()
        try:
            first_terminal = int(await conn.fetchval("SELECT count(*) FROM terminals")) + 1
            first_meter = int(await conn.fetchval("SELECT count(*) FROM meters")) + 1
            await seed(conn, self.keystore, agents=agents, terminals=terminals, meters=meters,
                       seed_secret=self.seed_secret(), float_each_minor=float_each_minor)
        finally:
            await conn.close()
        return Population(first_terminal=first_terminal, terminals=terminals, first_meter=first_meter,
                          meters=meters, agents=agents)

    def seed_secret(self) -> bytes:
        return bytes.fromhex(self.seed_secret_file.read_text().strip())

    async def add_kiosks(self, count: int) -> list[KioskCredential]:
        """A kiosk CA for the gateway and `count` kiosk terminals with client certificates (agent 1)."""
        assert 0 <= count <= kiosks_max
        authority = CertificateAuthority(self.data_dir / "ca")
        authority.init(now=datetime.now(UTC))
        credentials = []
        conn = await self.connect()
        try:
            agent_id = await conn.fetchval("SELECT min(agent_id) FROM agents")
            assert agent_id is not None, "seed agents before kiosks"
            for n in range(1, count + 1):
                kid = kiosk_id(n)
                await registry.add_terminal(conn, self.keystore, terminal_id=kid, serial=f"KSN{n:07d}",
                                            agent_id=int(agent_id), kind="kiosk", location="load test")
                cert, key, _ = await issue_kiosk_certificate(conn, authority, kid, self.data_dir / "kiosks")
                credentials.append(KioskCredential(kiosk_id=kid, cert_file=str(cert), key_file=str(key)))
        finally:
            await conn.close()
        return credentials

    def target(self, population: Population, kiosks: list[KioskCredential]) -> Target:
        ca = self.data_dir / "ca" / "ca.pem"
        return Target(host="127.0.0.1", pos_port=self.pos_port, kiosk_port=self.kiosk_port,
                      http_port=self.http_port, seed_secret_file=str(self.seed_secret_file),
                      first_terminal=population.first_terminal, terminals=population.terminals,
                      first_meter=population.first_meter, meters=population.meters, currency=DEMO_CURRENCY,
                      ca_file=str(ca) if ca.exists() else None, kiosks=kiosks)

    # -- the gateway process -------------------------------------------------------------------

    def start_gateway(self, *, log_level: str = "warning", pool_size_max: int = 20) -> None:
        """Run `vendgate serve` on free loopback ports; returns once /readyz answers 200."""
        assert self.url is not None and self.process is None
        self.pos_port, self.http_port = free_port(), free_port()
        kiosk_tls = (self.data_dir / "ca" / "ca.pem").exists()
        self.kiosk_port = free_port() if kiosk_tls else None
        env = {k: v for k, v in os.environ.items() if not k.startswith("VENDGATE_")}
        env.update({
            "VENDGATE_DATABASE_URL": self.url, "VENDGATE_MASTER_KEY": self.master_key.hex(),
            "VENDGATE_DATA_DIR": str(self.data_dir), "VENDGATE_POS_PORT": str(self.pos_port),
            "VENDGATE_HTTP_PORT": str(self.http_port), "VENDGATE_KIOSK_PORT": str(self.kiosk_port or 0),
            "VENDGATE_LOG_LEVEL": log_level, "VENDGATE_DATABASE_POOL_SIZE_MAX": str(pool_size_max),
        })
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "gateway", "serve"], env=env,
                                            stdout=log, stderr=log, cwd=str(Path(__file__).parent.parent))
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vendgate serve exited with {self.process.returncode}; see {self.log_file}")
            if self.http_get("/readyz", quiet=True) is not None:
                return
            time.sleep(0.1)
        self.stop_gateway()
        raise RuntimeError(f"vendgate serve was not ready within {ready_timeout_s:.0f} s; see {self.log_file}")

    def http_get(self, path: str, *, quiet: bool = False) -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}",
                                        timeout=http_timeout_s) as response:
                return str(response.read().decode())
        except (urllib.error.URLError, OSError):
            if quiet:
                return None
            raise

    def gateway_rss_bytes(self) -> int:
        assert self.process is not None
        return rss_bytes(self.process.pid)

    def stop_gateway(self) -> int | None:
        """SIGTERM, then wait (the gateway answers in-flight requests first); kill after the bound."""
        process, self.process = self.process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(stop_timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        return process.returncode

    def destroy(self) -> None:
        self.stop_gateway()
        self.cluster.destroy()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds all cores of this machine spent not idle since boot (Linux /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def metric_sums(text: str, name: str) -> tuple[float, float]:
    """(sum, count) of a Prometheus histogram without labels, from /metrics text."""
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith(f"{name}_sum "):
            total = float(line.split()[1])
        elif line.startswith(f"{name}_count "):
            count = float(line.split()[1])
    return total, count


_LABEL = re.compile(r'(\w+)="([^"]*)"')


def histogram_buckets(text: str, name: str, **labels: str) -> dict[float, float]:
    """Cumulative bucket counts (upper bound -> count) of one labelled Prometheus histogram."""
    buckets: dict[float, float] = {}
    prefix = f"{name}_bucket{{"
    for line in text.splitlines():
        if not line.startswith(prefix):
            continue
        label_text, _, value = line[len(prefix):].partition("} ")
        found = dict(_LABEL.findall(label_text))
        if all(found.get(k) == v for k, v in labels.items()) and "le" in found:
            buckets[float(found["le"])] = float(value)
    return buckets


def bucket_quantile_ms(before: dict[float, float], after: dict[float, float], fraction: float) -> float | None:
    """The upper bound (ms) of the bucket holding the `fraction` quantile of what was observed
    between two readings: a value at most that, at the histogram's resolution."""
    counts = sorted((bound, after.get(bound, 0.0) - before.get(bound, 0.0)) for bound in after)
    total = counts[-1][1] if counts else 0.0
    if total <= 0:
        return None
    for bound, cumulative in counts:
        if cumulative >= fraction * total:
            return None if bound == float("inf") else round(bound * 1000, 1)
    return None


def run_in_deployment(prefix: str, body: Callable[[LocalDeployment], Coroutine[Any, Any, T]], *,
                      keep: bool) -> T:
    """Run `body` on uvloop against a fresh durable deployment in a temporary folder, then tear
    it down (or stop it and keep its folder, printed on stderr, with `keep`)."""
    import uvloop

    deployment = LocalDeployment(Path(tempfile.mkdtemp(prefix=prefix)), durable=True)
    try:
        return uvloop.run(body(deployment))
    finally:
        if keep:
            deployment.stop_gateway()
            deployment.cluster.stop()
            print(f"kept {deployment.data_dir}", file=sys.stderr, flush=True)
        else:
            deployment.destroy()
            shutil.rmtree(deployment.data_dir, ignore_errors=True)
