"""Every key a trial understands: its type, its range and its default, in one pydantic model.

A wrong key, type or range is one `UserError` line naming the key, the value and what is expected.
Search-space files (search_spaces/), `--set` and `python -m trainables.train` all go through here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trainables.data.registry import MIN_IMAGE_SIZE
from trainables.data.splits import SPLIT_VERSION
from trainables.errors import UserError
from trainables.tracking.ranking import selection_mode

MAX_CV_FOLDS = 20
MAX_WORKERS = 1024


class TrialConfig(BaseModel):
    """One trial's configuration. Field order is the order `--help`-style listings show."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    # --- data ---
    dataset: str = "pneumoniamnist"  # registered name (trainables.data.datasets) or kind:PATH
    image_size: int = Field(28, ge=MIN_IMAGE_SIZE, le=1024)  # MedMNIST 28/64/128/224; folder datasets are resized to it
    split_ratio: float | None = Field(None, gt=0.0, lt=1.0)  # train share of the development pool; None: official split
    split_version: int = Field(SPLIT_VERSION, ge=1, le=SPLIT_VERSION)  # how splits are made (replay of old searches)
    # K > 1: K stratified (patient-grouped) folds of the development pool trained in lockstep, val_* = fold mean;
    # set by a space's top-level `cv_folds` or `tune.py --cv-folds`, never searched
    cv_folds: int = Field(1, ge=1, le=MAX_CV_FOLDS)
    skip_bad_images: bool = False  # leave unreadable image files out (counted) instead of failing
    seed: int = Field(0, ge=0)  # seeds the split, the initialisation, the augmentation and the loader order
    # --- model ---
    model: str = "resnet18"  # registered name (trainables.models)
    pretrained: bool = False  # start from ImageNet weights (needs `pretrained_path` offline)
    pretrained_path: str | None = None  # local weights file (.pth / .safetensors) for `pretrained`
    freeze_backbone: bool = False  # train the classifier head only
    # timm CNNs (ResNet, ResNet-D, DenseNet, EfficientNet-B0): imagenet = timm's stride-2 conv + max-pool (28 px is 7 px
    # at the first stage); small = first conv stride 1, no max-pool (28 px stays 28); auto = small below 64 px
    stem: Literal["auto", "imagenet", "small"] = "auto"
    drop_rate: float | None = Field(None, ge=0.0, lt=1.0)  # classifier dropout (0: none); None keeps the model's default
    drop_path_rate: float | None = Field(None, ge=0.0, lt=1.0)  # stochastic depth (timm ResNets, EfficientNet, ViT)
    attn_drop_rate: float | None = Field(None, ge=0.0, lt=1.0)  # attention dropout (ViT only); None: the model's default
    # auto: half ([-1, 1]) from scratch, the weights' own mean/std when pretrained; see trainables/data/normalization.py
    normalize: Literal["auto", "half", "dataset", "imagenet", "mean_image"] = "auto"
    # --- augmentation (training split only) ---
    augment: str = "none"  # "+"-joined names, e.g. "hflip+rotation+jitter", or "autoaugment_imagenet"
    rotation_degrees: float = Field(15.0, ge=0.0, le=180.0)  # for "rotation"
    rotation_crop: float | None = Field(None, gt=0.0, le=1.0)  # centre crop after rotation (side fraction, 210/224); None: auto
    jitter: float = Field(0.2, ge=0.0, le=1.0)  # brightness/contrast strength for "jitter"
    jitter_saturation: float = Field(0.0, ge=0.0, le=1.0)  # saturation strength for "jitter" (RGB images only)
    jitter_hue: float = Field(0.0, ge=0.0, le=0.5)  # hue shift for "jitter" (RGB images only)
    blur_sigma_min: float = Field(0.1, gt=0.0)  # lower sigma for "blur" (the ResNet-D study: 4 or 6)
    blur_sigma: float = Field(1.0, gt=0.0)  # upper sigma for "blur" (the ResNet-D study: 5 or 8)
    blur_kernel: int = Field(3, ge=3, le=31)  # odd kernel side for "blur"
    shift_frac: float = Field(0.1, ge=0.0, le=0.5)  # largest translation for "shift", fraction of the side
    crop_scale: float = Field(0.8, gt=0.0, le=1.0)  # smallest area kept by "crop" (random resized crop)
    noise_std: float = Field(0.05, ge=0.0)  # std (on the 0-1 scale) for "noise"
    minority_aug_pct: float = Field(0.0, ge=0.0, le=1000.0)  # each minority class gets this % extra augmented copies
    # cpu: per image; batch: Kornia on the device; auto: batch on CUDA or for a trial without augmentation (use_batched)
    augment_device: Literal["auto", "cpu", "batch"] = "auto"
    sampling: Literal["none", "oversample", "undersample"] = "none"  # class-balanced draws (multi-label: rarest positive label)
    # generated minority images (trainables/augment/synthetic.py): a class-conditional DCGAN trained on the training split
    synthetic_pct: float = Field(0.0, ge=0.0, le=1000.0)  # each minority class gets this % extra generated images
    gan_image_size: Literal["auto", 28, 64] = "auto"  # GAN side; auto: 28 for images <= 28 px, else 64 (then up-sampled)
    gan_epochs: int | None = Field(None, ge=1, le=100_000)  # passes over the training split; None: about 2000 steps
    gan_width: int = Field(32, ge=4, le=512)  # channels of the GAN's full-resolution block (doubled per halving)
    gan_latent_dim: int = Field(64, ge=2, le=1024)  # length of the generator's noise vector
    gan_batch_size: int = Field(64, ge=2, le=4096)
    gan_lr: float = Field(2e-4, gt=0.0, le=1.0)  # Adam (beta1 0.5) for both networks, as in DCGAN
    # --- loss ---
    # inverse / effective: from the training labels (multi-label: positive weights per label); wcel: per-batch betas
    loss_weighting: Literal["none", "inverse", "effective", "wcel"] = "none"
    effective_beta: float = Field(0.999, gt=0.0, lt=1.0)  # beta of the effective-number weighting
    # --- optimisation ---
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0.0)  # peak learning rate
    weight_decay: float = Field(0.0, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)  # sgd only
    batch_size: int = Field(128, ge=1)
    epochs: int = Field(3, ge=1)
    schedule: Literal["cosine", "step", "constant"] = "cosine"  # cosine = linear warm-up then cosine; constant = warm-up then flat
    warmup_frac: float = Field(0.0, ge=0.0, lt=1.0)  # fraction of all steps spent in linear warm-up (cosine, constant)
    step_milestones: list[float] = [0.5, 0.75]  # step schedule: fractions of the epochs where lr *= step_gamma
    step_gamma: float = Field(0.1, gt=0.0, le=1.0)
    # --- selection (validation only; the test split never chooses anything) ---
    metric: str = "val_auc"  # picks the best epoch (and, in tune.py, the best trial); never a test_ metric
    mode: Literal["max", "min"] = "max"  # left out: the metric's direction (val_loss: min); a contradicting one is refused
    # --- runtime ---
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on a CUDA GPU that has it, else fp32
    num_workers: int = Field(0, ge=0)  # DataLoader workers for per-sample augmentation
    # GPU kernels: true = deterministic cuDNN/cuBLAS ones, so a resumed trial repeats an uninterrupted one (slower
    # convolutions); false = cudnn.benchmark's fastest, which may differ run to run. No effect on the CPU
    deterministic: bool = True
    data_root: str | None = None  # where datasets live; None: $MEDTUNE_DATA_ROOT or ~/.medmnist
    # --- data-parallel trials (trainables/distributed.py) ---
    # processes that train one trial together (Ray Train, DDP), each on batch_size / workers images of every batch;
    # set by a space's `resources.workers`, never searched; 1: one process, as a trial has always run
    workers: int = Field(1, ge=1, le=MAX_WORKERS)
    sync_batchnorm: bool = False  # workers > 1: BatchNorm statistics over the global batch, not each worker's share

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        from trainables.data.datasets import check_dataset_name

        check_dataset_name(value)
        return value

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        from trainables.models import check_model_name

        check_model_name(value)
        return value

    @field_validator("augment")
    @classmethod
    def _known_augmentations(cls, value: str) -> str:
        from trainables.augment.per_sample import parse_augment

        parse_augment(value)
        return value

    @field_validator("metric")
    @classmethod
    def _validation_metric(cls, value: str) -> str:
        if not value.startswith("val_"):
            raise ValueError(f"metric {value!r} must be a validation metric (val_...): the test split never selects")
        return value

    @model_validator(mode="before")
    @classmethod
    def _mode_follows_metric(cls, data: Any) -> Any:
        """One rule for direction (trainables.tracking.ranking), as in space files and --metric."""
        if isinstance(data, dict) and isinstance(data.get("metric", "val_auc"), str) \
                and data.get("mode") in (None, "max", "min"):
            data = {**data, "mode": selection_mode(data.get("metric", "val_auc"), data.get("mode"))}
        return data

    @field_validator("step_milestones")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        if any(not 0.0 < m <= 1.0 for m in value):
            raise ValueError(f"step_milestones {value} must be fractions of the epochs in (0, 1], e.g. [0.5, 0.75]")
        return value

    @field_validator("blur_kernel")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(f"blur_kernel {value} must be odd, e.g. 3")
        return value

    @model_validator(mode="after")
    def _model_fits_images(self) -> TrialConfig:
        from trainables.models import check_model_name, check_model_options

        check_model_name(self.model, self.image_size, self.stem)
        check_model_options(self.model, drop_path_rate=self.drop_path_rate, attn_drop_rate=self.attn_drop_rate)
        return self

    @model_validator(mode="after")
    def _one_way_to_split(self) -> TrialConfig:
        if self.cv_folds > 1 and self.split_ratio is not None:
            raise ValueError(f"split_ratio {self.split_ratio} and cv_folds {self.cv_folds} both split the development "
                             "pool; drop split_ratio (each fold is the validation part once) or use cv_folds 1")
        return self

    @model_validator(mode="after")
    def _batch_splits_over_workers(self) -> TrialConfig:
        if self.batch_size % self.workers:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by workers {self.workers} (batch_size is "
                             f"the global batch, split evenly); use a multiple of {self.workers}")
        if self.workers > 1 and self.cv_folds > 1:
            raise ValueError(f"cv_folds {self.cv_folds} with workers {self.workers} is not supported; "
                             "use cv_folds 1 or resources.workers 1")
        return self

    @model_validator(mode="after")
    def _blur_range(self) -> TrialConfig:
        if self.blur_sigma_min > self.blur_sigma:
            raise ValueError(f"blur_sigma_min {self.blur_sigma_min} is above blur_sigma {self.blur_sigma}; "
                             "blur draws sigma in [blur_sigma_min, blur_sigma]")
        return self


