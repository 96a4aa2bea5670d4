"""The cluster configs in cluster/ parse, carry what their tools require, and agree with tune.py and Ray.

Ray cluster launcher YAMLs go through Ray's own `prepare_config` + `validate_config` (what `ray up` runs);
every `ray start` line is parsed by Ray's own CLI; every tune.py command by tune.py's `get_args_parser()`;
KubeRay manifests, the SLURM script and the MLflow server recipe are checked for the keys and settings
their tools need. The MLflow start script is also run: it refuses unsafe settings, and (where MLflow's
auth extra is installed) starts a server that turns away requests without a login. The SLURM script is run
with stand-ins for SLURM, `ray` and the search (its token's life), the launchers' node commands with stand-ins
for `ray` and `pip`, and each KubeRay NetworkPolicy is evaluated against the pods KubeRay makes (who reaches
the head, on which port).
"""

from __future__ import annotations

import configparser
import importlib.util
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray
import yaml
from conftest import NO_SERVER_JOBS, background_job
from local_cluster import free_port

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER = {"aws": CLUSTER / "aws.yaml", "gcp": CLUSTER / "gcp.yaml"}
KUBERAY = CLUSTER / "kuberay"
SBATCH = CLUSTER / "slurm.sbatch"
MLFLOW = CLUSTER / "mlflow"
SCRIPTS = [SBATCH, MLFLOW / "start_mlflow_server.sh"]


def load(path: Path):
    return yaml.safe_load(path.read_text())


