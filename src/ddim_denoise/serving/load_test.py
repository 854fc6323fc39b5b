"""A load test of the served denoiser: concurrent clients, mixed good and bad requests, the server's memory watched.

Two phases against one ``mlflow models serve`` process:

1. mixed: ``clients`` threads for ``seconds``, each sending one request of every kind in ``mix`` first, then
   requests drawn by weight (``mix``) from the kinds in ``KINDS``: valid (a small noisy PNG and a sigma), invalid (bad
   base64, a negative sigma, no image column) and oversized (base64 one character over the limit; a 20000 x 20000
   PNG bomb of a few hundred kB);
2. oversized: the same clients for ``oversized_seconds`` sending oversized requests only (the same way), with the
   server's memory (RSS of its whole process tree, sampled every 50 ms) read before, at its peak and after.

Every answer is checked: a valid request must come back 200 with an image of its size, any other 400 with its
reason. The result (``run_load_test``) is a JSON-ready dict: per phase and kind, requests sent, HTTP status counts,
answers not as expected, latency p50 / p99 / max; the memory figures; the settings. ``load_test_checkpoint`` saves a
checkpoint as the pyfunc model and serves it itself (``model_server.served_model``) with the limits set.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import random
import struct
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ddim_denoise.serving.pyfunc import LIMIT_VARIABLES, RequestLimits

VALID, INVALID, OVERSIZED = "valid", "invalid", "oversized"
MIB = 2**20


@dataclass(frozen=True)
class Kind:
    group: str
    reason: str  # what the 400's message must say ("" for the valid kind, which must answer 200)


KINDS = {
    "valid": Kind(VALID, ""),
    "bad_base64": Kind(INVALID, "is not the base64 text of an image file"),
    "negative_sigma": Kind(INVALID, "sigma must lie in"),
    "no_image_column": Kind(INVALID, "'image'"),  # MLflow's schema check names the missing column
    "base64_over_limit": Kind(OVERSIZED, LIMIT_VARIABLES["max_base64_chars"]),
    "png_bomb": Kind(OVERSIZED, LIMIT_VARIABLES["max_image_pixels"]),
}
DEFAULT_MIX = {"valid": 6, "bad_base64": 1, "negative_sigma": 1, "no_image_column": 1, "base64_over_limit": 1,
               "png_bomb": 1}


class LoadTestError(RuntimeError):
    """The load test cannot run or did not run whole: the bomb does not fit the limits, the model does not serve, or
    a client ended with an error (its requests would go uncounted)."""


@dataclass(frozen=True)
class LoadSettings:
    clients: int = 8
    seconds: float = 60.0  # the mixed phase
    oversized_seconds: float = 15.0  # the oversized-only phase
    mix: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_MIX))  # kind -> weight
    limits: Mapping[str, int] = field(default_factory=dict)  # RequestLimits fields given to the server
    image_side: int = 64  # the valid requests' PNG, RGB 8-bit
    sigma: float = 0.1
    bomb_side: int = 20_000  # 400 MB of gray pixels (4.8 GB as float32 RGB) in about 390 kB of PNG
    workers: int = 1  # uvicorn workers of a server started here
    server_threads: int | None = None  # OMP/MKL threads of a server started here (None: torch's default)
    request_timeout_s: float = 120.0
    seed: int = 0

    def __post_init__(self):
        unknown = sorted(set(self.mix) - set(KINDS)) + sorted(set(self.limits) - set(LIMIT_VARIABLES))
        if unknown:
            raise ValueError(f"unknown request kind or limit: {', '.join(unknown)} (kinds: {', '.join(KINDS)}; "
                             f"limits: {', '.join(LIMIT_VARIABLES)})")
        if self.clients < 1 or self.seconds <= 0 or self.oversized_seconds < 0 or not any(self.mix.values()):
            raise ValueError("clients >= 1, seconds > 0, oversized_seconds >= 0 and a mix of some weight are needed")

    def request_limits(self) -> RequestLimits:
        return RequestLimits(**self.limits)

    def server_env(self) -> dict[str, str]:
        env = {LIMIT_VARIABLES[name]: str(value) for name, value in self.limits.items()}
        if self.server_threads:
            env |= {"OMP_NUM_THREADS": str(self.server_threads), "MKL_NUM_THREADS": str(self.server_threads)}
        return env


# --- requests --------------------------------------------------------------------------------------------------------

def noisy_png(side: int, sigma: float, seed: int = 0) -> bytes:
    """An 8-bit RGB PNG of a colour ramp plus Gaussian noise."""
    import imagecodecs

    ramp = np.linspace(0.2, 0.8, side, dtype=np.float32)
    clean = np.stack([ramp[:, None] * np.ones(side, np.float32), ramp[None, :] * np.ones((side, 1), np.float32),
                      np.full((side, side), 0.5, np.float32)], axis=-1)
    noisy = clean + sigma * np.random.default_rng(seed).standard_normal(clean.shape, dtype=np.float32)
    return bytes(imagecodecs.png_encode(np.clip(np.rint(255 * noisy), 0, 255).astype(np.uint8)))


def png_bomb(side: int) -> bytes:
    """A true gray 8-bit PNG of side x side black pixels: it decodes in full, yet deflate squeezes its zero rows
    about a thousandfold. Written row by row, so building it never holds the pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    deflate = zlib.compressobj(9)
    row = bytes(side + 1)  # the filter byte (0: none), then the row's pixels
    pixels = b"".join([deflate.compress(row) for _ in range(side)] + [deflate.flush()])
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit gray, deflate, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def request_body(columns: list[str], row: list) -> bytes:
    return json.dumps({"dataframe_split": {"columns": columns, "data": [row]}, "params": {"steps": 1}}).encode()


