"""Ensembles and flip test-time augmentation: who may join, and which variant ships, chosen on validation only.

    python -m analysis.export --search NAME --out DIR --ensemble 3 --tta
    python tune.py --space smoke --ensemble 3 --tta          # the end-of-search summary prints the same choice

A member is a medtune checkpoint state (its config, dataset entry and best weights): one of the top trials of
a search by validation score, or, when the winner is cross-validated, one of its K fold models. Members must
share the dataset, image size, channels, normalisation and train/validation split: others are skipped, with
the reason. Each member gets its own temperature (fitted on validation), and a variant averages calibrated
probabilities: `single` (the winner), `single+tta`, `ensemble` (K members), `ensemble+tta`. Which one ships
follows the one-standard-error rule on the validation split: the cheapest variant (fewest forward passes)
whose validation score is within one paired-bootstrap SE of the best variant's. Test is read only afterwards.

A cross-validated winner (`decide_folds`): the members are its K fold models, the best fold first (`single`),
each with its own fold's split and a temperature fitted on its own held-out fold. No validation split is shared
(each fold model trained on the others' validation images), so the choice is made on OUT-OF-FOLD predictions:
every development image scored only by the fold model that held it out. That is honest for `single` and
`single+tta` (pooled over the fold models: it estimates one fold model on unseen images), and TTA is decided
there by the one-SE rule. Averaging K fold models has no honest out-of-fold figure (every other fold model
trained on each image), so its rule is fixed before any score is seen, as nnU-Net ensembles its folds: with
K >= 2 fold models (and `--ensemble` > 1) the fold ensemble ships, with TTA when the out-of-fold rule chose it.
Why this is defensible: the best fold model alone was picked by its own held-out score (optimistic), the
ensemble picks nothing; and the NLL of averaged probabilities is at most the members' mean NLL on every image
(convexity), whose out-of-fold estimate is `single`'s figure, shown in the ensemble's row as its stand-in (for
AUC / accuracy the usual case, not a guarantee). Fold models normalised with their own training folds'
statistics (`normalize: dataset / mean_image`) see different inputs: they are not averaged (said in the lines).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import stats

from analysis import runs
from analysis.calibration import calibrated, fit_temperature, nll_of_probs
from analysis.ensemble_model import Ensemble, Flipped, flip_shift
from analysis.replay import Replay, replay
from trainables.errors import UserError
from trainables.tracking.ranking import rank
from trainables.training.metrics import classification_metrics, safe_auc

N_RESAMPLES = 1000  # paired bootstrap resamples of the validation split for the SE of a score difference
SPLIT_KEYS = ("dataset", "image_size", "split_ratio", "split_version", "seed", "skip_bad_images")
INPUT_KEYS = ("task", "class_names", "channels", "normalize", "mean", "std")
VARIANTS = ("single", "single+tta", "ensemble", "ensemble+tta")  # cheapest first when K > 2 (passes 1, 2, K, 2K)


@dataclass(frozen=True)
class Member:
    """One network of an ensemble: `state` is a medtune checkpoint state (config, dataset entry, best weights)."""

    label: str  # trial id (a fold model would be e.g. "trial_x/fold2")
    state: dict
    run_id: str | None = None
    score: float | None = None  # its validation selection score, as ranked


def mismatch(reference: dict, state: dict) -> str | None:
    """Why checkpoint `state` cannot join an ensemble led by `reference` (None: it can). An ensemble's members
    see the same images the same way and share one validation split, which the choice is made on."""
    for key in SPLIT_KEYS:
        mine, theirs = state["config"].get(key), reference["config"].get(key)
        if mine != theirs:
            return f"{key} {mine!r}, not {theirs!r}"
    meta, ref = state.get("dataset") or {}, reference.get("dataset") or {}
    for key in INPUT_KEYS:
        if meta.get(key) != ref.get(key):
            return f"{key} {meta.get(key)!r}, not {ref.get(key)!r}"
    if (meta.get("mean_image") is None) != (ref.get("mean_image") is None) or (
            meta.get("mean_image") is not None and not torch.equal(meta["mean_image"], ref["mean_image"])):
        return "a different mean image"
    return None


def fold_state(state: dict, fold: int) -> dict:
    """A cross-validated trial's state as if `fold` were its best: replay() then rebuilds that fold's split,
    weights, normalisation and stem."""
    saved = state["folds"][fold]
    return {**state, "best_fold": fold, "dataset": saved["dataset"], "stem": saved.get("stem") or state.get("stem")}


def fold_members(state: dict, label: str, run_id: str | None = None) -> list[Member]:
    """A cross-validated trial's K fold models as members, the best fold (the model that scored test) first."""
    best = int(state["best_fold"])
    order = [best, *(fold for fold in range(len(state["folds"])) if fold != best)]
    return [Member(f"{label}/fold{fold}", fold_state(state, fold), run_id, state["folds"][fold].get("best_score"))
            for fold in order]


