"""A short load test of `mlflow models serve` with a tiny model (benchmarks/serve_load.py, serving/load_test.py):
concurrent clients, valid, invalid and oversized requests, every answer the expected one, and oversized requests
refused without the server's memory growing by anything like a decoded image."""

from __future__ import annotations

import base64
import contextlib
import json
import socketserver
import subprocess
import sys
import threading
import time

import pytest
from denoise_fixtures import write_tiny_checkpoint
from test_benchmarks import run_benchmark
from test_results_tables import made_up_load_result

from ddim_denoise.serving import load_test, model_server
from ddim_denoise.serving.load_test import (
    KINDS,
    MIB,
    OVERSIZED,
    VALID,
    LoadSettings,
    LoadTestError,
    TreeMemory,
    answer_problem,
    noisy_png,
    post,
    run_phase,
)

CLIENTS = 2
MIXED_S, OVERSIZED_S = 4, 3
LIMITS = {"max_base64_chars": 2**20, "max_image_pixels": 1_000_000}
BOMB_SIDE = 20_000  # the library's default: 400 MB decoded as 8-bit gray, 4.8 GB as float32 RGB
# Refusing from the headers leaves a few MiB of request bodies in flight (measured: under 15 MiB in the oversized
# phase, under 30 MiB over the whole test with the small valid images denoised too); decoding one bomb would add at
# least its 8-bit pixels, 381 MiB, before any float copy.
GROWTH_BOUND_MIB = 100


def test_the_served_model_answers_every_request_as_expected_under_load(tmp_path, tiny_params, capsys):
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.pt", tiny_params)
    out = tmp_path / "load.json"
    limits = ",".join(f"{name}={value}" for name, value in LIMITS.items())
    run_benchmark("serve_load", ["--checkpoint", str(checkpoint), "--clients", str(CLIENTS), "--seconds",
                                 str(MIXED_S), "--oversized-seconds", str(OVERSIZED_S), "--image-side", "32",
                                 "--mix", ",".join(f"{kind}=1" for kind in KINDS), "--limits", limits,
                                 "--server-threads", "1", "--log", str(tmp_path / "server.log"), "--out", str(out)])
    result = json.loads(out.read_text())
    printed = capsys.readouterr().out

    mixed, oversized = result["phases"]["mixed"], result["phases"]["oversized"]
    assert set(mixed["kinds"]) == set(KINDS)  # each client sends every kind once first
    assert {KINDS[kind].group for kind in oversized["kinds"]} == {OVERSIZED}
    assert all(tally["sent"] >= CLIENTS for phase in (mixed, oversized) for tally in phase["kinds"].values())
    for name, phase, seconds in (("mixed", mixed, MIXED_S), ("oversized", oversized, OVERSIZED_S)):
        assert phase["seconds"] >= seconds
        for kind, tally in phase["kinds"].items():
            expected = "200" if KINDS[kind].group == VALID else "400"
            # every request answered, with the expected status (no connection error, no 5xx) and content
            assert tally["sent"] > 0 and tally["status"] == {expected: tally["sent"]}, (name, kind, tally)
            assert tally["unexpected"] == 0 and tally["problems"] == [], (name, kind, tally)
            if expected == "400":
                assert KINDS[kind].reason in tally["reason"], (name, kind, tally["reason"])
            latency = tally["latency_ms"]
            assert 0 < latency["p50"] <= latency["p99"] <= latency["max"] <= phase["seconds"] * 1e3
            assert f"| {name} | {kind}" in printed
    assert "the image has 400,000,000 pixels" in oversized["kinds"]["png_bomb"]["reason"]

    memory = result["memory_mib"]
    assert 0 < memory["before"] <= memory["peak"]
    assert memory["oversized_before"] <= memory["oversized_peak"] <= memory["peak"]
    assert memory["oversized_growth"] < GROWTH_BOUND_MIB < BOMB_SIDE**2 / MIB, memory
    assert memory["peak"] - memory["before"] < GROWTH_BOUND_MIB, memory  # bombs are sent in the mixed phase too
    assert result["settings"]["bomb_side"] == BOMB_SIDE
    assert result["settings"]["limits"]["DDIM_DENOISE_MAX_BASE64_CHARS"] == LIMITS["max_base64_chars"]


def test_the_answer_check_flags_a_wrong_status_reason_or_image():
    image = json.dumps({"predictions": [{"image": base64.b64encode(noisy_png(16, 0.1)).decode(), "sigma": 0.1}]})
    assert answer_problem("valid", 200, image.encode(), 16) is None
    assert answer_problem("valid", 200, image.encode(), 32) == "an image of shape (16, 16, 3)"
    assert answer_problem("valid", 500, b"oops", 16) == "HTTP 500 instead of 200: oops"
    assert answer_problem("valid", 200, b"{}", 16).startswith("unreadable answer (KeyError")
    assert answer_problem("png_bomb", 200, image.encode(), 16).startswith("HTTP 200 instead of 400")
    assert "lacks 'DDIM_DENOISE_MAX_IMAGE_PIXELS'" in answer_problem("png_bomb", 400, b'{"message": "no"}', 16)


