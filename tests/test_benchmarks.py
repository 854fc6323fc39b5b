"""The benchmarks' library code runs end to end on a tiny model and the scripts print what their docstrings promise
(so they do not rot between the rare runs on real data). Timings themselves are not asserted: speed targets live in
the benchmarks."""

import re
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from denoise_fixtures import write_tiny_checkpoint

from ddim_denoise.evaluation import throughput, training_speed
from ddim_denoise.evaluation.lossless import evaluate_lossless, load_lossless_images
from ddim_denoise.evaluation.throughput import count_flops
from ddim_denoise.results import speed

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(autouse=True)
def small_peak_measurement(monkeypatch):
    monkeypatch.setattr(throughput, "PEAK_SIZE", {"cpu": (128, 2)})


def run_benchmark(script: str, args: list[str]) -> None:
    """``python benchmarks/<script>.py ARGS`` in this process (so the small peak measurement applies)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.argv", [str(BENCHMARKS / f"{script}.py"), *args])
        runpy.run_path(str(BENCHMARKS / f"{script}.py"), run_name="__main__")


def tiny_checkpoint_and_images(tmp_path, tiny_params, n: int, size: int) -> tuple[str, str]:
    """A tiny model's checkpoint and an .npz of n random (size x size) test images, as the scripts' paths."""
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.pt", tiny_params)
    images = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    np.savez(tmp_path / "test.npz", x_test=images)
    return str(checkpoint), str(tmp_path / "test.npz")


def test_count_flops_counts_a_matrix_product():
    a, b = torch.ones(4, 5), torch.ones(5, 6)
    assert count_flops(lambda: a @ b) == 2 * 4 * 5 * 6


def test_peak_table_measures_each_precision_once(monkeypatch):
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
    checkpoint, data = tiny_checkpoint_and_images(tmp_path, tiny_params, 6, 8)
    run_benchmark("denoise_speed", ["--checkpoint", checkpoint, "--data", data, "--n-images", "6",
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
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(tiny_params.model_dump()))
    run_benchmark("train_speed", ["--params", str(params_file), "--batch", "4", "--steps", "1", "--warmup", "1",
                      "--modes", "fp32,bf16", "--device", "cpu"])
    out = capsys.readouterr().out
    assert re.search(r"fp32: +[\d.]+ img/s .*% of the fp32 matmul peak", out)
    assert re.search(r"bf16: +[\d.]+ img/s .*% of the bfloat16 matmul peak", out)
    assert re.search(r"training FLOPs per image \(fwd\+bwd\): [\d.]+ GFLOP", out)


def test_train_speed_gives_one_row_per_batch_and_mode(tmp_path, tiny_params, capsys):
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(tiny_params.model_dump()))
    run_benchmark("train_speed", ["--params", str(params_file), "--batch", "2,4", "--steps", "1", "--warmup", "1",
                      "--modes", "fp32", "--device", "cpu"])
    rows = re.findall(r"fp32 @(\d+): +[\d.]+ img/s", capsys.readouterr().out)
    assert rows == ["2", "4"]


def test_train_speed_compares_cudnn_benchmark_settings_and_profiles_the_last_row(tmp_path, tiny_params, capsys):
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(tiny_params.model_dump()))
    run_benchmark("train_speed", ["--params", str(params_file), "--batch", "4", "--steps", "1", "--warmup", "1",
                      "--modes", "fp32", "--device", "cpu", "--cudnn-benchmark", "off,on", "--profile", "2"])
    out = capsys.readouterr().out
    assert re.findall(r"fp32 cudnn.benchmark=(\w+): +[\d.]+ img/s", out) == ["off", "on"]
    assert "profile of the last row (fp32 cudnn.benchmark=on)" in out and "aten::convolution" in out
    assert re.search(r"per step: [\d.]+ ms of CPU time in [\d.]+ ms wall", out)
    assert re.search(r"convolution / matmul +[\d.]+ ms +[\d.]+%", out)


def test_train_speed_applies_inductor_settings_and_times_the_warm_up(tmp_path, tiny_params, capsys, monkeypatch):
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(tiny_params.model_dump()))
    seen = []
    real_measure = training_speed.measure
    config = training_speed.inductor_config
    monkeypatch.setattr(training_speed, "measure", lambda *a: seen.append(
        (config.coordinate_descent_tuning, config.force_layout_optimization)) or real_measure(*a))
    args = ["--params", str(params_file), "--batch", "2", "--steps", "1", "--warmup", "1", "--modes", "fp32",
            "--device", "cpu"]
    run_benchmark("train_speed", args + ["--inductor", "coordinate_descent_tuning=True"])  # on params' train.inductor
    run_benchmark("train_speed", args + ["--inductor", "force_layout_optimization=False"])  # overriding it
    assert tiny_params.train.inductor == {"force_layout_optimization": True}
    assert seen == [(True, True), (False, False)]
    assert not config.coordinate_descent_tuning and not config.force_layout_optimization  # set for the row only
    assert re.search(r"fp32: +[\d.]+ img/s .* peak; warm-up [\d.]+ s", capsys.readouterr().out)
    with pytest.raises(SystemExit):
        run_benchmark("train_speed", args + ["--inductor", "no_such_setting=1"])
    assert "torch._inductor.config has no no_such_setting" in capsys.readouterr().err


@pytest.mark.parametrize("option, message", [
    (["-S", "train.lr=[1"], "--set 'train.lr=[1': not valid YAML"),
    (["-S", "train.lr"], "--set 'train.lr': expected KEY=VALUE"),
    (["-S", "train.lr=fast"], "train.lr: Input should be a valid number"),
    (["--inductor", "max_autotune=[1"], "--inductor 'max_autotune=[1': not valid YAML"),
    (["--inductor", "max_autotune"], "--inductor 'max_autotune': expected KEY=VALUE"),
])
def test_train_speed_reports_a_bad_value_in_one_line(tmp_path, tiny_params, capsys, option, message):
    """-S reads its values as the CLI does, and --inductor the same way: a YAML error is not a traceback."""
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(tiny_params.model_dump()))
    with pytest.raises(SystemExit) as exited:
        run_benchmark("train_speed", ["--params", str(params_file), "--device", "cpu", *option])
    assert exited.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("train_speed.py: error: ") and message in last


def test_count_flops_includes_attention_on_channels_last_inputs(tiny_params):
    """channels_last selects a fused CPU attention kernel that torch's flop counter has no formula for."""
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
    checkpoint, data = tiny_checkpoint_and_images(tmp_path, tiny_params, 3, 8)
    with np.load(data) as archive:
        test = archive["x_test"]
    np.savez(data, x_test=test, x_train=np.full_like(test, 128))  # flat gray training images: unlike the test ones
    args = ["--checkpoint", checkpoint, "--data", data, "--n-images", "3", "--bm3d-images", "0", "--ddim-steps", "",
            "--sigmas", "0.1", "--device", "cpu"]
    for split in ("test", "train"):
        run_benchmark("eval_lossless", args + ["--split", split])
    out = capsys.readouterr().out
    assert "3 lossless CIFAR-10 test images" in out and "3 lossless CIFAR-10 train images" in out
    rows = [line for line in out.splitlines() if line.startswith("| 0.1 |")]
    assert len(rows) == 2 and rows[0] != rows[1]  # different images, different scores


