"""A real search on a real two-node Ray cluster (head + one more node on this machine), storage on a shared dir.

The nodes are separate `ray start` processes with their own raylet, resources (1 CPU each) and node address,
joined with token authentication on. tune.py joins with --address like it would a cloud cluster; each trial's
result.json (written by Ray Tune on the node that ran it) names that node's address, and the driver-side
MLflow callback must have one nested run per trial, whichever node ran it.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
import pytest
from local_cluster import LocalCluster, _pids_in_sessions, free_port

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration

TINY = """\
description: tiny real search across two nodes
dataset: pneumoniamnist
num_samples: 2
max_concurrent: 2
max_failures: 0
scheduler: {max_t: 1, grace_period: 1, reduction_factor: 2}
resources: {cpu: 1}
fixed: {model: simple_cnn, batch_size: 256, optimizer: sgd, schedule: constant}
params:
  lr: {choice: [0.3, 0.1]}
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = LocalCluster(nodes=2, cpus_per_node=1, log_dir=tmp_path_factory.mktemp("ray-logs"))
    sessions = set()
    try:
        cluster.start()
        sessions = {proc.pid for proc in cluster._procs}
        yield cluster
    finally:
        cluster.stop()
    assert not _pids_in_sessions(sessions), "Ray processes of the test cluster outlived it"


@pytest.fixture(scope="module")
def search(cluster, tmp_path_factory, medmnist_root):
    tmp = tmp_path_factory.mktemp("multinode")
    shared = tmp / "shared"  # the "shared filesystem": every node writes its trials' results and checkpoints here
    (tmp / "tiny.yaml").write_text(TINY)
    # A driver holding the wrong token must be refused; it retries for ~20 s, so it waits alongside the search.
    intruder = subprocess.Popen([sys.executable, "-c", f"import ray; ray.init(address={cluster.address!r})"],
                                env={**cluster.env, "RAY_AUTH_TOKEN": "0" * 64}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    command = [sys.executable, str(REPO / "tune.py"), "--space", str(tmp / "tiny.yaml"), "--name", "multinode", "--no-report",
               "--address", cluster.address, "--storage", str(shared), "--data-root", str(medmnist_root),
               "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--seed", "3"]
    result = subprocess.run(command, cwd=tmp, env=cluster.env, capture_output=True, text=True, timeout=900)
    intruder_output, _ = intruder.communicate(timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp, shared / "multinode", result.stdout, (intruder.returncode, intruder_output)


def trial_nodes(search_dir: Path) -> dict[str, str]:
    """trial_id -> address of the node that ran it, from the result.json Ray Tune wrote in the trial's dir."""
    nodes = {}
    for result_file in search_dir.glob("trial_*/result.json"):
        for line in result_file.read_text().splitlines():
            result = json.loads(line)
            nodes.setdefault(result["trial_id"], set()).add(result["node_ip"])
    assert all(len(ips) == 1 for ips in nodes.values()), nodes  # a trial stays on its node
    return {trial: ips.pop() for trial, ips in nodes.items()}


def test_the_cluster_has_two_nodes_with_their_own_resources(cluster):
    nodes = cluster.query("result = [dict(id=n['NodeID'], ip=n['NodeManagerAddress'], cpu=n['Resources'].get('CPU'), "
                          "labels=n['Labels']) for n in ray.nodes() if n['Alive']]")
    assert len(nodes) == 2
    assert len({n["id"] for n in nodes}) == 2 and len({n["ip"] for n in nodes}) == 2
    assert [n["cpu"] for n in nodes] == [1.0, 1.0]
    assert sorted(n["labels"]["medtune-node"] for n in nodes) == ["node0", "node1"]


def test_trials_ran_on_both_nodes(cluster, search):
    _, search_dir, _, _ = search
    ran_on = trial_nodes(search_dir)
    alive = cluster.query("result = [n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']]")
    assert len(ran_on) == 2  # two trials at once, one CPU per node: one on each
    assert set(ran_on.values()) == set(alive), f"trials by node: {ran_on}, nodes: {alive}"


def test_every_trial_has_its_nested_mlflow_run_with_curves_and_reports(search):
    tmp, search_dir, stdout, _ = search
    client = mlflow.MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    found = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=100)
    parents = [r for r in found if r.data.tags.get("medtune.role") == "search"]
    children = [r for r in found if r.data.tags.get("medtune.role") == "trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    ran_on = trial_nodes(search_dir)
    assert {c.data.tags["medtune.trial_id"] for c in children} == set(ran_on)
    assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)
    assert all(c.info.status == "FINISHED" and "val_auc" in c.data.metrics for c in children)
    completed = [c for c in children if c.data.tags.get("medtune.outcome") == "completed"]
    assert completed and "2 trials:" in stdout
    for run in completed:  # the driver read each trial's figures from shared storage, whichever node wrote them
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"confusion_matrix.png", "roc_curve.png"} <= artifacts
        assert Path(run.data.tags["medtune.checkpoint"]).is_relative_to(search_dir)


