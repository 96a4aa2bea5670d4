"""A search survives its tracking server: the probe's settings stay in the probe, MLflow calls wait on disk while the
server is away and land once when it returns, and Ray storage rebuilds what MLflow never got (analysis.sync).

Real `mlflow server` processes paused, or stopped and started again on the same store; real searches through tune.py,
started with the session beside the other slow work (tests/conftest.py).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
from conftest import TWO_TINY_TRIALS, MlflowServer, background_job, free_port
from mlflow.entities import Metric
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

from analysis import sync
from trainables.errors import UserError
from trainables.tracking.mlflow_runs import OPERATIONS, check_tracking_uri, flat_params, get_experiment_id
from trainables.tracking.names import ARTIFACTS, GAN_ARTIFACTS, PARENT, TAG_BEST_RUN, TAG_IS_BEST, TAG_OUTCOME, TAG_TRIAL
from trainables.tracking.resilient import RETRY_ENV, ResilientClient, retry_window
from trainables.tracking.state import QUEUE_FILE, read_queue

REPO = Path(__file__).resolve().parents[1]
SPACE = TWO_TINY_TRIALS
UNREACHABLE = "MLflow unreachable since "


def test_the_connectivity_probe_leaves_mlflow_s_retries_to_the_search(monkeypatch, tmp_path):
    """The probe fails fast (no retries), and afterwards MLflow's own retry settings are as they were: the search's
    calls keep MLflow's retries with backoff. About 1 s."""
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    started = time.time()
    with pytest.raises(ConnectionError):
        check_tracking_uri(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    assert time.time() - started < 10  # MLflow's default retries would take minutes
    check_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ and "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")  # a user's own setting survives the probe too
    check_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"


def test_the_retry_window_is_a_number_of_seconds(monkeypatch):
    monkeypatch.delenv(RETRY_ENV, raising=False)
    assert retry_window() == 180
    monkeypatch.setenv(RETRY_ENV, "2.5")
    assert retry_window() == 2.5
    monkeypatch.setenv(RETRY_ENV, "soon")
    with pytest.raises(UserError, match=f"{RETRY_ENV}='soon' is not a number of seconds"):
        retry_window()


@pytest.mark.integration
def test_calls_made_while_mlflow_is_away_wait_on_disk_in_order_and_land_once_when_it_returns(started, tmp_path):
    """A trial's whole record (its run, two epochs, its end) made while the server is down: queued on disk under the
    search's storage with one line for the outage, read back by a new client (a driver restart), logged in order
    when the server is back, the run made once. A call the server refuses is one line, never an exception.
    Cost: two starts of a real mlflow server: 15 s alone, 29 s beside the suite's searches (2 cores)."""
    server = MlflowServer(started, tmp_path).start()
    client = mlflow.MlflowClient(server.url)
    parent = client.create_run(get_experiment_id(client), run_name="s").info.run_id
    said = []
    live = ResilientClient(server.url, str(tmp_path / "results"), "s", OPERATIONS, retry_s=1, say=said.append)
    assert live.log_batch("0" * 32, metrics=[Metric("x", 1.0, 0, 1)]) is None  # no such run: refused, not queued
    assert len(said) == 1 and said[0].startswith("MLflow refused log_batch (RestException: RESOURCE_DOES_NOT_EXIST")
    assert not live.queue
    server.stop()

    said.clear()
    started_at = time.time()
    away = ResilientClient(server.url, str(tmp_path / "results"), "s", OPERATIONS, retry_s=1, say=said.append)
    run_id = away.call("create_trial_run", parent, "s", "t1", "trial_t1", flat_params({"lr": 0.1}), placeholder="pending:t1")
    for step in (1, 2):
        away.log_batch(run_id, metrics=[Metric("val_loss", 1.0 / step, 1000 * step, step)])
    away.set_terminated(run_id, status="FINISHED")
    assert run_id == "pending:t1" and time.time() - started_at < 15  # retried for the window once, then queued at once
    assert len(said) == 1 and said[0].startswith(UNREACHABLE) and said[0].endswith(
        "results are kept in Ray storage and logged when it returns")
    assert len(read_queue(str(tmp_path / "results"), "s")) == 4

    said.clear()
    restarted = ResilientClient(server.url, str(tmp_path / "results"), "s", OPERATIONS, retry_s=1, say=said.append)
    server.start()
    try:
        assert restarted.flush(wait=True)
        assert said == ["MLflow is back: logged 4 calls queued by an earlier run of the search"]
        assert not (tmp_path / "results" / "s" / QUEUE_FILE).exists()
        assert restarted.call("create_trial_run", parent, "s", "t1", "trial_t1", []) == restarted.resolved["pending:t1"]
        trials = client.search_runs([client.get_run(parent).info.experiment_id], f"tags.`{PARENT}` = '{parent}'")
        assert [t.data.tags[TAG_TRIAL] for t in trials] == ["t1"]  # made once, though asked for twice
        assert trials[0].info.status == "FINISHED" and trials[0].data.params == {"lr": "0.1"}
        history = client.get_metric_history(trials[0].info.run_id, "val_loss")
        assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5)]
    finally:
        server.stop()


