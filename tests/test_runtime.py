"""What the Denoiser runs: the precision policies (``train.amp``, ``eval.amp``) and which of a checkpoint's weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from denoise_fixtures import write_tiny_checkpoint

from ddim_denoise.denoising.denoiser import Denoiser
from ddim_denoise.pipeline import runtime
from ddim_denoise.pipeline.checkpoint import load_checkpoint, save_checkpoint
from ddim_denoise.pipeline.runtime import (
    configure_cudnn,
    resolve_channels_last,
    resolve_compile,
    resolve_compile_mode,
    resolve_inference_precision,
    resolve_precision,
)

CPU = torch.device("cpu")
AVX512_BF16_FLAGS = "flags\t\t: fpu avx512f avx512_bf16 avx512_vnni\n"  # AVX512-BF16, no AMX
XEON_FLAGS = "flags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile\n"
OLD_FLAGS = "flags\t\t: fpu avx2 fma\n"


@pytest.mark.parametrize("flags, expected", [(AVX512_BF16_FLAGS, "bf16"), (XEON_FLAGS, "bf16"), (OLD_FLAGS, "fp32")])
def test_auto_picks_bf16_wherever_the_cpu_has_bf16_dot_products(monkeypatch, flags, expected):
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: flags)
    assert resolve_precision("auto", CPU).name == expected
    assert resolve_inference_precision("auto", CPU).name == expected
    assert resolve_inference_precision("off", CPU).name == "fp32"
    assert resolve_inference_precision("bf16", CPU).name == "bf16"


@pytest.mark.parametrize("capability, expected", [((7, 5), "fp16"), ((7, 0), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_picks_fp16_on_gpus_that_only_emulate_bf16(monkeypatch, capability, expected):
    """A T4 (7.5, the origin report's GPU) passes torch.cuda.is_bf16_supported() by emulation, without tensor cores."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.version, "hip", None)
    precision = resolve_precision("auto", torch.device("cuda"))
    assert precision.name == expected and precision.use_grad_scaler == (expected == "fp16")
    assert resolve_inference_precision("auto", torch.device("cuda")).name == expected


def test_device_name_reads_the_cpu_model(monkeypatch):
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: "processor\t: 0\nmodel name\t: Example CPU 9000\n" + AVX512_BF16_FLAGS)
    assert runtime.device_name(CPU) == "Example CPU 9000"
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: "")  # no /proc/cpuinfo
    assert runtime.device_name(CPU) == "cpu"


def test_channels_last_auto_is_on_for_gpus_only_and_an_explicit_setting_wins():
    assert resolve_channels_last("auto", torch.device("cuda")) and not resolve_channels_last("auto", CPU)
    assert resolve_channels_last(True, CPU) and not resolve_channels_last(False, torch.device("cuda"))


def test_compile_auto_is_on_for_gpus_only_and_an_explicit_setting_wins():
    assert resolve_compile("auto", torch.device("cuda")) and not resolve_compile("auto", CPU)
    assert resolve_compile(True, CPU) and not resolve_compile(False, torch.device("cuda"))


def test_cuda_graphs_are_asked_for_on_one_gpu_only(caplog):
    gpu = torch.device("cuda")
    assert resolve_compile_mode("reduce-overhead", gpu, world=1) == "reduce-overhead"
    assert resolve_compile_mode("reduce-overhead", CPU, world=1) == "default"
    assert resolve_compile_mode("max-autotune", gpu, world=2) == "max-autotune"  # no CUDA graphs asked for: kept
    with caplog.at_level("WARNING"):
        assert resolve_compile_mode("reduce-overhead", gpu, world=2) == "default"
    assert "DDP" in caplog.text and "128218" in caplog.text


@pytest.mark.parametrize("benchmark", [True, False])
def test_train_cudnn_benchmark_sets_cudnns_flag_on_gpus_and_leaves_cpus_alone(monkeypatch, benchmark):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", not benchmark)  # restored after the test
    configure_cudnn(torch.device("cpu"), benchmark)
    assert torch.backends.cudnn.benchmark is (not benchmark)
    configure_cudnn(torch.device("cuda", 0), benchmark)
    assert torch.backends.cudnn.benchmark is benchmark


