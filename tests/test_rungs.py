"""ASHA's rungs in seconds when a search has a time budget: fake trials with fake costs, no training, no Ray cluster.

A cheap trial (1 s per epoch) and a slow one (10 s per epoch, a little better per epoch) run side by side; each
reports its validation loss after every epoch, as tune_trainable does, with Ray's `time_total_s`.
"""

from __future__ import annotations

import pickle
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from ray import tune
from ray.tune.schedulers import TrialScheduler

from search_spaces import load_space, parse_space, validate_space
from search_spaces.tuner import RungRecords, build_tuner, make_scheduler, restore_tuner
from trainables.errors import UserError
from trainables.tracking.ranking import COMPLETED, STOPPED_EARLY, outcome

EPOCHS = 30
SPACE = {"description": "rungs", "dataset": "pneumoniamnist", "metric": "val_loss", "time_budget": 600,
         "fixed": {"model": "simple_cnn"}, "params": {"lr": {"loguniform": [1.0e-3, 0.1]}}}
SECONDS = {**SPACE, "scheduler": {"max_t": EPOCHS, "grace_period_s": 10, "reduction_factor": 3}}
EPOCH_RUNGS = {**SPACE, "scheduler": {"max_t": EPOCHS, "rungs": "epochs", "grace_period": 1, "reduction_factor": 3}}
TRIALS = {"cheap": (1.0, 1.0), "slow": (10.0, 0.9)}  # seconds per epoch, validation loss at epoch 1 (then / epoch)


def space(raw: dict):
    return parse_space(raw, Path("rungs.yaml"))


def run(scheduler, trials=TRIALS, epochs=EPOCHS):
    """Both trials side by side on their own cores, results in time order (the cheap one first on a tie), as Ray
    would deliver them; a STOP ends a trial and marks its last result done (Ray's TuneController). Returns per trial
    (epochs trained, seconds spent, its outcome)."""
    events = sorted((cost * epoch, order, name, epoch) for order, (name, (cost, _)) in enumerate(trials.items())
                    for epoch in range(1, epochs + 1))
    ended = {}
    for name in trials:
        scheduler.on_trial_add(None, SimpleNamespace(trial_id=name))
    for seconds, _, name, epoch in events:
        if name in ended:
            continue
        result = {"training_iteration": epoch, "time_total_s": seconds, "val_loss": trials[name][1] / epoch}
        stopped = scheduler.on_trial_result(None, SimpleNamespace(trial_id=name), result) == TrialScheduler.STOP
        if stopped or epoch == epochs:
            ended[name] = (epoch, seconds, outcome(epoch, epochs, marked_done=True))
    return ended


def test_seconds_rungs_stop_the_slow_trial_that_the_cheap_one_outlives_at_the_same_spend():
    ended = run(make_scheduler(space(SECONDS)))
    assert ended["slow"] == (1, 10.0, STOPPED_EARLY)  # judged at 10 s against the cheap trial's 10 epochs
    assert ended["cheap"] == (EPOCHS, 30.0, COMPLETED)


def test_epoch_rungs_judge_both_at_the_same_epoch_and_keep_the_slow_trial():
    scheduler = make_scheduler(space(EPOCH_RUNGS))
    ended = run(scheduler)
    first_rung = dict(scheduler._brackets[0]._rungs)[1]
    assert set(first_rung) == {"cheap", "slow"}  # both judged at epoch 1, whatever it cost
    assert ended["slow"] == (EPOCHS, 300.0, COMPLETED)  # 10x the seconds of the cheap trial for the same verdict


def test_seconds_rungs_never_stop_a_trial_for_its_age():
    """ASHA in seconds stops at rungs only: a trial still training its epochs past the top rung (and past the
    budget, which Ray's own stopper handles as "cut") keeps training, so "stopped early" keeps meaning a rung."""
    scheduler = make_scheduler(space(SECONDS))
    scheduler.on_trial_add(None, SimpleNamespace(trial_id="alone"))
    for epoch, seconds in enumerate((5, 50, 500, 700), start=1):
        result = {"training_iteration": epoch, "time_total_s": seconds, "val_loss": 1.0 / epoch}
        assert scheduler.on_trial_result(None, SimpleNamespace(trial_id="alone"), result) == TrialScheduler.CONTINUE


def test_rung_clock_goes_on_from_the_checkpoint_when_a_trial_is_restored():
    """Ray restores `time_total_s` from the checkpoint's metrics (Trainable.restore): a resumed trial meets its next
    rung after the seconds it still needs, not after the whole ladder again."""
    from ray.train._internal.checkpoint_manager import _TrainingResult

    class Trial(tune.Trainable):
        def step(self):
            return {"time_this_iter_s": 5.0}

        def save_checkpoint(self, checkpoint_dir):
            return {}

        def load_checkpoint(self, checkpoint):
            pass

    resumed = Trial({})
    resumed.restore(_TrainingResult(checkpoint=tune.Checkpoint.from_directory(tempfile.mkdtemp()),
                                    metrics={"time_total_s": 42.0, "training_iteration": 3}))
    result = resumed.train()
    assert (result["time_total_s"], result["training_iteration"]) == (47.0, 4)


