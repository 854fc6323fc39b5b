"""The results studies' tables (ddim_denoise.results): what they say follows from their files."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from ddim_denoise.evaluation.evaluate import NOISY, ONE_STEP
from ddim_denoise.pipeline.errors import DataError
from ddim_denoise.results import headline, levers, photos, search, serving_load, transfer


def test_the_headline_says_where_the_model_stands_against_each_published_model():
    one = pd.DataFrame({"psnr_of_mean_mse": [29.4, 25.0]}, index=pd.Index([0.1, 0.2], name="sigma"))
    anchors = pd.DataFrame({"model": ["DDPM", "DDPM", "IDDPM", "IDDPM"], "sigma": [0.1, 0.2, 0.1, 0.2],
                            "psnr_of_mean_mse": [29.2, 25.5, 29.6, 25.6]})
    ddpm, iddpm = headline._standing(one, anchors)
    assert "minus DDPM: +0.20 / -0.50 dB at σ = 0.1 / 0.2; at or above it at σ = 0.1." in ddpm
    assert "minus IDDPM: -0.20 / -0.60 dB" in iddpm and iddpm.endswith("at or above it at no σ.")


def scored_files(root, scored, one_step_psnr: float, train_seconds: float):
    """A made-up evaluation table (noisy input and one step, sigma 0.1 and 0.2) and training summary for ``scored``."""
    rows = [{"sigma": s, "method": m, "n_images": 1000, "psnr": p, "psnr_ci95": 0.1, "ssim": 0.9, "ssim_ci95": 0.01,
             "images_per_s": 1.0, "psnr_1step_same_images": float("nan"), "ssim_1step_same_images": float("nan"),
             "psnr_of_mean_mse": p - 0.2, "psnr_of_mean_mse_ci95": 0.1}
            for s in (0.1, 0.2) for m, p in ((NOISY, 20.0), (ONE_STEP, one_step_psnr))]
    for relative in (scored.table, scored.summary, headline.ANCHORS):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(root / scored.table, index=False)
    (root / scored.summary).write_text(json.dumps({"parameters": 1_540_483, "train_images_seen": 490_000,
                                                   "train_seconds": train_seconds, "device_name": "a CPU"}))
    pd.DataFrame({"model": ["DDPM", "DDPM"], "parameters": ["35.7M"] * 2, "sigma": [0.1, 0.2],
                  "psnr_of_mean_mse": [29.2, 25.5], "source": ["a paper"] * 2}).to_csv(root / headline.ANCHORS,
                                                                                     index=False)


def test_a_recipe_is_shown_from_its_own_files_beside_the_same_anchors(tmp_path):
    """The cpu recipe's block reads the recipe's table and summary, never the main chain's."""
    scored_files(tmp_path, headline.CPU_RECIPE, one_step_psnr=29.5, train_seconds=7000.0)
    text = headline.render(tmp_path, headline.CPU_RECIPE)
    assert text.startswith("The `cpu` recipe's model (1.54M parameters, 490,000 training images in 7000 s on a CPU)")
    assert "`dvc repro pipelines/results/recipes/dvc.yaml:evaluate@cpu`" in text
    assert "| 0.1 | 20.00 | 29.50 ± 0.10 | 29.30 ± 0.10 | 0.9000 ± 0.0100 | 29.2 | – | – |" in text
    assert "minus DDPM: +0.10 / +3.80 dB at σ = 0.1 / 0.2; at or above it at σ = 0.1, 0.2." in text
    with pytest.raises(DataError, match="results/headline/psnr_vs_sigma.csv not found"):
        headline.render(tmp_path)  # the main chain's files are not there


def test_the_readme_sets_each_model_beside_the_published_ones(tmp_path):
    scored_files(tmp_path, headline.MAIN_CHAIN, one_step_psnr=28.5, train_seconds=354.0)
    scored_files(tmp_path, headline.CPU_RECIPE, one_step_psnr=29.5, train_seconds=7000.0)
    text = headline.render_short(tmp_path)
    assert ("| σ | quick profile (1.54M, 6 min of training) | cpu recipe (1.54M, 1.9 h of training) | DDPM (35.7M) |"
            in text)
    assert "| 0.2 | 28.30 ± 0.10 | 29.30 ± 0.10 | 25.5 |" in text
    assert "- quick profile minus DDPM: -0.90 / +2.80 dB at σ = 0.1 / 0.2; at or above it at σ = 0.2." in text
    assert "- cpu recipe minus DDPM: +0.10 / +3.80 dB" in text


