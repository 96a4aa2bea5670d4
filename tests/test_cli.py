"""tune.py's promises on bad input: one line, exit 2, nothing written, before Ray starts (in-process calls; one
real process for the exit code)."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import background_job

import tune
from trainables.tracking.mlflow_runs import adopt_credentials, without_credentials
from trainables.tracking.state import read_state, storage_error, write_state

REPO = Path(__file__).resolve().parents[1]


def run_tune(capsys, *argv) -> tuple[int, str]:
    try:
        code = tune.main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    return code, capsys.readouterr().err


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def assert_nothing_written(folder: Path):
    assert not (folder / "medtune_results").exists() and not (folder / "mlflow.db").exists()


@pytest.mark.parametrize("argv, expected", [
    (["--space", "smok"], "Unknown search space 'smok'"),
    (["--space", "smoke", "--dataset", "pneumonia"], "Unknown dataset 'pneumonia'"),
    (["--space", "smoke", "--set", "model=resnet19"], "Unknown model 'resnet19'"),
    (["--space", "smoke", "--set", "lr=abc"], "--set lr: Invalid lr 'abc': input should be a valid number"),
    (["--space", "smoke", "--set", "x=[1"], "--set 'x=[1': '[1' is not a YAML value"),
    (["--space", "smoke", "--set", "batch_size=2.5"], "Invalid batch_size 2.5: input should be a valid integer"),
    (["--space", "smoke", "--set", "learning_rate=0.1"], "Unknown config key 'learning_rate'"),
    (["--space", "smoke", "--image-size", "0"], "--image-size: Invalid image_size 0: input should be greater than or equal to 8"),
    (["--space", "smoke", "--image-size", "-3"], "--image-size: Invalid image_size -3: input should be greater than or equal to 8"),
    (["--space", "smoke", "--num-samples", "0"], "argument --num-samples: 0 is not > 0"),
    (["--space", "smoke", "--max-epochs", "2.5"], "argument --max-epochs: invalid positive int value: '2.5'"),
    (["--space", "smoke", "--set", "model=densenet121"], "Model densenet121 with the imagenet stem needs images of at "
                                                         "least 32 px, got 28; raise image_size or use stem: small"),
    (["--space", "smoke", "--set", "model=vgg_like", "stem=small"], "Model vgg_like has no stem choice"),
    (["--space", "smoke", "--metric", "test_auc"], "--metric test_auc: selection uses validation metrics only"),
    (["--space", "smoke", "--metric", "val_acuc"], "--metric val_acuc is not a metric trials log; valid: val_loss, "),
    (["--space", "smoke", "--metric", "val_loss", "--mode", "max"],
     "--mode max contradicts metric val_loss, where lower is better; use --mode min or leave --mode out"),
    (["--space", "smoke", "--mode", "min"], "--mode min contradicts metric val_auc, where higher is better"),
    (["--space", "smoke", "--mode", "up"], "argument --mode: invalid choice: 'up'"),
    (["--resume", "no-such-search"], "No search named 'no-such-search'"),
    (["--space", "smoke", "--set", "cv_folds=3"], "--set cv_folds: the number of folds is the search's, not a trial key"),
    (["--space", "smoke", "--cv-folds", "21"], "cv_folds: 21: input should be less than or equal to 20"),
    (["--space", "smoke", "--cv-folds", "0"], "argument --cv-folds: 0 is not > 0"),
    (["--space", "smoke", "--cv-folds", "3", "--set", "split_ratio=0.8"], "split_ratio 0.8 and cv_folds 3 both split"),
])
def test_user_errors_are_one_line_exit_2_and_write_nothing(capsys, in_tmp, argv, expected):
    code, err = run_tune(capsys, *argv)
    assert code == 2 and err.count("\n") == 1 and expected in err, err
    assert_nothing_written(in_tmp)


SPACE = "description: x\ndataset: pneumoniamnist\n"


@pytest.mark.parametrize("body, expected", [
    ("fixed: {batch_size: 2.5}\n", "fixed: Invalid batch_size 2.5: input should be a valid integer"),
    ("params:\n  batch_size: {int: [0, 64]}\n", "params.batch_size: Invalid batch_size 0"),
    ("params:\n  batch_size: {uniform: [16, 64]}\n", "params.batch_size: batch_size is an integer; search it with int or choice"),
    ("params:\n  warmup_frac: {uniform: [0.0, 1.5]}\n", "params.warmup_frac: Invalid warmup_frac 1.5"),
    ("params:\n  lr: {int: [1.5, 3]}\n", "params.lr.int.0: 1.5: input should be a valid integer"),
    ("variants:\n  a: {lr: -1}\n", "variants.a: Invalid lr -1: input should be greater than 0"),
    ("scheduler: {max_t: 2, grace_period: 3}\n", "scheduler: grace_period 3 exceeds max_t 2"),
    ("num_samples: 2.5\n", "num_samples: 2.5: input should be a valid integer"),
    ("resources: {cpu: 0}\n", "resources.cpu: 0: input should be greater than 0"),
    ("fixed: {cv_folds: 3}\n", "fixed.cv_folds: is set by the space's own keys"),
    ("params:\n  cv_folds: {choice: [1, 3]}\n", "params.cv_folds: is set by the space's own keys"),
    ("cv_folds: 3\nfixed: {split_ratio: 0.8}\n", "fixed: split_ratio 0.8 and cv_folds 3 both split the development pool"),
])
def test_a_wrong_type_or_range_in_a_space_file_is_named_before_ray_starts(capsys, in_tmp, body, expected):
    (in_tmp / "mine.yaml").write_text(SPACE + body)
    code, err = run_tune(capsys, "--space", in_tmp / "mine.yaml")
    assert code == 2 and err.count("\n") == 1 and f"mine.yaml: {expected}" in err, err
    assert_nothing_written(in_tmp)


@background_job(needs_data=False, ray=False)
def tune_py_refusing_a_value(started, tmp: Path) -> subprocess.CompletedProcess:
    """`python tune.py --space smoke --set lr=abc` in a process of its own. Cost: one process, about 10 s of
    imports on 2 quiet cores, run beside the in-process tests from the session's start (tests/conftest.py)."""
    return started.run([sys.executable, str(REPO / "tune.py"), "--space", "smoke", "--set", "lr=abc"], cwd=tmp,
                       timeout=300)


