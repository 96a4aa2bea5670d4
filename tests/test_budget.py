"""A search's time budget: how it is written, what it overrides, and the "cut by budget" outcome everywhere."""

import pickle
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from ray.tune.stopper import TimeoutStopper
from test_cli import run_tune

import tune
from analysis.description import epochs_cell, leaderboard_order, outcomes_section
from analysis.summary import print_summary, rank_results, result_outcome
from search_spaces import load_space, parse_space
from search_spaces.budget import budget_line, parse_duration
from search_spaces.overrides import apply_overrides, check_resume_flags
from trainables.errors import UserError
from trainables.tracking.mlflow_runs import MLflowTrialCallback
from trainables.tracking.names import TAG_OUTCOME, TAG_TRIAL
from trainables.tracking.ranking import COMPLETED, CUT_BY_BUDGET, FAILED, INTERRUPTED, STOPPED_EARLY, outcome
from trainables.tracking.state import budget_spent, read_state, write_state

REPO = Path(__file__).resolve().parents[1]
SPACE = {"description": "x", "dataset": "pneumoniamnist", "fixed": {"model": "simple_cnn"}}


# --- writing a budget ----------------------------------------------------------------------------

@pytest.mark.parametrize("text, seconds", [("90s", 90), ("30m", 1800), ("1.5h", 5400), ("45", 45), (600, 600),
                                           (" 2 M ", 120), (0.5, 0.5)])
def test_a_budget_is_seconds_minutes_hours_or_a_plain_number_of_seconds(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["abc", "30min", "-3m", "0", "0s", "1e3", "", True, float("inf")])
def test_a_budget_that_is_not_a_positive_duration_is_refused(text):
    with pytest.raises(ValueError, match="time budget"):
        parse_duration(text)


def test_a_bad_budget_is_one_line_exit_2_before_anything_runs(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run_tune(capsys, "--space", "smoke", "--time-budget", "10 minutes")
    assert code == 2 and err.count("\n") == 1 and "argument --time-budget: time budget '10 minutes'" in err, err
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump({**SPACE, "time_budget": "-5m"}))
    code, err = run_tune(capsys, "--space", tmp_path / "mine.yaml")
    assert code == 2 and err.count("\n") == 1 and "mine.yaml: time_budget: time budget '-5m'" in err, err
    assert not (tmp_path / "medtune_results").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_space_with_a_budget_and_no_trial_count_runs_until_the_budget_and_both_apply_when_both_are_given():
    alone = parse_space({**SPACE, "time_budget": "30m"}, Path("a.yaml"))
    assert (alone.time_budget, alone.num_samples) == (1800, None)
    both = parse_space({**SPACE, "time_budget": 90, "num_samples": 4}, Path("b.yaml"))
    assert (both.time_budget, both.num_samples) == (90, 4)
    neither = parse_space(SPACE, Path("c.yaml"))
    assert (neither.time_budget, neither.num_samples) == (None, 8) and "time_budget" not in neither.as_dict()
    again = parse_space(alone.as_dict(), Path("a.yaml"))  # the state file's copy, as --resume reads it
    assert (again.time_budget, again.num_samples) == (1800, None)


def test_the_command_line_budget_replaces_the_space_trial_count_unless_num_samples_is_given_too():
    parser = tune.get_args_parser()
    space = apply_overrides(load_space("smoke"), parser.parse_args(["--space", "smoke", "--time-budget", "4m"]))
    assert (space.time_budget, space.num_samples) == (240, None)
    space = apply_overrides(load_space("smoke"),
                            parser.parse_args(["--space", "smoke", "--time-budget", "1.5h", "--num-samples", "3"]))
    assert (space.time_budget, space.num_samples) == (5400, 3)


def test_resume_refuses_a_new_budget():
    args = tune.get_args_parser().parse_args(["--resume", "old", "--time-budget", "30m"])
    with pytest.raises(UserError, match="--resume continues search 'old' as it was started, so --time-budget would"):
        check_resume_flags(args)


# --- the outcome rule and where it shows ---------------------------------------------------------

