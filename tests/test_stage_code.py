"""Each DVC stage depends on exactly the package folders it runs, and a run's identity follows that code."""

from __future__ import annotations

from pathlib import Path

import yaml

from ddim_denoise.pipeline import stage_code
from ddim_denoise.pipeline.stage_code import (
    STAGE_ENTRIES,
    code_digest,
    package_imports,
    script_folders,
    stage_folders,
    stage_modules,
)

REPO = Path(__file__).resolve().parents[1]
PIPELINES = {"prepare": "dvc.yaml", "train": "dvc.yaml", "evaluate": "dvc.yaml", "report": "dvc.yaml",
             "sweep": "pipelines/sweep/dvc.yaml", "serve-load": "pipelines/results/serving/dvc.yaml"}


def code_deps(pipeline: str, stage: str) -> list[str]:
    stage_def = yaml.safe_load((REPO / pipeline).read_text())["stages"][stage]
    deps = stage_def.get("do", stage_def)["deps"]  # a foreach stage keeps its deps under `do`
    prefix = "src/ddim_denoise/"
    return sorted(d.split(prefix, 1)[1] for d in deps if prefix in d)


def test_every_stage_depends_on_the_folders_it_runs():
    """A folder missing from a stage's deps lets `dvc repro` skip a stage whose result its change would alter."""
    assert set(PIPELINES) == set(STAGE_ENTRIES)
    for stage, pipeline in PIPELINES.items():
        assert code_deps(pipeline, stage) == stage_folders(stage), stage
    # the results studies run the same entry points as the main chain
    assert code_deps("pipelines/results/headline/dvc.yaml", "evaluate") == stage_folders("evaluate")
    assert code_deps("pipelines/results/levers/dvc.yaml", "levers") == stage_folders("sweep")
    assert code_deps("pipelines/results/transfer/dvc.yaml", "long") == stage_folders("sweep")
    assert code_deps("pipelines/sweep/gpu/dvc.yaml", "sweep") == stage_folders("sweep")
    assert code_deps(PIPELINES["sweep"], "verify") == stage_folders("sweep")
    for entry in ("train", "evaluate"):
        assert code_deps("pipelines/results/recipes/dvc.yaml", entry) == stage_folders(entry), entry
    photos = "pipelines/results/photos/dvc.yaml"
    photos_entries = {"prepare": "prepare", "train": "train", "evaluate": "evaluate", "cifar-model": "evaluate"}
    for stage, entry in photos_entries.items():
        assert code_deps(photos, stage) == stage_folders(entry), stage
    # the speed study's stages run benchmark scripts
    for stage, script in {"training": "train_speed.py", "denoising": "denoise_speed.py"}.items():
        assert code_deps("pipelines/results/speed/dvc.yaml", stage) == script_folders(REPO / "benchmarks" / script)
    assert code_deps(PIPELINES["serve-load"], "serve-load") == script_folders(REPO / "benchmarks" / "serve_load.py")


def fake_package(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_imports_are_found_at_any_depth_and_in_every_form(tmp_path, monkeypatch):
    fake_package(tmp_path, {
        "a/one.py": "from ddim_denoise.b.two import x\nfrom ddim_denoise.c import three\n\ndef f():\n"
                    "    import ddim_denoise.d.four\n    from torch import nn\n",
        "b/two.py": "", "c/three.py": "", "d/four.py": "from ddim_denoise.e.five import z\n", "e/five.py": ""})
    for folder in "abcde":
        (tmp_path / folder / "__init__.py").write_text("")
    monkeypatch.setattr(stage_code, "PACKAGE_DIR", tmp_path)
    assert package_imports("a.one") >= {"b.two", "c.three", "d.four"}
    assert "e.five" in stage_modules("a.one")
    monkeypatch.setitem(STAGE_ENTRIES, "train", "a.one")
    assert stage_folders("train") == list("abcde")


def test_the_training_code_is_part_of_a_runs_identity(tmp_path, monkeypatch):
    fake_package(tmp_path, {"training/__init__.py": "",
                            "training/distributed.py": "from ddim_denoise.core.x import y\n",
                            "core/__init__.py": "", "core/x.py": "STEP = 1\n"})
    monkeypatch.setattr(stage_code, "PACKAGE_DIR", tmp_path)
    before = code_digest("train")
    (tmp_path / "core/x.py").write_text("STEP = 2\n")
    assert code_digest("train") != before


def test_dvc_yaml_names_the_files_the_code_writes():
    """The stages' file names live in pipeline/files.py; dvc.yaml must track those very files."""
    from ddim_denoise.pipeline import files

    text = (REPO / "dvc.yaml").read_text()
    for path in (files.TRAINING_DIR / files.SUMMARY_FILE, files.TRAINING_DIR / files.STEPS_FILE,
                 files.TRAINING_DIR / files.VAL_FILE, f"${{eval.out_dir}}/{files.METRICS_FILE}",
                 f"${{eval.out_dir}}/{files.TABLE_FILE}", f"${{eval.out_dir}}/{files.GRID_FILE}",
                 f"${{train.out_dir}}/{files.BEST_CHECKPOINT}"):
        assert str(path) in text, path
