"""One train/validation split's training: its data and loaders, model, optimiser, schedule and best weights.

`SplitRun` steps one epoch at a time; `training.epochs.iterate_epochs` drives one of them (a single split) or K
in lockstep (cross-validation). The building blocks (`train_one_epoch`, `evaluate`, `eval_loader`, `build_model`)
are what `analysis/` replays a trial with.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler, StepLRScheduler
from torch.utils.data import BatchSampler, DataLoader, RandomSampler
from torch.utils.data import Dataset as TorchDataset

from trainables.augment.batched import BatchAugment, DeviceInputs, build_batch_augment, split_names, use_batched
from trainables.augment.per_sample import build_minority_transform, build_train_transform, minority_copies
from trainables.augment.synthetic import SyntheticImages, synthetic_training_images
from trainables.data.datasets import Dataset, ImageSet
from trainables.data.normalization import HALF, Normalization, resolve_normalization
from trainables.data.sampling import build_sampler
from trainables.errors import UserError
from trainables.models import create_model, model_costs, resolve_stem
from trainables.training.checkpoint import BEFORE_KEYS_EXISTED, best_weights
from trainables.training.losses import build_loss
from trainables.training.metrics import classification_metrics, probabilities

EXAMPLES = 16  # augmented training images shown in the final checkpoint's figure
FINITE_CHECK_STEPS = 50  # steps between host reads of the loss's finiteness (a GPU keeps queueing in between)


class ArrayDataset(TorchDataset):
    """uint8 NHWC images -> normalised float CHW tensors; rows from `extra_index` (minority copies) get
    `extra_transform` first, every row `transform`, then `normalization`."""

    def __init__(self, images: ImageSet, transform=None, extra_index=None, extra_transform=None, *,
                 normalization: Normalization = HALF):
        self.images, self.labels = images.images, images.labels
        self.index = np.arange(len(images)) if extra_index is None else np.r_[np.arange(len(images)), extra_index]
        self.first_extra = len(images)
        self.transform, self.extra_transform = transform, extra_transform
        self.normalization = normalization

    def __len__(self):
        return len(self.index)

    def augmented(self, position: int) -> torch.Tensor:
        """The uint8 CHW image of `position` as the model sees it, before normalisation."""
        image = torch.from_numpy(np.ascontiguousarray(self.images[self.index[position]])).permute(2, 0, 1)
        if position >= self.first_extra and self.extra_transform is not None:
            image = self.extra_transform(image)
        if self.transform is not None:
            image = self.transform(image)
        return image

    def __getitem__(self, position):
        return self.normalization(self.augmented(position)), torch.as_tensor(self.labels[self.index[position]])

    def raw_batch(self, positions: np.ndarray) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """((uint8 NCHW images after the per-sample `transform` only, copy flags), labels) of `positions`:
        one fancy index per batch, for augmentation on the device (batch_augment.py)."""
        positions = np.asarray(positions, dtype=np.int64)
        rows = self.index[positions]
        images = torch.from_numpy(np.ascontiguousarray(self.images[rows])).permute(0, 3, 1, 2)
        if self.transform is not None:  # AutoAugment: no batched equivalent
            images = torch.stack([self.transform(image) for image in images])
        copy = torch.from_numpy(positions >= self.first_extra)
        return (images.contiguous(), copy), torch.as_tensor(self.labels[rows])


class BatchView(TorchDataset):
    """An ArrayDataset read a whole batch at a time (its sampler yields lists of positions)."""

    def __init__(self, data: ArrayDataset):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, positions):
        return self.data.raw_batch(positions)


@dataclass
class Epoch:
    """What one epoch produced: the metrics to report and the state to checkpoint."""

    epoch: int
    metrics: dict
    state: dict
    final: bool = False
    test_labels: np.ndarray | None = None  # only on the final epoch
    test_probs: np.ndarray | None = None
    history: list = field(default_factory=list)
    train_examples: dict | None = None  # final epoch: augmented training images ("images", "labels", "copy")
    split_labels: dict | None = None  # final epoch: the labels of each split, for the class distribution
    synthetic: dict | None = None  # every epoch, with synthetic_pct: the GAN's samples, losses and summary
    # every epoch of a single-split trial: the best weights' validation predictions so far ({"index" into the
    # development pool, "labels", "logits", "epoch"}); on the final epoch those of the weights that scored test
    val_predictions: dict | None = None


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("device: cuda was asked for but no CUDA GPU is visible; use device: auto or cpu")
    return torch.device("cuda" if choice in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast: asked for, or `auto` on a CUDA GPU that has it (CPU autocast is the same code path)."""
    if precision == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return precision == "bf16"


