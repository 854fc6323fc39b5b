import itertools
import json
import logging
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from cifar_fixtures import write_cifar_npz

from ddim_denoise.data.patches import FixedImages
from ddim_denoise.data.prepared import prepare
from ddim_denoise.pipeline.checkpoint import CheckpointError, load_checkpoint
from ddim_denoise.pipeline.errors import TrainingError
from ddim_denoise.pipeline.params import ParamsError, validate_params
from ddim_denoise.training import build as build_module
from ddim_denoise.training import resume as resume_module
from ddim_denoise.training.build import EMA, build_trainer, lr_factor
from ddim_denoise.training.estimate import format_duration
from ddim_denoise.training.guards import EpochClock


@pytest.fixture
def workspace(tmp_path, monkeypatch, tiny_params):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    write_cifar_npz(tmp_path / "data" / "raw", n_train_per_batch=8, n_test=4)
    params = tiny_params.model_copy(deep=True)
    params.data.val_size = 8
    params.mlflow.log_model = False
    prepare(params)
    return params


def with_train(params, **changes):
    raw = params.model_dump()
    raw["train"].update(changes)
    return validate_params(raw)


def test_lr_warms_up_then_decays_to_min_lr():
    factors = [lr_factor(s, 10, 100, 1e-3, 1e-5) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert lr_factor(100, 10, 100, 1e-3, 1e-5) == pytest.approx(1e-2)


def test_durations_read_as_a_person_would_say_them():
    assert [format_duration(s) for s in (-1, 40.4, 59.6, 90, 3599, 3600, 7500, 86400 * 1.5)] == [
        "0 s", "40 s", "1 min", "2 min", "1 h 00 min", "1 h 00 min", "2 h 05 min", "36 h 00 min"]


def test_each_epoch_logs_the_time_left(workspace, caplog):
    caplog.set_level("INFO", logger="ddim_denoise.training.trainer")
    build_trainer(with_train(workspace, epochs=2)).fit()
    epoch_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert len(epoch_lines) == 2
    assert " left" in epoch_lines[0] and " left" not in epoch_lines[1]  # nothing is left after the last epoch


def test_a_run_of_days_says_so_inside_its_first_epoch_and_names_the_quick_profile(workspace, caplog):
    """A million epochs: the estimate at the second log point of epoch 1 warns; train.max_minutes ends the run after
    that epoch, so the test takes seconds."""
    caplog.set_level("WARNING", logger="ddim_denoise.training.estimate")
    params = with_train(workspace, epochs=10**6, max_minutes=1e-4, log_every=1, val_every=10**6)
    trainer = build_trainer(params)
    trainer.fit()
    assert trainer.epoch == 1
    warnings = [r.getMessage() for r in caplog.records if "this run needs about" in r.getMessage()]
    assert len(warnings) == 1 and "profile=quick" in warnings[0] and " h " in warnings[0], warnings


def test_time_estimates_and_the_steady_rate_leave_out_the_first_epochs_one_time_costs(monkeypatch):
    now = [0.0]
    monkeypatch.setattr("ddim_denoise.training.guards.time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    clock = EpochClock()
    now[0] = 60.0
    clock.epoch_done(images=1000, seconds=58.0)  # compilation and CUDA-graph capture
    assert clock.seconds_per_epoch() == 60.0 and clock.steady_rate() is None
    for end in (65.0, 70.0):
        now[0] = end
        clock.epoch_done(images=1000, seconds=4.0)
    now[0] = 71.0  # validation of the last epoch
    assert clock.seconds_per_epoch() == 5.5  # (71 - 60) / 2, not 71 / 3
    assert clock.steady_rate() == 250.0 and clock.last_rate() == 250.0


def test_short_training_lowers_the_loss(workspace):
    params = with_train(workspace, epochs=10, lr=3e-3, val_every=10)
    trainer = build_trainer(params)
    # Smooth images (random colour gradients): learnable structure, unlike the fixture's random pixels.
    ramp = np.linspace(0, 1, 32, dtype=np.float32)
    colours = np.random.default_rng(0).uniform(0, 1, (len(trainer.train_images), 1, 1, 3)).astype(np.float32)
    trainer.train_images = FixedImages(
        (255 * colours * ramp[None, :, None, None] * ramp[None, None, :, None]).astype(np.uint8))
    x0 = trainer._batch_to_model_scale(trainer.train_images.images[:8])
    gen = lambda: torch.Generator().manual_seed(0)  # same noise levels and noise before and after
    with torch.no_grad():
        before = trainer.loss_fn(trainer.model, x0, gen()).item()
    trainer.fit()
    with torch.no_grad():
        after = trainer.loss_fn(trainer.model, x0, gen()).item()
        after_ema = trainer.loss_fn(trainer.ema.model, x0, gen()).item()  # what best.pt, evaluate and export use
    assert after < 0.8 * before and after_ema < 0.8 * before


def test_the_ema_is_the_warmed_up_moving_average_of_the_weights():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.9)
    start = [p.clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model, step=100)  # past the warm-up: the decay itself
    for averaged, old, new in zip(ema.model.parameters(), start, model.parameters()):
        assert torch.allclose(averaged, 0.9 * old + 0.1 * new)
    ema.update(model, step=0)  # warm-up: decay (1 + 0) / (10 + 0), mostly the new weights
    for averaged, old, new in zip(ema.model.parameters(), start, model.parameters()):
        assert torch.allclose(averaged, 0.1 * (0.9 * old + 0.1 * new) + 0.9 * new)


def test_interrupted_run_resumes_to_the_same_state(workspace, tmp_path):
    straight = build_trainer(with_train(workspace, epochs=3, out_dir="straight"))
    straight.fit()

    first = build_trainer(with_train(workspace, epochs=3, out_dir="resumed"))
    # Simulate a kill after epoch 1: run one epoch and save, as fit() does, then start a fresh process-like trainer.
    first._start_tracking(None)
    first.train_epoch(first.train_images.epoch_images(0))
    first.epoch += 1
    first.validation_seconds = 100.0  # time spent before the kill counts on
    first._end_of_epoch({"epoch_loss": 0.0})
    resumed = build_trainer(with_train(workspace, epochs=3, out_dir="resumed"))
    assert resumed.fit()["validation_seconds"] > 100

    a, b = load_checkpoint("straight/last.pt"), load_checkpoint("resumed/last.pt")
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"] == 3
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["ema"]:
        assert torch.equal(a["ema"][key], b["ema"][key]), key
    # The resumed run continued the same MLflow run.
    assert a["mlflow_run_id"] != b["mlflow_run_id"]
    assert b["mlflow_run_id"] == load_checkpoint("resumed/epoch_0001.pt")["mlflow_run_id"]


def test_a_fresh_run_removes_an_earlier_runs_periodic_checkpoints_and_a_resume_keeps_its_own(workspace, caplog):
    """train.out_dir persists between runs (a DVC output with persist: true): a new run must not leave the previous
    run's epoch_*.pt beside its own."""
    def crash_after_epoch_1(*args):
        raise RuntimeError("simulated crash")

    def periodic() -> list[str]:
        return sorted(path.name for path in Path("models").glob("epoch_*.pt"))

    with caplog.at_level(logging.INFO, logger=resume_module.__name__):
        with pytest.raises(RuntimeError, match="simulated crash"):
            build_trainer(with_train(workspace, epochs=2), on_epoch_end=crash_after_epoch_1).fit()
        build_trainer(with_train(workspace, epochs=2)).fit()  # a resume: epoch 1's checkpoint is its own
        assert periodic() == ["epoch_0001.pt", "epoch_0002.pt"] and "removed" not in caplog.text
        # A fresh run that fails before its first checkpoint (mistaken params, a crash in epoch 1) removes nothing
        failing = build_trainer(with_train(workspace, epochs=1, lr=5e-4))
        failing.train_epoch = crash_after_epoch_1
        with pytest.raises(RuntimeError, match="simulated crash"):
            failing.fit()
        assert periodic() == ["epoch_0001.pt", "epoch_0002.pt"] and "removed" not in caplog.text
        build_trainer(with_train(workspace, epochs=1, lr=5e-4)).fit()  # other params: a fresh run
    assert periodic() == ["epoch_0001.pt"] and load_checkpoint("models/epoch_0001.pt")["params"]["train"]["lr"] == 5e-4
    removed = [r.getMessage() for r in caplog.records if "removed" in r.getMessage()]
    assert len(removed) == 1 and "removed 2 periodic checkpoint(s) of an earlier run" in removed[0], removed


def test_changed_params_start_a_new_run(workspace):
    build_trainer(with_train(workspace, epochs=1)).fit()
    other = build_trainer(with_train(workspace, epochs=1, lr=5e-4))
    assert other.try_resume() is None
    same = build_trainer(with_train(workspace, epochs=1, log_every=7))  # operational keys do not matter
    assert same.try_resume() is not None
    # nor do the Inductor settings, a mapping whose flattened keys sit below train.inductor
    for inductor in ({}, {"force_layout_optimization": False, "coordinate_descent_tuning": True}):
        assert build_trainer(with_train(workspace, epochs=1, inductor=inductor)).try_resume() is not None


def test_other_training_code_starts_a_new_run(workspace, monkeypatch):
    """dvc repro reruns the train stage when its code changes: resuming the finished run would record the old model
    against the new code."""
    build_trainer(with_train(workspace, epochs=1)).fit()
    assert build_trainer(with_train(workspace, epochs=1)).try_resume() is not None
    monkeypatch.setattr(resume_module, "code_digest", lambda stage: "other code")
    assert build_trainer(with_train(workspace, epochs=1)).try_resume() is None


def test_a_resume_validating_at_other_sigmas_chooses_best_pt_afresh(workspace, caplog):
    """eval.sigmas can change without changing what a run learns; a best PSNR from other sigmas (here, lower noise)
    must not stay the bar that every later validation fails to clear."""
    def crash_after_epoch_1(epoch, metrics):
        raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError):
        build_trainer(with_train(workspace, epochs=2, val_every=1), on_epoch_end=crash_after_epoch_1).fit()
    noisier = with_train(workspace, epochs=2, val_every=1)
    noisier.eval.sigmas = [0.5]
    result = build_trainer(noisier).fit()
    assert result["best_epoch"] == 2 and load_checkpoint("models/best.pt")["epoch"] == 2
    assert "best.pt is chosen afresh" in caplog.text