def search_members(client, parent, space: dict, k: int, first: Member) -> tuple[list[Member], list[str]]:
    """`first` (the winner) and the next best finished trials by validation until there are `k` that may join;
    the lines say which were skipped and why."""
    members, skipped = [first], []
    for run in runs.ranked_trials(client, parent, space):
        if len(members) >= k:
            break
        label = runs.trial_label(run)
        if run.info.run_id == first.run_id:
            continue
        try:
            state = runs.checkpoint_state(run)
        except UserError as error:
            skipped.append(f"skipped trial {label}: {error}")
            continue
        why = mismatch(first.state, state)
        if why:
            skipped.append(f"skipped trial {label}: {why} (members share image size, channels, normalisation and split)")
            continue
        key, _ = runs.selection(parent, space)
        members.append(Member(label, state, run.info.run_id, run.data.metrics.get(key)))
    return members, skipped


# --- validation predictions and the choice ----------------------------------------------------------

def member_probabilities(logits: np.ndarray, flipped: np.ndarray | None, task: str, temperature: float) -> np.ndarray:
    """A member's calibrated probabilities; with flip TTA the mean of the image's and its mirror image's."""
    probs = calibrated(logits, task, temperature)
    return probs if flipped is None else (probs + calibrated(flipped, task, temperature)) / 2


def variant_probabilities(plain: list[np.ndarray], tta: list[np.ndarray] | None) -> dict[str, tuple[np.ndarray, int]]:
    """{variant: (probabilities, forward passes per image)}, cheapest first; member 0 is the winner."""
    k = len(plain)
    variants = {"single": (plain[0], 1)}
    if tta is not None:
        variants["single+tta"] = (tta[0], 2)
    if k > 1:
        variants["ensemble"] = (np.mean(plain, axis=0), k)
        if tta is not None:
            variants["ensemble+tta"] = (np.mean(tta, axis=0), 2 * k)
    return dict(sorted(variants.items(), key=lambda item: item[1][1]))  # stable: single+tta before a 2-member ensemble


def scorer(metric: str, task: str):
    """(score(labels, probs), its name): the search's selection metric computed on probabilities. `loss` is the
    negative log-likelihood of the calibrated probabilities (the trial's own loss may carry class weights)."""
    name = metric.removeprefix("best_").removeprefix("val_")
    if name == "loss":
        return (lambda labels, probs: nll_of_probs(probs, labels, task)), "NLL"
    if name == "auc" and task == "binary":
        return (lambda labels, probs: safe_auc(labels, probs[:, 1])), "AUC"
    if name == "acc" and task != "multilabel":
        return (lambda labels, probs: float(np.mean(probs.argmax(axis=1) == labels))), "accuracy"
    return (lambda labels, probs: classification_metrics(task, labels, probs)[name]), name