def load_all(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def expand_shell_vars(text: str) -> str:
    """Shell variables -> "1", so a command can be parsed without its runtime values."""
    return re.sub(r"\$\{[^}]*\}|\$[A-Za-z_][A-Za-z_0-9]*|\$\([^)]*\)", "1", text)


def shell_lines(text: str) -> list[str]:
    """Lines of a shell script with backslash continuations joined."""
    return text.replace("\\\n", " ").splitlines()


# --- tune.py commands ---------------------------------------------------------------------------

TUNE = re.compile(r"python3?\s+(?:-m\s+tune\b|\S*tune\.py\b).*")


def tune_commands(path: Path) -> list[str]:
    """Every tune.py command written in `path`: in comments, in YAML values (a RayJob's entrypoint), in scripts."""
    text = path.read_text()
    found = []
    if path.suffix in (".yaml", ".yml"):
        comments = [line.strip().lstrip("#") for line in text.splitlines() if line.strip().startswith("#")]
        values = []

        def walk(node):
            if isinstance(node, dict):
                for value in node.values():
                    walk(value)
            elif isinstance(node, list):
                for value in node:
                    walk(value)
            elif isinstance(node, str):
                values.append(node)

        for doc in load_all(path):
            walk(doc)
        candidates = comments + values
    else:
        candidates = [line for line in shell_lines(text) if not line.lstrip().startswith("#")]
    for candidate in candidates:
        match = TUNE.search(candidate)
        if match:
            command = re.sub(r"\s+&$", "", match.group(0).strip())  # started in the background (slurm.sbatch)
            try:
                shlex.split(command)
            except ValueError:  # ends in the closing quote of an enclosing argument: ray exec ... 'cd && python ...'
                command = command[:-1]
            found.append(command)
    return found


def tune_args(command: str, expand: bool = True) -> list[str]:
    """The arguments after tune.py (or `-m tune`); shell variables -> "1" unless `expand` is false."""
    command = command.replace('"$@"', "")
    words = shlex.split(expand_shell_vars(command) if expand else command)
    start = next(i for i, w in enumerate(words) if w.endswith("tune.py") or w == "tune") + 1
    return words[start:]


COMMAND_FILES = [LAUNCHER["aws"], LAUNCHER["gcp"], KUBERAY / "raycluster.yaml", KUBERAY / "rayjob.yaml", SBATCH]


@pytest.mark.parametrize("path", COMMAND_FILES, ids=lambda p: p.name)
def test_tune_commands_use_flags_tune_py_accepts_and_shared_storage(path):
    from tune import get_args_parser

    commands = tune_commands(path)
    assert commands, f"{path.name} shows no tune.py command"
    parser = get_args_parser()
    for command in commands:
        try:
            args = parser.parse_args(tune_args(command))
        except SystemExit:
            pytest.fail(f"tune.py rejects the command in {path.name}: {command}")
        assert args.address, f"{path.name}: a cluster command needs --address: {command}"
        raw = dict(zip(tune_args(command, expand=False), tune_args(command, expand=False)[1:]))
        assert raw["--storage"].startswith(("s3://", "gs://", "/", "$MEDTUNE_SHARED/")), \
            f"{path.name}: --storage must be shared (s3://, gs:// or an absolute shared path): {command}"
        if args.space:  # a new search (a resume takes the tracking URI it started with)
            assert raw["--tracking-uri"].startswith(("http://", "https://", "$MLFLOW_TRACKING_URI")), \
                f"{path.name}: on a cluster, runs go to the MLflow server (--tracking-uri http://...): {command}"


# --- Ray cluster launcher -----------------------------------------------------------------------

@pytest.mark.parametrize("provider", sorted(LAUNCHER))
def test_launcher_config_passes_rays_own_validation(provider):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(LAUNCHER[provider])
    validate_config(prepare_config(config))  # what `ray up` does before touching the cloud
    assert config["provider"]["type"] == provider


@pytest.mark.parametrize("provider", sorted(LAUNCHER))
def test_launcher_config_has_cpu_head_autoscaling_gpu_workers_and_token_auth(provider):
    config = load(LAUNCHER[provider])
    for key in ("cluster_name", "max_workers", "provider", "auth", "available_node_types", "head_node_type",
                "setup_commands", "head_start_ray_commands", "worker_start_ray_commands", "file_mounts"):
        assert key in config, f"{provider}: missing {key}"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"].get("CPU") == 0
    assert workers and all(w["resources"]["GPU"] >= 1 for w in workers)
    assert all(0 < w["min_workers"] <= w["max_workers"] <= config["max_workers"] for w in workers)
    assert all("node_config" in t and "resources" in t for t in types.values())
    if provider == "aws":
        assert all(w["node_config"]["InstanceType"].startswith(("g", "p")) for w in workers)
    else:
        assert all(w["node_config"]["guestAccelerators"][0]["acceleratorCount"] >= 1 for w in workers)
        assert all({"onHostMaintenance": "TERMINATE"} in w["node_config"]["scheduling"] for w in workers)

    assert any("pip install" in c and "~/medtune" in c for c in config["setup_commands"])
    assert config["file_mounts"]["~/medtune"] == "." and "~/.ray" in config["file_mounts"]  # code + token
    head_start = " ".join(config["head_start_ray_commands"])
    worker_start = " ".join(config["worker_start_ray_commands"])
    assert "ray start" in head_start and "--head" in head_start and "--port=6379" in head_start
    assert "--address=$RAY_HEAD_IP:6379" in worker_start
    assert "RAY_AUTH_MODE=token" in head_start and "RAY_AUTH_MODE=token" in worker_start
    assert "--dashboard-host=127.0.0.1" in head_start


def ray_start_commands() -> list[tuple[str, list[str]]]:
    """(where, args of `ray start`) for every `ray start` in the launcher configs and the SLURM script."""
    found = []
    for provider, path in LAUNCHER.items():
        config = load(path)
        for key in ("head_start_ray_commands", "worker_start_ray_commands"):
            for command in config[key]:
                for part in command.split(";"):
                    words = shlex.split(expand_shell_vars(part))
                    if words[-2:] != ["ray", "stop"] and "start" in words and "ray" in words:
                        found.append((f"{provider}:{key}", words[words.index("ray") + 2:]))
    for line in shell_lines(SBATCH.read_text()):
        if "ray start" in line and not line.lstrip().startswith("#"):
            words = shlex.split(expand_shell_vars(line.split("&")[0]))
            found.append(("slurm.sbatch", words[words.index("start") + 1:]))
    return found


def test_every_ray_start_line_parses_with_rays_cli():
    import click
    from ray.scripts.scripts import start

    commands = ray_start_commands()
    assert {where.split(":")[0] for where, _ in commands} == {"aws", "gcp", "slurm.sbatch"}
    assert sum("--head" in args for _, args in commands) == 3  # one head per config
    for where, args in commands:
        try:
            start.make_context("ray start", list(args))
        except click.ClickException as error:  # UsageError, BadParameter
            pytest.fail(f"{where}: `ray start {' '.join(args)}` is rejected by Ray's CLI: {error}")


# `ray up` runs each launcher command on a node as `bash --login -c -i 'source ~/.bashrc && (command)'`; these
# stand-ins note what the commands call (`lspci` shows no NVIDIA card: GCP's wait for the driver returns at once).
LAUNCHER_STANDINS = {
    "ray": '#!/usr/bin/env bash\necho "ray ${RAY_AUTH_MODE:-unset} $*" >> "$STANDIN_LOG"\n',
    "pip": '#!/usr/bin/env bash\necho "pip $*" >> "$STANDIN_LOG"\n',
    "lspci": '#!/usr/bin/env bash\necho "00:02.0 VGA compatible controller: Cirrus Logic GD 5446"\n',
}


def run_node_commands(config: dict, kind: str, tmp_path: Path) -> tuple[Path, list[str]]:
    """A fresh node's home (token and code as `file_mounts` copy them), then the node's launcher commands in
    `ray up`'s order, twice (a `ray up` on a running cluster runs setup again); (home, the stand-ins' notes)."""
    home, bin_dir, log = tmp_path / kind, tmp_path / "bin", tmp_path / f"{kind}.calls"
    bin_dir.mkdir(exist_ok=True)
    for name, text in LAUNCHER_STANDINS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (home / ".ray").mkdir(parents=True)
    (home / "medtune").mkdir()
    (home / ".ray" / "auth_token").write_text("0" * 64)
    (home / ".ray" / "auth_token").chmod(0o644)
    (home / ".bashrc").write_text("# the image's own profile\n")
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(home), "STANDIN_LOG": str(log), "RAY_HEAD_IP": "10.0.0.5"}
    for _ in range(2):
        for key in ("initialization_commands", "setup_commands", f"{kind}_setup_commands", f"{kind}_start_ray_commands"):
            for command in config.get(key) or []:
                done = subprocess.run(["bash", "-c", f"source ~/.bashrc && ({command})"], env=env, capture_output=True,
                                      text=True, timeout=60)
                assert done.returncode == 0, f"{kind}: {key}: {command}\n{done.stderr}"
    return home, log.read_text().splitlines()


@pytest.mark.parametrize("provider", sorted(LAUNCHER))
def test_launcher_commands_on_a_node_make_the_token_private_and_start_ray_with_token_auth(provider, tmp_path):
    """Every setup and start command runs; the token ends 600, the profile turns token auth on once however often
    setup runs (so `ray stop`, `ray exec` and the autoscaler's own calls use it), the code is installed from the
    mounted copy, and `ray start` runs after `ray stop` with token auth: the head on 6379, a worker at the head."""
    config = load(LAUNCHER[provider])
    for kind in ("head", "worker"):
        home, calls = run_node_commands(config, kind, tmp_path)
        assert stat.S_IMODE((home / ".ray" / "auth_token").stat().st_mode) == 0o600
        assert (home / ".bashrc").read_text().splitlines().count("export RAY_AUTH_MODE=token") == 1
        assert calls.count(f"pip install -q -e {home}/medtune") == 2
        rays = [call.split() for call in calls if call.startswith("ray ")]
        assert [words[2] for words in rays] == ["stop", "start"] * 2, calls
        assert all(words[1] == "token" for words in rays), "ray runs without RAY_AUTH_MODE=token"
        start = rays[1][3:]
        if kind == "head":
            assert "--head" in start and "--port=6379" in start and not any(w.startswith("--address") for w in start)
        else:
            assert "--address=10.0.0.5:6379" in start and "--head" not in start


