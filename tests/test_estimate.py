"""A run that would take over two hours says so inside its first epoch and names the faster profile."""

from __future__ import annotations

from ddim_denoise.pipeline.params import CONF_DIR
from ddim_denoise.training.estimate import QUICK_PROFILE, FirstEpochEstimate, long_run_warning


def test_the_quick_profile_named_in_the_warning_exists():
    assert (CONF_DIR / "profile" / f"{QUICK_PROFILE}.yaml").is_file()


def test_a_run_of_days_on_a_cpu_is_told_its_length_and_the_faster_profile():
    # the full experiment on a CPU: 60 epochs x 45,000 images at 15 img/s
    warning = long_run_warning(60 * 45_000, 15.0, "cpu", "gpu")
    assert "50 h 00 min" in warning and "profile=quick" in warning and "cpu" in warning


def test_a_run_under_two_hours_says_nothing():
    assert long_run_warning(30_000, 80.0, "cpu", "quick") is None  # the quick profile: about 6 minutes of steps
    assert long_run_warning(7200 * 100, 100.0, "cpu", "gpu") is None  # exactly two hours


def test_the_quick_profile_itself_is_told_to_train_less():
    assert "train.epochs" in long_run_warning(10**7, 10.0, "cpu", "quick")


def test_the_estimate_leaves_out_the_first_interval_and_speaks_once(caplog):
    estimate = FirstEpochEstimate(images_to_train=1_000_000, device="cuda:0", profile="gpu")
    # the first interval compiles for a minute; after it, 10,000 img/s: 100 s left, no warning
    assert estimate.log_point(images_seen=1_000, seconds=60.0) is None
    assert estimate.log_point(images_seen=101_000, seconds=70.0) is None
    slow = FirstEpochEstimate(images_to_train=1_000_000, device="cpu", profile="gpu")
    slow.log_point(images_seen=100, seconds=5.0)
    assert "about 5 h 33 min" in slow.log_point(images_seen=200, seconds=7.0)  # 50 img/s for 999,800 images
    assert slow.log_point(images_seen=300, seconds=9.0) is None
    assert sum("5 h 33 min" in r.getMessage() for r in caplog.records) == 1