def test_exit_code_and_single_line_in_a_real_process(tune_py_refusing_a_value):
    result = tune_py_refusing_a_value
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Invalid lr 'abc'" in result.stderr


# --- resume --------------------------------------------------------------------------------------

@pytest.fixture
def saved_search(in_tmp):
    """The state file of a search 'old' as tune.py writes it (space with a GPU request, a tracking server)."""
    space = {"description": "x", "dataset": "pneumoniamnist", "resources": {"cpu": 1, "gpu": 0.5},
             "fixed": {"model": "simple_cnn"}}
    write_state("medtune_results", "old", {"space": space, "space_name": "mine", "seed": 0,
                                           "tracking_uri": "http://10.0.0.10:5000"})
    return in_tmp


@pytest.mark.parametrize("flag", [["--num-samples", "9"], ["--max-epochs", "5"], ["--set", "lr=0.1"], ["--seed", "3"],
                                  ["--gpus-per-trial", "1"], ["--dataset", "breastmnist"], ["--skip-bad-images"],
                                  ["--cv-folds", "3"]])
def test_resume_refuses_a_flag_it_would_ignore(capsys, saved_search, flag):
    code, err = run_tune(capsys, "--resume", "old", *flag)
    assert code == 2 and err.count("\n") == 1
    assert f"--resume continues search 'old' as it was started, so {flag[0]} would be ignored" in err


@pytest.mark.parametrize("argv, metric, mode", [
    (["--metric", "val_loss", "--mode", "min"], "val_loss", "min"),
    (["--metric", "val_loss"], "val_loss", "min"),  # the direction follows the metric
    (["--metric", "val_balanced_acc"], "val_balanced_acc", "max"),
    ([], "val_auc", "max"),  # the space's own
])
def test_metric_and_mode_override_the_space_selection(in_tmp, monkeypatch, argv, metric, mode):
    ran = []
    monkeypatch.setattr(tune, "run_search", lambda space, *args, **kwargs: ran.append(space) or 0)
    assert tune.main(["--space", "smoke", *argv]) == 0
    (space,) = ran
    assert (space.metric, space.mode) == (metric, mode)
    assert (space.base_config()["metric"], space.base_config()["mode"]) == (metric, mode)  # each trial's best epoch too
    assert space.as_dict()["metric"] == metric  # what the state file keeps for a resume


def test_a_metric_the_task_does_not_log_is_refused_after_the_data_is_read(capsys, in_tmp, medmnist_root):
    code, err = run_tune(capsys, "--space", "smoke", "--data-root", medmnist_root, "--metric", "val_hamming_loss")
    assert code == 2 and err.count("\n") == 1
    assert "metric val_hamming_loss is not logged for pneumoniamnist (binary); valid: val_loss, " in err
    assert_nothing_written(in_tmp)


def test_resume_takes_the_saved_metric_and_refuses_another(capsys, saved_search, monkeypatch):
    ran = []
    monkeypatch.setattr(tune, "run_search", lambda space, *args, **kwargs: ran.append(space) or 0)
    assert tune.main(["--resume", "old", "--metric", "val_auc", "--mode", "max"]) == 0  # the saved ones: accepted
    assert (ran[0].metric, ran[0].mode) == ("val_auc", "max")
    assert ran[0].fixed["stem"] == "imagenet"  # saved before `stem` existed: its trials had timm's stem
    for flag in (["--metric", "val_loss"], ["--mode", "min"]):
        code, err = run_tune(capsys, "--resume", "old", *flag)
        assert code == 2 and err.count("\n") == 1
        assert f"--resume continues search 'old', which selects by val_auc (max), so {flag[0]} {flag[1]} would" in err


