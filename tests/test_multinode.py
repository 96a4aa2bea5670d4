"""A real search on a real two-node Ray cluster, started by cluster/slurm.sbatch as SLURM would run it.

srun and scontrol are stand-ins that start every "node" on this machine; each node is a separate `ray start`
with its own raylet, resources (1 CPU each) and address (the head at this host's address, the worker at a
loopback address of its own, as srun on another machine would give it), joined with token authentication on.
tune.py joins with --address; each trial's result.json (written by Ray Tune on the node that ran it) names
that node's address, and the driver-side MLflow callback must have one nested run per trial, whichever node
ran it. While the search runs, a driver with the job's token asks the cluster for its nodes and one with a
wrong token is turned away. Once both trials have an epoch, the worker node is lost (every process of it killed, as
a machine that dies): its trial goes on on the head node from its last checkpoint in the shared storage
(`max_failures: 1`), and the search still ends with one MLflow run per trial.

Cost: two Ray nodes, a 2-trial search of 2 epochs each (the lost trial's second on the head) and two extra drivers:
130 s for the file on 2 cores under a load of 10 from other work (120 s before the node loss, 1 epoch each, at the
same load), started with the session beside the other searches (tests/conftest.py).
"""

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
from conftest import background_job, new_mlflow_store
from local_cluster import SlurmJob

pytestmark = pytest.mark.integration
JOB = "4242"

TINY = """\
description: tiny real search across two nodes
dataset: pneumoniamnist
num_samples: 2
max_concurrent: 2
max_failures: 1
scheduler: {kind: fifo, max_t: 2}
resources: {cpu: 1}
fixed: {model: simple_cnn, batch_size: 256, optimizer: sgd, schedule: constant}
params:
  lr: {choice: [0.3, 0.1]}
"""

NODES = "result = [dict(id=n['NodeID'], ip=n['NodeManagerAddress'], cpu=n['Resources'].get('CPU')) for n in ray.nodes() if n['Alive']]"


def driver(started, address: str, code: str, **env):
    """A fresh Ray driver joining `address` in token mode (RAY_AUTH_TOKEN in `env`) that prints `code`'s `result`."""
    script = (f"import json, ray\nray.init(address={address!r}, logging_level='ERROR', log_to_driver=False)\n"
              f"{code}\nprint('RESULT=' + json.dumps(result))\n")
    return started.popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**started.env, "RAY_AUTH_MODE": "token", **env})


