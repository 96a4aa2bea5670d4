"""A storage that fills up mid-search: one line naming it and the fix, exit 2, and the search goes on with --resume once
space is back.

The storage is a real small filesystem: a 64 MB tmpfs mounted in a mount namespace of the search's own (`unshare`, as
root or in a user namespace: nothing outside the test sees it), filled to the last byte once the first trial has
reported an epoch, emptied again before the resume. Where the kernel allows neither, the test is skipped.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
from conftest import REPO, TWO_TINY_TRIALS, background_job, new_mlflow_store

from trainables.tracking.names import PARENT, TAG_OUTCOME, TAG_TRIAL

SPACE = TWO_TINY_TRIALS
# Runs inside the namespace: $1 the storage (a mount point), $2 where the outputs go, $3 the tracking URI.
SCRIPT = """\
set -u
store=$1; out=$2; uri=$3
mount -t tmpfs -o size=64m medtune-test "$store" || exit 97
"$PYTHON" "$TUNE" --space space.yaml --name full --storage "$store" --tracking-uri "$uri" --no-report \\
  > "$out/first.out" 2> "$out/first.err" &
driver=$!
until grep -q " epoch 1/" "$out/first.out" || ! kill -0 "$driver" 2> /dev/null; do sleep 0.2; done
cat /dev/zero > "$store/filler" 2> /dev/null  # to the last byte
wait "$driver"; echo $? > "$out/first.code"
rm "$store/filler"  # space is back
"$PYTHON" "$TUNE" --resume full --storage "$store" --no-report > "$out/resume.out" 2> "$out/resume.err"
echo $? > "$out/resume.code"
"""
NAMESPACES = (["unshare", "--mount", "--propagation", "private"],  # root (CI)
              ["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private"])  # a user namespace


def namespace(started) -> list[str] | None:
    """The first way this kernel lets the test mount a tmpfs of its own, or None."""
    for command in NAMESPACES:
        probe = started.run([*command, "sh", "-c", "mount -t tmpfs -o size=1m probe /mnt"], timeout=30)
        if probe.returncode == 0:
            return command
    return None


@background_job()
def full_storage_search(started, tmp: Path) -> SimpleNamespace:
    """Cost: two Ray starts and 4 simple_cnn epochs, two at a time: 147-200 s alone on 2 cores under a load of 11
    from other work, within the 243 s of `preempted_search` when both run beside each other; not measured quiet."""
    command = namespace(started)
    if command is None:
        return None
    (tmp / "space.yaml").write_text(SPACE)
    (tmp / "store").mkdir()
    uri = new_mlflow_store(started, tmp / "mlflow.db")
    (tmp / "full.sh").write_text(SCRIPT)
    done = started.run([*command, "bash", str(tmp / "full.sh"), str(tmp / "store"), str(tmp), uri], timeout=1200,
                       cwd=tmp, env={**started.env, "PYTHON": sys.executable, "TUNE": str(REPO / "tune.py")})
    read = lambda name: (tmp / name).read_text() if (tmp / name).exists() else ""  # noqa: E731
    return SimpleNamespace(tmp=tmp, uri=uri, done=done, store=tmp / "store", first=int(read("first.code") or -1),
                           first_out=read("first.out"), first_err=read("first.err"),
                           resume=int(read("resume.code") or -1), resume_out=read("resume.out") + read("resume.err"))


@pytest.mark.integration
def test_a_storage_that_fills_up_ends_the_search_with_one_line_and_the_resume_finishes_it(full_storage_search):
    search = full_storage_search
    if search is None:
        pytest.skip("this kernel lets the test mount no tmpfs of its own (unshare --mount, or in a user namespace)")
    assert search.first == 2, search.first_out[-3000:] + search.first_err[-3000:] + search.done.stderr[-2000:]
    (line,) = search.first_err.strip().splitlines()  # one line, no traceback
    assert line.startswith(f"error: Cannot use --storage {search.store}: the storage is full; free space"), line
    assert f"then `python tune.py --resume full --storage {search.store}` goes on where it stopped" in line
    assert "No space left on device" in line and "FAILED" not in search.first_out

    assert search.resume == 0, search.resume_out[-4000:]
    assert "2 trials: 2 completed" in search.resume_out
    client = mlflow.MlflowClient(search.uri)
    found = client.search_runs([client.get_experiment_by_name("medtune").experiment_id], max_results=100)
    (parent,) = [r for r in found if r.data.tags.get("medtune.role") == "search"]
    trials = [r for r in found if r.data.tags.get(PARENT) == parent.info.run_id]
    assert parent.info.status == "FINISHED" and len({t.data.tags[TAG_TRIAL] for t in trials}) == len(trials) == 2
    for run in trials:  # one run per trial, each epoch once
        assert run.info.status == "FINISHED" and run.data.tags[TAG_OUTCOME] == "completed"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_auc")] == [1, 2]


def test_storage_lost_reads_a_full_or_read_only_storage_in_ray_s_words():
    from trainables.tracking.state import storage_lost

    assert storage_lost("OSError: [Errno 28] Error writing bytes to file. Detail: [errno 28] No space left on device")
    assert storage_lost("[Errno 30] Read-only file system: '/x/smoke-20261207-071403/trial_1/result.json'")
    assert storage_lost("OSError: [Errno 122] Disk quota exceeded")
    assert not storage_lost("[Errno 13] Permission denied: '/results/no space left on device/x'")  # a path's words
    assert not storage_lost("RuntimeError: CUDA out of memory")


def test_the_stop_s_line_names_the_storage_or_the_local_disk_that_failed_and_the_resume(tmp_path):
    from search_spaces.stopping import SearchStop

    resume = f"python tune.py --resume s --storage {tmp_path}"
    stop = SearchStop(str(tmp_path), mlflow=None)
    stop.storage_failure = ("Trial task failed for trial trial_1\nTraceback (most recent call last):\n  File "
                            "\"/venv/ray/tune/trainable/trainable.py\", line 1\nOSError: OSError: [Errno 28] Error "
                            "writing bytes to file. Detail: [errno 28] No space left on device")
    line = str(stop.storage_problem(resume))
    assert line.startswith(f"Cannot use --storage {tmp_path}: the storage is full; free space (or raise the quota), "
                           f"then `{resume}` goes on where it stopped (OSError: [Errno 28] Error writing bytes")
    stop.storage_failure = "OSError: [Errno 30] Read-only file system: '/tmp/ray/session_1/artifacts/x.json'"
    line = str(stop.storage_problem(resume))  # Ray's own folder on this machine, not the storage
    assert line.startswith("Cannot write to /tmp/ray/session_1/artifacts/x.json: the storage is read-only")


def test_ray_s_state_cut_short_by_a_full_storage_is_put_back_from_the_machine_s_copy(tmp_path, monkeypatch):
    """Ray overwrites its experiment state in place: a full storage can cut it short, and Tuner.restore would then
    start the search afresh. The resume puts back Ray's own copy from its session folder; without one, one line."""
    from search_spaces.stopping import put_back_ray_state
    from trainables.errors import UserError

    experiment, state = tmp_path / "results" / "s", "experiment_state-2026-12-07_12-00-00.json"
    experiment.mkdir(parents=True)
    (experiment / "experiment_state-2026-12-06_09-00-00.json").write_text('{"older": 1}')
    (experiment / state).write_text('{"trial_data": [["cut sh')  # the full storage's copy
    assert put_back_ray_state(str(experiment.parent / "other")) is None  # no state: nothing to do
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "ray-tmp"))
    with pytest.raises(UserError, match=r"Ray's saved state of this search \(.*" + state + r"\) was cut short"):
        put_back_ray_state(str(experiment))

    local = tmp_path / "ray-tmp" / "ray" / "session_2026-12-07_12-00-00_1" / "artifacts" / "2026-12-07_12-00-01" / "s" \
        / "driver_artifacts"
    (local / "trial_1").mkdir(parents=True)
    (local / state).write_text('{"trial_data": []}')
    (local / "searcher-state-2026-12-07_12-00-00.pkl").write_bytes(pickle.dumps("whole"))
    assert put_back_ray_state(str(experiment)) == str(local)
    assert (experiment / state).read_text() == '{"trial_data": []}'
    assert (experiment / "searcher-state-2026-12-07_12-00-00.pkl").read_bytes() == pickle.dumps("whole")
    assert not (experiment / "trial_1").exists()  # the state only: the trials' folders are the storage's
    assert put_back_ray_state(str(experiment)) is None  # whole now: left alone
    # the searcher's pickle cut short while the JSON state reads: put back too (Ray's restore fails on it)
    whole = pickle.dumps({"searcher": list(range(100))})
    (experiment / "searcher-state-2026-12-07_12-00-00.pkl").write_bytes(whole[:-20])
    (local / "searcher-state-2026-12-07_12-00-00.pkl").write_bytes(whole)
    assert put_back_ray_state(str(experiment)) == str(local)
    assert (experiment / "searcher-state-2026-12-07_12-00-00.pkl").read_bytes() == whole