def choose(labels: np.ndarray, variants: dict, metric: str, mode: str, task: str, n_resamples: int = N_RESAMPLES,
           seed: int = 0) -> dict:
    """The one-SE rule on validation: the cheapest variant whose score is within one SE of the best score, the SE
    that of the paired difference (the same resampled validation images score both)."""
    raw, shown = scorer(metric, task)

    def score(y, probs):  # a resample with one class has no AUC: NaN, left out of the SE
        try:
            return raw(y, probs)
        except ValueError:
            return float("nan")

    sign = 1.0 if mode == "max" else -1.0
    point = {name: score(labels, probs) for name, (probs, _) in variants.items()}
    names = list(variants)
    best = rank(names, point.get, mode, tie=lambda name: f"{names.index(name):04d}")[0]  # NaN last; ties: cheaper

    def gaps(rows):  # how much worse than the best each variant is on one resample (>= 0 is worse)
        top = score(labels[rows], variants[best][0][rows])
        return np.array([sign * (top - score(labels[rows], variants[n][0][rows])) for n in names])

    se = np.zeros(len(names))
    if len(names) > 1:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a one-class resample: AUC undefined, left out below
            result = stats.bootstrap((np.arange(len(labels)),), gaps, vectorized=False, n_resamples=n_resamples,
                                     method="percentile", rng=np.random.default_rng(seed))
            se = np.nanstd(np.atleast_2d(result.bootstrap_distribution), axis=-1, ddof=1)
    table = {n: {"value": point[n], "passes": variants[n][1], "gap_to_best": sign * (point[best] - point[n]),
                 "se_of_gap": float(s)} for n, s in zip(names, se)}
    chosen = next((n for n in names if table[n]["gap_to_best"] <= table[n]["se_of_gap"]), best)
    direction = "higher" if mode == "max" else "lower"
    if chosen == best:
        reason = (f"{chosen} has the best validation {shown} ({point[chosen]:.4f}, {direction} is better) and every "
                  "cheaper variant is more than one SE behind it" if chosen != names[0] else
                  f"{chosen} is the cheapest variant and has the best validation {shown} ({point[chosen]:.4f})")
    else:
        reason = (f"{best} has the best validation {shown} ({point[best]:.4f}), but {chosen} ({point[chosen]:.4f}) is "
                  f"within one SE of it (gap {table[chosen]['gap_to_best']:.4f} <= SE {table[chosen]['se_of_gap']:.4f}) "
                  "and costs fewer forward passes")
    return {"metric": shown, "mode": mode, "variants": table, "best": best, "chosen": chosen, "reason": reason,
            "rule": f"one-SE rule on the validation split, paired bootstrap ({n_resamples} resamples, seed {seed})",
            "n_val": int(len(labels))}


@dataclass
class Choice:
    """Members replayed, their temperatures, the validation choice; `module()` is the chosen network."""

    members: list[Member]
    reps: list[Replay]
    temperatures: list[float]
    tta_offered: bool
    decision: dict
    skipped: list[str] = field(default_factory=list)
    oof: dict | None = None  # a cross-validated winner: {"labels", "probs": {variant: out-of-fold probabilities}}
    # ensemble selection (analysis.handover): each member's weight in the ensemble variant, 0 for a winner it left
    # out; None: the ensemble averages every member equally (top-K, fold models)
    weights: list[float] | None = None

    @property
    def chosen(self) -> str:
        return self.decision["chosen"]

    def in_variant(self, variant: str | None = None) -> list[int]:
        """The members (indices) the variant's network is made of: the winner alone, or the ensemble's."""
        if not (variant or self.chosen).startswith("ensemble"):
            return [0]
        return list(range(len(self.members))) if self.weights is None else \
            [i for i, w in enumerate(self.weights) if w > 0]

    @property
    def chosen_members(self) -> int:
        return len(self.in_variant())

    @property
    def tta(self) -> bool:
        return self.chosen.endswith("+tta")

    @property
    def network(self) -> str:
        """"single": the shipped model is the winner alone, exported as without --ensemble."""
        return "single" if self.chosen == "single" else "ensemble"

    def module(self, variant: str | None = None) -> Ensemble:
        """The chosen variant (or `variant`) as one network: normalised images in, averaged log-probabilities out."""
        variant = variant or self.chosen
        shipped = self.in_variant(variant)
        rep = self.reps[0]
        return Ensemble([self.reps[i].model for i in shipped], [self.temperatures[i] for i in shipped],
                        rep.dataset.task, variant.endswith("+tta"), flip_shift(rep.normalization),
                        None if self.weights is None or shipped == [0] else [self.weights[i] for i in shipped]).eval()

    def lines(self) -> list[str]:
        d = self.decision
        if self.weights is not None:
            members = "ensemble members (selected on validation; weight, temperature): " + ", ".join(
                f"{m.label} ({'w ' + format(w, '.2f') if w > 0 else 'winner, not in the ensemble'}, T {t:.3f})"
                for m, t, w in zip(self.members, self.temperatures, self.weights))
        else:
            who = "ensemble members (best validation first): " if self.oof is None else \
                "fold models (best fold first, each T fitted on its own held-out fold): "
            members = who + ", ".join(f"{m.label} (T {t:.3f})" for m, t in zip(self.members, self.temperatures))
        out = [*self.skipped, *d.get("notes", []), members]
        split = "val" if self.oof is None else "out-of-fold"
        out += [f"  {name:13s} {v.get('scored_on', split)} {d['metric']} {v['value']:.4f}  " + (
                f"gap to best {v['gap_to_best']:+.4f} (SE {v['se_of_gap']:.4f})" if v.get("gap_to_best") is not None
                else "(stand-in: that of the single fold model)") + f"  {v['passes']} pass(es)/image"
                for name, v in d["variants"].items()]
        images = d.get("images_are") or ("validation images" if self.oof is None else "out-of-fold development images")
        out.append(f"chosen: {self.chosen} -- {d['reason']} ({d['rule']}, {d['n_val']} {images})")
        return out

    def threshold_data(self) -> tuple[np.ndarray, np.ndarray, str] | None:
        """A cross-validated winner's shipped network has no honest validation split: (logits at temperature 1,
        labels, what they are) of the out-of-fold probabilities of the chosen variant's single counterpart (each
        image by the fold model that held it out, at that model's temperature). None: use the validation split."""
        if self.oof is None:
            return None
        probs = np.clip(self.oof["probs"][self.chosen.replace("ensemble", "single")], 1e-12, 1 - 1e-12)
        logits = np.log(probs / (1 - probs)) if self.reps[0].dataset.task == "multilabel" else np.log(probs)
        return logits, self.oof["labels"], (f"out-of-fold predictions of the {len(self.members)} fold models "
                                            f"({len(self.oof['labels'])} development images, each model at its own "
                                            "temperature): the shipped network's honest stand-in")

    def record(self) -> dict:
        """What ensemble.json and metrics.json keep of the choice (the validation figures, never test)."""
        return {"variant": self.chosen, "network": self.network, "tta": self.tta, "tta_offered": self.tta_offered,
                "members_are": "trials" if self.oof is None else "folds", "choice": self.decision, "skipped": self.skipped,
                "candidates": [{"label": m.label, "run_id": m.run_id, "validation_score": m.score, "temperature": t,
                                **({} if self.weights is None else {"weight": self.weights[i]})}
                               for i, (m, t) in enumerate(zip(self.members, self.temperatures))]}


