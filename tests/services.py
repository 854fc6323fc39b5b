"""Real services for integration tests: a throw-away PostgreSQL server and an ``mlflow server`` backed by it.

Both are context managers that start the service on a free port of 127.0.0.1 (nothing listens beyond this machine),
wait for it within a time limit, and always stop it and delete its files, whatever the test did. Start-up failures
raise ``ServiceError`` with the tail of the service's own log.

PostgreSQL comes from the Debian package ``postgresql``, whose programs live in /usr/lib/postgresql/<version>/bin
(not on PATH). ``initdb`` refuses to run as root, so under root the server runs as the package's ``postgres``
account, in a folder under /tmp that this account can reach (pytest's own temporary folders are root-only).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cli_workspace import free_port

from ddim_denoise.serving.model_server import answers_ok, stop_process_group

POSTGRES_PROGRAMS = ("initdb", "pg_ctl")
DEBIAN_POSTGRES_BIN = "/usr/lib/postgresql/*/bin"
POSTGRES_ACCOUNT = "postgres"  # who runs the server when the tests run as root
SUPERUSER = "postgres"  # the database role the tests connect as (trust authentication, 127.0.0.1 only)
START_TIMEOUT_S = 120  # mlflow server creates its tables on first start: tens of seconds on two busy cores
STOP_TIMEOUT_S = 30
POLL_S = 0.5
LOG_TAIL_CHARS = 3000


class ServiceError(RuntimeError):
    """A service did not start or answer in time."""


def postgres_bin_dir() -> Path | None:
    """The folder holding initdb and pg_ctl: from PATH (resolving Debian's symlinks), else the newest Debian one."""
    on_path = [shutil.which(program) for program in POSTGRES_PROGRAMS]
    if all(on_path):
        return Path(on_path[0]).resolve().parent
    versions = sorted(Path("/").glob(DEBIAN_POSTGRES_BIN.lstrip("/")), key=lambda p: _version_key(p.parent.name))
    for folder in reversed(versions):
        if all((folder / program).is_file() for program in POSTGRES_PROGRAMS):
            return folder
    return None


def _version_key(name: str) -> tuple:
    return tuple(int(part) if part.isdigit() else 0 for part in name.split("."))


def wait_until(ready: Callable[[], bool], what: str, timeout_s: float, process: subprocess.Popen | None = None,
               log: Path | None = None) -> None:
    """Poll ``ready`` until it holds; ServiceError after ``timeout_s`` or if ``process`` exits first."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        exited = process is not None and process.poll() is not None
        if exited or time.monotonic() > deadline:
            reason = f"exited with code {process.returncode}" if exited else f"not ready after {timeout_s:.0f} s"
            raise ServiceError(f"{what} {reason}{_log_tail(log)}")
        time.sleep(POLL_S)


def _log_tail(log: Path | None) -> str:
    if log is None or not log.exists():
        return ""
    return "; its log ends:\n" + log.read_text(errors="replace")[-LOG_TAIL_CHARS:]


@dataclass(frozen=True)
class Postgres:
    host: str
    port: int

    def uri(self, database: str) -> str:
        """A SQLAlchemy URL (as MLflow and Optuna take it) for ``database`` on this server."""
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        # autocommit: CREATE DATABASE cannot run inside a transaction
        with psycopg.connect(host=self.host, port=self.port, user=SUPERUSER, dbname="postgres",
                             autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.uri(name)

    def accepts_connections(self) -> bool:
        import psycopg

        try:
            psycopg.connect(host=self.host, port=self.port, user=SUPERUSER, dbname="postgres",
                            connect_timeout=1).close()
            return True
        except psycopg.OperationalError:
            return False


@contextlib.contextmanager
def postgres_server() -> Iterator[Postgres]:
    """A fresh PostgreSQL cluster on a free port of 127.0.0.1, deleted afterwards."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        raise ServiceError("PostgreSQL's initdb/pg_ctl not found (apt-get install -y postgresql)")
    account = POSTGRES_ACCOUNT if os.geteuid() == 0 else None
    root = Path(tempfile.mkdtemp(prefix="ddim-denoise-postgres-"))
    if account:
        shutil.chown(root, account, account)
    data, log = root / "data", root / "server.log"
    server = Postgres("127.0.0.1", free_port())

    def as_server_account(*command: str, timeout: float = START_TIMEOUT_S) -> None:
        done = subprocess.run(command, cwd=root, user=account, group=account, capture_output=True, text=True,
                              timeout=timeout)
        if done.returncode != 0:
            raise ServiceError(f"{' '.join(command[:2])} failed: {done.stderr.strip()}{_log_tail(log)}")

    try:
        as_server_account(str(bin_dir / "initdb"), "-D", str(data), f"--username={SUPERUSER}", "--auth=trust",
                          "--encoding=UTF8", "--no-sync")
        options = (f"-p {server.port} -c listen_addresses={server.host} -c unix_socket_directories={root} "
                   "-c fsync=off")
        as_server_account(str(bin_dir / "pg_ctl"), "start", "-D", str(data), "-l", str(log), "-w",
                          "-t", str(START_TIMEOUT_S), "-o", options)
        wait_until(server.accepts_connections, "PostgreSQL", START_TIMEOUT_S, log=log)
        yield server
    finally:
        if (data / "postmaster.pid").exists():
            with contextlib.suppress(ServiceError, subprocess.TimeoutExpired):
                as_server_account(str(bin_dir / "pg_ctl"), "stop", "-D", str(data), "-m", "immediate", "-w",
                                  "-t", str(STOP_TIMEOUT_S), timeout=STOP_TIMEOUT_S * 2)
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def mlflow_server(backend_store_uri: str, artifacts_destination: Path, log: Path, app_name: str | None = None,
                  env: dict[str, str] | None = None) -> Iterator[str]:
    """``mlflow server`` on a free port of 127.0.0.1, serving artifacts from ``artifacts_destination``; yields its
    URL and stops the server and its workers (its own process group) afterwards. ``app_name``: e.g. "basic-auth";
    ``env``: the server's environment (default: this process's)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri", backend_store_uri,
               "--artifacts-destination", str(artifacts_destination), "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1", *(["--app-name", app_name] if app_name else [])]
    with open(log, "w") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                                   env=env)
    try:
        wait_until(lambda: answers_ok(f"{url}/health", timeout=1), "mlflow server", START_TIMEOUT_S, process, log)
        yield url
    finally:
        stop_process_group(process, STOP_TIMEOUT_S)
