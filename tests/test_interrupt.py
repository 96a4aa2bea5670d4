"""A search stopped by SIGTERM (a SLURM time limit) goes on with --resume, nothing lost and nothing twice.

cluster/slurm.sbatch runs a real search as a one-node SLURM job (the stand-ins of tests/local_cluster.py); once its
first trial has reported an epoch, the job's script gets SIGTERM, as `#SBATCH --signal=B:TERM@N` sends it N seconds
before the time limit. The script passes it on to tune.py and waits; the search stops with its trials' checkpoints,
every MLflow run ended KILLED and tagged interrupted, the state file saying what a resume does and one line giving
it; then the job again with MEDTUNE_RESUME finishes the search with one MLflow run per trial.
"""

from __future__ import annotations

import re
import shutil
import signal
import sqlite3
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
import yaml
from conftest import TWO_TINY_TRIALS, background_job, new_mlflow_store
from local_cluster import SBATCH, SlurmJob

from trainables.tracking.names import PARENT, TAG_OUTCOME, TAG_TRIAL
from trainables.tracking.state import STATE_FILE

pytestmark = pytest.mark.integration
SPACE = TWO_TINY_TRIALS
NAME = "preempted"
SIGNAL_AHEAD_S = int(re.search(r"#SBATCH --signal=B:TERM@(\d+)", SBATCH.read_text())[1])


def wait_for(job: SlurmJob, text: str, timeout: float = 600) -> bool:
    deadline = time.time() + timeout
    while job.process.poll() is None and time.time() < deadline:
        if text in job.output():
            return True
        time.sleep(0.2)
    return False


@background_job()
def preempted_search(started, tmp: Path) -> SimpleNamespace:
    """The job, SIGTERM to its script after the first epoch, then the job again with MEDTUNE_RESUME.
    Cost: two one-node jobs (a Ray node each) and 4 simple_cnn epochs, one at a time: 227-251 s on 2 cores under a
    load of 10-12 from other work (77 s to the stop, 164 s for the resumed job); not measured on a quiet machine."""
    (tmp / "space.yaml").write_text(SPACE)
    new_mlflow_store(started, tmp / "mlflow.db")
    env = {**started.env, "MEDTUNE_DATA_ROOT": str(started.data_root), "MEDTUNE_SPACE": str(tmp / "space.yaml"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}
    job, stop_s = SlurmJob(tmp, "501", ["node-a"], env, popen=started.popen), None
    process = job.start("--name", NAME, "--no-report")
    try:
        if wait_for(job, " epoch 1/2 "):
            sent = time.time()
            process.send_signal(signal.SIGTERM)  # to the script only, as `--signal=B:TERM@N` does
            process.wait(timeout=600)
            stop_s = time.time() - sent
    finally:
        job.end()
    stopped = SimpleNamespace(returncode=process.returncode, output=job.output(), stop_s=stop_s,
                              state=(job.results / NAME / STATE_FILE).read_text())
    shutil.copyfile(tmp / "mlflow.db", tmp / "mlflow-stopped.db")  # MLflow as the stop left it

    again = SlurmJob(tmp, "502", ["node-a"], env, popen=started.popen)
    process = again.start("--no-report", MEDTUNE_RESUME=NAME)
    try:
        process.wait(timeout=900)
    finally:
        again.end()
    return SimpleNamespace(tmp=tmp, stopped=stopped, resumed=SimpleNamespace(
        returncode=process.returncode, output=again.output(), state=(again.results / NAME / STATE_FILE).read_text()))


def runs(db: Path):
    """(parent, {trial id: trial run}, client) of the search in the SQLite store `db`."""
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    found = client.search_runs([client.get_experiment_by_name("medtune").experiment_id], max_results=100)
    (parent,) = [r for r in found if r.data.tags.get("medtune.role") == "search"]
    trials = {r.data.tags[TAG_TRIAL]: r for r in found if r.data.tags.get(PARENT) == parent.info.run_id}
    return parent, trials, client


def test_sigterm_stops_the_search_within_the_signal_s_lead_with_every_run_ended_and_one_resume_line(preempted_search):
    stopped = preempted_search.stopped
    assert stopped.returncode == 143, stopped.output[-4000:]  # 128 + SIGTERM: the job's status says preempted
    assert stopped.stop_s is not None and stopped.stop_s < SIGNAL_AHEAD_S, stopped.output[-4000:]
    lines = [line for line in stopped.output.splitlines() if "resume with:" in line]
    assert len(lines) == 1 and "SIGTERM" in lines[0], stopped.output[-4000:]
    command = lines[0].split("resume with:")[1].split()
    assert command[:4] == ["python", "tune.py", "--resume", NAME]
    assert command[command.index("--storage") + 1] == str(preempted_search.tmp / "shared" / "results")
    for text in ("Tuner.restore", "stopped early", "Traceback", "Trials did not complete"):
        assert text not in stopped.output, stopped.output[-4000:]

    state = yaml.safe_load(stopped.state)["interrupted"]
    assert state["by"] == "SIGTERM" and state["resume"] == " ".join(command)
    (first,) = state["trials_interrupted"]
    assert state["resume_does"] == (f"restarts 1 interrupted trial from the last checkpoint ({first}: epoch 1/2), "
                                    "starts 1 trial that had not finished an epoch from scratch")  # queued, not started

    parent, trials, _ = runs(preempted_search.tmp / "mlflow-stopped.db")
    assert parent.info.status == "KILLED" and parent.data.tags[TAG_OUTCOME] == "interrupted"
    assert first in trials and len(trials) <= 2  # the other one has a run if Ray had started it
    assert all(run.info.status == "KILLED" and run.data.tags[TAG_OUTCOME] == "interrupted" for run in trials.values())


def test_the_resumed_job_finishes_the_search_from_the_checkpoint_with_one_run_per_trial(preempted_search):
    resumed, first = preempted_search.resumed, yaml.safe_load(preempted_search.stopped.state)["interrupted"][
        "trials_interrupted"][0]
    assert resumed.returncode == 0, resumed.output[-4000:]
    assert "2 trials: 2 completed" in resumed.output
    assert f"[{first}] epoch 1/2" not in resumed.output and f"[{first}] epoch 2/2" in resumed.output  # its checkpoint
    assert "interrupted" not in yaml.safe_load(resumed.state)  # the search went on to its end

    parent, trials, client = runs(preempted_search.tmp / "mlflow.db")
    assert parent.info.status == "FINISHED" and TAG_OUTCOME not in parent.data.tags
    assert len(trials) == 2
    for run in trials.values():  # each epoch logged once: none lost at the stop, none twice after it
        assert run.info.status == "FINISHED" and run.data.tags[TAG_OUTCOME] == "completed"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_auc")] == [1, 2]
    with sqlite3.connect(preempted_search.tmp / "mlflow.db") as db:  # and no stray run of the search anywhere
        assert db.execute("select count(*) from runs").fetchone()[0] == 3
