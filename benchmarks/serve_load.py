"""Load test of the served model: concurrent clients against `mlflow models serve` on loopback.

Valid, invalid and oversized requests (``ddim_denoise.serving.load_test``), then oversized ones alone while the
server's memory is watched. Prints requests sent, HTTP statuses and p50 / p99 latency per kind, and the server's
peak memory; ``--out`` also writes the figures as JSON. With ``--url`` it tests a server already running (its
limits must be given as ``--limits``; its memory is read only with ``--server-pid``). Exits 1 (after printing and
writing the figures) when any answer was not the one expected, 2 when the test could not run.

    python benchmarks/serve_load.py --checkpoint models/best.pt --clients 8 --seconds 60 --out load.json
"""

from __future__ import annotations

import argparse
import sys

from ddim_denoise.serving.load_report import markdown_report
from ddim_denoise.serving.load_test import (
    DEFAULT_MIX,
    LoadSettings,
    LoadTestError,
    load_test_checkpoint,
    run_load_test,
    write_result,
)
from ddim_denoise.serving.model_server import ServerError


def whole_numbers(text: str) -> dict[str, int]:
    """'a=1,b=2' -> {'a': 1, 'b': 2}"""
    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    try:
        return {key.strip(): int(value) for key, value in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=NUMBER,...; got {text!r}") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="models/best.pt", help="saved as the pyfunc model and served here")
    parser.add_argument("--url", help="test this running server instead (e.g. http://127.0.0.1:5001)")
    parser.add_argument("--server-pid", type=int, help="with --url: the server's process, to read its memory")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60, help="length of the mixed phase")
    parser.add_argument("--oversized-seconds", type=float, default=15, help="length of the oversized-only phase")
    parser.add_argument("--mix", type=whole_numbers, default=DEFAULT_MIX,
                        help="request kind weights, e.g. valid=6,bad_base64=1,png_bomb=1")
    parser.add_argument("--limits", type=whole_numbers, default={},
                        help="the server's request limits, e.g. max_base64_chars=1048576,max_image_pixels=4000000")
    parser.add_argument("--image-side", type=int, default=64, help="side of the valid requests' PNG")
    parser.add_argument("--sigma", type=float, default=0.1)
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers of the server started here")
    parser.add_argument("--server-threads", type=int, help="OMP threads of the server started here")
    parser.add_argument("--log", help="keep the server's output in this file")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args(argv)

    try:
        settings = LoadSettings(clients=args.clients, seconds=args.seconds, oversized_seconds=args.oversized_seconds,
                                mix=args.mix, limits=args.limits, image_side=args.image_side, sigma=args.sigma,
                                workers=args.workers, server_threads=args.server_threads)
    except ValueError as e:
        parser.error(str(e))
    try:
        if args.url:
            result = run_load_test(args.url.rstrip("/"), settings, args.server_pid)
        else:
            result = load_test_checkpoint(args.checkpoint, settings, args.log)
    except (ServerError, LoadTestError) as e:
        print(f"serve_load.py: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(markdown_report(result))
    if args.out:
        write_result(result, args.out)
    unexpected = sum(tally["unexpected"] for phase in result["phases"].values() for tally in phase["kinds"].values())
    if unexpected:  # after the figures are written, so that they show what went wrong; a failed stage all the same
        raise SystemExit(f"serve_load.py: {unexpected} answer(s) not as expected (the table's 'not as expected')")

if __name__ == "__main__":
    main()