def test_the_lever_table_measures_each_change_against_the_defaults(tmp_path):
    study = tmp_path / levers.STUDY
    (study / "results").mkdir(parents=True)
    budget = {"train.epochs": 2, "train.max_train_images": 3000, "train.val_images": 1000}
    (study / "space.yaml").write_text(yaml.safe_dump({"budget": budget}))
    pd.DataFrame({"number": [0, 1, 2, 3], "state": ["COMPLETE", "COMPLETE", "COMPLETE", "FAIL"],
                  "value": [24.0, 24.5, 23.0, None], "user_attrs_baseline_params_yaml": [True, None, None, None],
                  "user_attrs_enqueued": [None, "train.lr=0.004", "diffusion.prediction=edm", "train.batch_size=64"],
                  "user_attrs_val_ssim_mean": [0.8, 0.81, 0.7, None]}).to_csv(study / "results/trials.csv",
                                                                          index=False)
    text = levers.render(tmp_path)
    assert "| 0 | none: params.yaml's defaults | 24.000 | +0.000 |" in text
    assert "| 1 | train.lr=0.004 | 24.500 | +0.500 |" in text and "| 3 | train.batch_size=64 | – | – |" in text
    assert text.endswith("Above the defaults at this budget: train.lr=0.004 (+0.500 dB).")
    assert "2 epochs x 3,000 images" in text and "1,000 lossless validation images" in text


def made_up_load_result() -> dict:
    """What serving/load_test.py writes, with round figures: two phases, three kinds, the memory read."""
    limits = {"DDIM_DENOISE_MAX_ROWS": 64, "DDIM_DENOISE_MAX_BASE64_CHARS": 1048576,
              "DDIM_DENOISE_MAX_IMAGE_PIXELS": 4000000, "DDIM_DENOISE_MAX_REQUEST_PIXELS": 32000000,
              "DDIM_DENOISE_MAX_STEPS": 50}

    def tally(sent, status, p50, p99):
        return {"sent": sent, "status": {status: sent}, "unexpected": 0, "problems": [], "reason": "",
                "latency_ms": {"p50": p50, "p99": p99, "max": p99 + 1}}

    return {"settings": {"clients": 8, "seconds": 60.0, "oversized_seconds": 15.0, "image_side": 64, "sigma": 0.1,
                         "bomb_side": 20000, "workers": 1, "limits": limits,
                         "mix": {"valid": 6, "bad_base64": 1, "png_bomb": 1, "negative_sigma": 0}},
            "phases": {"mixed": {"seconds": 60.2, "kinds": {"valid": tally(600, "200", 95.4, 310.0),
                                                            "bad_base64": tally(100, "400", 12.0, 40.0)}},
                       "oversized": {"seconds": 15.1, "kinds": {"png_bomb": tally(300, "400", 30.0, 90.0)}}},
            "memory_mib": {"before": 900.0, "peak": 960.0, "oversized_before": 950.0, "oversized_peak": 955.5,
                           "oversized_after": 951.0, "oversized_growth": 5.5}}


def test_the_serving_load_table_gives_each_kinds_answers_latency_and_the_memory(tmp_path):
    with pytest.raises(DataError, match="load.json not found: `dvc pull` or `dvc repro`"):
        serving_load.render(tmp_path)  # before the study has run: one line, no traceback
    (tmp_path / serving_load.STUDY).mkdir(parents=True)
    (tmp_path / serving_load.LOAD).write_text(json.dumps(made_up_load_result()))
    text = serving_load.render(tmp_path)
    assert "`dvc repro pipelines/results/serving/dvc.yaml`" in text
    assert "8 clients, 60 s mixed (weights: valid 6, bad_base64 1, png_bomb 1) then 15 s oversized only" in text
    assert "MAX_BASE64_CHARS=1,048,576" in text and "20,000-pixel-square PNG bomb" in text
    assert "| mixed | valid | 600 | 600 | 0 | 0 | 0 | 95 | 310 |" in text
    assert "| mixed | bad_base64 (invalid) | 100 | 0 | 100 | 0 | 0 | 12 | 40 |" in text
    assert "| oversized | png_bomb (oversized) | 300 | 0 | 300 | 0 | 0 | 30 | 90 |" in text
    assert "900 MiB after the first request, peak 960 MiB" in text
    assert "950 MiB before, peak 956 MiB, 951 MiB after: growth +5.5 MiB" in text
    assert "381 MiB as 8-bit gray and 4,578 MiB as float32 RGB" in text


def test_the_transfer_table_ranks_the_same_configurations_at_both_budgets(tmp_path):
    def trials(folder: str, values: list, lrs: list) -> None:
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"number": [0, 1, 2, 3], "state": ["COMPLETE"] * 3 + ["FAIL"], "value": values,
                      "params_train.lr": lrs, "user_attrs_baseline_params_yaml": [True, None, None, None],
                      "user_attrs_enqueued": [None, "train.lr=0.001", "train.lr=0.004", "train.lr=0.008"]}).to_csv(
            tmp_path / folder / "trials.csv", index=False)

    trials(f"{levers.STUDY}/results", [24.0, 23.0, 24.5, None], [0.002, 0.001, 0.004, 0.008])
    trials(f"{transfer.STUDY}/results", [26.0, 26.5, 25.0, 25.5], [0.002, 0.001, 0.004, 0.008])
    table = transfer.paired_trials(tmp_path)
    assert list(table.number) == [0, 1, 2]  # trial 3 failed at the short budget
    assert list(table.short_rank) == [2, 3, 1] and list(table.long_rank) == [2, 1, 3]
    assert transfer.rank_correlation(table) == pytest.approx(-1.0)  # the ranking turned over
    text = transfer.render(tmp_path)
    assert "| 2 | train.lr=0.004 | 24.500 | 1 | 25.000 | 3 |" in text
    assert text.endswith("Spearman's rank correlation over 3 configurations: -1.00.")

    trials(f"{transfer.STUDY}/results", [26.0, 26.5, 25.0, 25.5], [0.002, 0.001, 0.003, 0.008])
    with pytest.raises(DataError, match="trial 2 ran other parameters than the lever study's"):
        transfer.paired_trials(tmp_path)


