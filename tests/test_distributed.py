"""Trials that span several workers (trainables/distributed.py, trainables/training/data_parallel.py).

Quick tests: the sharding, the keys and their checks, the checkpoint's location and clock, the CPU BatchNorm
conversion. Integration (one search, see `data_parallel_search`): a 2-worker trial on gloo, killed mid-run and
resumed, against the same trial on one process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from conftest import background_job, new_mlflow_store, toy_images
from torch import nn
from torch.utils.data import BatchSampler, RandomSampler

from search_spaces import parse_space
from trainables.config import resolve_config
from trainables.distributed import CLOCK_KEY, TrialClock
from trainables.errors import UserError
from trainables.tracking.mlflow_runs import checkpoint_location
from trainables.training.data_parallel import GlobalBatchNorm, RankShare, global_batchnorm
from trainables.training.epochs import train

REPO = Path(__file__).resolve().parents[1]


def test_rank_shares_are_the_one_process_batches_cut_in_equal_parts():
    def batches(rank, world):
        order = RandomSampler(range(70), generator=torch.Generator().manual_seed(5))
        return list(RankShare(BatchSampler(order, 16, drop_last=True), rank, world))

    whole = batches(0, 1)
    shares = [batches(rank, 2) for rank in range(2)]
    assert len(whole) == 4 and all(len(share) == len(whole) for share in shares)  # same steps on every rank
    for step, batch in enumerate(whole):
        assert shares[0][step] + shares[1][step] == batch  # disjoint, together the 1-process batch, in order
        assert len(shares[0][step]) == len(shares[1][step]) == 8  # batch_size / workers each


def test_a_batch_the_workers_cannot_share_evenly_is_refused_in_one_line():
    with pytest.raises(UserError, match="batch_size 30 is not divisible by workers 4.*multiple of 4"):
        resolve_config({"workers": 4, "batch_size": 30})
    space = {"description": "d", "dataset": "pneumoniamnist", "resources": {"workers": 4},
             "params": {"batch_size": {"choice": [32, 50]}}}
    with pytest.raises(UserError, match="params.batch_size: batch_size 50 is not divisible by workers 4"):
        parse_space(space, Path("s.yaml"))


def test_workers_come_from_the_space_resources_and_reach_every_trial():
    space = parse_space({"description": "d", "dataset": "pneumoniamnist",
                         "resources": {"workers": 4, "cpu": 2, "gpu": 1}}, Path("s.yaml"))
    assert space.base_config()["workers"] == 4 and (space.cpu, space.gpu) == (2, 1)
    assert parse_space(space.as_dict(), Path("s.yaml")).workers == 4  # the state file keeps it for --resume
    one = parse_space({"description": "d", "dataset": "pneumoniamnist"}, Path("s.yaml"))
    assert "workers" not in one.base_config() and "workers" not in one.as_dict()["resources"]  # as before
    with pytest.raises(UserError, match="fixed.workers: is set by the space's own keys.*resources.workers"):
        parse_space({"description": "d", "dataset": "pneumoniamnist", "fixed": {"workers": 2}}, Path("s.yaml"))


def test_workers_that_cannot_all_fit_in_the_cluster_are_refused_before_the_search_waits_for_them():
    from search_spaces.tuner import check_workers_fit

    def space(workers, cpu, gpu=0):
        return parse_space({"description": "d", "dataset": "pneumoniamnist",
                            "resources": {"workers": workers, "cpu": cpu, "gpu": gpu}}, Path("s.yaml"))

    check_workers_fit(space(2, 1), {"CPU": 2.0}, gpu=0)  # 2 gloo workers on 2 cores: the Tune side asks no CPU
    with pytest.raises(UserError, match="4 workers x 1 CPUs needs 4 CPUs, the Ray cluster has 2"):
        check_workers_fit(space(4, 1), {"CPU": 2.0}, gpu=0)
    with pytest.raises(UserError, match="4 workers x 1 GPUs needs 4 GPUs.*has 2"):
        check_workers_fit(space(4, 1, 1), {"CPU": 32.0, "GPU": 2.0}, gpu=1)
    check_workers_fit(space(4, 1, 1), {"CPU": 32.0}, gpu=0)  # no GPU in the cluster: the workers fall back to CPUs


def test_a_trial_outside_ray_refuses_several_workers(toy):
    with pytest.raises(UserError, match="workers 2 needs Ray Train"):
        train({"workers": 2, "model": "simple_cnn"}, toy())


def test_a_data_parallel_trial_s_checkpoint_is_found_in_its_last_result():
    uri = "s3://bucket/medtune/search/trial_1/train/checkpoint_2026"
    assert checkpoint_location(None, {"checkpoint_path": uri}) == uri
    assert checkpoint_location(None, {"val_auc": 0.9}) is None  # never saved one


def test_the_trial_clock_goes_on_from_its_checkpoint_after_a_restart():
    clock = TrialClock(before=100.0)  # the checkpoint's CLOCK_KEY; Tune's own count restarts at zero
    total, told = clock.lap()
    assert total >= 100.0 and told == pytest.approx(total)  # Tune's time_total_s after the first report: the total
    time.sleep(0.01)
    total2, told2 = clock.lap()
    assert told2 == pytest.approx(total2 - total) and told2 > 0
    assert CLOCK_KEY == "time_total_s"


def test_cpu_batchnorm_sync_keeps_the_state_dict_and_refuses_what_it_cannot_sync():
    from timm.layers import BatchNormAct2d

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm1d(4)))
    keys = list(model.state_dict())
    converted = global_batchnorm(model, "m")
    assert isinstance(converted[1], GlobalBatchNorm) and isinstance(converted[2][0], GlobalBatchNorm)
    assert list(converted.state_dict()) == keys  # a checkpoint loads into the plain model, as export does
    x = torch.randn(6, 4, 5, 5)
    plain = nn.BatchNorm2d(4)
    plain.load_state_dict(converted[1].state_dict())
    assert torch.allclose(converted[1](x), plain(x))  # one process: BatchNorm itself
    with pytest.raises(UserError, match="sync_batchnorm on the CPU.*BatchNormAct2d.*sync_batchnorm: false"):
        global_batchnorm(nn.Sequential(BatchNormAct2d(4)), "densenet121")


# --- integration: one data-parallel search, killed and resumed ------------------------------------------

TRIAL = {"model": "resnet18", "stem": "imagenet", "image_size": 16, "optimizer": "sgd", "lr": 0.05,
         "batch_size": 32, "drop_rate": 0.0, "sync_batchnorm": True}
EPOCHS = 3


def space_file(folder: Path) -> str:
    """One 2-worker trial of TRIAL on the image folder, every epoch trained (no ASHA)."""
    return yaml.safe_dump({"description": "one data-parallel trial", "dataset": f"imagefolder:{folder}",
                           "num_samples": 1, "max_concurrent": 1, "max_failures": 0,
                           "scheduler": {"kind": "fifo", "max_t": EPOCHS},
                           "resources": {"workers": 2, "cpu": 1, "gpu": 0}, "fixed": TRIAL})


def write_toy_folder(root: Path, count: int = 240) -> Path:
    """A two-class image folder of learnable 16 px images (conftest.toy_images), as a user's data arrives."""
    from PIL import Image

    labels = np.random.default_rng(0).integers(0, 2, count)
    for number, (image, label) in enumerate(zip(toy_images(labels, size=16), labels)):
        folder = root / ("normal", "abnormal")[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[..., 0]).save(folder / f"{number:03d}.png")
    return root