def image_body(settings: LoadSettings, sigma: float) -> bytes:
    """The valid request's noisy PNG with ``sigma``."""
    png = base64.b64encode(noisy_png(settings.image_side, settings.sigma, settings.seed)).decode("ascii")
    return request_body(["image", "sigma"], [png, sigma])


def request_bodies(settings: LoadSettings) -> dict[str, bytes]:
    """The JSON body of each kind in the mix, built once (the clients only send them)."""
    limits = settings.request_limits()
    builders = {
        "valid": lambda: image_body(settings, settings.sigma),
        "bad_base64": lambda: request_body(["image", "sigma"], ["this is not base64!", settings.sigma]),
        "negative_sigma": lambda: image_body(settings, -0.5),
        "no_image_column": lambda: request_body(["sigma"], [settings.sigma]),
        "base64_over_limit": lambda: request_body(["image"], ["A" * (limits.max_base64_chars + 1)]),
        "png_bomb": lambda: bomb_body(settings, limits),
    }
    return {kind: builders[kind]() for kind, weight in settings.mix.items() if weight}


def bomb_body(settings: LoadSettings, limits: RequestLimits) -> bytes:
    """The bomb must pass the base64 check and meet the pixel check, the one that keeps it from being decoded."""
    bomb = base64.b64encode(png_bomb(settings.bomb_side)).decode("ascii")
    if settings.bomb_side**2 <= limits.max_image_pixels or len(bomb) > limits.max_base64_chars:
        raise LoadTestError(f"a {settings.bomb_side}-pixel-square bomb ({len(bomb):,} base64 characters) must be over "
                            f"max_image_pixels ({limits.max_image_pixels:,}) and within max_base64_chars "
                            f"({limits.max_base64_chars:,})")
    return request_body(["image"], [bomb])


def post(url: str, body: bytes, timeout_s: float) -> tuple[int, bytes]:
    """(HTTP status, body); status 0 when no whole answer came (refused, dropped or cut connection, a garbled
    status line, timeout), the body then saying what happened."""
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    try:
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as e:
            with e:
                return e.code, e.read()
    # URLError and timeouts are OSErrors; IncompleteRead and BadStatusLine (a worker killed mid-answer) are not
    except (OSError, http.client.HTTPException) as e:
        return 0, f"{type(e).__name__}: {e}".encode()