def test_a_trial_is_cut_by_budget_only_without_a_done_mark_short_of_max_t_and_with_the_budget_spent():
    assert outcome(1, 3, marked_done=False, budget_spent=True) == CUT_BY_BUDGET
    assert outcome(0, 3, marked_done=False, budget_spent=True) == CUT_BY_BUDGET  # cut before its first epoch
    assert outcome(1, 3, marked_done=True, budget_spent=True) == STOPPED_EARLY  # ASHA marks its stops done
    assert outcome(3, 3, marked_done=False, budget_spent=True) == COMPLETED  # its last epoch was in
    assert outcome(1, 3, marked_done=False, budget_spent=False) == INTERRUPTED  # stopped by a signal: resumable
    assert outcome(1, 3, failed=True, marked_done=False, budget_spent=True) == FAILED


def result(trial_id, epochs, best, done, error=None, lr=0.1, **metrics):
    return SimpleNamespace(metrics={"trial_id": trial_id, "training_iteration": epochs, "best_val_auc": best,
                                    "done": done, **metrics}, error=error, config={"lr": lr})


RESULTS = [result("a", 3, 0.90, True, test_auc=0.88), result("b", 1, 0.80, True),  # completed; stopped by ASHA
           result("c", 2, 0.95, False), result("d", 1, 0.99, False, error=RuntimeError("nan")),  # cut; failed
           result("e", 1, 0.97, True),  # stopped by ASHA with a high score: it does not rank
           SimpleNamespace(metrics={"trial_id": "f"}, error=None, config=None)]  # cut before its first report


def test_cut_trials_rank_with_completed_ones_on_their_best_validation_score():
    ranked = rank_results(RESULTS, "val_auc", "max", 3, budget_spent=True)
    assert [r.metrics["trial_id"] for r in ranked] == ["c", "a"]
    assert [r.metrics["trial_id"] for r in rank_results(RESULTS, "val_auc", "max", 3)] == ["a"]  # no budget spent
    assert [result_outcome(r, 3, True) for r in RESULTS] == [COMPLETED, STOPPED_EARLY, CUT_BY_BUDGET, FAILED,
                                                             STOPPED_EARLY, CUT_BY_BUDGET]


def test_summary_counts_cut_trials_apart_and_states_the_budget_used(capsys):
    ranked = rank_results(RESULTS, "val_auc", "max", 3, budget_spent=True)
    print_summary(ranked, RESULTS, ["lr"], "val_auc", 3, budget=budget_line(240, 246), budget_spent=True)
    out = capsys.readouterr().out
    assert "6 trials: 1 completed, 2 stopped early by ASHA, 2 cut by budget, 1 failed" in out
    assert "time budget: 4m, used 4.1m (102 %)" in out
    assert "2 cut" in out.split("best_val_auc")[1]  # its epochs column
    assert "best test metrics: none yet (cut by the budget after 2 epochs)" in out


class RecordingClient:
    """The few MlflowClient calls the callback makes when a trial ends, recorded."""

    def __init__(self):
        self.tags, self.ended = {}, {}

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        self.tags.setdefault(run_id, {}).update({t.key: t.value for t in tags})

    def set_terminated(self, run_id, status):
        self.ended[run_id] = status

    def log_artifact(self, run_id, path):
        pass


def ray_trial(trial_id, status, epochs, done):
    return SimpleNamespace(trial_id=trial_id, status=status, checkpoint=None,
                           last_result={"training_iteration": epochs, "done": done})


@pytest.mark.parametrize("spent", [True, False])
def test_mlflow_ends_the_trials_ray_stopped_cut_by_the_budget_or_else_interrupted_and_only_those(spent):
    callback = MLflowTrialCallback("sqlite:///unused.db", "parent", "s", max_t=3, time_budget_s=60)
    callback.client, callback.budget.used_s = RecordingClient(), 61 if spent else 30
    callback._runs = {t: f"run-{t}" for t in "abcd"}
    callback.on_experiment_end(trials=[ray_trial("a", "TERMINATED", 3, True), ray_trial("b", "TERMINATED", 1, True),
                                       ray_trial("c", "TERMINATED", 2, False), ray_trial("d", "ERROR", 1, False)])
    expected = {"run-c": {TAG_OUTCOME: CUT_BY_BUDGET if spent else INTERRUPTED}}  # else: a signal, the storage
    assert callback.client.tags == expected  # a, b were closed by on_trial_complete; d by on_trial_error
    assert callback.client.ended == {"run-c": "FINISHED" if spent else "KILLED"}  # KILLED: --resume trains it on


