"""One split trained by several processes at once (DDP): what changes from `SplitRun`, and nothing else.

Every rank builds the same `SplitRun` (same seed: same model, same split, same optimiser), then:
- training: each global batch of `batch_size` rows (the order one process would draw, from the same per-epoch
  generator) is cut into `workers` equal parts, one per rank (`RankShare`, torch's DistributedSampler with the
  1-process order kept); DDP averages the gradients, so the step is the 1-process step on the same global batch.
  With `sync_batchnorm` the BatchNorm statistics are the global batch's too, and the run repeats the 1-process
  run up to float rounding (tests/test_distributed.py). Dropout and augmentation draw per rank (rank 0 as
  1 process), so with them the runs match in distribution, not number for number;
- the train loss is summed over ranks and divided by the rows seen (the global mean); the pass's logits are
  gathered, so train_acc/train_auc are the whole pass's;
- validation and test: each rank scores a contiguous shard with rank 0's weights and buffers, and the
  logits are gathered in order. Every metric (AUC included) is then computed once on the whole split, by the
  same code as one process: exact, and `workers` times less scoring per rank than rank 0 scoring alone.
- the checkpoint holds the plain module's state (no DDP `module.` prefix; SyncBatchNorm keeps BatchNorm's keys),
  so analysis/ replays and exports it as a 1-process trial's.
Needs an initialised torch.distributed process group (Ray Train's TorchTrainer makes one: gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler

from trainables.data.registry import ImageSet
from trainables.data.sampling import build_sampler
from trainables.errors import UserError
from trainables.training.split_run import (
    BatchView,
    SplitRun,
    build_optimizer,
    build_schedule,
    eval_loader,
    predict_logits,
    train_one_epoch,
)

RANK_SEED_STRIDE = 10_000_019  # rank r's torch seed: the epoch's + r x this (rank 0: the 1-process seed)


class RankShare(Sampler[list[int]]):
    """This rank's part of every global batch of `batches`: the batch cut into `world` near-equal contiguous parts.
    Every rank walks the same global batches (same generator, same seed), so the ranks' parts never overlap and
    together are the 1-process batch; every rank has the same number of steps."""

    def __init__(self, batches: BatchSampler, rank: int, world: int):
        self.batches, self.rank, self.world = batches, rank, world

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            yield np.array_split(np.asarray(batch, dtype=np.int64), self.world)[self.rank].tolist()


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) whose gradient is summed over ranks too: every rank's loss depends on every rank's rows
    through the global statistics."""

    @staticmethod
    def forward(ctx, tensor):
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm over the global batch on the CPU (gloo), where torch's SyncBatchNorm refuses to run: the mean and
    the (biased) variance of every rank's rows, summed in two passes, with gradients through both; running statistics
    as BatchNorm updates them (unbiased variance). Same parameters and buffers as BatchNorm, so its state dict is
    BatchNorm's. In eval mode, and with one process, it is BatchNorm."""

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(x)
        dims, shape = [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() / x.shape[1]], dtype=torch.float64)
        dist.all_reduce(count)
        n = float(count.item())
        mean = _SumOverRanks.apply(x.sum(dims)) / n
        centred = x - mean.view(shape)
        var = _SumOverRanks.apply((centred * centred).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(var.detach() * n / max(n - 1, 1), alpha=momentum)
        out = centred * torch.rsqrt(var.view(shape) + self.eps)
        return out * self.weight.view(shape) + self.bias.view(shape) if self.affine else out


PLAIN_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def global_batchnorm(module: nn.Module, model_name: str) -> nn.Module:
    """`module` with every torch BatchNorm made a GlobalBatchNorm sharing its parameters and buffers. Other
    BatchNorm kinds (timm's BatchNormAct2d: EfficientNet, DenseNet) are refused: on the CPU only plain ones sync."""
    if type(module) in PLAIN_BATCHNORMS:
        converted = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                    module.track_running_stats)
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        if module.track_running_stats:
            converted.running_mean, converted.running_var = module.running_mean, module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
        return converted
    if isinstance(module, _BatchNorm):
        raise UserError(f"sync_batchnorm on the CPU covers torch's BatchNorm layers; {model_name} has "
                        f"{type(module).__name__}: train it on GPUs or set sync_batchnorm: false")
    for name, child in module.named_children():
        module.add_module(name, global_batchnorm(child, model_name))
    return module