def answer_problem(kind: str, status: int, body: bytes, image_side: int) -> str | None:
    """What is wrong with an answer to a request of ``kind``, or None when it is the one expected."""
    import imagecodecs

    expected = 200 if KINDS[kind].group == VALID else 400
    if status != expected:
        return f"HTTP {status} instead of {expected}: {body[:200].decode(errors='replace')}"
    try:
        answer = json.loads(body)
        if expected == 200:
            shape = imagecodecs.png_decode(base64.b64decode(answer["predictions"][0]["image"])).shape
            return None if shape == (image_side, image_side, 3) else f"an image of shape {shape}"
        message = answer.get("message", "")
    except Exception as e:  # an unreadable answer (bad JSON, base64, PNG) is a finding, not a client crash
        return f"unreadable answer ({type(e).__name__}: {e})"
    return None if KINDS[kind].reason in message else f"the reason lacks {KINDS[kind].reason!r}: {message[:200]}"


# --- measuring -------------------------------------------------------------------------------------------------------

@dataclass
class KindTally:
    """One kind's answers within a phase."""

    sent: int = 0
    statuses: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # seconds, request sent to answer read
    unexpected: int = 0
    problems: list[str] = field(default_factory=list)  # the first few unexpected answers
    reason: str = ""  # the first refusal's reason, as a sample

    def add(self, status: int, latency: float, body: bytes, problem: str | None) -> None:
        self.sent += 1
        self.statuses[status] += 1
        self.latencies.append(latency)
        if problem is not None:
            self.unexpected += 1
            if len(self.problems) < 3:
                self.problems.append(problem)
        if status == 400 and not self.reason:
            try:
                message = json.loads(body).get("message", "")
            except ValueError:
                return
            self.reason = message.rsplit("Error: ", 1)[-1][:300]  # MLflow puts the request's data before it

    def summary(self) -> dict:
        ms = np.asarray(self.latencies) * 1e3
        return {"sent": self.sent, "status": {str(code): n for code, n in sorted(self.statuses.items())},
                "unexpected": self.unexpected,
                "latency_ms": {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
                               "max": float(ms.max())} if self.sent else None,
                "reason": self.reason, "problems": self.problems}