# --- real searches against a server that goes away, started with the session -------------------------------------

def search_driver(started, tmp: Path, server: MlflowServer, name: str, retry_s: int) -> subprocess.Popen:
    (tmp / "space.yaml").write_text(SPACE)
    command = [sys.executable, str(REPO / "tune.py"), "--space", str(tmp / "space.yaml"), "--name", name,
               "--storage", str(tmp / "results"), "--data-root", str(started.data_root), "--tracking-uri", server.url,
               "--no-report"]
    return started.popen(command, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**started.env, RETRY_ENV: str(retry_s)})


def read_until(driver: subprocess.Popen, seen: list[str], text: str, count: int = 1) -> bool:
    """Read the driver's output into `seen` until `text` has appeared on `count` lines; False if it ended first."""
    for line in driver.stdout:
        seen.append(line)
        if sum(text in s for s in seen) >= count:
            return True
    return False


def finished(driver: subprocess.Popen, seen: list[str], tmp: Path, server: MlflowServer) -> SimpleNamespace:
    seen.extend(driver.stdout)
    return SimpleNamespace(tmp=tmp, url=server.url, returncode=driver.wait(timeout=900), out="".join(seen))


@background_job()
def hung_server_search(started, tmp: Path) -> SimpleNamespace:
    """A search whose server's processes are stopped (SIGSTOP: a hung server, whose connections time out) once both
    trials have their runs, and continued only after the search said it is unreachable (its 5 s retry window was
    over). A hung server comes back at once, so the test does not race the search's end against a server's start
    (a server killed and started again is `away_search`'s).
    Cost: one real search (Ray start, 2 simple_cnn trials of 2 epochs, its description) and a server: 60 s alone,
    105 s beside `away_search` (2 cores, load 2-6)."""
    server = MlflowServer(started, tmp / "server").start()
    driver, seen = search_driver(started, tmp, server, "outage", retry_s=5), []
    if read_until(driver, seen, "] start ", count=2):  # both trial runs exist in MLflow: their epochs do not yet
        server.pause()
        try:
            read_until(driver, seen, UNREACHABLE)
        finally:
            server.resume()  # away for longer than the window: the queue, not MLflow's retries, carried the search
    return finished(driver, seen, tmp, server)


@background_job()
def away_search(started, tmp: Path) -> SimpleNamespace:
    """A search whose server is killed once both trials have their runs and started again (on the same store) only
    after the search has ended. Cost: one real search (Ray start, 2 simple_cnn trials of 2 epochs) and two server
    starts: 49 s alone, about 100 s beside `hung_server_search` (2 cores, load 2-6)."""
    server = MlflowServer(started, tmp / "server").start()
    driver, seen = search_driver(started, tmp, server, "away", retry_s=2), []
    if read_until(driver, seen, "] start ", count=2):
        server.stop()
    search = finished(driver, seen, tmp, server)
    server.start()
    return search


def search_runs(uri: str, name: str):
    client = mlflow.MlflowClient(uri)
    found = client.search_runs([client.get_experiment_by_name("medtune").experiment_id], max_results=1000)
    parents = [r for r in found if r.data.tags.get("medtune.role") == "search" and r.data.tags.get("medtune.search") == name]
    trials = [r for r in found if parents and r.data.tags.get(PARENT) == parents[0].info.run_id]
    return client, parents, trials


