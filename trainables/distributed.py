"""Trials that span several workers: the Tune trial starts a Ray Train `TorchTrainer` and waits for it.

The pattern of Ray's "Hyperparameter Tuning with Ray Tune" (Ray Train V2): a Tune function trainable builds a
`TorchTrainer(train_fn_per_worker, scaling_config, run_config)` and calls `fit()`; `TuneReportCallback` forwards
the workers' reports to Tune (a Trainer passed to `Tuner` is the deprecated API). What the pattern leaves to us:

- metrics: Tune gets rank 0's report only. Every rank computes the same numbers: training.data_parallel sums the
  train loss over ranks and gathers the validation logits of every rank's shard, so val_auc is the whole split's.
- the checkpoint: rank 0 writes the 1-process trial's folder (training.checkpoint_files: plain state dict, report
  files) and Ray Train stores it under its own run, `<trial dir>/train/checkpoint_*` (one kept). Tune gets no
  checkpoint, only its URI in the result (`checkpoint_path`, TuneReportCallback's key, with the storage's scheme
  added); the MLflow callback, analysis.sync and tune.py read it there (mlflow_runs.checkpoint_location), so the
  `medtune.checkpoint` tag, the export and the ensembles work as for any trial.
- resume: the Trainer's `RunConfig(name="train", storage_path=<the trial's own dir>)` is the same on every start of
  the trial, and Ray Train restores a run by (storage_path, name): a trial restarted by Tune (`max_failures`, or
  `tune.py --resume`) hands its workers its latest checkpoint and goes on from the next epoch.
- ASHA and the clock: a restarted Tune trial has no Tune checkpoint, so Tune would count its iterations and
  `time_total_s` from zero. Each report states `training_iteration` (the epoch) and `time_this_iter_s` (the
  trial's training seconds since the last report, plus, once after a restart, those before it, kept in the
  checkpoint), so epoch rungs, seconds rungs and MLflow's steps continue where the trial was.
- the gap: Ray Train saves a checkpoint before Tune's driver has processed its result, so a search killed in between
  resumes from an epoch Tune never saw. A restarted trial therefore first reports again every epoch its checkpoint
  holds (its `history`, flagged `REPLAYED`): ASHA records a rung once, the MLflow callback logs only the steps its
  run lacks, the progress lines stay quiet.
- a non-finite loss ends the trial with a failure result, never a retry, as a 1-process trial does.
- resources: the Tune trial itself asks for TUNE_SIDE (no CPU: it only waits), the workers for `per_worker`
  each (search_spaces.tuner.make_trainable); GPUs: nccl, else gloo on the CPU.
"""

from __future__ import annotations

import tempfile
import time

import ray
import ray.train
import ray.train.torch
import torch
from ray import tune
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback

from trainables.data.datasets import DatasetRef
from trainables.tracking.names import REPLAYED
from trainables.tracking.ranking import failure_result
from trainables.training.checkpoint import load_checkpoint
from trainables.training.checkpoint_files import write_epoch_checkpoint
from trainables.training.data_parallel import DataParallelRun
from trainables.training.epochs import iterate_epochs
from trainables.training.split_run import NonFiniteLoss

# The Tune trial of a data-parallel trial only starts the Trainer and waits: no CPU, so `workers` x 1 CPU fill a node
# (0.01 CPU would leave 2 workers of 1 CPU waiting forever on a 2-CPU node). A placement-group bundle needs one
# non-zero resource: 1 MiB of Ray's memory accounting.
TUNE_SIDE = {"cpu": 0, "memory": 1 << 20}
TRAIN_RUN = "train"  # the Trainer's run name, under the trial's own directory
CLOCK_KEY = "time_total_s"  # in a data-parallel checkpoint: the trial's training seconds up to it


class ReportToTune(TuneReportCallback):
    """TuneReportCallback, with the checkpoint's full URI (s3://, gs:// or a local path) as `checkpoint_path`:
    Ray's own value is the path inside the storage filesystem, without its scheme."""

    def after_report(self, run_context, metrics, checkpoint):
        metrics = metrics[0].copy()  # rank 0's
        if checkpoint:
            kind = getattr(checkpoint.filesystem, "type_name", "local")
            metrics[CHECKPOINT_PATH_KEY] = checkpoint.path if kind == "local" else f"{kind}://{checkpoint.path}"
        self._training_actor_item_queue.put(metrics)