# --- KubeRay ------------------------------------------------------------------------------------

def kuberay_docs(name: str) -> dict:
    """The documents of cluster/kuberay/<name> by kind: the Ray resource and its NetworkPolicy."""
    docs = load_all(KUBERAY / name)
    assert len({doc["kind"] for doc in docs}) == len(docs), f"{name}: one document of each kind"
    return {doc["kind"]: doc for doc in docs}


def cluster_specs() -> dict:
    raycluster = kuberay_docs("raycluster.yaml")["RayCluster"]
    rayjob = kuberay_docs("rayjob.yaml")["RayJob"]
    assert raycluster["apiVersion"] == rayjob["apiVersion"] == "ray.io/v1"
    assert raycluster["kind"] == "RayCluster" and rayjob["kind"] == "RayJob"
    return {"RayCluster": raycluster["spec"], "RayJob": rayjob["spec"]["rayClusterSpec"]}


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_kuberay_cluster_has_cpu_head_gpu_worker_group_token_auth_and_shared_volume(kind):
    spec = cluster_specs()[kind]
    assert spec["authOptions"]["mode"] == "token"
    assert spec["rayVersion"] == ray.__version__
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    head_container = head["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head_container["resources"]["limits"]
    # the MLflow login comes from a Secret, never a literal
    env = {e["name"]: e for e in head_container.get("env", [])}
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        assert "secretKeyRef" in env[name]["valueFrom"] and "value" not in env[name]
    (group,) = spec["workerGroupSpecs"]
    assert group["groupName"] and 1 <= group["minReplicas"] <= group["maxReplicas"]
    assert isinstance(group["rayStartParams"], dict)
    worker_container = group["template"]["spec"]["containers"][0]
    assert int(worker_container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert head_container["image"] == worker_container["image"]
    claim = load(KUBERAY / "storage.yaml")
    assert claim["kind"] == "PersistentVolumeClaim" and claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for pod in (head["template"]["spec"], group["template"]["spec"]):
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        assert volumes["shared"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        assert mounts["shared"] == "/mnt/medtune" and mounts["dshm"] == "/dev/shm"


def test_rayjob_runs_tune_py_on_the_cluster_and_cleans_up():
    from tune import get_args_parser

    job = kuberay_docs("rayjob.yaml")["RayJob"]["spec"]
    args = get_args_parser().parse_args(tune_args(job["entrypoint"]))
    assert args.space == "resnetd_depth" and args.address == "auto"
    mount = "/mnt/medtune"  # on every pod (see the test above): results written by any node reach the driver
    assert args.storage.startswith(mount + "/") and args.data_root.startswith(mount + "/")
    assert job["shutdownAfterJobFinishes"] is True and job["submissionMode"] == "K8sJobMode"


# --- KubeRay: the head's NetworkPolicy ------------------------------------------------------------

_SELECTOR = {"type": "object", "additionalProperties": False, "properties": {
    "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
    "matchExpressions": {"type": "array", "items": {
        "type": "object", "additionalProperties": False, "required": ["key", "operator"], "properties": {
            "key": {"type": "string"}, "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
            "values": {"type": "array", "items": {"type": "string"}}}}}}}
_PEER = {"type": "object", "additionalProperties": False, "minProperties": 1, "properties": {
    "podSelector": _SELECTOR, "namespaceSelector": _SELECTOR,
    "ipBlock": {"type": "object", "additionalProperties": False, "required": ["cidr"], "properties": {
        "cidr": {"type": "string"}, "except": {"type": "array", "items": {"type": "string"}}}}}}
_PORT = {"type": "object", "additionalProperties": False, "properties": {
    "protocol": {"enum": ["TCP", "UDP", "SCTP"]},
    "port": {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 65535}, {"type": "string"}]},
    "endPort": {"type": "integer", "minimum": 1, "maximum": 65535}}}
# networking.k8s.io/v1 NetworkPolicy, transcribed from the Kubernetes API reference (the kubernetes client,
# which carries the OpenAPI models, is not a dependency): unknown or misspelt fields are errors, as in `kubectl
# apply --validate=strict`.
NETWORK_POLICY_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "networking.k8s.io/v1"}, "kind": {"const": "NetworkPolicy"},
        "metadata": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string", "maxLength": 253, "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"}}},
        "spec": {"type": "object", "additionalProperties": False, "required": ["podSelector"], "properties": {
            "podSelector": _SELECTOR,
            "policyTypes": {"type": "array", "items": {"enum": ["Ingress", "Egress"]}},
            "ingress": {"type": "array", "items": {"type": "object", "additionalProperties": False, "properties": {
                "from": {"type": "array", "items": _PEER}, "ports": {"type": "array", "items": _PORT}}}},
            "egress": {"type": "array", "items": {"type": "object", "additionalProperties": False, "properties": {
                "to": {"type": "array", "items": _PEER}, "ports": {"type": "array", "items": _PORT}}}}}}}}

_LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"