def test_the_search_table_gives_each_trials_changes_and_the_verdict_on_the_best(tmp_path):
    results = tmp_path / search.STUDY / "results"
    results.mkdir(parents=True)
    (tmp_path / search.SPACE).write_text(yaml.safe_dump({
        "budget": {"train.epochs": 2, "train.max_train_images": 3000, "train.val_images": 1000},
        "pruner": {"default": "hyperband"}}))
    pd.DataFrame({"number": [0, 1, 2, 3], "state": ["COMPLETE", "PRUNED", "COMPLETE", "FAIL"],
                  "value": [24.0, 22.5, 24.25, None], "params_diffusion.T": [1000, 1000, 500, 1000],
                  "params_train.lr": [0.002, 0.0051234567, 0.004, 0.001],
                  "user_attrs_baseline_params_yaml": [True, None, None, None]}).to_csv(results / "trials.csv",
                                                                                     index=False)
    verdict = {"trial": 2, "params_fingerprint": "f", "n_images": 1000, "defaults_psnr": 24.6, "defaults_ci95": 0.3,
               "winner_psnr": 24.7, "winner_ci95": 0.3, "difference": 0.1, "difference_ci95": 0.05,
               "verified": True}
    (results / "verification.json").write_text(json.dumps(verdict))
    text = search.render(tmp_path)
    assert "4 trials of 2 epochs x 3,000 images" in text
    assert "2 complete, 1 pruned, 1 failed" in text
    assert "| 0 | COMPLETE | 24.000 | +0.000 | none |" in text
    assert "| 1 | PRUNED | 22.500 | -1.500 | train.lr=0.00512 |" in text  # sampled floats to 3 digits
    assert "| 2 | COMPLETE | 24.250 | +0.250 | diffusion.T=500, train.lr=0.004 |" in text
    assert "| 3 | FAIL | – | – | train.lr=0.001 |" in text
    assert "- Best: trial 2, 24.250 dB (+0.250 dB over the defaults at this budget)." in text
    assert "+0.100 ± 0.050 dB; verified: it wins. params.yaml takes it" in text
    (results / "verification.json").write_text(json.dumps({**verdict, "difference_ci95": 0.2, "verified": False}))
    assert search.render(tmp_path).endswith("not verified: no win beyond the 95% CI. params.yaml keeps its values: "
                                            "`sweep best --apply` refuses.")
    (results / "verification.json").write_text(json.dumps({**verdict, "winner_diverged": True, "verified": False}))
    assert "+0.100 ± 0.050 dB; not verified: its training diverged at this budget" in search.render(tmp_path)


def test_the_photos_table_pairs_the_folder_model_with_bm3d_and_the_cifar_model(tmp_path):
    study = tmp_path / photos.STUDY
    for folder in ("evaluation", "cifar_model", "training"):
        (study / folder).mkdir(parents=True)
    (study / "params.yaml").write_text(yaml.safe_dump({"data": {"test_files": ["astronaut.png", "coffee.png"]},
                                                       "eval": {"ddim_steps": 10}}))

    def rows(method_psnr: dict[str, float]) -> pd.DataFrame:
        return pd.DataFrame([{"sigma": 0.1, "method": m, "n_images": 2, "psnr": p, "psnr_ci95": 0.5, "ssim": 0.9,
                              "ssim_ci95": 0.01, "images_per_s": 1.0, "psnr_of_mean_mse": p,
                              "psnr_of_mean_mse_ci95": 0.5, "psnr_1step_same_images": 0.0,
                              "ssim_1step_same_images": 0.0} for m, p in method_psnr.items()])

    rows({"noisy": 20.0, "bm3d": 30.0, "nlm": 28.0, "model_1step": 31.25, "model_ddim10": 31.0}).to_csv(
        study / "evaluation/psnr_vs_sigma.csv", index=False)
    rows({"noisy": 20.0, "model_1step": 29.5}).to_csv(study / "cifar_model/psnr_vs_sigma.csv", index=False)
    (study / "training/summary.json").write_text(json.dumps(
        {"parameters": 1_540_000, "train_seconds": 600.4, "precision": "bf16", "device_name": "a CPU",
         "best_val_psnr": 27.5}))
    text = photos.render(tmp_path)
    assert "| 0.1 | 20.00 ± 0.50 / 0.900 | 30.00 ± 0.50 / 0.900 | 28.00 ± 0.50 / 0.900 | 29.50 ± 0.50 / 0.900 | " \
           "31.25 ± 0.50 / 0.900 | 31.00 ± 0.50 / 0.900 | +1.25 | +1.75 |" in text
    assert "(astronaut.png, coffee.png; n = 2)" in text and "1.54M parameters, 600 s of training" in text
