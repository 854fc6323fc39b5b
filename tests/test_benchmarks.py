"""The speed benchmarks run end to end on a tiny model and print what their docstrings promise (so they do not rot
between the rare runs on real data). Timings themselves are not asserted: speed targets live in the benchmarks."""

import importlib
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from denoise_fixtures import write_tiny_checkpoint

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(autouse=True)
def benchmarks_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setattr("throughput.PEAK_SIZE", {"cpu": (128, 2)}, raising=False)
    yield
    for name in ("throughput", "train_speed", "denoise_speed", "eval_lossless", "gray_noise", "mono_noise"):
        sys.modules.pop(name, None)


def tiny_checkpoint_and_images(tmp_path, tiny_params, n: int, size: int) -> tuple[str, str]:
    """A tiny model's checkpoint and an .npz of n random (size x size) test images, as the scripts' paths."""
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.pt", tiny_params)
    images = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    np.savez(tmp_path / "test.npz", x_test=images)
    return str(checkpoint), str(tmp_path / "test.npz")


def test_count_flops_counts_a_matrix_product():
    from throughput import count_flops

    a, b = torch.ones(4, 5), torch.ones(5, 6)
    assert count_flops(lambda: a @ b) == 2 * 4 * 5 * 6


def test_peak_table_measures_each_precision_once(monkeypatch):
    import throughput

    monkeypatch.setattr(throughput, "PEAK_SIZE", {"cpu": (64, 1)})
    calls = []
    real = throughput.matmul_peak_tflops
    monkeypatch.setattr(throughput, "matmul_peak_tflops", lambda d, t: calls.append(t) or real(d, t))
    peaks = throughput.PeakTable(torch.device("cpu"))
    share = peaks.share(peaks.peak(None) / 2, None)
    peaks.share(1.0, torch.float32)
    peaks.share(1.0, torch.bfloat16)
    assert calls == [torch.float32, torch.bfloat16]
    assert share == pytest.approx(50)
    assert "float32" in peaks.describe() and "bfloat16" in peaks.describe()


def test_denoise_speed_prints_flops_and_the_share_of_peak(tmp_path, tiny_params, capsys):
    import denoise_speed

    checkpoint, data = tiny_checkpoint_and_images(tmp_path, tiny_params, 6, 8)
    denoise_speed.main(["--checkpoint", checkpoint, "--data", data, "--n-images", "6",
                        "--bm3d-images", "0", "--ddim-steps", "3", "--amp", "off", "--device", "cpu",
                        "--batch-size", "3"])
    out = capsys.readouterr().out
    one_step = next(line for line in out.splitlines() if line.startswith("| one-step"))
    ddim = next(line for line in out.splitlines() if line.startswith("| DDIM-3"))
    gflop_one, gflop_ddim = (float(row.split("|")[6]) for row in (one_step, ddim))
    assert gflop_one > 0 and gflop_ddim == pytest.approx(3 * gflop_one, rel=0.01)  # three model calls
    assert re.search(r"\| \d+% \|", one_step)
    assert "Measured matrix-product peaks on cpu: float32" in out


def test_train_speed_prints_each_mode_against_its_precision_peak(tmp_path, tiny_params, capsys):
    import train_speed

    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(tiny_params.model_dump()))
    train_speed.main(["--params", str(params_file), "--batch", "4", "--steps", "1", "--warmup", "1",
                      "--modes", "fp32,bf16", "--device", "cpu"])
    out = capsys.readouterr().out
    assert re.search(r"fp32: +[\d.]+ img/s .*% of the fp32 matmul peak", out)
    assert re.search(r"bf16: +[\d.]+ img/s .*% of the bfloat16 matmul peak", out)
    assert re.search(r"training FLOPs per image \(fwd\+bwd\): [\d.]+ GFLOP", out)


def test_train_speed_gives_one_row_per_batch_and_mode(tmp_path, tiny_params, capsys):
    import train_speed

    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(tiny_params.model_dump()))
    train_speed.main(["--params", str(params_file), "--batch", "2,4", "--steps", "1", "--warmup", "1",
                      "--modes", "fp32", "--device", "cpu"])
    rows = re.findall(r"fp32 @(\d+): +[\d.]+ img/s", capsys.readouterr().out)
    assert rows == ["2", "4"]


def test_train_speed_compares_cudnn_benchmark_settings_and_profiles_the_last_row(tmp_path, tiny_params, capsys):
    import train_speed

    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(tiny_params.model_dump()))
    train_speed.main(["--params", str(params_file), "--batch", "4", "--steps", "1", "--warmup", "1",
                      "--modes", "fp32", "--device", "cpu", "--cudnn-benchmark", "off,on", "--profile", "2"])
    out = capsys.readouterr().out
    assert re.findall(r"fp32 cudnn.benchmark=(\w+): +[\d.]+ img/s", out) == ["off", "on"]
    assert "profile of the last row (fp32 cudnn.benchmark=on)" in out and "aten::convolution" in out
    assert re.search(r"per step: [\d.]+ ms of CPU time in [\d.]+ ms wall", out)
    assert re.search(r"convolution / matmul +[\d.]+ ms +[\d.]+%", out)