def decide(members: list[Member], tta: bool, metric: str, mode: str, data_root: str | None = None,
           n_resamples: int = N_RESAMPLES, seed: int = 0, skipped: list[str] | None = None) -> Choice:
    """Replay the members, fit their temperatures and choose the variant, on the validation split only."""
    reps = [replay(m.state, data_root) for m in members]
    for member, rep in zip(members[1:], reps[1:]):
        if not np.array_equal(rep.val_index, reps[0].val_index):
            raise UserError(f"Member {member.label} replays to another validation split than {members[0].label}; "
                            "ensemble trials of one split only")
    task, labels = reps[0].dataset.task, reps[0].val.labels
    temperatures, plain, with_tta = [], [], []
    for rep in reps:
        logits, _ = rep.logits(rep.model, rep.val)
        temperature = fit_temperature(logits, labels, task)
        flipped = rep.logits(Flipped(rep.model, flip_shift(rep.normalization)), rep.val)[0] if tta else None
        temperatures.append(temperature)
        plain.append(member_probabilities(logits, None, task, temperature))
        with_tta.append(member_probabilities(logits, flipped, task, temperature) if tta else None)
    variants = variant_probabilities(plain, with_tta if tta else None)
    decision = choose(labels, variants, metric, mode, task, n_resamples, seed)
    return Choice(members, reps, temperatures, tta, decision, list(skipped or []))