class FakeTime:
    """time.time() for Ray's stopper and our callback alike, moved by hand."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_the_budget_clock_is_spent_when_ray_stops_the_trials_and_a_resume_goes_on_from_the_same_point(monkeypatch):
    """Ray's own TimeoutStopper (what time_budget_s makes) and the callback's clock, saved and restored as Ray saves
    its experiment state: a resume gets the budget that was left, and both say "spent" at the same tick."""
    clock = FakeTime()
    monkeypatch.setattr(time, "time", clock)
    stopper, callback = TimeoutStopper(60), MLflowTrialCallback("sqlite:///unused.db", "p", "s", 3, time_budget_s=60)
    for step in range(4):  # the first run: 30 s of steps, then Ray saves its state (in the same step), then a kill
        clock.now += 10 if step else 0
        callback.on_step_begin(0, [])
        assert not stopper.stop_all()
    saved_stopper, saved_callback = pickle.dumps(stopper), callback.get_state()
    clock.now += 500  # the search lies dead: no budget spent
    stopper = pickle.loads(saved_stopper)  # what Tuner.restore does
    callback = pickle.loads(pickle.dumps(MLflowTrialCallback("sqlite:///unused.db", "p", "s", 3, time_budget_s=60)))
    callback.set_state(saved_callback)
    ray_says = []
    for step in range(6):  # the resumed run: 30 s were left
        clock.now += 10 if step else 0
        callback.on_step_begin(0, [])
        ray_says.append(stopper.stop_all())
        assert callback.budget.spent == ray_says[-1]
    assert ray_says == [False, False, False, True, True, True]  # 30 s into the resume, not 60


def test_a_resumed_search_classes_the_trials_the_budget_cut_as_cut_everywhere(monkeypatch, tmp_path):
    """First run 40 s, a resume 25 s of a 60 s budget: the trial running at the end is cut by budget in MLflow, and
    the record tune.py reads (its summary and ranking) says spent with 65 s used; this run alone (25 s) was not."""
    clock = FakeTime()
    monkeypatch.setattr(time, "time", clock)
    write_state(str(tmp_path), "s", {"seed": 0})
    callback = MLflowTrialCallback("sqlite:///unused.db", "p", "s", 3, time_budget_s=60, storage=str(tmp_path))
    callback.on_step_begin(0, [])
    clock.now += 40
    saved = callback.get_state()
    clock.now += 300
    resumed = pickle.loads(pickle.dumps(MLflowTrialCallback("sqlite:///unused.db", "p", "s", 3, time_budget_s=60,
                                                            storage=str(tmp_path))))
    resumed.set_state(saved)
    resumed.client, resumed._runs = RecordingClient(), {"c": "run-c"}
    resumed.on_step_begin(0, [])
    clock.now += 25
    resumed.on_experiment_end(trials=[ray_trial("c", "TERMINATED", 1, False)])
    assert resumed.client.tags == {"run-c": {TAG_OUTCOME: CUT_BY_BUDGET}}
    used, spent = budget_spent(read_state(str(tmp_path), "s"), 60, 25)
    assert (used, spent) == (65, True)
    assert result_outcome(result("c", 1, 0.9, False), 3, spent) == CUT_BY_BUDGET
    assert budget_line(60, used) == "time budget: 1m, used 1.08m (108 %)"


def test_a_search_without_a_budget_record_counts_this_run_only():
    assert budget_spent({"seed": 0}, 60, 61) == (61, True) and budget_spent(None, 60, 30) == (30, False)
    assert budget_spent(None, None, 30) == (30, False)


def run(trial_id, outcome_tag, best, epochs):
    return SimpleNamespace(info=SimpleNamespace(run_id=f"run-{trial_id}"),
                           data=SimpleNamespace(tags={TAG_TRIAL: trial_id, TAG_OUTCOME: outcome_tag},
                                                metrics={"best_val_auc": best, "epoch": epochs}, params={}))


def test_the_description_ranks_cut_trials_with_completed_ones_and_says_why_they_ended():
    runs = [run("a", COMPLETED, 0.90, 3), run("b", STOPPED_EARLY, 0.99, 1), run("c", CUT_BY_BUDGET, 0.95, 2)]
    assert [r.data.tags[TAG_TRIAL] for r in leaderboard_order(runs, "best_val_auc", "max")] == ["c", "a", "b"]
    assert epochs_cell(runs[2], 3) == "2/3 cut by budget"
    board = SimpleNamespace(trials=runs)
    assert "3 trials: 1 completed, 1 stopped early, 1 cut by budget, 0 failed" in outcomes_section(board)[1]