def sync_batchnorm(module: nn.Module, device: torch.device, model_name: str) -> nn.Module:
    """BatchNorm over the global batch: torch's SyncBatchNorm through timm's converter on a GPU (it also converts
    timm's BatchNormAct2d), GlobalBatchNorm on the CPU."""
    if device.type == "cuda":
        from timm.layers import convert_sync_batchnorm

        return convert_sync_batchnorm(module)
    return global_batchnorm(module, model_name)


class DataParallelRun(SplitRun):
    """A SplitRun on one rank of a data-parallel trial (see the module's docstring for what it does differently)."""

    def __init__(self, config: dict, dataset, train_idx, val_idx, device: torch.device, amp: bool, fold: int = 0):
        super().__init__(config, dataset, train_idx, val_idx, device, amp, fold)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if config["sync_batchnorm"]:
            self.model = sync_batchnorm(self.model, device, config["model"]).to(device)
        # self.model stays the plain module (checkpoints, evaluation); the wrapper only trains
        self.ddp = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.train_loader = self._sharded_loader(config, device)
        self.optimizer = build_optimizer(config, self.model)
        self.schedule = build_schedule(config, self.optimizer, len(self.train_loader))  # global steps: 1 process's

    def _sharded_loader(self, config: dict, device: torch.device) -> DataLoader:
        """build_train_loader's batches (same order, same draws), each cut to this rank's share."""
        data = self.train_data
        sampler = build_sampler(config["sampling"], data.labels[data.index], self.generator)
        order = sampler if sampler is not None else RandomSampler(data, generator=self.generator)
        batches = BatchSampler(order, config["batch_size"], drop_last=len(order) > config["batch_size"])
        share = RankShare(batches, self.rank, self.world)
        common = {"generator": self.generator, "num_workers": config["num_workers"],
                  "pin_memory": device.type == "cuda", "persistent_workers": config["num_workers"] > 0}
        if self.prepare is not None:  # batched augmentation on the device: whole uint8 batches
            return DataLoader(BatchView(data), batch_size=None, sampler=share, **common)
        return DataLoader(data, batch_sampler=share, **common)

    def torch_seed(self, draws: int) -> int:
        return draws + RANK_SEED_STRIDE * self.rank

    def train_pass(self) -> tuple[float, np.ndarray, np.ndarray]:
        loss, self.step, logits, labels = train_one_epoch(
            self.ddp, self.criterion, self.optimizer, self.schedule, self.train_loader, self.device,
            self.dataset.task, self.step, self.amp, prepare=self.prepare)
        total = torch.tensor([loss * len(labels), len(labels)], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        logits, labels = self._gathered(logits, labels)
        return float(total[0] / total[1].clamp(min=1)), logits, labels

    def predict(self, images: ImageSet) -> tuple[np.ndarray, np.ndarray]:
        """Every rank scores its contiguous shard with rank 0's weights and buffers; the whole split, in order."""
        for buffer in self.model.buffers():  # unsynced BatchNorm: each rank's running statistics differ
            dist.broadcast(buffer, 0)
        rows = np.array_split(np.arange(len(images)), self.world)[self.rank]
        if len(rows):
            logits, labels = predict_logits(self.model, eval_loader(images.subset(rows), self.eval_batch, self.device,
                                                                    self.normalization), self.device, self.amp)
        else:  # fewer rows than ranks
            logits, labels = np.empty((0, self.dataset.num_classes), np.float32), images.labels[:0]
        return self._gathered(logits, labels)

    def _gathered(self, logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        parts: list = [None] * self.world
        dist.all_gather_object(parts, (logits, labels))
        return np.concatenate([part[0] for part in parts]), np.concatenate([part[1] for part in parts])
