"""Each DVC stage depends on exactly the package modules it runs, and a run's identity follows that code."""

from __future__ import annotations

from pathlib import Path

import yaml

from ddim_denoise import stage_code
from ddim_denoise.stage_code import STAGE_ENTRIES, code_digest, package_imports, stage_modules

REPO = Path(__file__).resolve().parents[1]
PIPELINES = {"prepare": "dvc.yaml", "train": "dvc.yaml", "evaluate": "dvc.yaml", "report": "dvc.yaml",
             "sweep": "pipelines/sweep/dvc.yaml"}


def module_deps(pipeline: str, stage: str) -> list[str]:
    deps = yaml.safe_load((REPO / pipeline).read_text())["stages"][stage]["deps"]
    prefix = "src/ddim_denoise/"
    return sorted(d.removeprefix(prefix).removesuffix(".py") for d in deps if d.startswith(prefix))


def test_every_stage_depends_on_the_modules_it_runs():
    """A module missing from a stage's deps lets `dvc repro` skip a stage whose result its change would alter (the
    sweep stage lacked sweep_report.py, which writes all its outputs)."""
    assert set(PIPELINES) == set(STAGE_ENTRIES)
    for stage, pipeline in PIPELINES.items():
        assert module_deps(pipeline, stage) == stage_modules(STAGE_ENTRIES[stage]), stage


def test_imports_are_found_at_any_depth_and_in_every_form(tmp_path, monkeypatch):
    (tmp_path / "a.py").write_text("from .b import x\nfrom . import c\n\ndef f():\n    import ddim_denoise.d\n"
                                   "    from ddim_denoise.e import y\n    from torch import nn\n")
    for name in "bcde":
        (tmp_path / f"{name}.py").write_text("from .a import z\n" if name == "e" else "")
    monkeypatch.setattr(stage_code, "PACKAGE_DIR", tmp_path)
    assert package_imports("a") == set("bcde")
    assert stage_modules(("e",)) == list("abcde")


def test_the_training_code_is_part_of_a_runs_identity(tmp_path, monkeypatch):
    (tmp_path / "distributed.py").write_text("from .train import Trainer\n")
    (tmp_path / "train.py").write_text("STEP = 1\n")
    monkeypatch.setattr(stage_code, "PACKAGE_DIR", tmp_path)
    before = code_digest("train")
    (tmp_path / "train.py").write_text("STEP = 2\n")
    assert code_digest("train") != before