def test_a_driver_with_the_wrong_token_is_refused(search):
    *_, (returncode, output) = search
    assert returncode != 0 and "Authentication token is missing or incorrect" in output, output[-2000:]


FAKE_SRUN = """#!/usr/bin/env bash
# srun stand-in: drop srun's own options, run the command here (every "node" is this machine)
while [[ $# -gt 0 && $1 == -* ]]; do
  case $1 in -w|--nodelist|-N|-n) shift 2 ;; *) shift ;; esac
done
exec "$@"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
# scontrol stand-in: `scontrol show hostnames LIST` for a comma-separated LIST
[[ $1 == show && $2 == hostnames ]] && tr ',' '\\n' <<< "$3"
"""


def test_slurm_script_runs_a_search_on_a_two_node_allocation(tmp_path, medmnist_root):
    """cluster/slurm.sbatch as sbatch would run it, with srun/scontrol stand-ins that start every node here."""
    shims = tmp_path / "bin"
    shims.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (shims / name).write_text(text)
        (shims / name).chmod(0o755)
    (tmp_path / "tiny.yaml").write_text(TINY)
    ray_tmp = tempfile.mkdtemp(prefix="mtslurm-", dir="/tmp")  # short: Ray's socket paths live under it
    env = {**os.environ, "PATH": f"{shims}:{os.environ['PATH']}", "RAY_TMPDIR": ray_tmp,
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node-a,node-b", "SLURM_CPUS_PER_TASK": "1",
           "MEDTUNE_VENV": sys.prefix, "MEDTUNE_SHARED": str(tmp_path / "shared"), "RAY_PORT": str(free_port()),
           "MEDTUNE_DATA_ROOT": str(medmnist_root), "MEDTUNE_SPACE": str(tmp_path / "tiny.yaml"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "SLURM_GPUS_PER_TASK"):
        env.pop(name, None)
    log = tmp_path / "medtune-4242.out"  # a file, not a pipe: the Ray nodes outlive the script and hold it open
    with open(log, "w") as handle:
        job = subprocess.Popen(["bash", str(REPO / "cluster" / "slurm.sbatch"), "--name", "slurm", "--seed", "5", "--no-report"],
                               cwd=tmp_path, env=env, stdout=handle, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        job.wait(timeout=900)
    finally:  # what SLURM does at the end of a job: end every step (the `ray start --block` nodes)
        for pid in _pids_in_sessions({job.pid}):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(ray_tmp, ignore_errors=True)
    output = log.read_text()
    assert job.returncode == 0, output[-4000:]
    assert "2 Ray nodes up" in output and "2 trials:" in output
    assert not list((tmp_path / "shared").glob(".ray-auth-*/*")), "the job's token outlived it"
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert sum(r.data.tags.get("medtune.role") == "trial" for r in runs) == 2
    assert (tmp_path / "shared" / "results" / "slurm").is_dir()