@background_job(needs_data=False)
def data_parallel_search(started, tmp: Path) -> SimpleNamespace:
    """`tune.py` on a 2-worker trial (gloo, 2 CPUs), SIGKILLed with its Ray once the trial reported epoch 1, then
    `--resume`d. Cost: two tune.py starts and Ray Train's 2-worker group twice, 3 epochs of ResNet-18 at 16 px on
    192 images: about 60 s on 2 quiet cores."""
    folder = write_toy_folder(tmp / "images")
    (tmp / "space.yaml").write_text(space_file(folder))
    new_mlflow_store(started, tmp / "mlflow.db")
    env = {**started.env, "MEDTUNE_CACHE_DIR": str(tmp / "cache")}
    common = ["--storage", str(tmp / "results"), "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--no-report"]
    driver = started.popen([sys.executable, str(REPO / "tune.py"), "--space", str(tmp / "space.yaml"), "--name", "ddp",
                            *common], cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline, seen = time.time() + 600, []
    for line in driver.stdout:
        seen.append(line)
        if "epoch 1/" in line or time.time() > deadline:
            break
    os.killpg(driver.pid, signal.SIGKILL)  # the driver, its Ray and the trial's two workers
    driver.wait()
    resumed = started.run([sys.executable, str(REPO / "tune.py"), "--resume", "ddp", *common], cwd=tmp, env=env,
                          timeout=900)
    return SimpleNamespace(tmp=tmp, folder=folder, before_the_kill="".join(seen), resumed=resumed)


@pytest.fixture(scope="module")
def resumed_search(data_parallel_search):
    import mlflow

    search = data_parallel_search
    assert "epoch 1/" in search.before_the_kill, search.before_the_kill[-3000:]
    assert search.resumed.returncode == 0, search.resumed.stdout[-3000:] + search.resumed.stderr[-3000:]
    client = mlflow.MlflowClient(f"sqlite:///{search.tmp / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=100)
    trials = [run for run in runs if run.data.tags.get("medtune.role") == "trial"]
    return SimpleNamespace(**vars(search), client=client, trials=trials)


def curve(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.mark.integration
def test_a_killed_data_parallel_trial_resumes_from_its_checkpoint_in_one_mlflow_run(resumed_search):
    (run,) = resumed_search.trials  # one run for the trial, not one per worker
    assert run.info.status == "FINISHED" and run.data.tags["medtune.outcome"] == "completed"
    assert run.data.params["workers"] == "2"
    # each epoch reported once: the resumed trial went on from its checkpoint instead of starting over
    assert [step for step, _ in curve(resumed_search.client, run.info.run_id, "epoch")] == list(range(1, EPOCHS + 1))
    times = [value for _, value in curve(resumed_search.client, run.info.run_id, "time_total_s")]
    assert times == sorted(times)  # the trial's clock went on across the kill (ASHA's seconds rungs read it)


@pytest.mark.integration
def test_a_data_parallel_checkpoint_loads_into_the_plain_model_as_export_reads_it(resumed_search):
    from trainables.data.datasets import load_dataset
    from trainables.training.checkpoint import best_weights, load_checkpoint
    from trainables.training.split_run import build_model

    (run,) = resumed_search.trials
    location = run.data.tags["medtune.checkpoint"]
    assert "/train/checkpoint_" in location  # Ray Train's, under the trial's own directory
    state = load_checkpoint(location)
    assert state["final"] and not any(key.startswith("module.") for key in state["model"])
    os.environ["MEDTUNE_CACHE_DIR"] = str(resumed_search.tmp / "cache")
    try:
        dataset = load_dataset(f"imagefolder:{resumed_search.folder}", image_size=16)
    finally:
        os.environ.pop("MEDTUNE_CACHE_DIR")
    build_model(state["config"], dataset).load_state_dict(best_weights(state))  # strict: BatchNorm's own keys
    assert (Path(location) / "test_predictions.npz").exists()  # the report files of a 1-process trial's folder


@pytest.mark.integration
def test_two_workers_with_sync_batchnorm_repeat_the_one_worker_validation_curve(resumed_search):
    """The same seed, global batch 32 (16 per worker), no augmentation, no dropout, SGD: the 2-worker trial sees the
    1-process batches (RankShare), its BatchNorm the global batch's statistics and its gradient the global mean, so
    only the order of float sums differs (the gradient all-reduce, BatchNorm's two-pass sums over ranks).
    Tolerance, stated before this test first ran: 1e-3 on val_loss and train_loss (values 0.004-0.7), 0.02 on
    val_auc (20 validation images: one swapped pair of near-equal scores moves AUC by ~0.01). Where it comes from:
    two scratch runs of this very trial before the test was written differed from one process by at most 6e-5
    (torch.multiprocessing + gloo) and 3e-5 (this search) on val_loss, when the one process also ran on 1 thread as
    each 1-CPU Ray worker does; on 2 threads the one process itself moves by 1e-2 (lr 0.05 amplifies the order of
    float sums), so the reference runs on 1 thread. A 16-row BatchNorm per worker (sync_batchnorm off) changes the
    statistics themselves, not their rounding. Adam is left out on purpose: it divides by the gradient's own size,
    so float noise in near-zero gradients becomes lr-sized steps, a drift that is not the data-parallel arithmetic."""
    from trainables.data.datasets import load_dataset

    (run,) = resumed_search.trials
    os.environ["MEDTUNE_CACHE_DIR"], threads = str(resumed_search.tmp / "cache"), torch.get_num_threads()
    try:
        dataset = load_dataset(f"imagefolder:{resumed_search.folder}", image_size=16)
        torch.set_num_threads(1)  # as each worker (1 CPU: Ray sets OMP_NUM_THREADS=1)
        one = []
        train({**TRIAL, "dataset": f"imagefolder:{resumed_search.folder}", "epochs": EPOCHS}, dataset, one.append)
    finally:
        os.environ.pop("MEDTUNE_CACHE_DIR")
        torch.set_num_threads(threads)
    for key, tolerance in (("val_loss", 1e-3), ("train_loss", 1e-3), ("val_auc", 0.02)):
        two = [value for _, value in curve(resumed_search.client, run.info.run_id, key)]
        assert len(two) == EPOCHS
        assert np.abs(np.array(two) - [m[key] for m in one]).max() <= tolerance, (key, two, [m[key] for m in one])


@pytest.mark.integration
def test_the_export_ships_a_data_parallel_winner_and_replays_its_test_metrics(resumed_search, capsys):
    """analysis.export on the search: it reads the winner's checkpoint by its tag, replays it on one CPU process and
    exits 1 unless the replay reproduces the logged test metrics (README: accuracy exact, AUC to 1e-6 here)."""
    from analysis import export

    out = resumed_search.tmp / "export"
    os.environ["MEDTUNE_CACHE_DIR"] = str(resumed_search.tmp / "cache")
    try:
        code = export.main(["--robustness-images", "32",
                            "--search", "ddp", "--tracking-uri", f"sqlite:///{resumed_search.tmp / 'mlflow.db'}",
                            "--out", str(out), "--n-resamples", "200", "--ensemble", "1"])
    finally:
        os.environ.pop("MEDTUNE_CACHE_DIR")
    printed = capsys.readouterr()
    assert code == 0, printed.out[-3000:] + printed.err[-3000:]
    assert (out / "model.safetensors").exists() and (out / "model.json").exists()
