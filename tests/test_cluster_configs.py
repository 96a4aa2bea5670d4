"""The cluster configs in cluster/ parse, carry what their tools require, and agree with tune.py and Ray.

Ray cluster launcher YAMLs go through Ray's own `prepare_config` + `validate_config` (what `ray up` runs);
every `ray start` line is parsed by Ray's own CLI; every tune.py command by tune.py's `get_args_parser()`;
KubeRay manifests, the SLURM script and the MLflow server recipe are checked for the keys and settings
their tools need. The MLflow start script is also run: it refuses unsafe settings, and (where MLflow's
auth extra is installed) starts a server that turns away requests without a login.
"""

from __future__ import annotations

import configparser
import importlib.util
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import ray
import yaml

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
            command = match.group(0).strip()
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
    from ray.scripts.scripts import start

    commands = ray_start_commands()
    assert {where.split(":")[0] for where, _ in commands} == {"aws", "gcp", "slurm.sbatch"}
    assert sum("--head" in args for _, args in commands) == 3  # one head per config
    for where, args in commands:
        try:
            start.make_context("ray start", list(args))
        except Exception as error:  # click.UsageError, BadParameter
            pytest.fail(f"{where}: `ray start {' '.join(args)}` is rejected by Ray's CLI: {error}")


@pytest.mark.parametrize("provider", sorted(LAUNCHER))
def test_launcher_shell_commands_parse(provider):
    config = load(LAUNCHER[provider])
    for key in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands"):
        for command in config.get(key) or []:
            done = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
            assert done.returncode == 0, f"{provider}:{key}: {command}\n{done.stderr}"


# --- KubeRay ------------------------------------------------------------------------------------

def cluster_specs() -> dict:
    raycluster = load(KUBERAY / "raycluster.yaml")
    rayjob = load(KUBERAY / "rayjob.yaml")
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

    job = load(KUBERAY / "rayjob.yaml")["spec"]
    args = get_args_parser().parse_args(tune_args(job["entrypoint"]))
    assert args.space == "resnetd_depth" and args.address == "auto"
    mount = "/mnt/medtune"  # on every pod (see the test above): results written by any node reach the driver
    assert args.storage.startswith(mount + "/") and args.data_root.startswith(mount + "/")
    assert job["shutdownAfterJobFinishes"] is True and job["submissionMode"] == "K8sJobMode"


def test_ray_versions_agree_with_the_installed_ray():
    """Driver and cluster must run the same Ray: every image tag and rayVersion in cluster/ names this one."""
    texts = {p.relative_to(REPO): p.read_text() for p in CLUSTER.rglob("*") if p.is_file()}
    versions = {(str(path), v) for path, text in texts.items()
                for v in re.findall(r"rayproject/ray:([0-9][0-9.]*[0-9])", text)}
    versions |= {(name, spec["rayVersion"]) for name, spec in cluster_specs().items()}
    assert len(versions) >= 5
    assert {v for _, v in versions} == {ray.__version__}, sorted(versions)


# --- SLURM --------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_parse(script):
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


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


@pytest.mark.skipif(importlib.util.find_spec("flask_wtf") is None,
                    reason="MLflow's basic-auth app needs mlflow[auth] (Flask-WTF)")
def test_server_script_starts_mlflow_that_requires_a_login_and_proxies_artifacts(tmp_path):
    """The real script and basic_auth.ini; only the databases are SQLite files here instead of PostgreSQL."""
    ini = (MLFLOW / "basic_auth.ini").read_text().replace("postgresql+psycopg:///mlflow_auth",
                                                         f"sqlite:///{tmp_path / 'auth.db'}")
    (tmp_path / "basic_auth.ini").write_text(ini)
    port = free_port()
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path),
           "PYTHONPATH": os.environ.get("PYTHONPATH", ""), "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(port),
           "MLFLOW_WORKERS": "1", "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "artifacts"),
           "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "basic_auth.ini"),
           "MLFLOW_AUTH_ADMIN_USERNAME": "admin", "MLFLOW_AUTH_ADMIN_PASSWORD": "admin-password-for-the-test",
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret-key"}
    server = subprocess.Popen(["bash", str(MLFLOW / "start_mlflow_server.sh")], env=env, cwd=tmp_path,
                              stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while http_status(f"{url}/health") != 200:
            assert server.poll() is None and time.time() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(1)
        api = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
        assert http_status(api) == 401
        assert http_status(api, ("admin", "wrong")) == 401
        assert http_status(api, ("admin", "admin-password-for-the-test")) == 200

        # what the tune.py driver does, as a user the admin created: a run with an artifact, proxied
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
        done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
        assert done.returncode == 0, done.stderr[-3000:]
        assert "ARTIFACT_URI=mlflow-artifacts:/" in done.stdout  # clients only see the server's proxy
        assert list((tmp_path / "artifacts").rglob("report.json"))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)


def test_no_secret_is_committed_in_cluster():
    for path in CLUSTER.rglob("*"):
        if path.is_file():
            text = path.read_text(errors="replace")
            assert not re.search(r"\b[0-9a-f]{32,}\b", text), f"{path}: looks like a token"
            assert "PRIVATE KEY" not in text and "aws_secret_access_key" not in text.lower(), path