@background_job()
def slurm_search(started, tmp: Path) -> SimpleNamespace:
    """cluster/slurm.sbatch as job 4242 on node-a,node-b, with the stand-ins; once both nodes are up, one driver
    with the job's token and one with a wrong token join while the search runs."""
    (tmp / "tiny.yaml").write_text(TINY)
    new_mlflow_store(started, tmp / "mlflow.db")
    job = SlurmJob(tmp, JOB, ["node-a", "node-b"], {
        **started.env, "MEDTUNE_DATA_ROOT": str(started.data_root), "MEDTUNE_SPACE": str(tmp / "tiny.yaml"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}, popen=started.popen)
    process = job.start("--name", "slurm", "--seed", "5", "--no-report")
    asked, intruder, left_over, lost = None, None, [], None
    try:
        deadline = time.time() + 900
        while process.poll() is None and time.time() < deadline:
            if lost is None and job.output().count(" epoch 1/2 ") == 2:  # one trial on each node has an epoch
                lost = job.kill_node(1)
            if asked is None and "2 Ray nodes up" in job.output():
                (token,) = (tmp / "shared").glob(f".ray-auth-*/{JOB}.*/auth_token")
                address = re.search(r"Ray head on node-a \((\S+:\d+)\)", job.output())[1]
                asked = driver(started, address, NODES, RAY_AUTH_TOKEN=token.read_text().strip())
                # the wrong token: Ray retries for ~20 s before it gives up
                intruder = driver(started, address, "result = 'joined'", RAY_AUTH_TOKEN="0" * 64)
            time.sleep(0.5)
        process.wait(timeout=max(1.0, deadline - time.time()))
        nodes = asked.communicate(timeout=300)[0] if asked else "the nodes never came up"
        refused = intruder.communicate(timeout=300)[0] if intruder else ""
    finally:  # what SLURM does at the end of a job: end every step (the `ray start --block` nodes)
        left_over = job.end()
    result = next((json.loads(line[7:]) for line in nodes.splitlines() if line.startswith("RESULT=")), None)
    return SimpleNamespace(tmp=tmp, returncode=process.returncode, output=job.output(), search_dir=job.results / "slurm",
                           nodes=result, nodes_output=nodes[-3000:], lost=lost,
                           intruder=(intruder.returncode if intruder else None, refused), left_over=left_over)


def epoch_nodes(search_dir: Path) -> dict[str, list[tuple[int, str]]]:
    """trial_id -> (epoch, address of the node that trained it) for every result in the result.json Ray Tune wrote
    in the trial's dir."""
    nodes = {}
    for result_file in search_dir.glob("trial_*/result.json"):
        for line in result_file.read_text().splitlines():
            result = json.loads(line)
            nodes.setdefault(result["trial_id"], []).append((result["training_iteration"], result["node_ip"]))
    return nodes


def trial_nodes(search_dir: Path) -> dict[str, str]:
    """trial_id -> address of the node that ran its first epoch."""
    return {trial: epochs[0][1] for trial, epochs in epoch_nodes(search_dir).items()}


def test_the_job_runs_the_search_and_removes_its_token_and_its_nodes(slurm_search):
    assert slurm_search.returncode == 0, slurm_search.output[-4000:]
    assert "2 Ray nodes up" in slurm_search.output and "2 trials:" in slurm_search.output
    assert not list((slurm_search.tmp / "shared").glob(".ray-auth-*/*")), "the job's token outlived it"
    assert not slurm_search.left_over, "Ray processes of the job outlived it"


def test_the_cluster_has_two_nodes_with_their_own_resources(slurm_search):
    nodes = slurm_search.nodes
    assert nodes is not None, slurm_search.nodes_output
    assert len(nodes) == 2 and len({n["id"] for n in nodes}) == 2 and len({n["ip"] for n in nodes}) == 2
    assert [n["cpu"] for n in nodes] == [1.0, 1.0]


def test_trials_ran_on_both_nodes(slurm_search):
    ran_on = trial_nodes(slurm_search.search_dir)
    alive = {n["ip"] for n in slurm_search.nodes or []}
    assert len(ran_on) == 2  # two trials at once, one CPU per node: one on each
    assert set(ran_on.values()) == alive, f"trials by node: {ran_on}, nodes: {alive}"


def test_the_lost_node_s_trial_goes_on_on_the_other_node_from_its_checkpoint(slurm_search):
    assert slurm_search.lost, "the worker node was never killed (no epoch on both nodes)"
    worker = next(n["ip"] for n in slurm_search.nodes or [] if n["ip"] == "127.0.0.2")
    epochs = epoch_nodes(slurm_search.search_dir)
    (moved,) = [trial for trial, ran in epochs.items() if ran[0][1] == worker]
    head = next(ip for trial, ran in epochs.items() if trial != moved for _, ip in ran)
    assert epochs[moved] == [(1, worker), (2, head)], epochs  # epoch 1 is not trained again: its checkpoint was kept
    assert "2 trials: 2 completed" in slurm_search.output, slurm_search.output[-4000:]


def test_every_trial_has_its_nested_mlflow_run_with_curves_and_reports(slurm_search):
    client = mlflow.MlflowClient(f"sqlite:///{slurm_search.tmp / 'mlflow.db'}")
    found = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=100)
    parents = [r for r in found if r.data.tags.get("medtune.role") == "search"]
    children = [r for r in found if r.data.tags.get("medtune.role") == "trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert {c.data.tags["medtune.trial_id"] for c in children} == set(trial_nodes(slurm_search.search_dir))
    assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)
    assert all(c.info.status == "FINISHED" and "val_auc" in c.data.metrics for c in children)
    for run in children:  # one run per trial, the lost node's one too, each epoch once
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_auc")] == [1, 2]
    completed = [c for c in children if c.data.tags.get("medtune.outcome") == "completed"]
    assert completed
    for run in completed:  # the driver read each trial's figures from shared storage, whichever node wrote them
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"confusion_matrix.png", "roc_curve.png"} <= artifacts
        assert Path(run.data.tags["medtune.checkpoint"]).is_relative_to(slurm_search.search_dir)


def test_a_driver_with_the_wrong_token_is_refused(slurm_search):
    returncode, output = slurm_search.intruder
    assert returncode != 0 and "Authentication token is missing or incorrect" in output, output[-2000:]