def test_train_speed_applies_inductor_settings_and_times_the_warm_up(tmp_path, tiny_params, capsys, monkeypatch):
    import train_speed

    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(tiny_params.model_dump()))
    seen = []
    real_measure = train_speed.measure
    config = train_speed.inductor_config
    monkeypatch.setattr(train_speed, "measure", lambda *a: seen.append(
        (config.coordinate_descent_tuning, config.force_layout_optimization)) or real_measure(*a))
    args = ["--params", str(params_file), "--batch", "2", "--steps", "1", "--warmup", "1", "--modes", "fp32",
            "--device", "cpu"]
    train_speed.main(args + ["--inductor", "coordinate_descent_tuning=True"])  # on top of params' train.inductor
    train_speed.main(args + ["--inductor", "force_layout_optimization=False"])  # overriding it
    assert tiny_params.train.inductor == {"force_layout_optimization": True}
    assert seen == [(True, True), (False, False)]
    assert not config.coordinate_descent_tuning and not config.force_layout_optimization  # set for the row only
    assert re.search(r"fp32: +[\d.]+ img/s .* peak; warm-up [\d.]+ s", capsys.readouterr().out)
    with pytest.raises(SystemExit):
        train_speed.main(args + ["--inductor", "no_such_setting=1"])
    assert "torch._inductor.config has no no_such_setting" in capsys.readouterr().err


def test_count_flops_includes_attention_on_channels_last_inputs(tiny_params):
    """channels_last selects a fused CPU attention kernel that torch's flop counter has no formula for."""
    from throughput import count_flops

    from ddim_denoise.denoising.denoiser import build_model

    model, _ = build_model(tiny_params)
    model.eval()
    y, sigma = torch.randn(2, 3, 8, 8), torch.full((2,), 0.3)
    with torch.no_grad():
        contiguous = count_flops(lambda: model(y, sigma))
        model.to(memory_format=torch.channels_last)
        channels_last = count_flops(lambda: model(y.contiguous(memory_format=torch.channels_last), sigma))
    assert channels_last == contiguous


def test_eval_lossless_scores_the_training_images_with_split_train(tmp_path, tiny_params, capsys):
    """--split train reads x_train: the same table on images the model trained on shows over-fitting."""
    import eval_lossless

    checkpoint, data = tiny_checkpoint_and_images(tmp_path, tiny_params, 3, 8)
    with np.load(data) as archive:
        test = archive["x_test"]
    np.savez(data, x_test=test, x_train=np.full_like(test, 128))  # flat gray training images: unlike the test ones
    args = ["--checkpoint", checkpoint, "--data", data, "--n-images", "3", "--bm3d-images", "0", "--ddim-steps", "",
            "--sigmas", "0.1", "--device", "cpu"]
    for split in ("test", "train"):
        eval_lossless.main(args + ["--split", split])
    out = capsys.readouterr().out
    assert "3 lossless CIFAR-10 test images" in out and "3 lossless CIFAR-10 train images" in out
    rows = [line for line in out.splitlines() if line.startswith("| 0.1 |")]
    assert len(rows) == 2 and rows[0] != rows[1]  # different images, different scores


def test_eval_lossless_pairs_with_bm3d_when_a_ddim_row_ran_on_no_image(tmp_path, tiny_params, capsys):
    """--ddim-images 0 leaves the DDIM rows out of the first table; the BM3D-paired table must still print."""
    import eval_lossless

    checkpoint, data = tiny_checkpoint_and_images(tmp_path, tiny_params, 3, 16)  # BM3D crashes on 8x8 images
    eval_lossless.main(["--checkpoint", checkpoint, "--data", data, "--n-images", "3", "--bm3d-images", "1",
                        "--ddim-steps", "3", "--ddim-images", "0", "--sigmas", "0.1", "--device", "cpu",
                        "--workers", "1", "--cache-dir", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    assert "on BM3D's 1 images" in out and "DDIM" not in out


@pytest.mark.parametrize("script", ["gray_noise", "mono_noise"])
def test_noise_probe_prints_a_row_per_sigma_with_every_method(tmp_path, tiny_params, capsys, script):
    probe = importlib.import_module(script)
    checkpoint, data = tiny_checkpoint_and_images(tmp_path, tiny_params, 4, 16)
    probe.main(["--checkpoint", checkpoint, "--data", data, "--n-images", "4",
                "--bm3d-images", "2", "--workers", "1", "--sigmas", "0.1,0.2", "--device", "cpu",
                "--cache-dir", str(tmp_path / "cache")])
    rows = [line for line in capsys.readouterr().out.splitlines() if re.match(r"\| 0\.[12] \|", line)]
    assert len(rows) == 2
    for row in rows:
        cells = row.strip("|").split("|")[1:]
        if script == "mono_noise":  # and how many images auto takes for monochromatic
            cells, counts = cells[:-1], cells[-1]
            assert re.fullmatch(r" \d / \d, \d of 4 ", counts)
        assert len(cells) == (8 if script == "mono_noise" else 7)
        assert all(re.fullmatch(r" \d+\.\d\d / \d\.\d{3} ", c) for c in cells)
