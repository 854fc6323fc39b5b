"""Data-parallel training (DDP) on this CPU: gloo, two processes, started by torchrun or torch.multiprocessing.

What must hold: two processes with half the batch each learn like one process with the whole batch; DDP keeps the
ranks' weights identical; the run has one MLflow run and one set of checkpoints; a checkpoint written by N
processes resumes on M.
"""

from __future__ import annotations

import itertools
import os
import shutil
import time
from pathlib import Path

import mlflow
import pytest
import torch
import torch.multiprocessing as mp
from cli_workspace import TRAIN_IMAGES, cli, free_port, make_workspace, process_env, run, summary, with_train

from ddim_denoise.core.precond import DenoisingLoss
from ddim_denoise.pipeline.checkpoint import load_checkpoint
from ddim_denoise.training import build as build_module
from ddim_denoise.training import distributed
from ddim_denoise.training import resume as resume_module
from ddim_denoise.training.build import build_trainer
from ddim_denoise.training.distributed import Launch, LaunchError, launch_from_env, rank_device
from ddim_denoise.training.trainer import Trainer

GLOBAL_BATCH, EPOCHS, WORLD = 8, 20, 2
NOISE_DRAWS = 8
CURVE_TOLERANCE = 0.15  # relative gap allowed between the final losses of the 1- and 2-process runs
RANKS_TIMEOUT_S = 180  # a rank waiting on a collective that never comes must fail the test, not hang it
CHECKPOINT_SET = {"last.pt", "best.pt", *(f"epoch_{e:04d}.pt" for e in range(1, EPOCHS + 1))}


# --- reading torchrun's environment ----------------------------------------------------------------------------------
def test_plain_process_is_rank_0_of_1():
    assert launch_from_env({}) == Launch(0, 1, 0) and not Launch().distributed


def test_torchrun_environment_is_read():
    assert launch_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Launch(3, 4, 1)


@pytest.mark.parametrize("env, message", [
    ({"RANK": "0", "WORLD_SIZE": "2"}, "LOCAL_RANK not"),
    ({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "must be integers"),
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "inconsistent"),
])
def test_broken_torchrun_environment_is_refused(env, message):
    with pytest.raises(LaunchError, match=message):
        launch_from_env(env)


def test_each_process_takes_the_gpu_at_its_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert rank_device("auto", Launch(3, 4, 1)) == "cuda:1"
    assert rank_device("cuda", Launch(0, 4, 0)) == "cuda:0"
    assert rank_device("cpu", Launch(3, 4, 1)) == "cpu"
    assert rank_device("cuda:1", Launch()) == "cuda:1"  # one process: train.device as given
    with pytest.raises(LaunchError, match="at most 2 processes per machine"):
        rank_device("auto", Launch(2, 4, 2))
    with pytest.raises(LaunchError, match="all 4 processes on one device"):
        rank_device("cuda:1", Launch(0, 4, 0))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert rank_device("auto", Launch(1, 2, 1)) == "cpu"


def test_nproc_per_node_inside_torchrun_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LaunchError, match="already running under torchrun"):
        distributed.relaunch_with_torchrun(2, ["train"])