def test_rung_records_survive_a_resume(tmp_path):
    """Ray does not save its scheduler with the experiment; RungRecords does. The search is built and restored as
    tune.py does (build_tuner, restore_tuner), its rungs saved by the callback and put back: the restored ASHA
    stops the slow trial as the first one did. About 5 s (two Tuners, no trial runs)."""
    searched = space(SECONDS)

    def trainable(config):
        pass

    build_tuner(searched, "resumed", str(tmp_path), trainable, [], seed=0)
    restored = restore_tuner(searched, "resumed", str(tmp_path), trainable)._local_tuner
    callback = next(c for c in restored._run_config.callbacks if isinstance(c, RungRecords))
    assert callback.scheduler is restored._tune_config.scheduler

    before = make_scheduler(searched)  # the run before the kill: the cheap trial passed its rungs
    run(before, {"cheap": TRIALS["cheap"]})
    callback.set_state(pickle.loads(pickle.dumps(RungRecords(before).get_state())))
    assert run(callback.scheduler, {"slow": TRIALS["slow"]})["slow"][:2] == (1, 10.0)


# --- the space keys ------------------------------------------------------------------------------------------

def test_rung_unit_defaults_to_seconds_with_a_budget_and_to_epochs_otherwise():
    assert (space(SECONDS).rung_unit, space({**SPACE, "scheduler": {"max_t": 5}}).first_rung) == ("seconds", 20.0)
    no_budget = {k: v for k, v in SPACE.items() if k != "time_budget"}
    assert space(no_budget).rung_unit == "epochs"
    # a scheduler stating an epoch grace period keeps epoch rungs: the quality benchmark's space, saved searches
    assert space({**SPACE, "scheduler": {"max_t": 5, "grace_period": 2}}).rung_unit == "epochs"
    assert load_space(str(Path(__file__).parents[1] / "bench" / "quality_space.yaml")).rung_unit == "epochs"
    later = space(no_budget)  # --time-budget on a space that left the unit to its default
    later.time_budget = 300
    assert validate_space(later).scheduler_dict() == {"kind": "asha", "max_t": 3, "rungs": "seconds",
                                                      "grace_period_s": 10.0, "reduction_factor": 2}


def test_saved_space_keeps_its_rungs():
    """The space as saved (state file, MLflow) parses back to the same rungs: a resume runs as the search started."""
    for raw in (SECONDS, EPOCH_RUNGS):
        saved = space(raw).as_dict()
        again = space(yaml.safe_load(yaml.safe_dump(saved)))
        assert again.as_dict() == saved and (again.rung_unit, again.first_rung) == (space(raw).rung_unit,
                                                                                    space(raw).first_rung)


@pytest.mark.parametrize(("scheduler", "budget", "message"), [
    ({"rungs": "seconds"}, None, "scheduler: rungs: seconds needs a time_budget"),
    ({"rungs": "seconds", "grace_period": 2}, 600, "scheduler: grace_period counts epochs; with rungs: seconds give "
                                                   "grace_period_s"),
    ({"grace_period_s": 30}, None, "scheduler: grace_period_s counts seconds: give it with rungs: seconds"),
    ({"rungs": "epochs", "grace_period_s": 30}, 600, "scheduler: grace_period_s counts seconds"),
    ({"kind": "fifo", "rungs": "seconds"}, 600, "scheduler: rungs: seconds applies to ASHA"),
    ({"grace_period_s": "10m"}, 300, "scheduler: grace_period_s 600 is not below the time budget (300 s)"),
    ({"grace_period_s": "soon"}, 300, "scheduler.grace_period_s: grace_period_s 'soon' is not a duration"),
    ({"rungs": "minutes"}, 300, "scheduler.rungs: 'minutes': input should be 'epochs' or 'seconds'"),
])
def test_space_refuses_rung_keys_that_do_not_fit(scheduler, budget, message):
    raw = {**{k: v for k, v in SPACE.items() if k != "time_budget"}, "scheduler": {"max_t": 5, **scheduler},
           **({"time_budget": budget} if budget else {})}
    with pytest.raises(UserError) as error:
        space(raw)
    assert "\n" not in str(error.value) and str(error.value).startswith(f"rungs.yaml: {message}"), str(error.value)


def test_space_accepts_seconds_rungs_as_durations():
    given = space({**SPACE, "scheduler": {"max_t": 5, "rungs": "seconds", "grace_period_s": "1m"}})
    assert (given.rung_unit, given.first_rung) == ("seconds", 60.0)
    assert [m for m, _ in make_scheduler(given)._brackets[0]._rungs] == [480.0, 240.0, 120.0, 60.0]  # to the budget