DEFAULTS: dict = TrialConfig.model_construct().model_dump()  # the defaults, without importing every registry
TRIAL_KEYS = tuple(TrialConfig.model_fields)


def resolve_config(overrides: dict) -> dict:
    """The defaults updated by `overrides`, type-checked; a UserError names the first wrong key."""
    try:
        return TrialConfig.model_validate(dict(overrides)).model_dump()
    except ValidationError as error:
        raise UserError(describe_error(error, "config key")) from error


def first_error(error: ValidationError) -> tuple[str, str, str]:
    """pydantic's first error as (key path, error type, problem): the one reading of a validation error that the
    trial config and the space files share. The problem names the value given and what is expected; our own
    validators' messages already do."""
    first = error.errors(include_url=False)[0]
    key = ".".join(str(part) for part in first["loc"] if not str(part).startswith("function-after")) or "(top level)"
    message = first["msg"]
    if first["type"] == "value_error":
        return key, first["type"], message.removeprefix("Value error, ")
    shown = first.get("input")
    value = "" if isinstance(shown, dict) else f"{shown!r}: "
    return key, first["type"], f"{value}{message[0].lower()}{message[1:]}"


def describe_error(error: ValidationError, what: str, model: type[BaseModel] = TrialConfig) -> str:
    """pydantic's first error as one line: the key, the value given and what is expected."""
    key, kind, problem = first_error(error)
    if kind == "extra_forbidden":
        return f"Unknown {what} {key!r}; valid keys: {', '.join(model.model_fields)}"
    if kind == "missing":
        return f"Missing {what} {key!r}; it is required"
    return problem if kind == "value_error" else f"Invalid {key} {problem}"


def check_value(key: str, value: Any) -> None:
    """Validate one key on its own (a command-line override), before it is merged into a space."""
    resolve_config({key: value})


def parse_overrides(items: list[str]) -> dict:
    """`--set KEY=VALUE ...` -> {key: YAML value}; a malformed item is a UserError naming it."""
    import yaml

    overrides = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: write KEY=VALUE, e.g. --set batch_size=64")
        try:
            overrides[key] = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise UserError(f"--set {item!r}: {text!r} is not a YAML value ({getattr(error, 'problem', error)}); "
                            "quote strings and close brackets, e.g. --set step_milestones=[0.5,0.75]") from error
    return overrides
