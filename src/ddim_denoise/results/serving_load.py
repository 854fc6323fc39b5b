"""The serving load study's table (pipelines/results/serving): the main chain's model under `mlflow models serve`,
concurrent clients sending valid, invalid and oversized requests (``ddim_denoise.serving.load_test``), as
``serving.load_report`` renders it for benchmarks/serve_load.py too."""

from __future__ import annotations

from pathlib import Path

from ddim_denoise.results.sources import read_json
from ddim_denoise.serving.load_report import markdown_report

STUDY = "pipelines/results/serving"
LOAD = f"{STUDY}/load.json"
SOURCES = (LOAD,)


def render(root: Path) -> str:
    return (f"The main chain's model served on loopback (`dvc repro {STUDY}/dvc.yaml`): "
            + markdown_report(read_json(root, LOAD)))