def test_the_memory_sampler_sees_a_grandchild_take_memory():
    """The bound above means something only if the sampler would see a worker process allocate a bomb's pixels."""
    allocate = "import time; pixels = b'x' * (200 * 2**20); time.sleep(1.5)"
    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys; "
                               f"subprocess.run([sys.executable, '-c', {allocate!r}])"])
    try:
        with TreeMemory(parent.pid) as memory:
            start = time.monotonic()
            parent.wait(timeout=60)
        first = memory.samples[0][1]
        assert memory.peak(start) - first > 150 * MIB
    finally:
        parent.kill()
        parent.wait()


@contextlib.contextmanager
def answering(raw: bytes):
    """A loopback server that reads each request whole, sends ``raw`` and closes the connection: its URL."""

    class Handler(socketserver.StreamRequestHandler):
        def handle(self):
            length = 0
            while (line := self.rfile.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            self.rfile.read(length)
            self.wfile.write(raw)

    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler) as server:
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()


CUT_ANSWERS = {  # what a worker killed mid-answer can leave (http.client.HTTPExceptions, not OSErrors), and its name
    "body cut": (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"predictions\": ", "IncompleteRead"),
    "error body cut": (b"HTTP/1.1 400 Bad Request\r\nContent-Length: 100\r\n\r\n{\"message\": ", "IncompleteRead"),
    "garbled status": (b"garbage\r\n\r\n", "BadStatusLine"),
    "no answer": (b"", "RemoteDisconnected"),
}


@pytest.mark.parametrize("cut", CUT_ANSWERS)
def test_a_cut_answer_is_status_0_saying_what_happened(cut):
    raw, problem = CUT_ANSWERS[cut]
    with answering(raw) as url:
        status, body = post(url, b"{}", timeout_s=10)
    assert status == 0 and body.decode().startswith(f"{problem}: "), body


def test_cut_answers_are_counted_as_unexpected_and_a_client_error_stops_the_phase(monkeypatch):
    settings = LoadSettings(clients=2, seconds=0.3)
    with answering(CUT_ANSWERS["body cut"][0]) as url:
        tally = run_phase(url, {"valid": b"{}"}, {"valid": 1}, settings, settings.seconds, seed=0)["kinds"]["valid"]
        assert tally["sent"] >= 2 and tally["status"] == {"0": tally["sent"]} == {"0": tally["unexpected"]}
        assert tally["problems"][0].startswith("HTTP 0 instead of 200: IncompleteRead")

        def fail(kind, status, body, image_side):
            raise MemoryError("no room")

        monkeypatch.setattr(load_test, "answer_problem", fail)
        with pytest.raises(LoadTestError, match="2 of 2 load clients ended early.*MemoryError: no room"):
            run_phase(url, {"valid": b"{}"}, {"valid": 1}, settings, settings.seconds, seed=0)


def test_the_benchmark_says_in_one_line_why_it_cannot_run(capsys):
    with pytest.raises(SystemExit) as stopped:
        run_benchmark("serve_load", ["--mix", "nope=1"])
    assert stopped.value.code == 2 and "unknown request kind or limit: nope" in capsys.readouterr().err
    with answering(CUT_ANSWERS["no answer"][0]) as url, pytest.raises(SystemExit) as stopped:
        run_benchmark("serve_load", ["--url", url, "--mix", "valid=1"])
    error = capsys.readouterr().err
    assert stopped.value.code == 2 and error.startswith("serve_load.py: the served model does not denoise a small PNG")
    assert error.count("\n") == 1, error


def test_the_benchmark_fails_after_writing_its_figures_when_an_answer_is_wrong(tmp_path, monkeypatch, capsys):
    result = made_up_load_result()
    result["phases"]["oversized"]["kinds"]["png_bomb"]["unexpected"] = 2
    monkeypatch.setattr(load_test, "run_load_test", lambda url, settings, server_pid: result)
    with pytest.raises(SystemExit, match=r"2 answer\(s\) not as expected"):
        run_benchmark("serve_load", ["--url", "http://127.0.0.1:9", "--out", str(tmp_path / "load.json")])
    assert json.loads((tmp_path / "load.json").read_text()) == result
    assert "| oversized | png_bomb (oversized) | 300 | 0 | 300 | 0 | 2 |" in capsys.readouterr().out


def test_a_server_whose_port_another_process_answers_on_is_refused(tmp_path, monkeypatch):
    """Between free_port and the server's bind another listener may take the port and answer /ping."""
    with answering(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n") as url:
        monkeypatch.setattr(model_server, "free_port", lambda: int(url.rsplit(":", 1)[1]))
        monkeypatch.setattr(model_server, "serve_command",
                            lambda model_uri, port, workers: [sys.executable, "-c", "import time; time.sleep(60)"])
        with pytest.raises(model_server.ServerError, match=f"{url}/ping answers, but mlflow models serve does not "
                                                           f"listen on it: another process holds port"):
            with model_server.served_model("unused", log=tmp_path / "server.log"):
                pass
