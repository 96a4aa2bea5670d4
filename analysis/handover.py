"""What a search hands over: its single winner or an ensemble selected from its trials, by a rule fixed in advance.

    python -m analysis.export --search NAME --out DIR                   # rule `select`, at most 5 members
    python tune.py --space smoke --ensemble 5                           # prints the same choice at the end
    python -m analysis.export --search NAME --out DIR --ensemble-rule topk --ensemble 3   # the older rule

Rule `select` (the default). Candidates: every trial of the search that trained to the end, was cut by the time
budget or was stopped early by ASHA (its best checkpoint so far), on the winner's split and inputs (the keys of
analysis.ensemble.SPLIT_KEYS / INPUT_KEYS), read from the validation predictions each trial kept
(trainables.tracking.names.VAL_PREDICTIONS): no replay, no test image. The validation split is cut in two halves
(seeded, stratified; analysis.selection.halves says why): on the first, each candidate's temperature is fitted
and greedy forward selection with replacement (analysis.selection.greedy, 25 steps, at most K distinct members)
picks members and weights, scored by the search's metric (NLL of the calibrated probabilities for val_loss); on
the second, which chose nothing, the single winner and that ensemble are scored. THE RULE, fixed before any test
number was seen: the ensemble ships unless, on that held-back half, it is worse than the single winner by more
than one paired-bootstrap SE; then the single winner ships. It prefers quality: an ensemble that is not clearly
worse is kept, since averaging calibrated models rarely hurts and a few hundred validation images cannot tell
small differences apart (issue 23: on PneumoniaMNIST validation preferred the single model where test did not).
The weights shipped are those chosen on the first half (what the second half judged); the member temperatures
are refitted on the whole validation split, as the export fits the ensemble's own.

A cross-validated winner keeps analysis.ensemble.decide_folds (its own K fold models, a rule fixed in advance);
rule `topk` is analysis.ensemble's one-SE rule over the top K trials, as before.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from analysis import runs
from analysis.calibration import calibrated, fit_temperature
from analysis.ensemble import (
    INPUT_KEYS,
    N_RESAMPLES,
    SPLIT_KEYS,
    Choice,
    Member,
    choose,
    choose_for_search,
    figures_after_choice,
    figures_line,
    member_probabilities,
    mismatch,
    scorer,
)
from analysis.ensemble_model import Flipped, flip_shift
from analysis.replay import replay
from analysis.selection import STEPS, greedy, halves, paired_se, safe_score, weighted
from trainables.errors import UserError
from trainables.tracking.names import TAG_CHECKPOINT, TAG_HANDOVER, TAG_OUTCOME, VAL_PREDICTIONS
from trainables.tracking.ranking import COMPLETED, CUT_BY_BUDGET, STOPPED_EARLY, leaderboard
from trainables.training.figures import read_val_predictions

RULES = ("select", "topk")
DEFAULT_MEMBERS = 5  # --ensemble's default: at most 5 distinct members (~5 forward passes per image)
CANDIDATES = (COMPLETED, CUT_BY_BUDGET, STOPPED_EARLY)


@dataclass
class Candidate:
    """A trial that may join, with the validation predictions it kept (analysis.selection reads only these)."""

    label: str
    run_id: str
    score: float | None
    kept: dict
    run: object = None  # its MLflow run (for its checkpoint, if selected)


def kept_validation(client, run) -> dict | None:
    """The validation predictions a trial kept: its MLflow artifact, else its local checkpoint folder; None when
    it kept none (a trial from before trials kept them, or a cross-validated one: those keep out-of-fold ones)."""
    logged = runs.kept_file(client, run, VAL_PREDICTIONS, read_val_predictions)
    if logged is not None:
        return logged
    local = Path(run.data.tags.get(TAG_CHECKPOINT) or "/nonexistent") / VAL_PREDICTIONS
    return read_val_predictions(local) if "://" not in str(local) and local.is_file() else None


def split_of(kept: dict) -> dict:
    """What trials must share to be combined: the split (config) and how images become inputs (dataset entry)."""
    return {**{k: kept["config"].get(k) for k in SPLIT_KEYS},
            **{k: kept["inputs"].get(k) for k in (*INPUT_KEYS, "mean_image_sha1")}}


def candidates(client, parent, space: dict, winner, kept_winner: dict) -> tuple[list[Candidate], list[str]]:
    """The winner and every trial that may join it (completed, cut by budget, stopped early; leaderboard order),
    each with its kept validation predictions; the lines say which were left out and why."""
    key, mode = runs.selection(parent, space)
    found = [Candidate(runs.trial_label(winner), winner.info.run_id, winner.data.metrics.get(key), kept_winner, winner)]
    ours, skipped = split_of(kept_winner), []
    trials = [r for r in runs.trials(client, parent) if r.data.tags.get(TAG_OUTCOME) in CANDIDATES
              and r.info.run_id != winner.info.run_id]
    for run in leaderboard(trials, lambda r: r.data.tags.get(TAG_OUTCOME),
                           lambda r: r.data.metrics.get(key, math.nan), mode, tie=runs.trial_label):
        label = runs.trial_label(run)
        kept = kept_validation(client, run)
        if kept is None:
            skipped.append(f"skipped trial {label}: it kept no validation predictions ({VAL_PREDICTIONS}: a trial "
                           "from before trials kept them, or a cross-validated one)")
            continue
        theirs = split_of(kept)
        why = next((f"{k} {theirs[k]!r}, not {ours[k]!r}" for k in ours if theirs[k] != ours[k]), None)
        if why is None and not np.array_equal(kept["index"], kept_winner["index"]):
            why = "other validation rows"
        if why:
            skipped.append(f"skipped trial {label}: {why} (members share image size, channels, normalisation and split)")
            continue
        found.append(Candidate(label, run.info.run_id, run.data.metrics.get(key), kept, run))
    return found, skipped


def select(found: list[Candidate], metric: str, mode: str, k: int, seed: int = 0,
           n_resamples: int = N_RESAMPLES, steps: int = STEPS) -> dict:
    """Selection on one half of the validation split, the rule on the other (module docstring); found[0] is the
    winner. Returns the decision: variants scored on the held-back half, the chosen one, why, and the weights."""
    first = found[0].kept
    task, labels = first["task"], first["labels"]
    pick, check = halves(labels, seed)
    score, shown = scorer(metric, task)
    probs = []
    for candidate in found:  # temperatures from the selection half only: the other half fits nothing
        logits = candidate.kept["logits"]
        probs.append(calibrated(logits, task, fit_temperature(logits[pick], labels[pick], task)))
    counts, path = greedy([p[pick] for p in probs], labels[pick], score, mode, steps, k)
    if not counts.sum():  # nothing scored (e.g. AUC on a one-class half): the winner alone
        counts = np.eye(len(found), dtype=int)[0]
    weights = counts / counts.sum()
    single, ensemble = probs[0][check], weighted([p[check] for p in probs], weights)
    value = {"single": safe_score(score, labels[check], single), "ensemble": safe_score(score, labels[check], ensemble)}
    sign = 1.0 if mode == "max" else -1.0
    worse = sign * (value["single"] - value["ensemble"])  # > 0: the ensemble is worse than the single winner
    se = paired_se(labels[check], single, ensemble, score, n_resamples, seed)
    members = [f"{c.label} {w:.2f}" for c, w in zip(found, weights) if w > 0]
    winner_only = counts[0] == counts.sum()
    if winner_only:
        chosen, reason = "single", (f"selection kept the winner alone ({len(found)} candidate(s)): no mix scored a "
                                    f"better {shown} on the selection half, so the single model ships")
    elif math.isnan(value["ensemble"]) or (not math.isnan(value["single"]) and worse > se):
        chosen, reason = "single", (f"on the held-back half the selected ensemble ({', '.join(members)}) has {shown} "
                                    f"{value['ensemble']:.4f}, worse than the single winner's {value['single']:.4f} by "
                                    f"{worse:.4f}, more than one SE ({se:.4f}): the single winner ships")
    else:
        verdict = "better than" if worse < 0 else "within one SE of"
        chosen, reason = "ensemble", (f"on the held-back half the selected ensemble ({', '.join(members)}) has "
                                      f"{shown} {value['ensemble']:.4f}, {verdict} the single winner's "
                                      f"{value['single']:.4f} (gap {worse:+.4f}, SE {se:.4f}): the ensemble ships")
    best = "ensemble" if not winner_only and sign * value["ensemble"] > sign * value["single"] else "single"
    scored_on = "held-back val"
    variants = {"single": {"value": value["single"], "passes": 1, "scored_on": scored_on},
                **({} if winner_only else {"ensemble": {"value": value["ensemble"], "passes": int(np.count_nonzero(counts)),
                                                  "scored_on": scored_on}})}
    for name, row in variants.items():
        row["gap_to_best"] = sign * (value[best] - row["value"]) + 0.0  # + 0.0: no "-0.0000" for the best
        row["se_of_gap"] = 0.0 if name == best else se
    rule = (f"ensemble selection: greedy forward selection with replacement, {steps} steps, at most {k} distinct "
            f"members, on a seeded stratified half of the validation split ({len(pick)} images, seed {seed}); the "
            f"single winner ships only when, on the other half, the ensemble is worse by more than one paired-"
            f"bootstrap SE ({n_resamples} resamples)")
    return {"metric": shown, "mode": mode, "variants": variants, "best": best, "chosen": chosen, "reason": reason,
            "rule": rule, "n_val": int(len(check)), "images_are": "held-back validation images",
            "weights": weights.tolist(), "selection": {
                "steps": steps, "max_members": k, "counts": counts.tolist(), "path": path, "n_select": int(len(pick)),
                "n_check": int(len(check)), "seed": seed, "candidates": [c.label for c in found]}}


def choose_selected(client, parent, space: dict, k: int, tta: bool, data_root: str | None = None, seed: int = 0,
                    winner_state: dict | None = None, n_resamples: int = N_RESAMPLES, winner_rep=None) -> Choice:
    """Rule `select` for a search: the decision from kept validation predictions, then the members' checkpoints
    (only the winner and the selected trials are loaded and replayed, to be exported and, after the choice,
    scored on test). A cross-validated winner: its fold models (analysis.ensemble.decide_folds)."""
    winner = runs.winner(client, parent)
    key, mode = runs.selection(parent, space)
    state = winner_state if winner_state is not None else runs.checkpoint_state(winner)
    if state.get("folds"):
        return choose_for_search(client, parent, space, k, tta, data_root, seed, state, n_resamples)
    first = Member(runs.trial_label(winner), state, winner.info.run_id, winner.data.metrics.get(key))
    kept = kept_validation(client, winner)
    if kept is None:
        decision = alone(f"the winner kept no validation predictions ({VAL_PREDICTIONS}: trained before trials kept "
                         "them), so there is nothing to select from without a replay; `--ensemble-rule topk` "
                         "replays the top trials instead")
        return _choice([first], [1.0], [None], tta, decision, [], key, mode, data_root, seed, n_resamples, winner_rep)
    found, skipped = candidates(client, parent, space, winner, kept)
    decision = select(found, key, mode, k, seed, n_resamples)
    shipped = [0, *(i for i, w in enumerate(decision["weights"]) if w > 0 and i != 0)]
    members = [first, *(Member(found[i].label, runs.checkpoint_state(found[i].run), found[i].run_id, found[i].score)
                        for i in shipped[1:])]
    for member in members[1:]:  # the kept files said they match; their checkpoints must agree
        why = mismatch(state, member.state)
        if why:
            raise UserError(f"Trial {member.label}'s checkpoint does not match the validation predictions it kept "
                            f"({why}); re-run the search or use --ensemble-rule topk")
    return _choice(members, [decision["weights"][i] for i in shipped], [found[i].kept for i in shipped], tta,
                   decision, skipped, key, mode, data_root, seed, n_resamples, winner_rep)


def alone(reason: str) -> dict:
    """The decision when there is nothing to select: the winner ships, for `reason`."""
    return {"metric": "", "mode": "", "variants": {"single": {"value": math.nan, "passes": 1, "gap_to_best": 0.0,
                                                              "se_of_gap": 0.0}},
            "best": "single", "chosen": "single", "reason": reason, "rule": "ensemble selection", "n_val": 0,
            "images_are": "validation images", "weights": [1.0]}


def _choice(members: list[Member], weights: list[float], kept: list[dict | None], tta: bool, decision: dict,
            skipped: list[str], metric: str, mode: str, data_root: str | None, seed: int, n_resamples: int,
            winner_rep=None) -> Choice:
    """The Choice analysis.export ships: members replayed (their networks; `winner_rep`: the winner's, when the
    caller has it already), each temperature refitted on the whole validation split from its kept logits (the
    replayed ones for a winner that kept none); with `tta`, flips decided after the selection (below)."""
    reps = [winner_rep or replay(members[0].state, data_root), *(replay(m.state, data_root) for m in members[1:])]
    task, labels = reps[0].dataset.task, reps[0].val.labels
    temperatures = [fit_temperature(*(rep.logits(rep.model, rep.val) if saved is None else
                                      (saved["logits"], saved["labels"])), task) for rep, saved in zip(reps, kept)]
    choice = Choice(members, reps, temperatures, tta, decision, list(skipped), None, weights)
    if tta:
        _decide_flips(choice, labels, metric, mode, seed, n_resamples)
    return choice


def _decide_flips(choice: Choice, labels: np.ndarray, metric: str, mode: str, seed: int, n_resamples: int) -> None:
    """Flip TTA for the network the rule chose, on the whole validation split (the kept predictions have no
    mirror images, so the shipped members are replayed, plain and flipped), by analysis.ensemble's one-SE rule:
    doubling the forward passes has to be clearly better."""
    base, task = choice.chosen, choice.reps[0].dataset.task
    shipped = choice.in_variant(base)
    weights = np.array([1.0 if choice.weights is None else choice.weights[i] for i in shipped])
    plain, flipped = [], []
    for index in shipped:
        rep, temperature = choice.reps[index], choice.temperatures[index]
        logits, _ = rep.logits(rep.model, rep.val)
        mirrored, _ = rep.logits(Flipped(rep.model, flip_shift(rep.normalization)), rep.val)
        plain.append(member_probabilities(logits, None, task, temperature))
        flipped.append(member_probabilities(logits, mirrored, task, temperature))
    weights = weights / weights.sum()
    flips = choose(labels, {base: (weighted(plain, weights), len(shipped)),
                            f"{base}+tta": (weighted(flipped, weights), 2 * len(shipped))},
                   metric, mode, task, n_resamples, seed)
    decision = choice.decision
    decision["variants"][f"{base}+tta"] = {**flips["variants"][f"{base}+tta"], "scored_on": "whole val"}
    decision["tta_choice"] = flips
    decision["reason"] += f"; flip TTA, on the whole validation split: {flips['reason']}"
    decision["chosen"] = flips["chosen"]


def choose_handover(client, parent, space: dict, k: int, tta: bool, data_root: str | None = None, seed: int = 0,
                    winner_state: dict | None = None, n_resamples: int = N_RESAMPLES, rule: str = "select",
                    winner_rep=None) -> Choice:
    """What analysis.export and tune.py --ensemble run: rule `select` (default) or `topk`."""
    if rule not in RULES:
        raise UserError(f"--ensemble-rule {rule!r} is not a rule; use one of {', '.join(RULES)}")
    if rule == "topk":
        return choose_for_search(client, parent, space, k, tta, data_root, seed, winner_state, n_resamples)
    return choose_selected(client, parent, space, k, tta, data_root, seed, winner_state, n_resamples, winner_rep)


def handover_record(choice: Choice) -> dict:
    """What the search's description shows of the hand-over: the variant, why, and the members with weights."""
    shipped = choice.in_variant()
    weights = [1.0] if shipped == [0] else \
        [choice.weights[i] for i in shipped] if choice.weights is not None else [1.0 / len(shipped)] * len(shipped)
    return {"variant": choice.chosen, "reason": choice.decision["reason"], "rule": choice.decision["rule"],
            "members": [{"label": choice.members[i].label, "weight": round(float(w), 4)} for i, w in zip(shipped, weights)]}


def record_on_search(client, parent_id: str, choice: Choice) -> None:
    """Keep the hand-over on the parent run, where analysis.description reads it."""
    client.set_tag(parent_id, TAG_HANDOVER, json.dumps(handover_record(choice)))


def summarise_search(client, parent_id: str, k: int, tta: bool, data_root: str | None = None,
                     rule: str = "select") -> list[str]:
    """tune.py --ensemble K [--tta]: what analysis.export would ship by `rule` and why, then every variant's test
    figures (after the choice); the hand-over is kept on the parent run for its description."""
    parent = client.get_run(parent_id)
    choice = choose_handover(client, parent, runs.search_space(client, parent), k, tta, data_root, rule=rule)
    record_on_search(client, parent_id, choice)
    return [*choice.lines(), figures_line(figures_after_choice(choice), choice.chosen)]