def valid_label(key: str, value: str) -> bool:
    """Kubernetes label syntax: [DNS-subdomain prefix/]name, and a value of at most 63 name characters."""
    prefix, _, name = key.rpartition("/")
    return (re.fullmatch(_LABEL_NAME, name) is not None and (value == "" or re.fullmatch(_LABEL_NAME, value) is not None)
            and (prefix == "" or (len(prefix) <= 253 and re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", prefix))))


def selects(selector: dict | None, labels: dict) -> bool:
    """Kubernetes label-selector semantics: every matchLabels pair and matchExpression holds; {} selects all."""
    selector = selector or {}
    if any(labels.get(key) != value for key, value in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        present, values = expression["key"] in labels, expression.get("values") or []
        holds = {"In": present and labels.get(expression["key"]) in values,
                 "NotIn": not present or labels.get(expression["key"]) not in values,
                 "Exists": present, "DoesNotExist": not present}[expression["operator"]]
        if not holds:
            return False
    return True


NAMESPACE = "ml"  # where the manifests are applied (they name none: the current namespace)


def pod(labels: dict, namespace: str = NAMESPACE) -> dict:
    return {"namespace": namespace, "labels": labels}


def kuberay_pod(cluster: str, node_type: str, group: str, template: dict) -> dict:
    """A Ray pod as KubeRay labels it (ray-operator common/pod.go, labelPod): its labels over the template's,
    except ray.io/node-type, ray.io/group and ray.io/cluster, which the template cannot set."""
    labels = {"ray.io/is-ray-node": "yes", "ray.io/cluster": cluster, "ray.io/node-type": node_type,
              "ray.io/group": group, "ray.io/identifier": f"{cluster}-{node_type}",
              "app.kubernetes.io/name": "kuberay", "app.kubernetes.io/created-by": "kuberay-operator"}
    reserved = {"ray.io/node-type", "ray.io/group", "ray.io/cluster"}
    labels.update({k: v for k, v in ((template.get("metadata") or {}).get("labels") or {}).items() if k not in reserved})
    return pod(labels)


def admitted(policies: list[dict], source: dict, target: dict, port: int) -> bool:
    """Whether TCP traffic from `source` reaches `target`:`port` (NetworkPolicy v1: a pod that no ingress policy
    selects takes everything; a selected pod takes what at least one rule of one of them allows)."""
    selecting = [p for p in policies if target["namespace"] == NAMESPACE
                 and selects(p["spec"]["podSelector"], target["labels"])
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress") or []:
            ports = rule.get("ports")
            if ports and not any(p.get("protocol", "TCP") == "TCP" and p["port"] <= port <= p.get("endPort", p["port"])
                                 for p in ports):
                continue
            peers = rule.get("from")
            if not peers:
                return True
            for peer in peers:
                if "namespaceSelector" in peer:
                    in_namespace = selects(peer["namespaceSelector"],
                                           {"kubernetes.io/metadata.name": source["namespace"]})
                else:
                    in_namespace = source["namespace"] == NAMESPACE
                if in_namespace and ("podSelector" not in peer or selects(peer["podSelector"], source["labels"])):
                    return True
    return False


GCS, DASHBOARD, CLIENT, METRICS, RAYLET = 6379, 8265, 10001, 8080, 43211  # RAYLET: a port Ray picks at start


def head_policy_scene(file: str) -> dict:
    """The pods around a cluster made from cluster/kuberay/<file>: its own, the submitter (RayJob), the
    operator, and pods that must not reach the head."""
    docs = kuberay_docs(file)
    ray = docs["RayCluster"] if "RayCluster" in docs else docs["RayJob"]
    spec = ray["spec"] if ray["kind"] == "RayCluster" else ray["spec"]["rayClusterSpec"]
    # a RayJob's cluster is named <RayJob name>-<random suffix> by KubeRay
    cluster = ray["metadata"]["name"] + ("" if ray["kind"] == "RayCluster" else "-x7k2q")
    (group,) = spec["workerGroupSpecs"]
    scene = {
        "head": kuberay_pod(cluster, "head", "headgroup", spec["headGroupSpec"]["template"]),
        "worker": kuberay_pod(cluster, "worker", group["groupName"], group["template"]),
        "operator": pod({"app.kubernetes.io/name": "kuberay-operator", "app.kubernetes.io/instance": "kuberay-operator",
                         "app.kubernetes.io/component": "kuberay-operator"}, namespace="kuberay-system"),
        "another Ray cluster's worker": kuberay_pod("someone-else", "worker", "cpu", {}),
        "another Ray cluster's head": kuberay_pod("someone-else", "head", "headgroup", {}),
        "a pod of the namespace": pod({"app": "notebook"}),
        "a pod of another namespace": pod({"app": "notebook"}, namespace="web"),
        "another Job's pod": pod({"batch.kubernetes.io/job-name": "nightly-export", "job-name": "nightly-export"}),
    }
    if ray["kind"] == "RayJob":  # the Job controller labels its pods with the Job's name: KubeRay's is the RayJob's
        name = ray["metadata"]["name"]
        scene["submitter"] = pod({"batch.kubernetes.io/job-name": name, "job-name": name})
    return {"policies": [docs["NetworkPolicy"]], "ray": ray, "pods": scene}


@pytest.mark.parametrize("file", ["raycluster.yaml", "rayjob.yaml"])
def test_head_network_policy_is_a_valid_kubernetes_object(file):
    import jsonschema

    policy = kuberay_docs(file)["NetworkPolicy"]
    jsonschema.validate(policy, NETWORK_POLICY_SCHEMA)
    selectors = [policy["spec"]["podSelector"]] + [peer[key] for rule in policy["spec"]["ingress"]
                                                   for peer in rule["from"] for key in peer]
    for selector in selectors:
        for key, value in (selector.get("matchLabels") or {}).items():
            assert valid_label(key, value), f"{file}: not a Kubernetes label: {key}: {value}"
    assert policy["spec"]["policyTypes"] == ["Ingress"]  # egress stays open: workers reach MLflow, buckets, pip


@pytest.mark.parametrize("file", ["raycluster.yaml", "rayjob.yaml"])
def test_head_network_policy_lets_only_the_clusters_own_pods_reach_the_head(file):
    scene = head_policy_scene(file)
    policies, pods, ray = scene["policies"], scene["pods"], scene["ray"]
    (policy,) = policies
    head = pods["head"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    # the head pod, by the labels KubeRay gives it; ray.io/cluster where the cluster's name is known
    assert selector["ray.io/node-type"] == "head"
    if ray["kind"] == "RayCluster":
        assert selector["ray.io/cluster"] == ray["metadata"]["name"]
    else:
        assert selector["medtune/rayjob"] == ray["metadata"]["name"]
    assert [name for name, p in pods.items() if not admitted(policies, pods["a pod of another namespace"], p, GCS)] \
        == ["head"], "the policy selects the head pod, and no other"

    for port in (GCS, DASHBOARD, CLIENT, METRICS, RAYLET):  # workers reach the GCS and every port Ray picks
        for own in ("head", "worker"):
            assert admitted(policies, pods[own], head, port), f"{file}: the {own} cannot reach the head on {port}"
    submitters = ["operator"] + (["submitter"] if ray["kind"] == "RayJob" else [])
    for name in submitters:
        assert admitted(policies, pods[name], head, DASHBOARD), f"{file}: the {name} cannot reach the dashboard"
        for port in (GCS, CLIENT, METRICS, RAYLET):
            assert not admitted(policies, pods[name], head, port), f"{file}: the {name} reaches the head on {port}"
    for name, stranger in pods.items():
        if name not in ("head", "worker", *submitters):
            for port in (GCS, DASHBOARD, CLIENT, METRICS, RAYLET):
                assert not admitted(policies, stranger, head, port), f"{file}: {name} reaches the head on {port}"

    # in the manifest: every rule names its sources (no ipBlock, no empty `from` that admits all), and the
    # only port opened beyond the cluster's own pods is the dashboard's
    for rule in policy["spec"]["ingress"]:
        assert rule.get("from") and all("ipBlock" not in peer for peer in rule["from"]), rule
    listed = {p["port"] for rule in policy["spec"]["ingress"] for p in rule.get("ports", [])}
    assert listed == {DASHBOARD}


def test_rayjob_labels_its_pods_for_the_policy_with_the_rayjob_name():
    """A RayJob renamed (say, to resume) must carry the new name into its pod labels and policy, or its own
    submitter would be shut out of the dashboard."""
    docs = kuberay_docs("rayjob.yaml")
    name = docs["RayJob"]["metadata"]["name"]
    spec = docs["RayJob"]["spec"]["rayClusterSpec"]
    for template in [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
        assert template["metadata"]["labels"]["medtune/rayjob"] == name
    assert name in docs["NetworkPolicy"]["metadata"]["name"]
    assert len(name) <= 47  # KubeRay's limit for a RayJob's name (its cluster's is name + 6 characters)


def test_ray_versions_agree_with_the_installed_ray():
    """Driver and cluster must run the same Ray: every image tag and rayVersion in cluster/ names this one."""
    texts = {p.relative_to(REPO): p.read_text() for p in CLUSTER.rglob("*") if p.is_file()}
    versions = {(str(path), v) for path, text in texts.items()
                for v in re.findall(r"rayproject/ray:([0-9][0-9.]*[0-9])", text)}
    versions |= {(name, spec["rayVersion"]) for name, spec in cluster_specs().items()}
    assert len(versions) >= 5
    assert {v for _, v in versions} == {ray.__version__}, sorted(versions)


# --- SLURM --------------------------------------------------------------------------------------

def test_sbatch_starts_head_then_workers_with_a_private_token():
    text = SBATCH.read_text()
    directives = dict(re.findall(r"^#SBATCH\s+--([a-z-]+)=?(\S*)", text, flags=re.M))
    assert int(directives["nodes"]) >= 2 and directives["ntasks-per-node"] == "1"
    lines = shell_lines(text)
    head = [line for line in lines if "srun" in line and "ray start --head" in line]
    workers = [line for line in lines if "srun" in line and "ray start" in line and "--address=" in line]
    assert len(head) == 1 and len(workers) == 1 and lines.index(head[0]) < lines.index(workers[0])
    assert all("--block" in line for line in head + workers)
    assert "export RAY_AUTH_MODE=token" in text and "export RAY_AUTH_TOKEN_PATH=" in text
    assert "umask 077" in text and "chmod 700" in text


# cluster/slurm.sbatch run for real, with stand-ins for SLURM (srun runs the command here, scontrol expands a
# comma-separated node list, squeue lists $FAKE_SQUEUE_JOBS) and for the venv's `ray` and `python` (the token
# is made by the real interpreter; `ray start`, the wait for the nodes and the search only note what they see).
# tests/test_multinode.py runs the same script with real Ray nodes and a real search.
SLURM_STANDINS = {
    "srun": """#!/usr/bin/env bash
while [[ $# -gt 0 && $1 == -* ]]; do
  case $1 in -w|--nodelist|-N|-n) shift 2 ;; *) shift ;; esac
done
exec "$@"
""",
    "scontrol": """#!/usr/bin/env bash
[[ $1 == show && $2 == hostnames ]] && tr ',' '\\n' <<< "$3"
""",
    "squeue": """#!/usr/bin/env bash
[[ -z ${FAKE_SQUEUE_FAIL:-} ]] || { echo "squeue: error: Unable to contact slurm controller" >&2; exit 1; }
printf '%s\\n' $FAKE_SQUEUE_JOBS
""",
}
VENV_STANDINS = {
    "activate": 'PATH="$(dirname "${BASH_SOURCE[0]}"):$PATH"\n',
    "ray": """#!/usr/bin/env bash
if [[ $1 == start ]]; then
  echo "$RAY_AUTH_MODE $RAY_AUTH_TOKEN_PATH $(cat "$RAY_AUTH_TOKEN_PATH") ${RAY_AUTH_TOKEN-unset}" \\
    >> "$STANDIN_LOG/ray-start"
fi
""",
    "python": f"""#!/usr/bin/env bash
case $1 in
  -)  # the wait for the nodes: until every `ray start` has run
      cat > /dev/null
      for _ in $(seq 200); do
        [[ $(cat "$STANDIN_LOG/ray-start" 2> /dev/null | wc -l) -ge $3 ]] && {{ echo "$3 Ray nodes up"; exit 0; }}
        sleep 0.05
      done
      exit 1 ;;
  -m) # the search: what it sees of the token
      token_dir=$(dirname "$RAY_AUTH_TOKEN_PATH")
      {{ echo "pid $$"; echo "mode $RAY_AUTH_MODE"; echo "path $RAY_AUTH_TOKEN_PATH"
         echo "perms $(stat -c %a "$token_dir") $(stat -c %a "$RAY_AUTH_TOKEN_PATH")"
         echo "token $(cat "$RAY_AUTH_TOKEN_PATH")"; echo "env-token ${{RAY_AUTH_TOKEN-unset}}"
         echo "token-dirs $(cd "$token_dir/.." && echo *)"; echo "args $*"; }} > "$STANDIN_LOG/driver"
      [[ -z ${{DRIVER_SLEEPS:-}} ]] || exec sleep 60
      exit "${{DRIVER_EXIT:-0}}" ;;
  *)  exec {sys.executable} "$@" ;;
esac
""",
}
JOB = "4242"


@pytest.fixture
def sbatch(tmp_path):
    """cluster/slurm.sbatch as job 4242 on node-a,node-b, with the stand-ins: `.start(**env)` runs it (extra
    environment as keywords) and returns the Popen; `.token_root`, `.log` (what the stand-ins noted) and
    `.output` (the job's output file) are its paths."""
    slurm_bin, venv = tmp_path / "slurm-bin", tmp_path / "venv"
    for folder, files in ((slurm_bin, SLURM_STANDINS), (venv / "bin", VENV_STANDINS)):
        folder.mkdir(parents=True)
        for name, text in files.items():
            (folder / name).write_text(text)
            (folder / name).chmod(0o755)
    shared, log, output = tmp_path / "shared", tmp_path / "log", tmp_path / f"medtune-{JOB}.out"
    log.mkdir()
    env = {"PATH": f"{slurm_bin}:/usr/bin:/bin", "HOME": str(tmp_path), "USER": "medtune-test",
           "SLURM_JOB_ID": JOB, "SLURM_JOB_NODELIST": "node-a,node-b", "SLURM_CPUS_PER_TASK": "1",
           "MEDTUNE_VENV": str(venv), "MEDTUNE_SHARED": str(shared), "MEDTUNE_HEAD_IP": "127.0.0.1",
           "RAY_PORT": "6399", "MEDTUNE_SPACE": "tiny", "MLFLOW_TRACKING_URI": "http://10.0.0.10:5000",
           "STANDIN_LOG": str(log), "FAKE_SQUEUE_JOBS": JOB, "RAY_AUTH_TOKEN": "a-token-of-the-submitting-shell"}
    jobs = []

    def start(**extra) -> subprocess.Popen:
        job_env = {name: value for name, value in {**env, **extra}.items() if value is not None}  # None: unset
        with open(output, "w") as handle:  # a file: a stand-in left running must not hold a pipe open
            jobs.append(subprocess.Popen(["bash", str(SBATCH), "--seed", "5"], env=job_env, stdout=handle,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True))
        return jobs[-1]

    yield SimpleNamespace(start=start, token_root=shared / ".ray-auth-medtune-test", log=log, output=output)
    for job in jobs:  # what SLURM does at the end of a job: end whatever the script left running
        try:
            os.killpg(job.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        job.wait(timeout=10)


def noted_by_the_search(log: Path) -> dict:
    return dict(line.split(" ", 1) for line in (log / "driver").read_text().splitlines())


@pytest.mark.parametrize("exit_code", [0, 3], ids=["search-succeeds", "search-fails"])
def test_sbatch_token_is_private_shared_by_every_node_and_removed_at_the_end(sbatch, exit_code):
    job = sbatch.start(DRIVER_EXIT=str(exit_code))
    assert job.wait(timeout=30) == exit_code, sbatch.output.read_text()

    during = noted_by_the_search(sbatch.log)
    token_dir = Path(during["path"]).parent
    assert during["mode"] == "token" and token_dir.parent == sbatch.token_root and token_dir.name.startswith(f"{JOB}.")
    assert during["perms"] == "700 600", "the token dir must be 700 and the token 600 while the search runs"
    assert re.fullmatch(r"[0-9a-f]{64}", during["token"])
    assert during["env-token"] == "unset", "RAY_AUTH_TOKEN from the submitting shell would override the job's token"
    assert during["args"].endswith("--seed 5")
    starts = (sbatch.log / "ray-start").read_text().splitlines()  # the head's and the worker's `ray start`
    assert starts == [f"token {during['path']} {during['token']} unset"] * 2

    assert not token_dir.exists(), "the job's token outlived it"
    assert stat.S_IMODE(sbatch.token_root.stat().st_mode) == 0o700 and not list(sbatch.token_root.iterdir())
    assert during["token"] not in sbatch.output.read_text()


def test_sbatch_without_USER_names_the_token_root_after_the_account(sbatch):
    job = sbatch.start(USER=None)
    assert job.wait(timeout=30) == 0, sbatch.output.read_text()
    account = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
    assert Path(noted_by_the_search(sbatch.log)["path"]).parent.parent.name == f".ray-auth-{account}"


EARLIER = {"1111.aB3dE5gH": "ended", "2222.kL7mN9pQ": "running", f"{JOB}.rS2tU4vW": "this job, before a requeue"}


def lay_out_earlier_token_dirs(token_root: Path):
    for name in EARLIER:
        (token_root / name).mkdir(parents=True)
        (token_root / name / "auth_token").write_text("0" * 8)


def test_sbatch_first_removes_the_token_dirs_its_earlier_jobs_left(sbatch):
    lay_out_earlier_token_dirs(sbatch.token_root)
    job = sbatch.start(FAKE_SQUEUE_JOBS=f"{JOB} 2222")
    assert job.wait(timeout=30) == 0, sbatch.output.read_text()
    during = noted_by_the_search(sbatch.log)
    assert sorted(during["token-dirs"].split()) == sorted(["2222.kL7mN9pQ", Path(during["path"]).parent.name])
    assert [p.name for p in sbatch.token_root.iterdir()] == ["2222.kL7mN9pQ"]
    assert "stale Ray token directory of job 1111" in sbatch.output.read_text()


@pytest.mark.parametrize("squeue", [{"FAKE_SQUEUE_FAIL": "1"}, {"FAKE_SQUEUE_JOBS": "2222"}],
                         ids=["squeue-fails", "squeue-lacks-this-job"])
def test_sbatch_removes_no_token_dir_when_squeue_cannot_tell(sbatch, squeue):
    lay_out_earlier_token_dirs(sbatch.token_root)
    job = sbatch.start(**squeue)
    assert job.wait(timeout=30) == 0, sbatch.output.read_text()
    assert sorted(p.name for p in sbatch.token_root.iterdir()) == sorted(EARLIER)


def test_sbatch_cancelled_mid_search_stops_the_search_and_removes_its_token(sbatch):
    job = sbatch.start(DRIVER_SLEEPS="1")
    deadline = time.time() + 30
    while not (sbatch.log / "driver").exists():
        assert job.poll() is None and time.time() < deadline, sbatch.output.read_text()
        time.sleep(0.05)
    during = noted_by_the_search(sbatch.log)
    job.send_signal(signal.SIGTERM)  # scancel, or the time limit
    assert job.wait(timeout=10) == 143, sbatch.output.read_text()
    assert not Path(during["path"]).parent.exists(), "a cancelled job's token outlived it"
    state = Path(f"/proc/{during['pid']}/stat")
    for _ in range(100):  # the search got the SIGTERM too (gone, or a zombie waiting for its reaper)
        if not state.exists() or state.read_text().rsplit(")", 1)[1].split()[0] in "ZX":
            break
        time.sleep(0.05)
    else:
        pytest.fail("the search kept running after the job was cancelled")


# --- secrets stay out of output and logs ----------------------------------------------------------

def cluster_shell_code() -> dict[str, list[str]]:
    """Every shell line that cluster/ runs: the scripts (comments dropped) and the launchers' commands."""
    code = {path.name: [line for line in shell_lines(path.read_text()) if not line.lstrip().startswith("#")]
            for path in SCRIPTS}
    for path in LAUNCHER.values():
        config = load(path)
        code[path.name] = [command for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                                               "worker_setup_commands", "head_start_ray_commands",
                                               "worker_start_ray_commands") for command in config.get(key) or []]
    return code


def test_cluster_scripts_never_trace_or_print_secrets():
    """xtrace prints every command with its variables expanded (tokens, passwords); an echo of a secret
    variable lands in the job's output file or the journal; `ray get-auth-token` prints the token."""
    for name, lines in cluster_shell_code().items():
        for line in lines:
            assert not re.search(r"\bset\s+(-[a-zA-Z]*x|-o\s+xtrace)|\bbash\s+-[a-z]*x", line), f"{name}: {line}"
            if re.search(r"\b(echo|printf)\b", line):
                assert not re.search(r"\$\{?\w*(token|password|secret|credential)", line, re.I), f"{name}: {line}"
    readme = (REPO / "README.md").read_text()
    texts = {"README.md": readme, **{p.name: p.read_text() for p in CLUSTER.rglob("*") if p.is_file()}}
    for name, text in texts.items():
        for line in text.splitlines():
            if "ray get-auth-token" in line and "--generate" in line and line.lstrip("#` ").startswith("ray "):
                assert "> /dev/null" in line, f"{name}: `ray get-auth-token` prints the token: {line}"


# --- MLflow server recipe -----------------------------------------------------------------------

def test_compose_runs_postgres_privately_and_mlflow_on_a_private_address_with_auth():
    compose = load(MLFLOW / "docker-compose.yaml")
    services = compose["services"]
    assert set(services) == {"postgres", "mlflow"}
    assert "ports" not in services["postgres"]
    mlflow_service = services["mlflow"]
    (published,) = mlflow_service["ports"]
    assert published.startswith("${MLFLOW_HOST:?") and not published.startswith(("0.0.0.0", "5000"))
    env = mlflow_service["environment"]
    assert env["PGHOST"] == "postgres" and env["MEDTUNE_MLFLOW_IN_CONTAINER"] == "1"
    for name, value in {**env, **services["postgres"]["environment"]}.items():
        if re.search("PASSWORD|SECRET", name):
            assert str(value).startswith("${"), f"{name} must come from the env file, not the compose file"
    assert mlflow_service["depends_on"]["postgres"]["condition"] == "service_healthy"
    dockerfile = (MLFLOW / mlflow_service["build"]["dockerfile"]).read_text()
    assert "mlflow[auth]" in dockerfile and "psycopg" in dockerfile
    assert 'ENTRYPOINT ["/opt/medtune-mlflow/start_mlflow_server.sh"]' in dockerfile
    assert re.search(r"^USER (?!root)\w+", dockerfile, flags=re.M)
    assert "./init-auth-db.sql:/docker-entrypoint-initdb.d/10-auth-db.sql:ro" in services["postgres"]["volumes"]
    assert "CREATE DATABASE mlflow_auth" in (MLFLOW / "init-auth-db.sql").read_text()  # basic_auth.ini's database


def test_basic_auth_ini_uses_postgres_without_a_password_in_it():
    config = configparser.ConfigParser()
    config.read(MLFLOW / "basic_auth.ini")
    auth = config["mlflow"]
    assert auth["database_uri"] == "postgresql+psycopg:///mlflow_auth"  # host, user, password from libpq's env
    assert auth["default_permission"] in {"READ", "NO_PERMISSIONS"}
    assert auth["authorization_function"] == "mlflow.server.auth:authenticate_request_basic_auth"
    assert "admin_password" not in auth


def test_systemd_unit_runs_the_script_unprivileged_with_secrets_from_an_env_file():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(MLFLOW / "mlflow-server.service")
    assert {"Unit", "Service", "Install"} <= set(unit)
    service = unit["Service"]
    assert service["ExecStart"].endswith("cluster/mlflow/start_mlflow_server.sh")
    assert service["EnvironmentFile"].startswith("/etc/") and service["User"] not in ("", "root")
    assert service["RestartPreventExitStatus"] == "2"


def run_server_script(env: dict, timeout: float = 30) -> subprocess.CompletedProcess:
    base = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(["bash", str(MLFLOW / "start_mlflow_server.sh")], env={**base, **env},
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("host, message", [("8.8.8.8", "public address"), ("0.0.0.0", "every interface"),
                                           ("mlflow.example.com", "not an IP address")])
def test_server_script_refuses_to_listen_beyond_a_private_address(host, message):
    done = run_server_script({"MLFLOW_HOST": host, "MLFLOW_ARTIFACTS_DESTINATION": "/tmp/a",
                              "MLFLOW_FLASK_SERVER_SECRET_KEY": "k", "PGHOST": "db"})
    assert done.returncode == 2 and message in done.stderr and done.stderr.count("\n") == 1, done.stderr


@pytest.mark.parametrize("missing, message", [("MLFLOW_HOST", "MLFLOW_HOST"),
                                              ("MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_FLASK_SERVER_SECRET_KEY"),
                                              ("PGHOST", "PGHOST")])
def test_server_script_names_a_missing_setting(missing, message):
    env = {"MLFLOW_HOST": "10.0.0.10", "MLFLOW_ARTIFACTS_DESTINATION": "/tmp/a", "MLFLOW_FLASK_SERVER_SECRET_KEY": "k",
           "PGHOST": "db"}
    env.pop(missing)
    done = run_server_script(env)
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_server_script_keeps_the_database_password_off_the_command_line():
    done = run_server_script({"MLFLOW_HOST": "10.0.0.10", "MLFLOW_ARTIFACTS_DESTINATION": "/tmp/a", "PGHOST": "db",
                              "MLFLOW_FLASK_SERVER_SECRET_KEY": "k",
                              "MLFLOW_BACKEND_STORE_URI": "postgresql+psycopg://mlflow:hunter2@db/mlflow"})
    assert done.returncode == 2 and "PGPASSWORD" in done.stderr
    assert "hunter2" not in done.stdout + done.stderr  # the refusal does not print what it refuses


def test_server_script_takes_a_database_uri_with_a_user_and_no_password():
    # a public MLFLOW_HOST stops it at the next check, before MLflow would start
    done = run_server_script({"MLFLOW_HOST": "8.8.8.8", "MLFLOW_ARTIFACTS_DESTINATION": "/tmp/a", "PGHOST": "db",
                              "MLFLOW_FLASK_SERVER_SECRET_KEY": "k",
                              "MLFLOW_BACKEND_STORE_URI": "postgresql+psycopg://mlflow@db:5432/mlflow"})
    assert done.returncode == 2 and "public address" in done.stderr and "PGPASSWORD" not in done.stderr


def http_status(url: str, auth: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url)
    if auth:
        import base64

        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:  # not listening (yet)
        return 0


@background_job(needs_data=False, ray=False)
def auth_server(started, tmp_path: Path) -> SimpleNamespace:
    """cluster/mlflow/start_mlflow_server.sh with the real basic_auth.ini (only its databases are SQLite files
    here instead of PostgreSQL): the HTTP status of the API without a login, with a wrong and with the right
    one, then what the tune.py driver does, as a user the admin created. Cost: an MLflow server with its auth
    app, about 20 s on 2 quiet cores, started with the session beside the searches (tests/conftest.py)."""
    if importlib.util.find_spec("flask_wtf") is None:
        return None
    ini = (MLFLOW / "basic_auth.ini").read_text().replace("postgresql+psycopg:///mlflow_auth",
                                                         f"sqlite:///{tmp_path / 'auth.db'}")
    (tmp_path / "basic_auth.ini").write_text(ini)
    port = free_port()
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path),
           "PYTHONPATH": started.env.get("PYTHONPATH", ""), "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(port),
           "MLFLOW_WORKERS": "1", "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "artifacts"),
           "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "basic_auth.ini"),
           "MLFLOW_AUTH_ADMIN_USERNAME": "admin", "MLFLOW_AUTH_ADMIN_PASSWORD": "admin-password-for-the-test",
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret-key", **NO_SERVER_JOBS}
    with open(tmp_path / "server.log", "w") as log:
        server = started.popen(["bash", str(MLFLOW / "start_mlflow_server.sh")], env=env, cwd=tmp_path, stdout=log,
                               stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while http_status(f"{url}/health") != 200:
            if server.poll() is not None or time.time() > deadline:
                return SimpleNamespace(up=False, log=(tmp_path / "server.log").read_text()[-3000:])
            time.sleep(1)
        api = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
        statuses = [http_status(api), http_status(api, ("admin", "wrong")),
                    http_status(api, ("admin", "admin-password-for-the-test"))]
        code = f"""
import os, mlflow
from mlflow.server.auth.client import AuthServiceClient
os.environ.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD="admin-password-for-the-test")
AuthServiceClient({url!r}).create_user("medtune", "medtune-password-for-the-test")
os.environ.update(MLFLOW_TRACKING_USERNAME="medtune", MLFLOW_TRACKING_PASSWORD="medtune-password-for-the-test")
client = mlflow.MlflowClient({url!r})
run = client.create_run(client.create_experiment("medtune"))
open("report.json", "w").write("{{}}")
client.log_artifact(run.info.run_id, "report.json")
print("ARTIFACT_URI=" + run.info.artifact_uri)
"""
        client = started.run([sys.executable, "-c", code], cwd=tmp_path, timeout=300,
                             env={**started.env, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
        return SimpleNamespace(up=True, statuses=statuses, client=client,
                               stored=list((tmp_path / "artifacts").rglob("report.json")))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)


@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("flask_wtf") is None,
                    reason="MLflow's basic-auth app needs mlflow[auth] (Flask-WTF)")
def test_server_script_starts_mlflow_that_requires_a_login_and_proxies_artifacts(auth_server):
    assert auth_server.up, auth_server.log
    assert auth_server.statuses == [401, 401, 200]  # no login, a wrong password, the admin's
    assert auth_server.client.returncode == 0, auth_server.client.stderr[-3000:]
    assert "ARTIFACT_URI=mlflow-artifacts:/" in auth_server.client.stdout  # clients only see the server's proxy
    assert auth_server.stored  # the artifact went through the server to its artifact store


def test_no_secret_is_committed_in_cluster():
    for path in CLUSTER.rglob("*"):
        if path.is_file():
            text = path.read_text(errors="replace")
            assert not re.search(r"\b[0-9a-f]{32,}\b", text), f"{path}: looks like a token"
            assert "PRIVATE KEY" not in text and "aws_secret_access_key" not in text.lower(), path