def test_eval_lossless_pairs_with_bm3d_when_a_ddim_row_ran_on_no_image(tmp_path, tiny_params, capsys):
    """--ddim-images 0 leaves the DDIM rows out of the first table; the BM3D-paired table must still print."""
    checkpoint, data = tiny_checkpoint_and_images(tmp_path, tiny_params, 3, 16)  # BM3D crashes on 8x8 images
    run_benchmark("eval_lossless", ["--checkpoint", checkpoint, "--data", data, "--n-images", "3",
                                    "--bm3d-images", "1", "--ddim-steps", "3", "--ddim-images", "0", "--sigmas", "0.1",
                                    "--device", "cpu", "--workers", "1", "--cache-dir", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    assert "on BM3D's 1 images" in out and "DDIM" not in out


def test_lossless_evaluation_reruns_on_bm3d_images_only_the_methods_that_saw_more(tmp_path, tiny_params):
    """The paired table puts every method on BM3D's images: one step (all 3 images) runs again on BM3D's 1, DDIM
    (already on 1) and BM3D keep their rows."""
    from ddim_denoise.denoising.denoiser import Denoiser

    checkpoint, data = tiny_checkpoint_and_images(tmp_path, tiny_params, 3, 16)  # BM3D crashes on 8x8 images
    denoiser = Denoiser.from_checkpoint(checkpoint, device="cpu")
    evaluation = evaluate_lossless(denoiser, load_lossless_images(data, "test", 3), [0.1], ddim_steps=[2],
                                   ddim_images=1, bm3d_images=1, workers=1, cache_dir=tmp_path / "cache")
    first = evaluation.table.set_index("method").n_images
    paired = evaluation.paired.set_index("method").n_images
    assert evaluation.n_bm3d == 1 and first.max() == 3
    assert list(paired.index) == list(first.index) and (paired == 1).all()  # same methods, same order
    reran = first.index[first > 1]
    assert not evaluation.paired.set_index("method").loc[reran, "psnr"].equals(
        evaluation.table.set_index("method").loc[reran, "psnr"])  # scored on other images
    assert "on BM3D's 1 images" in evaluation.markdown("title")


def test_export_latency_prints_every_backend_with_its_difference_from_eager(tmp_path, tiny_params, capsys):
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.pt", tiny_params)
    run_benchmark("export_latency", ["--checkpoint", str(checkpoint), "--batch", "2", "--size", "16", "--threads", "1",
                                     "--warmup", "1", "--repeats", "2"])
    rows = re.findall(r"^(pytorch eager|torchscript \(torch.jit\)|onnx \(onnxruntime\)) +([\d.]+) +([\d.]+) +(\S+)$",
                      capsys.readouterr().out, flags=re.MULTILINE)
    assert [r[0] for r in rows] == ["pytorch eager", "torchscript (torch.jit)", "onnx (onnxruntime)"]
    assert all(float(ms) > 0 for _, ms, _, _ in rows)
    assert float(rows[0][3]) == 0 and all(float(error) < 1e-3 for *_, error in rows)  # a wrong export would show


def test_the_speed_study_renders_what_the_benchmarks_write(tmp_path, tiny_params, capsys):
    """pipelines/results/speed runs both scripts with --out; its docs block reads those CSVs back."""
    checkpoint, data = tiny_checkpoint_and_images(tmp_path, tiny_params, 4, 32)  # BM3D needs its block size
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(tiny_params.model_dump()))
    study = tmp_path / speed.STUDY
    run_benchmark("train_speed", ["--params", str(params_file), "--batch", "4", "--steps", "1", "--warmup", "1",
                                  "--modes", "fp32,bf16", "--device", "cpu", "--out", str(tmp_path / speed.TRAINING)])
    run_benchmark("denoise_speed", ["--checkpoint", checkpoint, "--data", data, "--n-images", "4", "--bm3d-images",
                                    "1", "--ddim-steps", "2", "--amp", "off", "--device", "cpu",
                                    "--out", str(tmp_path / speed.DENOISING)])
    assert sorted(p.name for p in study.iterdir()) == ["denoising_speed.csv", "training_speed.csv"]
    text = speed.render(tmp_path)
    rates = [float(line.split("|")[3]) for line in text.splitlines() if line.startswith(("| fp32 ", "| bf16 "))]
    assert len(rates) == 2 and all(rate > 0 for rate in rates)
    assert "| one-step | cpu fp32 | 4 |" in text and "| DDIM-2 | cpu fp32 | 4 |" in text
    assert re.search(r"\| BM3D \| cpu, 1 process\(es\) \| 1 \|", text)
    assert "failed" not in text
