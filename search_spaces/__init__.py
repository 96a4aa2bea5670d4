"""Named search spaces: one YAML file each, validated on load, turned into a Ray Tune param space.

Schema (every key but `description` and `dataset` optional; see smoke.yaml). `SpaceFile` below is the
typed version: an unknown key, a wrong type or an out-of-range value is one line naming file, key and fix.

    description: one line shown by --list-spaces
    dataset: pneumoniamnist            # registered name or kind:PATH
    metric: val_auc                    # validation metric to optimise (never a test_ metric)
    mode: max                          # optional: the metric's direction (val_loss: min); a contradicting one is refused
    num_samples: 8                     # trials (default 8; with a time_budget and no num_samples: no limit)
    time_budget: 30m                   # optional: keep proposing trials until spent (90s, 30m, 1.5h, seconds)
    max_concurrent: 2                  # parallel trials (caps TPE's batch so it keeps learning)
    max_failures: 1                    # retries per trial (FailureConfig); 0 = none
    cv_folds: 1                        # K > 1: every trial trains K fold models (trainables/training/cv.py); 1..20
    scheduler: {max_t: 3, grace_period: 1, reduction_factor: 2}   # ASHA; max_t = every trial's epochs
    # rungs: epochs | seconds (what ASHA's rungs count; default seconds with a time_budget unless grace_period is
    # given, else epochs); grace_period: the first rung in epochs; grace_period_s: in seconds (default budget/30)
    resources: {cpu: 1, gpu: 0}        # per trial; fractional gpu shares a card
    # resources: {workers: 4, cpu: 4, gpu: 1}   # workers > 1: each trial is a data-parallel job of 4 processes
    #                                           # (Ray Train), cpu and gpu per worker; batch_size is the global batch
    fixed: {optimizer: adamw, weight_decay: 0.05}   # trainables/config.py keys
    variants:                          # optional: one searched choice among whole groups of keys
      vgg_scratch: {model: vgg_like}
      resnet18_frozen: {model: resnet18, pretrained: true, freeze_backbone: true}
    params:                            # searched keys: one domain each
      lr: {loguniform: [1.0e-4, 1.0e-2]}
      warmup_frac: {uniform: [0.0, 0.2]}
      drop_rate: {quniform: [0, 0.3, 0.1]}
      batch_size: {choice: [32, 64]}
      rotation_degrees: {int: [0, 15]}   # inclusive bounds

A key is fixed, searched or in the variants, never two of them. The top-level keys set dataset, epochs
(scheduler.max_t), metric, mode and cv_folds for every trial: they are not `fixed` or `params` keys.
tests/test_spaces.py parses the example above.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from search_spaces.budget import parse_duration
from trainables.config import DEFAULTS, MAX_CV_FOLDS, MAX_WORKERS, TRIAL_KEYS, TrialConfig, describe_error, first_error, resolve_config
from trainables.errors import UserError
from trainables.tracking.ranking import selection_mode
from trainables.tracking.searched import VARIANT, searched_keys

SPACES_DIR = Path(__file__).resolve().parent
SPACE_FILE_PROBLEMS = {"extra_forbidden": "unknown key; valid keys: see the schema in search_spaces/__init__.py",
                       "missing": "required"}
SET_BY_SPACE = ("dataset", "epochs", "metric", "mode", "cv_folds", "workers")  # trial keys the space's own keys decide


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


GRACE_SHARE_OF_BUDGET = 30  # seconds rungs: the first rung at budget / 30 unless grace_period_s says otherwise


def rung_unit(rungs: str | None, kind: str, time_budget: float | None, grace_period: int | None) -> str:
    """What ASHA's rungs count: `rungs` as given; left out, seconds when the search has a time budget (the budget is
    seconds, so trials are compared at equal seconds spent: a choice 10x slower per epoch meets its first rung after
    a tenth of the epochs, not at 10x the cost), epochs otherwise. A scheduler that states an epoch `grace_period`
    keeps epoch rungs, so a space written for them (and every search saved before this key) runs as it did."""
    if rungs is not None:
        return rungs
    return "seconds" if kind == "asha" and time_budget is not None and grace_period is None else "epochs"


class Scheduler(_Strict):
    """ASHA: every trial trains at most max_t epochs (its epoch count, whatever the rungs count); rungs at
    grace_period epochs (or grace_period_s seconds of the trial's training time), times reduction_factor each.
    `kind: fifo` turns early stopping off, so every trial gets the same budget (a model comparison, as the studies
    ran it). None = not given: `rung_unit` and `SearchSpace.first_rung` supply the default."""

    kind: Literal["asha", "fifo"] = "asha"
    max_t: PositiveInt = 3
    rungs: Literal["epochs", "seconds"] | None = None
    grace_period: PositiveInt | None = None  # epochs (1 when not given)
    grace_period_s: Annotated[float, BeforeValidator(lambda v: parse_duration(v, "grace_period_s"))] | None = None
    reduction_factor: int = Field(2, ge=2)

    @model_validator(mode="after")
    def _grace_within_max_t(self) -> Scheduler:
        if self.grace_period is not None and self.grace_period > self.max_t:
            raise ValueError(f"grace_period {self.grace_period} exceeds max_t {self.max_t}; lower it")
        return self

    def check_unit(self, time_budget: float | None) -> None:
        """The rung unit fits the rest of the space; ValueError naming the fix otherwise."""
        unit = rung_unit(self.rungs, self.kind, time_budget, self.grace_period)
        if unit == "epochs":
            if self.grace_period_s is not None:
                raise ValueError("grace_period_s counts seconds: give it with rungs: seconds (and a time_budget), "
                                 "or use grace_period (epochs)")
            return
        if self.kind == "fifo":
            raise ValueError("rungs: seconds applies to ASHA; drop it with kind: fifo")
        if time_budget is None:
            raise ValueError("rungs: seconds needs a time_budget (the rungs climb towards it); set time_budget, "
                             "or use rungs: epochs")
        if self.grace_period is not None:
            raise ValueError("grace_period counts epochs; with rungs: seconds give grace_period_s (seconds), "
                             "or use rungs: epochs")
        if self.grace_period_s is not None and self.grace_period_s >= time_budget:
            raise ValueError(f"grace_period_s {self.grace_period_s:g} is not below the time budget "
                             f"({time_budget:g} s): no trial would reach a rung; lower it")


class Resources(_Strict):
    cpu: float = Field(1.0, gt=0)  # per trial (per worker when workers > 1)
    gpu: float = Field(0.0, ge=0)  # per trial (per worker when workers > 1); a fraction shares a card
    workers: PositiveInt = Field(1, le=MAX_WORKERS)  # > 1: a data-parallel trial (trainables/distributed.py)


class Domain(_Strict):
    """Exactly one of: choice, uniform, loguniform, int (inclusive bounds), quniform."""

    choice: list[Any] | None = Field(None, min_length=1)
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    integer: tuple[int, int] | None = Field(None, alias="int")
    quniform: tuple[float, float, float] | None = None

    @model_validator(mode="after")
    def _one_valid_range(self) -> Domain:
        given = [name for name in ("choice", "uniform", "loguniform", "integer", "quniform")
                 if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one domain: choice, uniform, loguniform, int or quniform, "
                             "e.g. {loguniform: [1.0e-4, 1.0e-2]}")
        kind, args = self.kind, self.args
        if kind != "choice" and not args[0] < args[1]:
            raise ValueError(f"{kind} range [{args[0]}, {args[1]}] is empty; low must be < high")
        if kind == "loguniform" and args[0] <= 0:
            raise ValueError(f"loguniform needs 0 < low; got {args[0]}")
        if kind == "quniform" and args[2] <= 0:
            raise ValueError(f"quniform step must be > 0; got {args[2]}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("choice", "uniform", "loguniform", "integer", "quniform")
                    if getattr(self, k) is not None).replace("integer", "int")

    @property
    def args(self) -> list:
        return list(getattr(self, "integer" if self.kind == "int" else self.kind))

    def edge_values(self) -> list:
        """The values that decide whether the domain is valid for its key: every choice, or both bounds."""
        return self.args if self.kind == "choice" else self.args[:2]

    def as_yaml(self) -> dict:
        return {self.kind: self.args}


class SpaceFile(_Strict):
    """A search-space YAML file, typed."""

    description: str
    dataset: str
    metric: str = "val_auc"
    mode: Literal["max", "min"] | None = Field(None, validate_default=True)  # None: the metric's direction
    num_samples: PositiveInt | None = None  # None: 8, or no limit when a time_budget is given
    time_budget: Annotated[float, BeforeValidator(parse_duration)] | None = None  # seconds
    max_concurrent: PositiveInt = 2
    max_failures: NonNegativeInt = 1
    cv_folds: int = Field(1, ge=1, le=MAX_CV_FOLDS)  # cross-validated trials: K fold models each, val_* = fold mean
    scheduler: Scheduler = Scheduler()
    resources: Resources = Resources()
    fixed: dict[str, Any] = {}
    params: dict[str, Domain] = {}
    variants: dict[str, dict[str, Any]] = {}
    points_to_evaluate: list[dict[str, Any]] = []  # searched values tried first, e.g. the study's own protocol

    @field_validator("mode")
    @classmethod
    def _mode_follows_metric(cls, mode: str | None, info: ValidationInfo) -> str:
        return selection_mode(info.data.get("metric", "val_auc"), mode)

    @field_validator("scheduler")
    @classmethod
    def _rungs_fit_budget(cls, scheduler: Scheduler, info: ValidationInfo) -> Scheduler:
        scheduler.check_unit(info.data.get("time_budget"))
        return scheduler


@dataclass
class SearchSpace:
    name: str
    source: Path
    description: str
    dataset: str
    metric: str = "val_auc"
    mode: str = "max"
    num_samples: int | None = 8  # None: no limit, the time budget ends the search
    time_budget: float | None = None  # seconds; Ray Tune's time_budget_s
    max_concurrent: int = 2
    max_failures: int = 1
    cv_folds: int = 1
    max_t: int = 3  # every trial's epochs, whatever ASHA's rungs count
    grace_period: int | None = None  # as the space gives it (None: 1 epoch); see first_rung
    reduction_factor: int = 2
    scheduler: str = "asha"
    rungs: str | None = None  # as the space gives it; see rung_unit
    grace_period_s: float | None = None  # as the space gives it (None: time_budget / 30); see first_rung
    cpu: float = 1.0
    gpu: float = 0.0
    workers: int = 1  # > 1: every trial is a data-parallel job of this many processes, cpu and gpu each
    fixed: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    variants: dict = field(default_factory=dict)
    points_to_evaluate: list = field(default_factory=list)

    @property
    def rung_unit(self) -> str:
        """"epochs" or "seconds": what ASHA's rungs count (search_spaces.rung_unit)."""
        return rung_unit(self.rungs, self.scheduler, self.time_budget, self.grace_period)

    @property
    def first_rung(self) -> float:
        """ASHA's grace period in the rung unit: grace_period epochs (1), or grace_period_s seconds (budget / 30:
        the first rung then takes a thirtieth of the budget, so even if every trial stopped there a search running
        two at a time could judge ~60 of them, and a choice too slow to be worth its time is dropped after that
        much, or after its first epoch when one epoch takes longer)."""
        if self.rung_unit == "epochs":
            return self.grace_period or 1
        return self.grace_period_s or self.time_budget / GRACE_SHARE_OF_BUDGET

    def values_of(self, key: str) -> list:
        """Every value `key` can take: its choices, its variants' values, or its one fixed value."""
        domain = self.params.get(key)
        if domain and "choice" in domain:
            values = list(domain["choice"])
        else:
            values = [self.fixed.get(key, DEFAULTS[key] if key != "dataset" else self.dataset)]
        if self.variants and any(key in v for v in self.variants.values()):
            values = [v.get(key, values[0]) for v in self.variants.values()]
        return list(dict.fromkeys(values))

    def base_config(self) -> dict:
        """The fixed part of every trial's config."""
        return {**self.fixed, "dataset": self.dataset, "epochs": self.max_t, "metric": self.metric, "mode": self.mode,
                "cv_folds": self.cv_folds, **({"workers": self.workers} if self.workers > 1 else {})}

    def searched_keys(self) -> list[str]:
        """The keys this space varies (trainables.tracking.searched: the rule analysis/ applies to the logged space)."""
        return searched_keys(self.as_dict())

    def param_space(self) -> dict:
        """Fixed values plus Ray Tune domains, for `Tuner(param_space=...)` with OptunaSearch."""
        space = {**self.base_config(), **{key: to_tune_domain(spec) for key, spec in self.params.items()}}
        if self.variants:
            space[VARIANT] = to_tune_domain({"choice": list(self.variants)})
        return space

    def as_dict(self) -> dict:
        """The resolved space, as YAML would state it (logged with every search)."""
        return {"description": self.description, "dataset": self.dataset, "metric": self.metric, "mode": self.mode,
                "num_samples": self.num_samples, **({"time_budget": self.time_budget} if self.time_budget else {}),
                "max_concurrent": self.max_concurrent, "max_failures": self.max_failures,
                **({"cv_folds": self.cv_folds} if self.cv_folds > 1 else {}),
                "scheduler": self.scheduler_dict(),
                "resources": {"cpu": self.cpu, "gpu": self.gpu, **({"workers": self.workers} if self.workers > 1 else {})},
                "fixed": self.fixed, "params": self.params,
                **({"variants": self.variants} if self.variants else {}),
                **({"points_to_evaluate": self.points_to_evaluate} if self.points_to_evaluate else {})}


    def scheduler_dict(self) -> dict:
        """The scheduler with its rung unit and first rung resolved (against the time budget as it is now, so a
        --time-budget override moves a left-out default). The epoch grace period is stated only for epoch rungs,
        where the report draws rungs from it."""
        first = "grace_period" if self.rung_unit == "epochs" else "grace_period_s"
        return {"kind": self.scheduler, "max_t": self.max_t, "rungs": self.rung_unit, first: self.first_rung,
                "reduction_factor": self.reduction_factor}


def to_tune_domain(spec: dict):
    from ray import tune

    (kind, args), = spec.items()
    if kind == "choice":
        return tune.choice(list(args))
    if kind == "uniform":
        return tune.uniform(*args)
    if kind == "loguniform":
        return tune.loguniform(*args)
    if kind == "int":
        return tune.randint(args[0], args[1] + 1)  # YAML bounds are inclusive
    return tune.quniform(*args)


def shipped_spaces() -> dict[str, Path]:
    return {path.stem: path for path in sorted(SPACES_DIR.glob("*.yaml"))}


def load_space(name_or_path: str) -> SearchSpace:
    """A shipped space by name, or a user's YAML file by path; validated."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        spaces = shipped_spaces()
        if name_or_path not in spaces:
            raise UserError(f"Unknown search space {name_or_path!r}; valid names: {', '.join(spaces)} "
                            "(or the path of your own .yaml file)")
        path = spaces[name_or_path]
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}{where}: not valid YAML ({getattr(error, 'problem', error)}); fix the syntax") from error
    return parse_space(raw, path)


def parse_space(raw, path: Path, origin: str | None = None) -> SearchSpace:
    """Type-check a space (a mapping, as in YAML) and every trial config it can produce."""
    origin = origin or str(path)
    if not isinstance(raw, dict):
        raise UserError(f"{origin}: expected a mapping of keys (description, dataset, params, ...)")
    try:
        typed = SpaceFile.model_validate(raw)
    except ValidationError as error:
        where, kind, problem = first_error(error)
        raise UserError(f"{origin}: {where}: {SPACE_FILE_PROBLEMS.get(kind, problem)}") from error
    space = SearchSpace(
        name=path.stem, source=path, description=typed.description, dataset=typed.dataset, metric=typed.metric,
        mode=typed.mode, num_samples=trial_count(typed), time_budget=typed.time_budget,
        max_concurrent=typed.max_concurrent, max_failures=typed.max_failures, cv_folds=typed.cv_folds,
        max_t=typed.scheduler.max_t, grace_period=typed.scheduler.grace_period,
        reduction_factor=typed.scheduler.reduction_factor, scheduler=typed.scheduler.kind,
        rungs=typed.scheduler.rungs, grace_period_s=typed.scheduler.grace_period_s, cpu=typed.resources.cpu,
        gpu=typed.resources.gpu, workers=typed.resources.workers, fixed=dict(typed.fixed),
        params={k: d.as_yaml() for k, d in typed.params.items()},
        variants={k: dict(v) for k, v in typed.variants.items()},
        points_to_evaluate=[dict(point) for point in typed.points_to_evaluate],
    )
    check_trial_configs(space, typed, origin)
    return space


def trial_count(typed: SpaceFile) -> int | None:
    """`num_samples` as given; unset, 8 trials, or no limit when a time budget ends the search instead."""
    if typed.num_samples is not None:
        return typed.num_samples
    return None if typed.time_budget is not None else 8


def validate_space(space: SearchSpace, origin: str | None = None) -> SearchSpace:
    """The space checked again as a whole (after command-line overrides changed it)."""
    return parse_space(space.as_dict(), space.source, origin)


def check_trial_configs(space: SearchSpace, typed: SpaceFile, origin: str) -> None:
    """Every trial the space can produce is a valid TrialConfig: its fixed part, each variant, both bounds
    (or every choice) of each searched key, and every model x image size x stem combination."""
    def fail(where: str, problem: str) -> UserError:
        return UserError(f"{origin}: {where}: {problem}")

    for section in ("fixed", "params"):
        for key in getattr(space, section):
            if key not in TRIAL_KEYS:
                raise fail(f"{section}.{key}", "unknown config key; valid keys: see trainables/config.py")
            if key in SET_BY_SPACE:
                raise fail(f"{section}.{key}", "is set by the space's own keys (dataset, scheduler.max_t, "
                                               "metric, mode, cv_folds, resources.workers); set it there")
    overlap = set(space.fixed) & set(space.params)
    if overlap:
        raise fail(f"params.{sorted(overlap)[0]}", "is both fixed and searched; keep one")
    for name, keys in space.variants.items():
        clash = set(keys) & (set(space.params) | set(space.fixed) | set(SET_BY_SPACE))
        if clash:
            raise fail(f"variants.{name}", f"{sorted(clash)[0]} is also fixed or searched; keep one")
    base = space.base_config()
    _check(base, fail, "fixed")
    for name, keys in space.variants.items():
        _check({**base, **keys}, fail, f"variants.{name}")
    for key, domain in typed.params.items():
        if domain.kind in ("uniform", "loguniform", "quniform") and TrialConfig.model_fields[key].annotation is int:
            raise fail(f"params.{key}", f"{key} is an integer; search it with int or choice, not {domain.kind}")
        for value in domain.edge_values():
            _check({**base, key: value}, fail, f"params.{key}")
    for model, size, stem in itertools.product(space.values_of("model"), space.values_of("image_size"),
                                               space.values_of("stem")):
        _check({**base, "model": model, "image_size": size, "stem": stem}, fail, "params")
    for number, point in enumerate(space.points_to_evaluate):
        _check_point(space, typed, point, fail, f"points_to_evaluate[{number}]")
        if point in space.points_to_evaluate[:number]:  # the sampler would not run it twice: say so here
            first = space.points_to_evaluate.index(point)
            raise fail(f"points_to_evaluate[{number}]", f"repeats points_to_evaluate[{first}]; drop one")


def _check_point(space: SearchSpace, typed: SpaceFile, point: dict, fail, where: str) -> None:
    """A point gives a value inside its domain for every searched key (and a variant when there are variants)."""
    searched = space.searched_keys()
    missing, extra = sorted(set(searched) - set(point)), sorted(set(point) - set(searched))
    if missing or extra:
        raise fail(where, f"give exactly the searched keys ({', '.join(searched)}); "
                          + (f"missing {missing[0]}" if missing else f"{extra[0]} is not searched"))
    if space.variants and point["variant"] not in space.variants:
        raise fail(where, f"variant {point['variant']!r} is not one of {', '.join(space.variants)}")
    for key, domain in typed.params.items():
        value, args = point[key], domain.args
        inside = value in args if domain.kind == "choice" else (
            isinstance(value, (int, float)) and not isinstance(value, bool) and args[0] <= value <= args[1])
        if not inside:
            raise fail(where, f"{key} {value!r} is outside its domain {domain.as_yaml()}")
    variant = space.variants.get(point.get("variant"), {})
    _check({**space.base_config(), **variant, **{k: v for k, v in point.items() if k != "variant"}}, fail, where)


TOP_LEVEL_SOURCE = {"dataset": "dataset", "epochs": "scheduler.max_t", "metric": "metric", "mode": "mode"}


def _check(config: dict, fail, where: str) -> None:
    try:
        resolve_config(config)
    except UserError as error:
        cause = error.__cause__
        key = str(cause.errors()[0]["loc"][0]) if isinstance(cause, ValidationError) and cause.errors()[0]["loc"] else ""
        raise fail(TOP_LEVEL_SOURCE.get(key, where), str(error)) from error


__all__ = ["SearchSpace", "SpaceFile", "describe_error", "load_space", "parse_space", "shipped_spaces",
           "validate_space"]
