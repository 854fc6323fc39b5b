"""A load test's result (``serving/load_test.py``) as Markdown: what benchmarks/serve_load.py prints and the docs'
serving-load block shows."""

from __future__ import annotations

from ddim_denoise.serving.load_test import KINDS, MIB


def markdown_report(result: dict) -> str:
    """A load test's result (``serving/load_test.py``) as a Markdown table (phase x kind) under a line of settings,
    with the memory figures after."""
    settings = result["settings"]
    limits = ", ".join(f"{name.removeprefix('DDIM_DENOISE_')}={value:,}" for name, value in settings["limits"].items())
    mix = ", ".join(f"{kind} {weight}" for kind, weight in settings["mix"].items() if weight)
    lead = (f"{settings['clients']} clients, {settings['seconds']:g} s mixed (weights: {mix}) then "
            f"{settings['oversized_seconds']:g} s oversized only; {settings['image_side']}x{settings['image_side']} "
            f"PNG at sigma {settings['sigma']:g}, "
            f"a {settings['bomb_side']:,}-pixel-square PNG bomb; {settings['workers']} uvicorn worker(s); "
            f"limits {limits}.")
    lines = ["| phase | request | sent | 200 | 400 | other | not as expected | p50 ms | p99 ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for phase, measured in result["phases"].items():
        for kind, tally in measured["kinds"].items():
            status = tally["status"]
            other = tally["sent"] - status.get("200", 0) - status.get("400", 0)
            latency = tally["latency_ms"] or {"p50": float("nan"), "p99": float("nan")}
            named = kind if kind == KINDS[kind].group else f"{kind} ({KINDS[kind].group})"
            lines.append(f"| {phase} | {named} | {tally['sent']} | {status.get('200', 0)} | "
                         f"{status.get('400', 0)} | {other} | {tally['unexpected']} | {latency['p50']:.0f} | "
                         f"{latency['p99']:.0f} |")
    notes = []
    memory = result["memory_mib"]
    if memory:
        notes.append(f"- Server RSS (all its processes): {memory['before']:.0f} MiB after the first request, peak "
                     f"{memory['peak']:.0f} MiB.")
        notes.append(f"- Oversized phase: {memory['oversized_before']:.0f} MiB before, peak "
                     f"{memory['oversized_peak']:.0f} MiB, {memory['oversized_after']:.0f} MiB after: growth "
                     f"{memory['oversized_growth']:+.1f} MiB, where one decoded bomb would take "
                     f"{settings['bomb_side'] ** 2 / MIB:,.0f} MiB as 8-bit gray and "
                     f"{12 * settings['bomb_side'] ** 2 / MIB:,.0f} MiB as float32 RGB.")
    return "\n".join([lead, "", *lines, "", *notes]).strip()