def run_data_parallel(config: dict, dataset: DatasetRef, per_worker: dict) -> None:
    """The Tune side of a data-parallel trial: start (or restart) its Trainer and wait for it. Each rank opens the
    dataset by its reference (a read-only memory map of its node's cache): no image array goes through Ray."""
    use_gpu = per_worker.get("gpu", 0) > 0
    storage = tune.get_context().get_storage()
    trainer = ray.train.torch.TorchTrainer(
        train_worker,
        train_loop_config={"config": config, "dataset": dataset},
        torch_config=ray.train.torch.TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=config["workers"], use_gpu=use_gpu,
            resources_per_worker={"CPU": per_worker.get("cpu", 1.0), **({"GPU": per_worker["gpu"]} if use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=TRAIN_RUN, storage_path=storage.trial_fs_path, storage_filesystem=storage.storage_filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),  # it holds the best weights too
            callbacks=[ReportToTune()]),
    )
    try:
        trainer.fit()
    except ray.train.WorkerGroupError as error:
        diverged = [failure for failure in error.worker_failures.values() if _is_non_finite(failure)]
        if not diverged:
            raise
        # the same seed and checkpoint would diverge again: end the trial, never a retry
        tune.report(failure_result(config["metric"], NonFiniteLoss(_message(diverged[0]))))


def train_worker(loop_config: dict) -> None:
    """One rank: `iterate_epochs` with a DataParallelRun; every rank reports each epoch, rank 0 with the checkpoint."""
    config, dataset = loop_config["config"], loop_config["dataset"].open()
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            resume = load_checkpoint(directory)
    clock = TrialClock(resume.get(CLOCK_KEY, 0.0) if resume else 0.0)
    for past in resume["history"] if resume else ():  # every rank: a report is a barrier
        last = past is resume["history"][-1]
        ray.train.report({**past, "training_iteration": past["epoch"], REPLAYED: True,
                          "time_this_iter_s": clock.tell_before() if last else 0.0},
                         # a run that had finished: its final checkpoint again, so the trial's last result names it
                         checkpoint=checkpoint if last and resume["final"] and rank == 0 else None)
    if resume and resume["final"]:  # nothing left to train (its test metrics stay in the checkpoint's files)
        return
    gan_files: dict[str, bytes] = {}
    for epoch in iterate_epochs(config, dataset, resume, device=device, runner=DataParallelRun):
        total, this_report = clock.lap()
        metrics = {**epoch.metrics, "training_iteration": epoch.epoch, "time_this_iter_s": this_report}
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)
            continue
        with tempfile.TemporaryDirectory() as directory:
            gan_files = write_epoch_checkpoint(directory, epoch, dataset, gan_files, {**epoch.state, CLOCK_KEY: total})
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


class TrialClock:
    """The trial's training seconds: `before` (from its checkpoint) plus this start's; `lap` returns the total
    and what this start has not told Tune yet (Tune's own count starts at zero on every start of the trial)."""

    def __init__(self, before: float):
        self.total, self.told, self.last = before, 0.0, time.perf_counter()

    def tell_before(self) -> float:
        """The seconds before this start, told once (with the last epoch reported again from the checkpoint)."""
        untold, self.told = self.total - self.told, self.total
        return untold

    def lap(self) -> tuple[float, float]:
        now = time.perf_counter()
        self.total, self.last = self.total + now - self.last, now
        untold, self.told = self.total - self.told, self.total
        return self.total, untold


def _is_non_finite(failure: BaseException) -> bool:
    """A worker's NonFiniteLoss, as Ray hands it over (the exception itself, or wrapped with it as the cause)."""
    while failure is not None:
        if isinstance(failure, NonFiniteLoss) or "NonFiniteLoss" in type(failure).__name__:
            return True
        failure = failure.__cause__
    return False


def _message(failure: BaseException) -> str:
    lines = [line for line in str(failure).splitlines() if "Non-finite loss" in line]
    return lines[-1].split("NonFiniteLoss: ")[-1].strip() if lines else str(failure).strip().splitlines()[-1]