def test_another_validation_split_starts_a_new_run(workspace):
    """A larger data.val_size moves images the checkpoint trained on into validation: no resume across it."""
    build_trainer(with_train(workspace, epochs=1)).fit()
    resplit = workspace.model_copy(deep=True)
    resplit.data.val_size = 12
    prepare(resplit)
    assert build_trainer(with_train(resplit, epochs=1)).try_resume() is None
    prepare(workspace)
    assert build_trainer(with_train(workspace, epochs=1)).try_resume() is not None


def test_init_from_starts_from_the_checkpoints_ema_weights(workspace):
    build_trainer(with_train(workspace, epochs=1, out_dir="first")).fit()
    ema = load_checkpoint("first/best.pt")["ema"]
    tuned = build_trainer(with_train(workspace, epochs=1, init_from="first/best.pt", lr=1e-4))
    for name, tensor in tuned.model.state_dict().items():
        assert torch.equal(tensor, ema[name]) and torch.equal(tuned.ema.model.state_dict()[name], ema[name]), name
    assert tuned.try_resume() is None  # another run (its params differ), not a resume of the first
    assert tuned.fit()["epochs"] == 1


def test_a_fresh_run_from_a_periodic_checkpoint_of_its_out_dir_keeps_that_checkpoint(workspace):
    """Fine-tuning from models/epoch_0002.pt into models/: the earlier run's other checkpoints go, the one this run
    starts from stays, and a rerun can load it again."""
    build_trainer(with_train(workspace, epochs=3)).fit()
    tuned = with_train(workspace, epochs=1, init_from="models/epoch_0002.pt", lr=1e-4)
    build_trainer(tuned).fit()
    assert sorted(path.name for path in Path("models").glob("epoch_*.pt")) == ["epoch_0001.pt", "epoch_0002.pt"]
    assert load_checkpoint("models/epoch_0002.pt")["params"]["train"]["epochs"] == 3  # the earlier run's
    assert load_checkpoint("models/epoch_0001.pt")["params"]["train"]["lr"] == 1e-4  # this run's own
    assert build_trainer(tuned).fit()["epochs"] == 1  # the rerun loads init_from, then finds the run finished