def assert_complete_in_mlflow(uri: str, name: str, report_files: bool = True) -> None:
    """What a user looks for: one parent with its winner and description, every trial FINISHED with its curves,
    test metrics and report files."""
    client, parents, trials = search_runs(uri, name)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert len(trials) == 2 and len({t.data.tags[TAG_TRIAL] for t in trials}) == 2
    for run in trials:
        assert run.info.status == "FINISHED" and run.data.tags[TAG_OUTCOME] == "completed"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_auc")] == [1, 2]
        assert "test_auc" in run.data.metrics and run.data.params["lr"] in ("0.03", "0.1")
        if report_files:
            assert set(ARTIFACTS) - set(GAN_ARTIFACTS) <= {a.path for a in client.list_artifacts(run.info.run_id)}
    winner = client.get_run(parent.data.tags[TAG_BEST_RUN])
    assert winner.data.tags[TAG_IS_BEST] == "true" and parent.data.metrics["test_auc"] == winner.data.metrics["test_auc"]
    assert parent.data.tags[MLFLOW_RUN_NOTE].startswith(f"## Search `{name}`: winner `{winner.data.tags[TAG_TRIAL]}`")


def snapshot(uri: str, name: str):
    """Everything the sync could add to or change in MLflow, run by run (times of day aside)."""
    client, parents, trials = search_runs(uri, name)

    def run_record(run):
        histories = {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
                     for key in run.data.metrics}
        return (run.info.status, run.data.params, histories, run.data.tags,
                sorted(a.path for a in client.list_artifacts(run.info.run_id)))

    return [run_record(p) for p in parents], {t.data.tags[TAG_TRIAL]: run_record(t) for t in trials}


@pytest.mark.integration
def test_a_search_rides_out_an_mlflow_outage_longer_than_the_retry_window(hung_server_search):
    """The trials keep training while the server is away, the search ends with exit 0, and MLflow holds all of it,
    as if nothing happened: one line when it went away, one when it came back."""
    search = hung_server_search
    assert search.returncode == 0, search.out[-3000:]
    assert search.out.count(UNREACHABLE) == 1 and search.out.count("MLflow is back: logged ") == 1, search.out[-3000:]
    assert "2 trials: 2 completed" in search.out and "MLflow did not get everything" not in search.out
    assert not (search.tmp / "results" / "outage" / QUEUE_FILE).exists()
    assert_complete_in_mlflow(search.url, "outage")


@pytest.mark.integration
def test_a_search_whose_server_never_returns_ends_and_the_sync_logs_it_once(away_search, mlflow_store, monkeypatch,
                                                                            capsys):
    """The server stays away to the end: exit 0, the results in Ray storage, the one command that syncs them printed.
    Once the server is back, that command logs everything; run again, it changes nothing; pointed at an empty store,
    it rebuilds the search from Ray storage alone. Cost (beside `away_search`): three syncs, the first as its own
    process: 30-32 s (2 cores, load 2-6)."""
    search, tmp = away_search, away_search.tmp
    assert search.returncode == 0, search.out[-3000:]
    assert search.out.count(UNREACHABLE) == 1 and "2 trials: 2 completed" in search.out
    assert "MLflow did not get everything" in search.out and (tmp / "results" / "away" / QUEUE_FILE).exists()
    command = shlex.split(search.out.split("log them with:\n")[1].splitlines()[0])
    assert command == ["python", "-m", "analysis.sync", "--search", "away", "--storage", str(tmp / "results"),
                       "--no-report"]

    _, parents, trials = search_runs(search.url, "away")
    assert TAG_BEST_RUN not in parents[0].data.tags and {t.info.status for t in trials} == {"RUNNING"}
    synced = subprocess.run([sys.executable, *command[1:]], cwd=tmp, capture_output=True, text=True, timeout=600)
    assert synced.returncode == 0, synced.stdout[-3000:] + synced.stderr[-3000:]
    assert_complete_in_mlflow(search.url, "away")
    assert not (tmp / "results" / "away" / QUEUE_FILE).exists()

    before = snapshot(search.url, "away")
    monkeypatch.chdir(tmp)  # the same command again, in this process (a new one costs its imports)
    assert sync.main(command[3:]) == 0
    assert capsys.readouterr().out.startswith("nothing to sync")
    assert snapshot(search.url, "away") == before

    (tmp / "rebuilt").mkdir()
    fresh = mlflow_store(tmp / "rebuilt")  # a store that never saw the search: Ray storage alone
    assert sync.main([*command[3:], "--tracking-uri", fresh]) == 0
    assert_complete_in_mlflow(fresh, "away", report_files=False)  # the same trials, statuses, params and curves:
    assert {t: run[:3] for t, run in snapshot(fresh, "away")[1].items()} == {t: run[:3] for t, run in before[1].items()}