# --- real processes --------------------------------------------------------------------------------------------------
@pytest.fixture
def workspace(tmp_path, tiny_params, monkeypatch):
    """A project folder with learnable images, also this test's working folder; runs write models/ and training/."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = make_workspace(tmp_path, tiny_params, {"train.epochs": EPOCHS, "train.val_every": EPOCHS,
                                                    "train.lr": 3e-3}, learnable=True)
    return tmp_path, params


def fixed_noise_loss(params, model_state: dict | None) -> float:
    """The training loss of the given weights (fresh ones for None) on every training image, averaged over
    ``NOISE_DRAWS`` fixed draws of noise levels and noise: the same yardstick for every model."""
    probe = build_trainer(with_train(params, resume="never", out_dir="probe"))
    if model_state is not None:
        probe.model.load_state_dict(model_state)
    probe.model.eval()
    x0 = probe._batch_to_model_scale(probe.train_images.epoch_images(0))
    with torch.no_grad():
        return sum(probe.loss_fn(probe.model, x0, torch.Generator().manual_seed(draw)).item()
                   for draw in range(NOISE_DRAWS)) / NOISE_DRAWS


def test_two_processes_learn_like_one_with_the_same_global_batch(workspace):
    root, params = workspace
    uri = f"sqlite:///{root / 'mlflow.db'}"
    env = process_env(uri)
    one = run(cli("train", "-S", f"train.batch_size={GLOBAL_BATCH}", "-S", "train.out_dir=models_1"), root, env)
    assert one.returncode == 0, one.stderr
    one_summary = summary(root)
    # `train --nproc-per-node 2` runs `torchrun --standalone --nproc-per-node 2 -m ddim_denoise.cli train ...`.
    two = run(cli("train", "--nproc-per-node", str(WORLD), "-S", f"train.batch_size={GLOBAL_BATCH // WORLD}",
                  "-S", "train.out_dir=models_2"), root, env)
    assert two.returncode == 0, two.stderr
    two_summary = summary(root)

    steps = EPOCHS * TRAIN_IMAGES // GLOBAL_BATCH
    assert one_summary["world_size"] == 1 and two_summary["world_size"] == WORLD
    assert one_summary["steps"] == two_summary["steps"] == steps
    assert two_summary["train_images_seen"] == one_summary["train_images_seen"] == steps * GLOBAL_BATCH
    # Rank 0 alone wrote: one checkpoint set, one summary line printed, one MLflow run with every step's loss.
    assert {p.name for p in (root / "models_2").iterdir()} == CHECKPOINT_SET
    assert two.stdout.count("trained ") == 1
    client = mlflow.MlflowClient(uri)
    runs = {run.info.run_id: run for run in client.search_runs(
        [client.get_experiment_by_name(params.mlflow.experiment).experiment_id])}
    assert set(runs) == {one_summary["mlflow_run_id"], two_summary["mlflow_run_id"]}
    two_run = runs[two_summary["mlflow_run_id"]]
    assert two_run.info.status == "FINISHED" and two_run.data.params["train.batch_size"] == str(GLOBAL_BATCH // WORLD)
    two_losses = [m.value for m in client.get_metric_history(two_run.info.run_id, "train_loss")]
    one_losses = [m.value for m in client.get_metric_history(one_summary["mlflow_run_id"], "train_loss")]
    assert len(two_losses) == len(one_losses) == steps

    # Same images per step, other noise draws: the two curves agree, and both learned.
    before = fixed_noise_loss(params, None)
    after_one = fixed_noise_loss(params, load_checkpoint(root / "models_1" / "last.pt")["model"])
    after_two = fixed_noise_loss(params, load_checkpoint(root / "models_2" / "last.pt")["model"])
    print(f"\nfixed-noise loss before {before:.4f}; after {steps} steps: 1 process x batch {GLOBAL_BATCH} "
          f"{after_one:.4f}, {WORLD} processes x batch {GLOBAL_BATCH // WORLD} {after_two:.4f}; last-epoch mean "
          f"logged loss {sum(one_losses[-4:]) / 4:.4f} vs {sum(two_losses[-4:]) / 4:.4f}")
    assert after_one < 0.6 * before and after_two < 0.6 * before
    # One process with five other noise streams ends at 0.64..0.72 (mean 0.69) from 1.29: a gap within
    # CURVE_TOLERANCE is what other noise draws alone give.
    assert abs(after_two - after_one) < CURVE_TOLERANCE * after_one


# --- ranks in this test's own processes (torch.multiprocessing) -------------------------------------------------------
def _rank_main(rank: int, world: int, port: int, params, nonfinite_steps_on_rank_1: frozenset[int]) -> None:
    """One rank, set up the way torchrun sets it up, through the same entry point as `ddim-denoise train`; it
    saves the weights it ends with, to compare across ranks. Only rank 0 may read a checkpoint (the others get its
    state over the process group); rank 1's loss is NaN at the given steps, as if its half of the batch overflowed."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    if rank != 0:
        build_module.load_checkpoint = resume_module.load_checkpoint = _only_rank_0_reads_checkpoints
    if rank == 1:
        loss_of_batch, step = DenoisingLoss.__call__, itertools.count()

        def nan_at_some_steps(*args, **kwargs):
            loss = loss_of_batch(*args, **kwargs)
            return loss * float("nan") if next(step) in nonfinite_steps_on_rank_1 else loss

        DenoisingLoss.__call__ = nan_at_some_steps
    finish = Trainer.fit

    def fit_and_keep_weights(trainer):
        result = finish(trainer)
        torch.save(trainer.model.state_dict(), f"weights_rank{trainer.rank}.pt")
        from torch._dynamo.utils import counters  # graphs torch.compile captured in this rank's process

        Path(f"compiled_graphs_rank{trainer.rank}.txt").write_text(str(counters["stats"]["unique_graphs"]))
        return result

    Trainer.fit = fit_and_keep_weights
    distributed.train_as_launched(params)