def test_init_from_a_checkpoint_of_another_architecture_is_one_clear_error(workspace):
    build_trainer(with_train(workspace, epochs=1, out_dir="first")).fit()
    raw = with_train(workspace, init_from="first/best.pt").model_dump()
    raw["model"]["base_channels"] = 16
    with pytest.raises(CheckpointError, match="train.init_from needs a checkpoint trained with the same model"):
        build_trainer(validate_params(raw))


def test_outputs_and_summary(workspace, monkeypatch):
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)  # the name below is a run's outside `dvc exp run`
    summary = build_trainer(workspace).fit()
    assert summary["epochs"] == 2 and summary["parameters"] > 0 and summary["images_per_s"] > 0
    assert summary["steady_images_per_s"] > 0  # epoch 2's rate
    # where the time outside the training steps went: two validations, two rounds of checkpoint writes
    assert summary["validation_seconds"] > 0 and summary["checkpoint_seconds"] > 0
    # what the auto settings resolved to, so that runs on different machines compare (here: eager, NCHW, a CPU)
    assert summary["compile"] is None and summary["channels_last"] is False and summary["device_name"]
    import mlflow

    run = mlflow.MlflowClient().get_run(summary["mlflow_run_id"])
    assert run.info.run_name == "train ch8 e2 b8 lr1e-3" and run.info.status == "FINISHED"  # what it was, not "train"
    tags = run.data.tags
    assert tags["compile"] == "off" and tags["channels_last"] == "False" and tags["device_name"] == summary["device_name"]
    assert tags["data_source"].startswith("npz ") and tags["data_val_split"].endswith(" images")
    on_disk = json.loads(open("training/summary.json").read())
    assert on_disk["best_val_psnr"] == summary["best_val_psnr"] and np.isfinite(on_disk["best_val_psnr"])
    assert open("training/steps.csv").readline().strip() == "step,epoch,loss,lr"
    assert len(open("training/val.csv").read().splitlines()) == 1 + 2 * 2  # 2 epochs x 2 sigmas
    for name in ("last.pt", "best.pt", "epoch_0001.pt", "epoch_0002.pt"):
        assert load_checkpoint(f"models/{name}")["format"]


