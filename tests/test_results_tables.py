"""The results studies' tables (ddim_denoise.results): what they say follows from their files."""

from __future__ import annotations

import pandas as pd
import yaml

from ddim_denoise.results import headline, levers


def test_the_headline_says_where_the_model_stands_against_each_published_model():
    one = pd.DataFrame({"psnr_of_mean_mse": [29.4, 25.0]}, index=pd.Index([0.1, 0.2], name="sigma"))
    anchors = pd.DataFrame({"model": ["DDPM", "DDPM", "IDDPM", "IDDPM"], "sigma": [0.1, 0.2, 0.1, 0.2],
                            "psnr_of_mean_mse": [29.2, 25.5, 29.6, 25.6]})
    ddpm, iddpm = headline._standing(one, anchors)
    assert "minus DDPM: +0.20 / -0.50 dB at σ = 0.1 / 0.2; at or above it at σ = 0.1." in ddpm
    assert "minus IDDPM: -0.20 / -0.60 dB" in iddpm and iddpm.endswith("at or above it at no σ.")


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