class TreeMemory:
    """The resident memory of a process and all its descendants, sampled in a thread: the server's footprint
    (``mlflow models serve`` runs its model in uvicorn worker processes)."""

    def __init__(self, pid: int, interval_s: float = 0.05):
        import psutil

        self.process = psutil.Process(pid)
        self.interval_s = interval_s
        self.samples: list[tuple[float, int]] = []  # (monotonic time, bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True, name="rss-sampler")

    def rss(self) -> int:
        import psutil

        total = 0
        try:
            processes = [self.process, *self.process.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0
        for process in processes:
            try:
                total += process.memory_info().rss
            except psutil.NoSuchProcess:  # a worker that ended between the listing and the reading
                pass
        return total

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), self.rss()))
            self._stop.wait(self.interval_s)

    def peak(self, since: float = float("-inf"), until: float = float("inf")) -> int:
        return max((rss for t, rss in self.samples if since <= t <= until), default=0)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_phase(url: str, bodies: dict[str, bytes], weights: Mapping[str, int], settings: LoadSettings,
              seconds: float, seed: int) -> dict:
    """``settings.clients`` threads, each sending one request of every kind first (however long that takes), then
    requests drawn by ``weights`` until ``seconds`` have passed (requests in flight then are answered and counted); per
    kind, what came back."""
    kinds = [kind for kind, weight in weights.items() if weight and kind in bodies]
    tallies = {kind: KindTally() for kind in kinds}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    errors: list[tuple[str, Exception]] = []  # (client, what ended it)

    def client(index: int) -> None:
        draw = random.Random(seed * 1000 + index)
        first = kinds[index % len(kinds):] + kinds[:index % len(kinds)]  # every kind once, the clients starting apart
        try:
            while first or time.monotonic() < deadline:
                kind = first.pop(0) if first else draw.choices(kinds, [weights[k] for k in kinds])[0]
                start = time.perf_counter()
                status, body = post(url, bodies[kind], settings.request_timeout_s)
                latency = time.perf_counter() - start
                problem = answer_problem(kind, status, body, settings.image_side)
                with lock:
                    tallies[kind].add(status, latency, body, problem)
        except Exception as e:  # kept, so that no client ends unnoticed
            with lock:
                errors.append((threading.current_thread().name, e))

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,), name=f"load-client-{i}") for i in range(settings.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        ended = "; ".join(f"{name}: {type(e).__name__}: {e}" for name, e in errors)
        raise LoadTestError(f"{len(errors)} of {settings.clients} load clients ended early, their requests uncounted: "
                            f"{ended}") from errors[0][1]
    return {"seconds": time.monotonic() - started, "kinds": {kind: tally.summary() for kind, tally in tallies.items()}}


def run_load_test(url: str, settings: LoadSettings = LoadSettings(), server_pid: int | None = None) -> dict:
    """The two phases against the model served at ``url``, whose limits must be ``settings.limits``; with
    ``server_pid``, the server's memory too (None in the result without it)."""
    bodies = request_bodies(settings)
    status, body = post(url, image_body(settings, settings.sigma), settings.request_timeout_s)
    if status != 200:  # the first call loads lazily initialised parts: not a measurement, but it must work
        raise LoadTestError(f"the served model does not denoise a small PNG: HTTP {status}: {body[:300]!r}")
    oversized = {kind: weight for kind, weight in settings.mix.items() if KINDS[kind].group == OVERSIZED and weight}
    with TreeMemory(server_pid) if server_pid else contextlib.nullcontext() as memory:
        before = memory.rss() if memory else 0
        mixed = run_phase(url, bodies, settings.mix, settings, settings.seconds, settings.seed)
        phase_start, oversized_before = time.monotonic(), memory.rss() if memory else 0
        refused = (run_phase(url, bodies, oversized, settings, settings.oversized_seconds, settings.seed + 1)
                   if oversized and settings.oversized_seconds else None)
        phase_end, oversized_after = time.monotonic(), memory.rss() if memory else 0
    phases = {"mixed": mixed, **({"oversized": refused} if refused else {})}
    memory_mib = None
    if memory:
        oversized_peak = max(memory.peak(phase_start, phase_end), oversized_before, oversized_after)
        memory_mib = {key: value / MIB for key, value in {
            "before": before, "peak": max(memory.peak(), before, oversized_after),
            "oversized_before": oversized_before, "oversized_peak": oversized_peak,
            "oversized_after": oversized_after, "oversized_growth": oversized_peak - oversized_before}.items()}
    return {"settings": _settings_record(settings), "phases": phases, "memory_mib": memory_mib}


def _settings_record(settings: LoadSettings) -> dict:
    record = asdict(settings)
    record["mix"], record["limits"] = dict(settings.mix), {
        LIMIT_VARIABLES[name]: value for name, value in asdict(settings.request_limits()).items()}
    return record


# --- entry points ----------------------------------------------------------------------------------------------------

def load_test_model(model_uri: str, settings: LoadSettings = LoadSettings(), log: Path | None = None) -> dict:
    """Serve ``model_uri`` on loopback with ``settings``' limits, run the load test on it, stop the server."""
    from ddim_denoise.serving.model_server import served_model

    with served_model(model_uri, settings.server_env(), settings.workers, log) as server:
        return run_load_test(server.url, settings, server.pid)


def load_test_checkpoint(checkpoint: str | Path, settings: LoadSettings = LoadSettings(),
                         log: Path | None = None) -> dict:
    """The checkpoint saved as the pyfunc model ``log_pyfunc_model`` logs (in a temporary folder), load-tested."""
    from ddim_denoise.serving.pyfunc import save_pyfunc_model

    with tempfile.TemporaryDirectory(prefix="ddim-denoise-load-") as tmp:
        model = save_pyfunc_model(checkpoint, Path(tmp) / "model")
        return load_test_model(str(model), settings, log)


def write_result(result: dict, path: str | Path) -> None:
    from ddim_denoise.pipeline.checkpoint import atomic_write_text

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