def test_running_out_of_device_memory_names_a_smaller_batch_and_keeps_the_checkpoint(workspace, monkeypatch):
    """The gpu profile's batch of 512 does not fit every GPU: one line with the fix, not a traceback."""
    trainer = build_trainer(with_train(workspace, epochs=2))  # batch 8, lr 1e-3
    real_step = trainer.train_step

    def step(x0):
        if trainer.epoch >= 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(x0)

    monkeypatch.setattr(trainer, "train_step", step)
    with pytest.raises(TrainingError, match=r"out of memory on .* at train.batch_size=8: .*"
                                            r"-S train.batch_size=4 -S train.lr=0.0005 \(models/last.pt holds"):
        trainer.fit()
    assert load_checkpoint("models/last.pt")["epoch"] == 1


def test_nonfinite_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(workspace, monkeypatch):
    trainer = build_trainer(with_train(workspace, epochs=3, max_nonfinite_steps=2))
    real_loss = trainer.loss_fn
    calls = {"n": 0}

    def flaky(model, x0, gen):
        calls["n"] += 1
        return real_loss(model, x0, gen) * (float("nan") if trainer.epoch >= 1 else 1.0)

    trainer.loss_fn = flaky
    with pytest.raises(TrainingError, match="non-finite for 2 steps"):
        trainer.fit()
    assert load_checkpoint("models/last.pt")["epoch"] == 1
    assert trainer.nonfinite_steps == 2


def test_a_loss_that_rises_and_stays_up_stops_training_with_a_clear_error(workspace):
    # A finite collapse (the output stuck at zero after too high an lr) which max_nonfinite_steps cannot see.
    trainer = build_trainer(with_train(workspace, epochs=4, divergence_factor=3.0, max_diverged_steps=3))
    real_loss = trainer.loss_fn
    trainer.loss_fn = lambda model, x0, gen: real_loss(model, x0, gen) * (100.0 if trainer.epoch >= 1 else 1.0)
    with pytest.raises(TrainingError, match=r"training diverged: .* above 3x its lowest .* for 3 steps .* lower "
                                            r"train\.lr"):
        trainer.fit()
    assert load_checkpoint("models/last.pt")["epoch"] == 1
    assert trainer.step == trainer.batches_per_epoch + 3  # stopped after exactly max_diverged_steps bad steps