def seed_everything(seed: int) -> None:
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_determinism(deterministic: bool) -> None:
    """The trial's GPU kernels, chosen where it starts (never at import: the flags are the whole process's).
    Deterministic: cuDNN's and cuBLAS's deterministic kernels, as PyTorch's reproducibility notes ask, so a resumed
    trial repeats an uninterrupted one; an operation with no deterministic kernel warns instead of failing. Else
    cudnn.benchmark times the kernels and keeps the fastest, which may differ from run to run."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS gets its workspace
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def build_schedule(config: dict, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """Linear warm-up over `warmup_frac` of all steps then cosine to zero (`cosine`) or flat (`constant`);
    step decay (`step`); None for a constant rate without warm-up."""
    total = config["epochs"] * steps_per_epoch
    warmup = int(round(config["warmup_frac"] * total))
    if config["schedule"] == "cosine":
        return CosineLRScheduler(optimizer, t_initial=max(total - warmup, 1), warmup_t=warmup, warmup_prefix=True,
                                 warmup_lr_init=config["lr"] * 1e-3, lr_min=0.0, t_in_epochs=False)
    if config["schedule"] == "constant" and warmup > 0:  # decay_rate 1: the rate stays at lr after the warm-up
        return StepLRScheduler(optimizer, decay_t=total + 1, decay_rate=1.0, warmup_t=warmup, warmup_prefix=True,
                               warmup_lr_init=config["lr"] * 1e-3, t_in_epochs=False)
    if config["schedule"] == "step":
        # timm decays once t + 1 reaches a milestone, and the loop calls step_update(k) before step k + 1:
        # +1 makes the first step after the milestone epoch the first one at the lower rate.
        milestones = [int(round(m * config["epochs"])) * steps_per_epoch + 1 for m in config["step_milestones"]]
        return MultiStepLRScheduler(optimizer, decay_t=milestones, decay_rate=config["step_gamma"], t_in_epochs=False)
    return None


def build_optimizer(config: dict, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=config["lr"], momentum=config["momentum"], weight_decay=config["weight_decay"])
    cls = torch.optim.AdamW if config["optimizer"] == "adamw" else torch.optim.Adam
    return cls(params, lr=config["lr"], weight_decay=config["weight_decay"])


def _targets(labels: torch.Tensor, task: str) -> torch.Tensor:
    return labels.float() if task == "multilabel" else labels.long()


def model_inputs(inputs, device: torch.device, prepare: Callable | None = None) -> torch.Tensor:
    """A loader batch on `device`, as the model takes it: already normalised (per-sample path), or
    `prepare(uint8 images, copy flags)` there (batched augmentation on the device)."""
    if prepare is None:
        return inputs.to(device, non_blocking=True)
    return prepare(*(part.to(device, non_blocking=True) for part in inputs))


class NonFiniteLoss(FloatingPointError):
    """The loss diverged. Deterministic: the same seed and checkpoint diverge again, so a retry only repeats it."""


def train_one_epoch(model, criterion, optimizer, schedule, loader, device, task, step: int,
                    amp: bool, prepare: Callable | None = None) -> tuple[float, int, np.ndarray, np.ndarray]:
    """One pass over `loader`; returns (mean loss, global step, the pass's own logits and labels, for the
    train-split metrics without a second pass). A non-finite loss fails the trial.

    Nothing is read back to the host per step (no `.item()`, `.cpu()` or `if` on a device value): the loss sum,
    the logits and the finiteness flag stay on the device and are read every FINITE_CHECK_STEPS steps and at the
    end, as timm's and torchvision's reference loops do, so a GPU's queue never stalls on a step."""
    model.train()
    total = torch.zeros((), device=device)
    finite = torch.ones((), dtype=torch.bool, device=device)
    seen, checked, all_logits, all_labels = 0, step, [], []
    for inputs, batch_labels in loader:
        images = model_inputs(inputs, device, prepare)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        labels = _targets(batch_labels.to(device, non_blocking=True), task)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(images)
            loss = criterion(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if schedule is not None:
            schedule.step_update(step)
        finite &= torch.isfinite(loss.detach())
        total += loss.detach().float() * len(batch_labels)
        seen += len(batch_labels)
        all_logits.append(logits.detach().float())
        all_labels.append(batch_labels)
        if step - checked >= FINITE_CHECK_STEPS:
            _fail_if_not_finite(finite, checked, step)
            checked = step
    _fail_if_not_finite(finite, checked, step)
    return total.item() / max(seen, 1), step, torch.cat(all_logits).cpu().numpy(), torch.cat(all_labels).numpy()


def _fail_if_not_finite(finite: torch.Tensor, first: int, last: int) -> None:
    if not bool(finite):  # the one host read of the flag
        raise NonFiniteLoss(f"Non-finite loss between steps {first + 1} and {last}; lower lr or check the data")


@torch.inference_mode()
def predict_logits(model, loader, device, amp: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels for a whole split, without autograd."""
    model.eval()
    logits, labels = [], []
    for images, batch_labels in loader:
        images = images.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits.append(model(images).float().cpu())
        labels.append(batch_labels)
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def evaluate(model, criterion, loader, device, task, class_names, amp: bool = False) -> tuple[dict, np.ndarray, np.ndarray]:
    """(metrics incl. loss, labels, logits) for one split (logits: what a temperature is fitted on later)."""
    logits, labels = predict_logits(model, loader, device, amp)
    return split_metrics(criterion, task, class_names, logits, labels), labels, logits


def split_metrics(criterion, task, class_names, logits: np.ndarray, labels: np.ndarray) -> dict:
    """Loss and classification metrics of a whole split's logits (a CPU `criterion`)."""
    loss = float(criterion(torch.from_numpy(logits), _targets(torch.from_numpy(labels), task)).item())
    return {"loss": loss, **classification_metrics(task, labels, probabilities(task, logits), class_names)}


def eval_loader(images: ImageSet, batch_size: int, device: torch.device, normalization: Normalization = HALF) -> DataLoader:
    """Unaugmented batches in order; `normalization`: the trial's (`Normalization.from_meta(state["dataset"])`)."""
    return DataLoader(ArrayDataset(images, normalization=normalization), batch_size=batch_size, shuffle=False,
                      pin_memory=device.type == "cuda")


def build_model(config: dict, dataset: Dataset) -> torch.nn.Module:
    """The trial's network; replay passes older configs completed by `checkpoint.with_old_defaults`."""
    return create_model(config["model"], num_classes=dataset.num_classes, in_chans=dataset.channels,
                        img_size=int(dataset.dev.images.shape[1]), pretrained=config["pretrained"],
                        pretrained_path=config["pretrained_path"], freeze_backbone=config["freeze_backbone"],
                        drop_rate=config["drop_rate"], drop_path_rate=config["drop_path_rate"],
                        attn_drop_rate=config["attn_drop_rate"], stem=config["stem"])


def augmented_examples(data: ArrayDataset, seed: int, count: int = EXAMPLES, augment: BatchAugment | None = None) -> dict:
    """Up to `count` training images after augmentation, half of them minority copies when there are any:
    {"images": (N, H, W, C) uint8, "labels", "copy": bool per image}. Draws from its own seeded RNG.
    `augment`: the trial's batched augmentation, when it trains with one."""
    rng = np.random.default_rng(seed)
    originals, copies = np.arange(data.first_extra), np.arange(data.first_extra, len(data))
    n_copies = min(len(copies), count // 2)
    positions = np.r_[rng.choice(originals, min(count - n_copies, len(originals)), replace=False),
                      rng.choice(copies, n_copies, replace=False)].astype(np.int64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        images = _examples(data, positions, augment)
    return {"images": images if len(images) else np.empty((0, *data.images.shape[1:]), np.uint8),
            "labels": data.labels[data.index[positions]], "copy": positions >= data.first_extra}


def _examples(data: ArrayDataset, positions: np.ndarray, augment: BatchAugment | None) -> np.ndarray:
    """(N, H, W, C) uint8 augmented images of `positions`, by the path the trial trains with."""
    if not len(positions):
        return np.empty((0,), np.uint8)
    if augment is None:
        return np.stack([data.augmented(int(p)).permute(1, 2, 0).numpy() for p in positions])
    (images, copy), _ = data.raw_batch(positions)
    return (augment(images, copy) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def build_train_loader(data: ArrayDataset, config: dict, sampler, generator: torch.Generator, device: torch.device,
                       batched: bool) -> DataLoader:
    """Training batches: per image through ArrayDataset (normalised), or, `batched`, whole uint8 batches
    with copy flags (BatchView) for augmentation on the device. Same order and draws either way."""
    draws = len(data) if sampler is None else len(sampler)
    drop_last = draws > config["batch_size"]
    common = {"generator": generator, "num_workers": config["num_workers"], "pin_memory": device.type == "cuda",
              "persistent_workers": config["num_workers"] > 0}
    if not batched:
        return DataLoader(data, batch_size=config["batch_size"], shuffle=sampler is None, sampler=sampler,
                          drop_last=drop_last, **common)
    order = sampler if sampler is not None else RandomSampler(data, generator=generator)
    return DataLoader(BatchView(data), batch_size=None, sampler=BatchSampler(order, config["batch_size"], drop_last),
                      **common)


def _better(score: float, best: float | None, mode: str) -> bool:
    if math.isnan(score):
        return False
    return best is None or (score > best if mode == "max" else score < best)


def training_data(config: dict, train_set: ImageSet, extra: np.ndarray, normalization: Normalization, channels: int,
                  batched: bool) -> tuple[ArrayDataset, BatchAugment | None]:
    """The training rows (+ minority copies) and, `batched`, the augmentation the device applies: then the
    dataset keeps only what has no batched version (AutoAugment) per sample."""
    size = int(train_set.images.shape[1])
    if not batched:
        return ArrayDataset(train_set, build_train_transform(config, size, channels), extra,
                            build_minority_transform(config, size, channels) if len(extra) else None,
                            normalization=normalization), None
    _, per_sample = split_names(config["augment"])
    data = ArrayDataset(train_set, build_train_transform(config, size, channels, per_sample), extra,
                        normalization=normalization)
    return data, build_batch_augment(config, size, channels, copies=len(extra) > 0)


class SplitRun:
    """One train/validation split's training state (data, model, optimiser, schedule, best weights), stepped one
    epoch at a time: a trial runs one (today's single split) or K in lockstep (cross-validation, `cv_folds`)."""

    def __init__(self, config: dict, dataset: Dataset, train_idx: np.ndarray, val_idx: np.ndarray,
                 device: torch.device, amp: bool, fold: int = 0):
        self.config, self.dataset, self.device, self.amp, self.fold = config, dataset, device, amp, fold
        self.val_index = val_idx
        self.train_set, self.val_set = dataset.dev.subset(train_idx), dataset.dev.subset(val_idx)
        size, channels = int(self.train_set.images.shape[1]), dataset.channels
        self.normalization = resolve_normalization(config["normalize"], model=config["model"],
                                                   pretrained=config["pretrained"],
                                                   train_images=self.train_set.images)  # training split only
        self.extra = minority_copies(self.train_set.labels, float(config["minority_aug_pct"]), config["seed"])
        # generated minority images, from a GAN trained on this split's training rows only (None without synthetic_pct)
        self.synthetic = synthetic_training_images(self.train_set, config, dataset, device)
        batched = use_batched(config["augment_device"], device, augments=any(split_names(config["augment"]))
                              or len(self.extra) > 0)
        self.train_data, self.batch_augment = training_data(config, with_synthetic(self.train_set, self.synthetic),
                                                            self.extra, self.normalization, channels, batched)
        self.prepare = DeviceInputs(self.batch_augment, self.normalization) if batched else None
        self.generator = torch.Generator().manual_seed(config["seed"])
        sampler = build_sampler(config["sampling"], self.train_data.labels[self.train_data.index], self.generator)
        self.train_loader = build_train_loader(self.train_data, config, sampler, self.generator, device, batched)

        self.model = build_model(config, dataset).to(device)
        if device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.costs = model_costs(self.model, channels, size)  # params_total, params_trainable, flops_per_image
        self.stem = resolve_stem(config["model"], config["stem"], size)  # logged (stem_resolved), kept in the checkpoint
        self.criterion = build_loss(dataset.task, self.train_set.labels, dataset.num_classes, config["loss_weighting"],
                                    config["effective_beta"]).to(device)
        self.optimizer = build_optimizer(config, self.model)
        self.schedule = build_schedule(config, self.optimizer, len(self.train_loader))
        self.best_score, self.best_epoch, self.best_state = None, 0, None
        self.best_val: dict | None = None  # the best weights' validation predictions (`best_predictions`)
        self.step = 0
        self.metric_key = config["metric"].removeprefix("val_")
        self.cpu_criterion = self.criterion.cpu() if device.type == "cpu" else copy.deepcopy(self.criterion).cpu()

    def resume(self, saved: dict) -> int:
        """Load a checkpoint's (or a fold file's) model, optimizer and best weights; returns the next epoch."""
        if "optimizer" not in saved:
            raise UserError(f"Checkpoint of epoch {saved['epoch']} is a finished trial's; there is nothing to resume")
        saved_stem = saved.get("stem", BEFORE_KEYS_EXISTED["stem"])
        if saved_stem != self.stem:  # same weight shapes either way: loading would not notice
            raise UserError(f"The checkpoint was trained with the {saved_stem} stem, this config builds the {self.stem} "
                            f"stem; resume with stem: {saved_stem}")
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.best_score, self.best_epoch, self.best_state = saved["best_score"], saved["best_epoch"], best_weights(saved)
        self.best_val = saved.get("val_predictions")  # None in a checkpoint from before trials kept them
        return saved["epoch"] + 1

    def start_at(self, epoch: int) -> None:
        self.step = (epoch - 1) * len(self.train_loader)
        if self.schedule is not None:
            self.schedule.step_update(self.step)

    def run_epoch(self, epoch: int) -> dict:
        """Train one epoch, score validation, keep the best weights; returns the epoch's metrics."""
        config, task = self.config, self.dataset.task
        started = time.perf_counter()
        # Each epoch's shuffle, augmentation and dropout draws depend on (seed, fold, epoch) only, so a trial
        # resumed from a checkpoint trains exactly as one that was never interrupted.
        draws = config["seed"] * 100_003 + epoch + 1_000_003 * self.fold
        self.generator.manual_seed(draws)
        torch.manual_seed(self.torch_seed(draws))
        train_loss, train_logits, train_labels = self.train_pass()
        # on the augmented (and re-sampled) training batches, in train mode: a cheap gap monitor, not a score
        train_metrics = classification_metrics(task, train_labels, probabilities(task, train_logits),
                                               self.dataset.class_names)
        val_logits, val_labels = self.predict(self.val_set)
        val_metrics = split_metrics(self.cpu_criterion, task, self.dataset.class_names, val_logits, val_labels)
        score = val_metrics.get(self.metric_key, float("nan"))
        # no epoch scored yet (NaN metric): the first epoch's weights stand in
        if _better(score, self.best_score, config["mode"]) or self.best_state is None:
            if _better(score, self.best_score, config["mode"]):
                self.best_score = score
            self.best_epoch = epoch
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
            # these very weights' validation predictions, kept from this pass: no extra pass, no test image
            self.best_val = {"index": torch.from_numpy(np.asarray(self.val_index, np.int64)),
                             "labels": torch.from_numpy(np.ascontiguousarray(val_labels)),
                             "logits": torch.from_numpy(val_logits), "epoch": epoch}
        return {"epoch": epoch, "train_loss": train_loss, "train_acc": train_metrics["acc"],
                "train_auc": train_metrics["auc"], **{f"val_{k}": v for k, v in val_metrics.items()},
                "best_epoch": self.best_epoch,
                f"best_{config['metric']}": self.best_score if self.best_score is not None else float("nan"),
                "lr": self.optimizer.param_groups[0]["lr"], "epoch_seconds": time.perf_counter() - started,
                "train_images": len(self.train_data), **self.costs,
                **(self.synthetic.metrics if self.synthetic else {}), "stem_resolved": self.stem}

    # --- what a data-parallel run (training.data_parallel) does its own way ---
    def torch_seed(self, draws: int) -> int:
        """The seed of torch's global generator (dropout, augmentation draws) for the epoch's `draws`."""
        return draws

    def train_pass(self) -> tuple[float, np.ndarray, np.ndarray]:
        """One epoch of training: (mean loss, the pass's logits and labels)."""
        loss, self.step, logits, labels = train_one_epoch(
            self.model, self.criterion, self.optimizer, self.schedule, self.train_loader, self.device,
            self.dataset.task, self.step, self.amp, prepare=self.prepare)
        return loss, logits, labels

    def predict(self, images: ImageSet) -> tuple[np.ndarray, np.ndarray]:
        """(logits, labels) of the current weights on every row of `images`, in order."""
        return predict_logits(self.model, eval_loader(images, self.eval_batch, self.device, self.normalization),
                              self.device, self.amp)

    @property
    def eval_batch(self) -> int:
        """The trial's own batch size: memory it already trains in (a fixed 512 needed 6.7 GiB at 224 px)."""
        return self.config["batch_size"]

    def load_best(self) -> None:
        self.model.load_state_dict(self.best_state)

    def score(self, images: ImageSet) -> tuple[dict, np.ndarray, np.ndarray]:
        """(metrics, labels, probabilities) of the current weights on `images` (call `load_best` first)."""
        logits, labels = self.predict(images)
        metrics = split_metrics(self.cpu_criterion, self.dataset.task, self.dataset.class_names, logits, labels)
        return metrics, labels, probabilities(self.dataset.task, logits)

    def val_logits(self) -> np.ndarray:
        """Validation logits of the current weights (the best ones at the end: out-of-fold predictions)."""
        return self.predict(self.val_set)[0]

    def split_labels(self, test_labels: np.ndarray) -> dict:
        labels = {"train": self.train_set.labels, "val": self.val_set.labels, "test": test_labels}
        if len(self.extra) or self.synthetic:
            added = "_and_".join(n for n, on in (("copies", len(self.extra)), ("synthetic", self.synthetic)) if on)
            labels = {"train": self.train_set.labels,
                      f"train_with_{added}": self.train_data.labels[self.train_data.index],
                      "val": self.val_set.labels, "test": test_labels}
        return labels

    @property
    def synthetic_report(self) -> dict | None:
        return self.synthetic.report if self.synthetic else None

    def dataset_meta(self) -> dict:
        dataset = self.dataset
        return {"name": dataset.name, "task": dataset.task, "class_names": list(dataset.class_names),
                "channels": dataset.channels, "image_size": int(self.train_set.images.shape[1]),
                **self.normalization.as_meta()}

    def weights(self, epoch: int, final: bool) -> dict:
        return checkpoint_weights(self.model, self.optimizer, self.best_state, self.best_epoch == epoch, final)


def with_synthetic(train_set: ImageSet, synthetic: SyntheticImages | None) -> ImageSet:
    """The training split with the generated images appended (after the real rows, so minority copies, which
    index real rows, stay copies of real images); normalisation and loss weights keep the real rows' statistics."""
    if synthetic is None or not len(synthetic.labels):
        return train_set
    return ImageSet(np.concatenate([train_set.images, synthetic.images]),  # no patient IDs: training needs none
                    np.concatenate([train_set.labels, synthetic.labels.astype(train_set.labels.dtype)]))


def checkpoint_weights(model, optimizer, best_state: dict, best_is_current: bool, final: bool) -> dict:
    """What a checkpoint must hold, and no more: the final one only the best weights (nothing is left to
    resume); an earlier one the model and optimizer to resume from, plus the best weights when they are an
    earlier epoch's (Ray hands a resumed trial its latest checkpoint only, so they travel with it)."""
    if final:
        return {"model": model.state_dict()}  # the best weights: loaded above for the test score
    weights = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    return weights if best_is_current else {**weights, "best_model": best_state}