def test_a_new_search_states_its_stem_for_a_later_resume(in_tmp, monkeypatch):
    ran = []
    monkeypatch.setattr(tune, "run_search", lambda space, *args, **kwargs: ran.append(space) or 0)
    (in_tmp / "mine.yaml").write_text("description: x\ndataset: pneumoniamnist\nfixed: {model: resnet18}\n")
    assert tune.main(["--space", str(in_tmp / "mine.yaml")]) == 0
    assert ran[0].as_dict()["fixed"]["stem"] == "auto"


def test_resume_refuses_another_tracking_server(capsys, saved_search, monkeypatch):
    code, err = run_tune(capsys, "--resume", "old", "--tracking-uri", "http://other:5000")
    assert code == 2 and "logs to MLflow at http://10.0.0.10:5000, but --tracking-uri is http://other:5000" in err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    code, err = run_tune(capsys, "--resume", "old")
    assert code == 2 and "but MLFLOW_TRACKING_URI is sqlite:///elsewhere.db" in err


# --- storage -------------------------------------------------------------------------------------

def test_storage_problems_are_named_as_such(capsys, in_tmp):
    (in_tmp / "a_file").write_text("not a folder")
    code, err = run_tune(capsys, "--space", "smoke", "--storage", in_tmp / "a_file" / "results")
    assert code == 2 and err.count("\n") == 1 and "Cannot use --storage" in err and "a file is in the way" in err
    code, err = run_tune(capsys, "--resume", "old", "--storage", in_tmp / "a_file" / "results")
    assert code == 2 and "No search named" not in err and "a file is in the way" in err


@pytest.mark.parametrize(("number", "words", "advice"), [
    (errno.ENOTDIR, "Not a directory", "a file is in the way"),
    (errno.ENOSPC, "No space left on device", "the storage is full"),
    (errno.EROFS, "Read-only file system", "the storage is read-only"),
    (errno.EACCES, "Permission denied", "permission denied"),
])
def test_a_storage_failure_is_named_by_its_kind_not_by_digits_in_its_path(number, words, advice):
    # A search folder's timestamp (smoke-20261207-071403) once read as HTTP 403: the path must not classify the error.
    path = "/results/smoke-20261207-071403/medtune_search.yaml"
    for error in (OSError(number, words, path), OSError(f"{words}: '{path}'")):
        assert advice in str(storage_error("/results", error))


def test_unreachable_object_storage_is_named(capsys, in_tmp):
    storage = "s3://medtune-bucket/results?endpoint_override=127.0.0.1:9&scheme=http"
    code, err = run_tune(capsys, "--space", "smoke", "--storage", storage)
    assert code == 2 and err.count("\n") == 1 and "the storage is unreachable" in err


# --- tracking URI conventions and secrets ----------------------------------------------------------

def test_credentials_in_a_tracking_uri_are_moved_to_the_environment(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    assert adopt_credentials("http://alice:s%40cret@mlflow.internal:5000/") == "http://mlflow.internal:5000/"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice" and os.environ["MLFLOW_TRACKING_PASSWORD"] == "s@cret"
    assert without_credentials("sqlite:////tmp/m.db") == "sqlite:////tmp/m.db"


def test_a_password_in_the_tracking_uri_is_never_printed(capsys, in_tmp, medmnist_root):
    code, err = run_tune(capsys, "--space", "smoke", "--data-root", medmnist_root, "--tracking-uri",
                         "http://alice:topsecret@127.0.0.1:9")
    out = capsys.readouterr().out
    assert code == 2 and "127.0.0.1:9 is unreachable" in err and "topsecret" not in err + out


def test_state_file_round_trips(in_tmp):
    write_state("medtune_results", "s", {"tracking_uri": "http://h:5000", "seed": 1})
    assert read_state("medtune_results", "s") == {"tracking_uri": "http://h:5000", "seed": 1}
    assert read_state("medtune_results", "missing") is None


def test_missing_data_is_named_with_the_fix(capsys, in_tmp):
    code, err = run_tune(capsys, "--space", "smoke", "--data-root", in_tmp, "--dataset", "breastmnist",
                         "--image-size", "64")
    assert code == 2 and err.count("\n") == 1 and "breastmnist_64.npz is not in" in err
    assert_nothing_written(in_tmp)


# --- which Ray -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("flag", "environment", "expected"), [
    (None, None, "local"), ("auto", None, "auto"), (None, "ray://head:10001", "ray://head:10001")])
def test_a_search_starts_its_own_ray_unless_told_to_join_one(monkeypatch, flag, environment, expected):
    # Ray's default (address None) joins the last cluster anyone started on the machine (`ray start`).
    import ray

    from search_spaces.tuner import start_ray

    asked = []

    def init(address, **kwargs):  # records where it would connect, then stops before a Ray starts
        asked.append(address)
        raise ConnectionError("stop here")

    monkeypatch.setattr(ray, "init", init)
    if environment:
        monkeypatch.setenv("RAY_ADDRESS", environment)
    else:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises((ConnectionError, tune.UserError)):
        start_ray(flag, None, debug=False)
    assert asked == [expected]