def _only_rank_0_reads_checkpoints(path, *args, **kwargs):
    raise AssertionError(f"a rank other than 0 read {path}")


def run_ranks(world: int, params, nonfinite_steps_on_rank_1: frozenset[int] = frozenset()) -> None:
    """Run ``world`` ranks of a training; fail (never hang) if one fails or they do not finish in time."""
    context = mp.start_processes(_rank_main, args=(world, free_port(), params, nonfinite_steps_on_rank_1),
                                 nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + RANKS_TIMEOUT_S
    try:
        while not context.join(timeout=1):
            assert time.monotonic() < deadline, f"{world} ranks did not finish in {RANKS_TIMEOUT_S} s"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


def assert_ranks_hold_identical_weights(world: int) -> dict:
    weights = [torch.load(f"weights_rank{rank}.pt") for rank in range(world)]
    for key in weights[0]:
        assert all(torch.equal(weights[0][key], other[key]) for other in weights[1:]), key
    return weights[0]


def test_ranks_stay_identical_and_checkpoints_move_between_world_sizes(workspace):
    root, params = workspace
    per_rank = with_train(params, batch_size=GLOBAL_BATCH // WORLD, epochs=3)
    steps_per_epoch = {1: TRAIN_IMAGES // (GLOBAL_BATCH // WORLD), WORLD: TRAIN_IMAGES // GLOBAL_BATCH}

    # Two ranks from scratch: DDP averages the gradients, so both ranks take identical steps; a step whose loss is
    # non-finite on one rank only is skipped by both (else they would part ways, or deadlock).
    skipped = frozenset({2, 5})
    run_ranks(WORLD, with_train(per_rank, out_dir="two"), nonfinite_steps_on_rank_1=skipped)
    final = assert_ranks_hold_identical_weights(WORLD)
    written = load_checkpoint("two/last.pt")
    assert all(torch.equal(final[k], written["model"][k]) for k in final)
    assert written["step"] == 3 * steps_per_epoch[WORLD] and written["nonfinite_steps"] == len(skipped)

    # N -> M: the 2-rank checkpoint after epoch 1 resumes in one process, continuing the step count and MLflow run;
    # its LR goes on as an uninterrupted 1-process run's does (the schedule follows epochs, not the step count).
    shutil.copytree("two", "one_from_two", ignore=lambda folder, names: [n for n in names if n != "epoch_0001.pt"])
    os.replace("one_from_two/epoch_0001.pt", "one_from_two/last.pt")
    resumed = build_trainer(with_train(per_rank, out_dir="one_from_two"))
    result = resumed.fit()
    assert result["steps"] == steps_per_epoch[WORLD] + 2 * steps_per_epoch[1]
    assert result["mlflow_run_id"] == written["mlflow_run_id"]
    logged = [int(step) for step, *_ in resumed.history.steps]  # every step but the skipped ones, none twice
    assert logged == sorted(set(logged)) and len(logged) == result["steps"] - result["nonfinite_steps"]
    assert result["nonfinite_steps"] == 1  # the skipped step of the 2-rank epoch 1 is remembered

    uninterrupted = build_trainer(with_train(per_rank, out_dir="one"))
    uninterrupted.fit()
    assert lrs_of_epochs(resumed.history.steps, {2, 3}) == lrs_of_epochs(uninterrupted.history.steps, {2, 3})

    # M -> N: a 1-process checkpoint after epoch 1 resumes on 2 ranks; rank 1 gets rank 0's state over the wire.
    shutil.copytree("one", "two_from_one", ignore=lambda folder, names: [n for n in names if n != "epoch_0001.pt"])
    os.replace("two_from_one/epoch_0001.pt", "two_from_one/last.pt")
    run_ranks(WORLD, with_train(per_rank, out_dir="two_from_one"))
    assert_ranks_hold_identical_weights(WORLD)
    two_from_one = load_checkpoint("two_from_one/last.pt")
    assert two_from_one["step"] == steps_per_epoch[1] + 2 * steps_per_epoch[WORLD]
    # Its LR schedule ends where the 2-rank run's from scratch ended, not one 1-process epoch's steps beyond it.
    assert two_from_one["scheduler"]["last_epoch"] == written["scheduler"]["last_epoch"] == 3 * steps_per_epoch[WORLD]
    assert two_from_one["history"]["steps"][-1][3] == written["history"]["steps"][-1][3]


def lrs_of_epochs(steps: list, epochs: set[int]) -> list[float]:
    """The logged LR of each step of the given epochs (history rows: step, epoch, loss, lr)."""
    return [lr for _, epoch, _, lr in steps if epoch in epochs]


def compiled_graphs(rank: int) -> int:
    return int(Path(f"compiled_graphs_rank{rank}.txt").read_text())


def test_compiled_ranks_take_the_eager_ranks_steps(workspace):
    """torch.compile of the DDP-wrapped model, as on a multi-GPU box with train.compile: auto, here with Inductor's
    CPU backend and params' train.inductor settings: the ranks stay identical, take the eager ranks' steps up to
    float reassociation, and write a checkpoint that loads into a plain model."""
    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("torch.compile's CPU backend needs a C compiler (cc); none is on PATH")
    root, params = workspace
    per_rank = with_train(params, batch_size=GLOBAL_BATCH // WORLD, epochs=2)
    run_ranks(WORLD, with_train(per_rank, compile=True, out_dir="compiled"))
    compiled = assert_ranks_hold_identical_weights(WORLD)
    assert all(compiled_graphs(rank) > 0 for rank in range(WORLD))  # else "the same steps" would prove nothing
    run_ranks(WORLD, with_train(per_rank, compile=False, out_dir="eager"))
    eager = assert_ranks_hold_identical_weights(WORLD)
    assert all(compiled_graphs(rank) == 0 for rank in range(WORLD))

    written = load_checkpoint("compiled/last.pt")
    assert set(written["model"]) == set(eager)  # no '_orig_mod.' or 'module.' prefixes
    assert written["step"] == 2 * TRAIN_IMAGES // GLOBAL_BATCH
    moved = max((compiled[k] - eager[k]).abs().max().item() for k in eager if eager[k].is_floating_point())
    # Measured: at most 2.4e-4 (weights of magnitude up to ~0.1) after these 8 steps; the steps themselves move
    # weights by ~lr = 3e-3 each, so a compiled step that differed would show far above this bound.
    assert moved < 1e-3, moved
