"""A search started before trainables/ was grouped by concern (commit 1ae823f) resumes and exports after it, and a
SIGKILLed search resumes without running a config twice or logging a trial twice (the fixture was killed so).

Ray pickled that search's MLflow callback as `analysis.tracking.MLflowTrialCallback`; the fixture is such a search,
made by that commit's tune.py (3 simple_cnn trials of 2 epochs on PneumoniaMNIST: one finished, one killed with
SIGKILL after its first epoch, one not started). Only what a resume reads is kept: the finished trial's
report files (derived from the test split) are left out, and the MLflow store is gzipped. Its pickles hold the
absolute paths it was made at (/tmp/medtune-old-layout), as every saved search does, so the test puts it back there.
Cost: one resumed search (Ray start, 2 trials of 2 epochs), about a minute on 2 quiet cores, started with the
session beside the other searches (tests/conftest.py); the export runs in-process.
"""

import contextlib
import fcntl
import gzip
import io
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
import yaml
from conftest import REPO, background_job

from analysis import export

FIXTURE = REPO / "tests" / "fixtures" / "search_before_the_layout_change"
WHERE_IT_WAS_MADE = Path("/tmp/medtune-old-layout")
pytestmark = pytest.mark.integration


@background_job()
def old_layout_resumed(started, tmp: Path) -> SimpleNamespace:
    """The fixture search put back where it was made, with this machine's data root, then `tune.py --resume`d.
    The place is one per machine: a lock keeps a second test run there out until the test has cleaned up."""
    lock = open(f"{WHERE_IT_WAS_MADE}.lock", "w")  # held until the test has cleaned up
    fcntl.flock(lock, fcntl.LOCK_EX)
    shutil.rmtree(WHERE_IT_WAS_MADE, ignore_errors=True)
    shutil.copytree(FIXTURE, WHERE_IT_WAS_MADE, ignore=shutil.ignore_patterns("mlflow.db.gz"))
    with gzip.open(FIXTURE / "mlflow.db.gz") as packed:  # a mostly empty SQLite store: 976 KiB as is, 26 KiB packed
        (WHERE_IT_WAS_MADE / "mlflow.db").write_bytes(packed.read())
    state_file = WHERE_IT_WAS_MADE / "results" / "old-layout" / "medtune_search.yaml"
    state = yaml.safe_load(state_file.read_text())
    state["space"]["fixed"]["data_root"] = str(started.data_root)  # where this machine keeps the data
    state_file.write_text(yaml.safe_dump(state, sort_keys=False))
    env = {k: v for k, v in started.env.items() if k != "MLFLOW_TRACKING_URI"}  # the search's own store, as saved
    resumed = started.run([sys.executable, str(REPO / "tune.py"), "--storage", str(WHERE_IT_WAS_MADE / "results"),
                           "--resume", "old-layout", "--no-report"], cwd=WHERE_IT_WAS_MADE, timeout=900, env=env)
    return SimpleNamespace(resumed=resumed, lock=lock)


def test_a_search_from_the_previous_layout_resumes_and_exports(old_layout_resumed, tmp_path):
    resumed = old_layout_resumed.resumed
    try:
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        assert "3 trials: 3 completed" in resumed.stdout
        uri = f"sqlite:///{WHERE_IT_WAS_MADE / 'mlflow.db'}"
        client = mlflow.MlflowClient(uri)
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        trials = [r for r in runs if r.data.tags.get("medtune.role") == "trial"]
        assert len(trials) == 3 and all(r.info.status == "FINISHED" for r in trials)
        assert len({r.data.tags["medtune.trial_id"] for r in trials}) == 3  # the killed trial kept its run
        assert len({r.data.params["lr"] for r in trials}) == 3, "a config was evaluated twice"
        (parent,) = [r for r in runs if r.data.tags.get("medtune.role") == "search"]
        assert parent.info.status == "FINISHED"

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = export.main(["--robustness-images", "32",
                                "--search", "old-layout", "--out", str(tmp_path / "model"), "--tracking-uri", uri,
                                "--n-resamples", "200"])
        assert code == 0, out.getvalue()[-3000:] + err.getvalue()[-3000:]
        assert "reproduces the logged test metrics" in out.getvalue()
        assert (tmp_path / "model" / "model.safetensors").exists()
    finally:
        shutil.rmtree(WHERE_IT_WAS_MADE, ignore_errors=True)
        old_layout_resumed.lock.close()