def test_the_divergence_guard_can_be_switched_off(workspace):
    trainer = build_trainer(with_train(workspace, epochs=2, divergence_factor=None, max_diverged_steps=1))
    real_loss = trainer.loss_fn
    trainer.loss_fn = lambda model, x0, gen: real_loss(model, x0, gen) * (100.0 if trainer.epoch >= 1 else 1.0)
    assert trainer.fit()["epochs"] == 2


def test_a_nonfinite_step_is_skipped_on_the_device_and_training_goes_on(workspace):
    # The skip happens inside the fused optimizer (found_inf), not in Python: weights and Adam moments stay as they
    # were, the counters live on the device, and the next finite step updates as usual.
    trainer = build_trainer(with_train(workspace, epochs=1))
    x0 = torch.rand(8, 3, 16, 16) * 2 - 1
    trainer.train_step(x0)
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    moments = [trainer.optimizer.state[p]["exp_avg"].clone() for p in trainer.model.parameters()]
    real_loss = trainer.loss_fn
    trainer.loss_fn = lambda model, x, gen: real_loss(model, x, gen) * float("nan")
    loss = trainer.train_step(x0)
    assert isinstance(loss, torch.Tensor) and torch.isnan(loss)
    assert all(torch.equal(v, weights[k]) for k, v in trainer.model.state_dict().items())
    assert all(torch.equal(trainer.optimizer.state[p]["exp_avg"], m) for p, m in zip(trainer.model.parameters(), moments))
    assert trainer.nonfinite_steps == 1 and int(trainer.nonfinite_guard.consecutive) == 1
    assert all(torch.isfinite(p).all() for p in trainer.ema.model.parameters())
    trainer.loss_fn = real_loss
    assert torch.isfinite(trainer.train_step(x0))
    assert int(trainer.nonfinite_guard.consecutive) == 0 and trainer.step == 3
    assert not all(torch.equal(v, weights[k]) for k, v in trainer.model.state_dict().items())


def test_training_logs_no_model_of_its_own(workspace):
    """The run's model is the code-based pyfunc that evaluate logs into it (mlflow.log_model); training once logged a
    pickled nn.Module there, which loading would have unpickled."""
    import mlflow

    params = workspace.model_copy(deep=True)
    params.train.epochs = 1
    params.mlflow.log_model = True
    summary = build_trainer(params).fit()
    experiment = mlflow.get_experiment_by_name("ddim-denoise").experiment_id
    assert mlflow.get_run(summary["mlflow_run_id"]).info.status == "FINISHED"
    assert mlflow.search_logged_models(experiment_ids=[experiment], output_format="list") == []


@pytest.mark.parametrize("setting, memory_format", [(False, torch.contiguous_format), (True, torch.channels_last),
                                                     ("auto", torch.contiguous_format)])  # auto: off on a CPU
def test_training_batches_have_the_memory_format_train_channels_last_asks_for(workspace, setting, memory_format):
    # The uint8 batch is permuted from NHWC, so it has channels_last strides already; left as it is, it made the
    # convolutions run channels_last under train.channels_last=false too (bf16 on a CPU at 0.6x its speed).
    trainer = build_trainer(with_train(workspace, epochs=1, channels_last=setting))
    batch = trainer._batch_to_model_scale(trainer.train_images.images[:4])
    assert batch.shape == (4, 3, 32, 32) and batch.is_contiguous(memory_format=memory_format)
    weight = next(p for p in trainer.model.parameters() if p.ndim == 4)
    assert weight.is_contiguous(memory_format=memory_format)


