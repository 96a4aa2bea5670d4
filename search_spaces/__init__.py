"""Named search spaces: one YAML file each, validated on load, turned into a Ray Tune param space.

Schema (every key but `description`, `params` optional; see smoke.yaml):

    description: one line shown by --list-spaces
    dataset: pneumoniamnist            # registered name or kind:PATH
    metric: val_auc                    # validation metric to optimise (never a test_ metric)
    mode: max
    num_samples: 8                     # trials
    max_concurrent: 2                  # parallel trials (caps TPE's batch so it keeps learning)
    max_failures: 1                    # retries per trial (FailureConfig)
    scheduler: {max_t: 3, grace_period: 1, reduction_factor: 2}   # ASHA; max_t = epochs
    resources: {cpu: 1, gpu: 0}        # per trial; fractional gpu shares a card
    fixed: {model: resnet18, ...}      # trainables/config.py keys
    variants:                          # optional: one searched choice among whole groups of keys
      vgg_scratch: {model: vgg_like}
      resnet18_frozen: {model: resnet18, pretrained: true, freeze_backbone: true}
    params:                            # searched keys: one domain each
      lr: {loguniform: [1.0e-4, 1.0e-2]}
      warmup_frac: {uniform: [0.0, 0.2]}
      depth: {quniform: [0, 0.3, 0.1]}
      batch_size: {choice: [32, 64]}
      epochs: {int: [1, 5]}
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from trainables.config import DEFAULTS, resolve_config
from trainables.datasets import check_dataset_name
from trainables.errors import UserError
from trainables.models import check_model_name

SPACES_DIR = Path(__file__).resolve().parent
TOP_LEVEL = {"description", "dataset", "metric", "mode", "num_samples", "max_concurrent", "max_failures",
             "scheduler", "resources", "fixed", "params", "variants"}
DOMAINS = {"choice", "uniform", "loguniform", "int", "quniform"}


@dataclass
class SearchSpace:
    name: str
    source: Path
    description: str
    dataset: str
    metric: str = "val_auc"
    mode: str = "max"
    num_samples: int = 8
    max_concurrent: int = 2
    max_failures: int = 1
    max_t: int = 3
    grace_period: int = 1
    reduction_factor: int = 2
    cpu: float = 1.0
    gpu: float = 0.0
    fixed: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    variants: dict = field(default_factory=dict)

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
        return {**self.fixed, "dataset": self.dataset, "epochs": self.max_t, "metric": self.metric, "mode": self.mode}

    def param_space(self) -> dict:
        """Fixed values plus Ray Tune domains, for `Tuner(param_space=...)` with OptunaSearch."""
        space = {**self.base_config(), **{key: to_tune_domain(spec) for key, spec in self.params.items()}}
        if self.variants:
            space["variant"] = to_tune_domain({"choice": list(self.variants)})
        return space

    def as_dict(self) -> dict:
        """The resolved space, as YAML would state it (logged with every search)."""
        return {"description": self.description, "dataset": self.dataset, "metric": self.metric, "mode": self.mode,
                "num_samples": self.num_samples, "max_concurrent": self.max_concurrent,
                "max_failures": self.max_failures,
                "scheduler": {"max_t": self.max_t, "grace_period": self.grace_period,
                              "reduction_factor": self.reduction_factor},
                "resources": {"cpu": self.cpu, "gpu": self.gpu}, "fixed": self.fixed, "params": self.params,
                **({"variants": self.variants} if self.variants else {})}


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
        raise UserError(f"{path}{where}: not valid YAML ({getattr(error, 'problem', error)}); fix the syntax") from None
    return parse_space(raw, path)


def parse_space(raw, path: Path) -> SearchSpace:
    def fail(key: str, problem: str) -> UserError:
        return UserError(f"{path}: {key}: {problem}")

    if not isinstance(raw, dict):
        raise fail("(top level)", "expected a mapping of keys (description, dataset, params, ...)")
    for key in raw:
        if key not in TOP_LEVEL:
            raise fail(key, f"unknown key; valid keys: {', '.join(sorted(TOP_LEVEL))}")
    for key in ("description", "dataset"):
        if not isinstance(raw.get(key), str):
            raise fail(key, "required (a string)")
    scheduler, resources = raw.get("scheduler") or {}, raw.get("resources") or {}
    for section, valid in ((scheduler, {"max_t", "grace_period", "reduction_factor"}), (resources, {"cpu", "gpu"})):
        for key in section:
            if key not in valid:
                raise fail(key, f"unknown key; valid keys: {', '.join(sorted(valid))}")
    space = SearchSpace(
        name=path.stem, source=path, description=raw["description"], dataset=raw["dataset"],
        metric=raw.get("metric", "val_auc"), mode=raw.get("mode", "max"),
        num_samples=raw.get("num_samples", 8), max_concurrent=raw.get("max_concurrent", 2),
        max_failures=raw.get("max_failures", 1), max_t=scheduler.get("max_t", 3),
        grace_period=scheduler.get("grace_period", 1), reduction_factor=scheduler.get("reduction_factor", 2),
        cpu=resources.get("cpu", 1), gpu=resources.get("gpu", 0),
        fixed=dict(raw.get("fixed") or {}), params=dict(raw.get("params") or {}),
        variants=dict(raw.get("variants") or {}),
    )
    validate_space(space, fail)
    return space


def validate_space(space: SearchSpace, fail=None) -> None:
    """Every check that can be made without data: keys, ranges, names, counts."""
    if fail is None:
        def fail(key, problem):
            return UserError(f"{space.source}: {key}: {problem}")
    if not space.metric.startswith("val_"):
        raise fail("metric", f"{space.metric!r} must be a validation metric (val_...): test never selects")
    if space.mode not in ("max", "min"):
        raise fail("mode", "use max or min")
    for key in ("num_samples", "max_concurrent", "max_t", "grace_period", "reduction_factor"):
        value = getattr(space, key)
        if not isinstance(value, int) or value < 1:
            raise fail(key, f"{value!r} is not a positive integer")
    if space.grace_period > space.max_t:
        raise fail("grace_period", f"{space.grace_period} exceeds max_t {space.max_t}")
    if space.reduction_factor < 2:
        raise fail("reduction_factor", "must be at least 2")
    if space.cpu <= 0 or space.gpu < 0:
        raise fail("resources", "cpu must be > 0 and gpu >= 0")
    for section in ("fixed", "params"):
        for key in getattr(space, section):
            if key not in DEFAULTS or key in ("dataset", "epochs", "metric", "mode"):
                reason = "is set by the space's top-level keys" if key in DEFAULTS else "unknown config key"
                raise fail(f"{section}.{key}", f"{reason}; valid keys: see trainables/config.py")
    overlap = set(space.fixed) & set(space.params)
    if overlap:
        raise fail(f"params.{sorted(overlap)[0]}", "is both fixed and searched; keep one")
    for key, spec in space.params.items():
        _check_domain(f"params.{key}", spec, fail)
    for name, keys in space.variants.items():
        clash = set(keys) & (set(space.params) | set(space.fixed)) if isinstance(keys, dict) else None
        if clash is None or clash:
            raise fail(f"variants.{name}", "must map config keys not also fixed or searched"
                       + (f" (clash: {sorted(clash)[0]})" if clash else ""))
    try:
        base = space.base_config()
        resolve_config(base)
        for name, keys in space.variants.items():
            resolve_config({**base, **keys})
        for key, spec in space.params.items():
            for value in _edge_values(spec):
                resolve_config({**base, key: value})
        check_dataset_name(space.dataset)
        for model, size in itertools.product(space.values_of("model"), space.values_of("image_size")):
            check_model_name(model, int(size))
    except UserError as error:
        raise fail("fixed/params", str(error)) from None


def _edge_values(spec: dict) -> list:
    """The values that decide whether a domain is valid for its key: every choice, or both bounds."""
    (kind, args), = spec.items()
    return list(args) if kind == "choice" else [args[0], args[1]]


def _check_domain(key: str, spec, fail) -> None:
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DOMAINS:
        raise fail(key, f"give exactly one domain: {', '.join(sorted(DOMAINS))}, e.g. {{loguniform: [1.0e-4, 1.0e-2]}}")
    (kind, args), = spec.items()
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise fail(key, "choice needs a non-empty list")
        return
    expected = 3 if kind == "quniform" else 2
    if not isinstance(args, list) or len(args) != expected or not all(isinstance(a, (int, float)) for a in args):
        raise fail(key, f"{kind} needs [{'low, high, step' if expected == 3 else 'low, high'}] numbers")
    low, high = args[0], args[1]
    if not low < high:
        raise fail(key, f"{kind} range [{low}, {high}] is empty; low must be < high")
    if kind == "loguniform" and low <= 0:
        raise fail(key, f"loguniform needs 0 < low; got {low}")
    if kind == "int" and not all(isinstance(a, int) for a in args):
        raise fail(key, "int bounds must be integers")
    if kind == "quniform" and args[2] <= 0:
        raise fail(key, "quniform step must be > 0")
