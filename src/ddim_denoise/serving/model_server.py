"""``mlflow models serve`` as a child process on a free port of 127.0.0.1: started, waited for, always stopped.

``served_model`` is a context manager: it yields the server's URL and process id once ``/ping`` answers and the port
is held by the server's processes, and on the way out (an error included) stops the server and the uvicorn workers it
started. The server runs in its own session,
so its process group holds exactly those processes and nothing of the caller's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"  # loopback only: `mlflow models serve` has no authentication of its own
START_TIMEOUT_S = 180  # a cold start imports mlflow and torch, tens of seconds on two busy cores
STOP_GRACE_S = 20
POLL_S = 0.5
LOG_TAIL_CHARS = 3000


class ServerError(RuntimeError):
    """The server exited or did not answer in time; the message ends with the tail of its log."""


@dataclass(frozen=True)
class Server:
    url: str  # http://127.0.0.1:PORT
    pid: int  # the `mlflow models serve` process, leader of the server's process group
    log: Path  # its stdout and stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def answers_ok(url: str, timeout: float = 2) -> bool:
    """Whether a GET of ``url`` answers 200 (a server's readiness endpoint: /ping, /health)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def log_tail(log: Path) -> str:
    text = log.read_text(errors="replace") if log.is_file() else ""
    return f"; its log ends:\n{text[-LOG_TAIL_CHARS:]}" if text else ""


def wait_until_serving(url: str, process: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not answers_ok(f"{url}/ping"):
        if process.poll() is not None:
            raise ServerError(f"mlflow models serve exited with code {process.returncode}{log_tail(log)}")
        if time.monotonic() > deadline:
            raise ServerError(f"mlflow models serve did not answer {url}/ping within {timeout_s:.0f} s{log_tail(log)}")
        time.sleep(POLL_S)


def listens_on(pid: int, port: int) -> bool:
    """Whether the process ``pid`` or one of its descendants (a uvicorn worker) listens on TCP ``port``."""
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return False
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            listing = getattr(process, "net_connections", None) or process.connections  # psutil < 6: connections
            connections = listing(kind="tcp")
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in connections):
                return True
    return False


def check_port_is_ours(url: str, port: int, process: subprocess.Popen, log: Path) -> None:
    """After ``/ping`` answered: the server must still run and hold the port, which another listener could have taken
    between ``free_port`` and the server's bind (and answered ``/ping`` for it)."""
    if process.poll() is not None or not listens_on(process.pid, port):
        state = f"exited with code {process.returncode}" if process.returncode is not None else "does not listen on it"
        raise ServerError(f"{url}/ping answers, but mlflow models serve {state}: another process holds port "
                          f"{port}{log_tail(log)}")


def stop_process_group(process: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM the group ``process`` leads, give it ``grace_s``, then SIGKILL whatever of it is left (workers that
    outlived their leader included)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def serve_command(model_uri: str, port: int, workers: int = 1) -> list[str]:
    return [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
            "--host", HOST, "--port", str(port), "--workers", str(workers)]


@contextlib.contextmanager
def served_model(model_uri: str, env: Mapping[str, str] | None = None, workers: int = 1,
                 log: Path | None = None, start_timeout_s: float = START_TIMEOUT_S) -> Iterator[Server]:
    """Serve ``model_uri`` (a model folder, ``models:/name/1``, ``runs:/...``) with ``env`` added to this process's
    environment (e.g. the request limits); ``log`` keeps the server's output (default: a temporary file)."""
    with contextlib.ExitStack() as cleanup:
        if log is None:
            log = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="ddim-denoise-serve-"))) / "server.log"
        port = free_port()
        with open(log, "wb") as log_file:
            process = subprocess.Popen(serve_command(model_uri, port, workers), stdout=log_file,
                                       stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                       start_new_session=True)
        cleanup.callback(stop_process_group, process)
        url = f"http://{HOST}:{port}"
        wait_until_serving(url, process, log, start_timeout_s)
        check_port_is_ours(url, port, process, log)
        yield Server(url, process.pid, log)