def test_compiled_training_uses_train_compile_mode_and_marks_every_step(workspace, monkeypatch):
    """compile_mode reaches torch.compile, and each step is marked as new: under CUDA graphs (reduce-overhead) a
    step that is not marked would find the last step's output buffers still in use."""
    import torch._inductor.config as inductor_config

    modes, marks, settings_in_steps = [], [], set()

    def stand_in_compile(module, mode=None):  # records the Inductor settings each training step's forward runs under
        modes.append(mode)
        module.register_forward_pre_hook(lambda *_: torch.is_grad_enabled() and settings_in_steps.add(
            (inductor_config.force_layout_optimization, inductor_config.coordinate_descent_tuning)))
        return module

    monkeypatch.setattr(torch, "compile", stand_in_compile)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    trainer = build_trainer(with_train(workspace, epochs=1, compile=True, compile_mode="max-autotune-no-cudagraphs",
                                       inductor={"force_layout_optimization": True, "coordinate_descent_tuning": True}))
    trainer.fit()
    assert modes == ["max-autotune-no-cudagraphs"]
    assert len(marks) == trainer.step == trainer.batches_per_epoch
    assert settings_in_steps == {(True, True)}  # train.inductor while compiling: the backward compiles lazily too
    assert not inductor_config.force_layout_optimization and not inductor_config.coordinate_descent_tuning  # restored
    # params.yaml's compile: auto leaves a CPU run eager (compiling would cost minutes), steps unmarked
    assert build_trainer(with_train(workspace, epochs=1, compile="auto")).compile is False


def test_a_misspelt_inductor_setting_stops_at_the_params_even_where_nothing_compiles(workspace):
    with pytest.raises(ParamsError, match="train.inductor: Value error, torch._inductor.config has no "
                                          "force_layout_optimisation; see that module"):
        with_train(workspace, compile=False, inductor={"force_layout_optimisation": True})


@pytest.mark.parametrize("setting", ["auto", True])
def test_a_failing_compiler_falls_back_to_eager_under_auto_and_stops_an_explicit_compile(workspace, monkeypatch,
                                                                                          setting):
    """compile: auto is params.yaml's default on GPUs; a machine whose compiler fails (no C compiler, an unsupported
    GPU) must still train, eager. A compiler backend that always fails stands in for it, on the CPU."""
    def broken_compiler(graph, example_inputs):
        raise RuntimeError("no working C compiler")

    real_compile = torch.compile
    monkeypatch.setattr(build_module, "resolve_compile", lambda setting, device: True)  # compile on this CPU
    monkeypatch.setattr(torch, "compile", lambda module, mode=None: real_compile(module, backend=broken_compiler))
    torch._dynamo.reset()  # no compiled (or given-up) code from earlier tests
    trainer = build_trainer(with_train(workspace, epochs=1, compile=setting))
    if setting == "auto":
        summary = trainer.fit()
        assert summary["epochs"] == 1 and np.isfinite(summary["best_val_psnr"])
    else:
        with pytest.raises(Exception, match="no working C compiler"):
            trainer.fit()
    torch._dynamo.reset()


def test_batches_of_data_on_an_accelerator_are_indexed_on_its_device(workspace):
    """Indexing GPU data with a host index makes every step wait for the GPU (the index copy blocks): the index
    batches must live where the data does. A stand-in for GPU data (device 'meta') records what indexes it."""
    trainer = build_trainer(with_train(workspace, batch_size=4))

    class DeviceData:
        device = torch.device("meta")

        def __init__(self):
            self.index_devices, self.indices = set(), []

        def __len__(self):
            return 18

        def __getitem__(self, idx):
            self.index_devices.add(idx.device)
            self.indices.append(idx.shape[0])
            return idx

    data = DeviceData()
    n_batches, batches = trainer._batches(data)
    list(batches)
    assert n_batches == 4 and data.indices == [4, 4, 4, 4]
    assert data.index_devices == {torch.device("meta")}


def test_a_time_budget_stops_after_the_last_epoch_that_fits_and_a_rerun_goes_on(workspace, monkeypatch, caplog):
    clock = itertools.count(0, 40)  # the EpochClock's clock: each reading 40 s after the last
    monkeypatch.setattr("ddim_denoise.training.guards.time", types.SimpleNamespace(perf_counter=lambda: float(next(clock))))
    params = with_train(workspace, epochs=5, val_every=10, max_minutes=2)
    summary = build_trainer(params).fit()
    # Budget 120 s: after epoch 1 (at least 80 s on this clock, as much again to come) no second epoch fits.
    assert summary["epochs"] == 1 and summary["stopped_early"].startswith("train.max_minutes=2 reached after epoch 1")
    assert np.isfinite(summary["best_val_psnr"])  # the last epoch was validated although val_every is 10
    assert "rerun the same command to go on" in caplog.text
    resumed = build_trainer(with_train(workspace, epochs=5, val_every=10)).fit()  # the budget is operational: resumes
    assert resumed["epochs"] == 5 and resumed["stopped_early"] is None