def test_inference_precision_never_scales_gradients_and_names_its_key():
    assert not resolve_inference_precision("bf16", CPU).use_grad_scaler
    with pytest.raises(ValueError, match="eval.amp=fp16 needs a CUDA device"):
        resolve_inference_precision("fp16", CPU)


def test_bf16_denoising_stays_close_to_fp32(tmp_path, tiny_params):
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.pt", tiny_params)
    noisy = np.random.default_rng(0).random((4, 16, 16, 3), dtype=np.float32)
    fp32 = Denoiser.from_checkpoint(checkpoint, device="cpu", amp="off")
    bf16 = Denoiser.from_checkpoint(checkpoint, device="cpu", amp="bf16")
    assert (fp32.precision.name, bf16.precision.name) == ("fp32", "bf16")
    a, b = fp32.denoise(noisy, 0.2), bf16.denoise(noisy, 0.2)
    assert 0 < np.abs(a - b).max() < 0.02  # bf16 really ran (outputs differ) and kept ~2-3 significant digits


def test_denoiser_runs_the_ema_weights_unless_asked_for_the_raw_ones(tmp_path, tiny_params):
    state = load_checkpoint(write_tiny_checkpoint(tmp_path / "tiny.pt", tiny_params))
    state["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in state["ema"].items()}
    save_checkpoint(tmp_path / "two.pt", state)
    for weights in ("ema", "model"):
        loaded = Denoiser.from_checkpoint(tmp_path / "two.pt", device="cpu", weights=weights).model.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in state[weights].items())


def test_denoising_outside_the_trained_noise_range_warns_once(tmp_path, tiny_params, caplog):
    params = tiny_params.model_copy(update={"diffusion": tiny_params.diffusion.model_copy(
        update={"t_sampling": "log_uniform", "sigma_min": 0.05, "sigma_max": 0.6})})
    denoiser = Denoiser.from_checkpoint(write_tiny_checkpoint(tmp_path / "tiny.pt", params), device="cpu")
    assert denoiser.trained_sigma_range == (0.05, 0.6)
    noisy = np.broadcast_to(np.float32([0.4, 0.5, 0.6]), (2, 8, 8, 3))  # colour: gray images count sqrt(3)x
    denoiser.denoise(noisy, 0.2)
    assert "outside" not in caplog.text
    denoiser.denoise(noisy, np.array([0.2, 0.01]))
    denoiser.denoise(noisy, 0.9)
    assert caplog.text.count("sigma 0.01 lies outside the 0.05-0.6 this model was trained on") == 1
    assert caplog.text.count("outside") == 1


def test_a_gray_image_warns_at_the_level_the_model_sees(tmp_path, tiny_params, caplog):
    params = tiny_params.model_copy(update={"diffusion": tiny_params.diffusion.model_copy(
        update={"t_sampling": "log_uniform", "sigma_min": 0.05, "sigma_max": 0.6})})
    denoiser = Denoiser.from_checkpoint(write_tiny_checkpoint(tmp_path / "tiny.pt", params), device="cpu")
    denoiser.denoise(np.full((1, 8, 8, 1), 0.5, np.float32), 0.5)  # the model sees sqrt(3) x 0.5 = 0.866
    expected = "sigma 0.866 (a gray image's or monochromatic noise's 0.5 times sqrt(3)) lies outside the 0.05-0.6"
    assert caplog.text.count(expected) == 1


def test_a_model_trained_on_every_noise_level_never_warns(tmp_path, tiny_params, caplog):
    params = tiny_params.model_copy(update={"diffusion": tiny_params.diffusion.model_copy(
        update={"t_sampling": "uniform"})})
    denoiser = Denoiser.from_checkpoint(write_tiny_checkpoint(tmp_path / "tiny.pt", params), device="cpu")
    denoiser.denoise(np.full((1, 8, 8, 3), 0.5, np.float32), 0.001)
    assert denoiser.trained_sigma_range is None and "outside" not in caplog.text