def decide_folds(members: list[Member], tta: bool, ensemble: bool, metric: str, mode: str,
                 data_root: str | None = None, n_resamples: int = N_RESAMPLES, seed: int = 0,
                 skipped: list[str] | None = None) -> Choice:
    """A cross-validated winner's fold models (`fold_members`): TTA chosen on out-of-fold predictions by the
    one-SE rule; the fold ensemble shipped when `ensemble` and every fold model sees the same inputs (the rule
    of the module docstring: averaging has no honest out-of-fold figure). Test is never read."""
    reps = [replay(m.state, data_root) for m in members]
    task = reps[0].dataset.task
    temperatures, index, labels, plain, with_tta = [], [], [], [], []
    for rep in reps:  # each fold model on its own held-out fold: together, the development pool once
        logits, fold_labels = rep.logits(rep.model, rep.val)
        temperature = fit_temperature(logits, fold_labels, task)
        flipped = rep.logits(Flipped(rep.model, flip_shift(rep.normalization)), rep.val)[0] if tta else None
        temperatures.append(temperature)
        index.append(rep.val_index)
        labels.append(fold_labels)
        plain.append(member_probabilities(logits, None, task, temperature))
        with_tta.append(member_probabilities(logits, flipped, task, temperature) if tta else None)
    order = np.argsort(np.concatenate(index), kind="stable")
    labels = np.concatenate(labels)[order]
    oof = {"single": np.concatenate(plain)[order]}
    if tta:
        oof["single+tta"] = np.concatenate(with_tta)[order]
    decision = choose(labels, {name: (probs, 1 if name == "single" else 2) for name, probs in oof.items()},
                      metric, mode, task, n_resamples, seed)
    decision["rule"] = decision["rule"].replace("on the validation split", "on out-of-fold predictions")
    decision["reason"] = decision["reason"].replace("validation", "out-of-fold")
    skipped = list(skipped or [])
    unlike = [f"{m.label}: {why}" for m in members[1:] if (why := mismatch(members[0].state, m.state))]
    if ensemble and unlike:
        skipped.append("fold models not averaged, they see different inputs (" + "; ".join(unlike) + "); a fold "
                       "ensemble needs a shared normalisation (normalize half, imagenet or auto)")
    if ensemble and len(members) > 1 and not unlike:
        k, single = len(members), decision["chosen"]
        for name in oof:
            decision["variants"][name.replace("single", "ensemble")] = {
                "value": decision["variants"][name]["value"], "passes": k * decision["variants"][name]["passes"],
                "gap_to_best": None, "se_of_gap": None, "stand_in": f"the out-of-fold figure of {name}"}
        decision["chosen"] = single.replace("single", "ensemble")
        decision["reason"] = (f"the winner is cross-validated: its {k} fold models ship averaged, a rule fixed before "
                              "any score is seen (no honest out-of-fold figure exists for averaging them: every other "
                              "fold model trained on each image; the best fold alone was picked on its own held-out "
                              "score, the ensemble picks nothing; averaged probabilities' NLL is at most the "
                              f"members' mean, which {single}'s out-of-fold figure estimates); TTA "
                              f"{'on' if single.endswith('+tta') else 'off'}, by the out-of-fold rule: "
                              + decision["reason"])
    return Choice(members, reps, temperatures, tta, decision, skipped, {"labels": labels, "probs": oof})


def figures_after_choice(choice: Choice) -> dict:
    """Every variant's test AUC and accuracy, computed AFTER the choice (reported, never used to choose)."""
    rep = choice.reps[0]
    out = {}
    for variant in choice.decision["variants"]:
        logits, labels = rep.logits(choice.module(variant), rep.test)
        metrics = classification_metrics(rep.dataset.task, labels, calibrated(logits, rep.dataset.task, 1.0))
        out[variant] = {"auc": metrics["auc"], "acc": metrics["acc"]}
    return out


def choose_for_search(client, parent, space: dict, k: int, tta: bool, data_root: str | None = None, seed: int = 0,
                      winner_state: dict | None = None, n_resamples: int = N_RESAMPLES) -> Choice:
    """The search's winner (its checkpoint, or `winner_state`) and the next best compatible trials up to `k`
    (a cross-validated winner: its fold models, `decide_folds`), and the variant to ship, chosen on validation
    (out-of-fold) predictions: what analysis.export and tune.py --ensemble both run."""
    winner = runs.winner(client, parent)
    key, mode = runs.selection(parent, space)
    state = winner_state if winner_state is not None else runs.checkpoint_state(winner)
    if state.get("folds"):  # a cross-validated winner: its own fold models, chosen on out-of-fold predictions
        folds = fold_members(state, runs.trial_label(winner), winner.info.run_id)
        note = [f"the winner is cross-validated: --ensemble {k} uses its {len(folds)} fold models, not other trials"]
        return decide_folds(folds, tta, k > 1, key, mode, data_root, n_resamples, seed, note if k > 1 else [])
    first = Member(runs.trial_label(winner), state, winner.info.run_id, winner.data.metrics.get(key))
    members, skipped = search_members(client, parent, space, k, first)
    return decide(members, tta, key, mode, data_root, n_resamples, seed, skipped)


def figures_line(tests: dict, chosen: str) -> str:
    """Every variant's test AUC and accuracy on one line, the shipped one starred."""
    return "test after the choice (reported, never used to choose): " + "  ".join(
        f"{n}{' *' if n == chosen else ''} AUC {t['auc']:.4f} acc {t['acc']:.4f}" for n, t in tests.items())


def summarise_search(client, parent_id: str, k: int, tta: bool, data_root: str | None = None) -> list[str]:
    """tune.py --ensemble K [--tta]: the export's choice for this search, then every variant's test figures."""
    parent = client.get_run(parent_id)
    choice = choose_for_search(client, parent, runs.search_space(client, parent), k, tta, data_root)
    return [*choice.lines(), figures_line(figures_after_choice(choice), choice.chosen)]
