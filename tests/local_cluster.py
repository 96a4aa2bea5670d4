"""A real multi-node Ray cluster on this machine: one `ray start --head` and more `ray start --address` nodes.

    with LocalCluster(nodes=2, cpus_per_node=1) as cluster:
        subprocess.run([..., "tune.py", "--address", cluster.address, ...], env=cluster.env)
        cluster.query("result = len(ray.nodes())")  # a question answered by a driver on the cluster

`SlurmJob` runs cluster/slurm.sbatch itself the same way, with stand-ins for srun and scontrol.

Every node is its own raylet with its own resources and object store, started the way a real cluster node
is, so Ray schedules trials across them exactly as across machines. What differs from real machines: they
share the CPU and the disk. Each node gets an address of its own (see `node_ip`), so the `node_ip` that
Ray Tune writes into every trial result names the node that ran the trial.

Token authentication is on, as on a real cluster: a fresh token in a private file, given to every node and
to the driver with RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH (`self.env`). A driver that connects with an
explicit address does not switch token auth on by itself; it needs RAY_AUTH_MODE=token in its environment.

Each node runs `ray start --block` in a session of its own; `stop()` ends those processes and anything
they spawned (raylet, GCS, workers) by session id. Never `ray stop`: it kills every Ray process of the
user on the machine, other people's clusters included.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
READY = "Ray runtime started"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalCluster:
    def __init__(self, nodes: int = 2, cpus_per_node: int = 1, log_dir: str | os.PathLike | None = None,
                 start_timeout: float = 120.0, gpus_per_node: int = 0):
        self.nodes, self.cpus_per_node, self.start_timeout = nodes, cpus_per_node, start_timeout
        self.gpus_per_node = gpus_per_node  # 0: the nodes hide any GPU (tests); the GPU benchmark offers one
        # Ray's unix sockets live under the temp dir and must stay under ~100 characters: keep it short.
        self.root = Path(tempfile.mkdtemp(prefix="mtray-", dir="/tmp"))
        self.log_dir = Path(log_dir) if log_dir else self.root / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.token_path = self.root / "auth_token"
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path)}
        self.env.pop("RAY_ADDRESS", None)
        self.env.pop("RAY_AUTH_TOKEN", None)  # it would take precedence over our token file
        self._procs: list[subprocess.Popen] = []

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> LocalCluster:
        fd = os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
        try:
            for index in range(self.nodes):
                self._start_node(index)
        except BaseException:
            self.stop()
            raise
        return self

    @staticmethod
    def node_ip(index: int) -> str:
        """127.0.0.1 for the head (Ray turns it into this host's address), 127.0.0.<n+1> for node n: a
        loopback address of its own, so `node_ip` in trial results tells the nodes apart as on real machines."""
        return f"127.0.0.{index + 1}"

    def _start_node(self, index: int) -> None:
        common = [f"--num-cpus={self.cpus_per_node}", f"--num-gpus={self.gpus_per_node}", f"--node-ip-address={self.node_ip(index)}",
                  f"--temp-dir={self.root / 'ray'}", f"--labels=medtune-node=node{index}",
                  f"--resources={json.dumps({f'medtune_node{index}': 1})}",
                  f"--dashboard-agent-listen-port={free_port()}", "--block", "--disable-usage-stats"]
        if index == 0:
            command = [RAY, "start", "--head", f"--port={self.port}", "--include-dashboard=false",
                       "--dashboard-host=127.0.0.1", f"--dashboard-port={free_port()}", *common]
        else:
            command = [RAY, "start", f"--address={self.address}", *common]
        log = self.log_dir / f"node{index}.log"
        with open(log, "w") as handle:
            proc = subprocess.Popen(command, env=self.env, stdout=handle, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self._procs.append(proc)
        deadline = time.monotonic() + self.start_timeout
        while READY not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray node {index} did not start:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.25)

    def stop(self) -> None:
        """End our nodes (workers first, so none waits for a dead GCS), then whatever they left."""
        sessions = {proc.pid for proc in self._procs}
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    pass
        for pid in _pids_in_sessions(sessions):  # raylets, workers, GCS of our sessions only
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in self._procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self._procs.clear()
        shutil.rmtree(self.root, ignore_errors=True)  # token, Ray's session dir (and logs unless log_dir was given)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- questions about the running cluster --------------------------------------------------

    def query(self, code: str, timeout: float = 120) -> object:
        """Run `code` in a fresh driver connected to the cluster; it must assign `result` (JSON-able)."""
        script = (f"import json, ray\nray.init(address={self.address!r}, logging_level='ERROR', log_to_driver=False)\n"
                  f"{code}\nprint('RESULT=' + json.dumps(result))\nray.shutdown()\n")
        done = subprocess.run([sys.executable, "-c", script], env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        for line in done.stdout.splitlines():
            if line.startswith("RESULT="):
                return json.loads(line[len("RESULT="):])
        raise RuntimeError(f"cluster query failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")


def _pids_in_sessions(sessions: set[int]) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session ...
        if int(fields[3]) in sessions:
            pids.append(int(entry.name))
    return pids


# --- cluster/slurm.sbatch as SLURM runs it ----------------------------------------------------------------------

FAKE_SRUN = """#!/usr/bin/env bash
# srun stand-in: drop srun's own options, run the command here (every "node" is this machine). A `ray start`
# that names no address of its own gets its node's (FAKE_NODE_IP_<node>), as it would on that machine.
node=
while [[ $# -gt 0 && $1 == -* ]]; do
  case $1 in -w|--nodelist) node=$2; shift 2 ;; -N|-n) shift 2 ;; *) shift ;; esac
done
ip_var=FAKE_NODE_IP_${node//-/_}
if [[ $1 == ray && $2 == start && " $* " != *" --node-ip-address="* && -n ${!ip_var:-} ]]; then
  exec "$@" "--node-ip-address=${!ip_var}"
fi
exec "$@"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
# scontrol stand-in: `scontrol show hostnames LIST` for a comma-separated LIST
[[ $1 == show && $2 == hostnames ]] && tr ',' '\\n' <<< "$3"
"""
SBATCH = Path(__file__).resolve().parents[1] / "cluster" / "slurm.sbatch"


class SlurmJob:
    """cluster/slurm.sbatch run as job `job` on `nodes` (node-a, node-b, ...: node i answers at 127.0.0.<i+1>), with
    srun and scontrol stand-ins, every node on this machine, its results under `folder`/shared/results; `popen` must
start the script in a session of its own (as tests/conftest.py's `Background.popen` does). `end()` does
    what SLURM does when a job ends: it ends every process of the job (the `ray start --block` nodes)."""

    def __init__(self, folder: Path, job: str, nodes: list[str], env: dict, popen=None):
        self.folder, self.job, self.nodes = folder, job, nodes
        self.popen = popen or (lambda command, **kwargs: subprocess.Popen(command, start_new_session=True, **kwargs))
        shims = folder / "bin"
        shims.mkdir(exist_ok=True)
        for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
            (shims / name).write_text(text)
            (shims / name).chmod(0o755)
        self.ray_tmp = tempfile.mkdtemp(prefix="mtslurm-", dir="/tmp")  # short: Ray's socket paths live under it
        self.env = {**env, "PATH": f"{shims}:{env['PATH']}", "RAY_TMPDIR": self.ray_tmp, "SLURM_JOB_ID": job,
                    "SLURM_JOB_NODELIST": ",".join(nodes), "SLURM_CPUS_PER_TASK": "1", "MEDTUNE_VENV": sys.prefix,
                    "MEDTUNE_SHARED": str(folder / "shared"), "RAY_PORT": str(free_port()),
                    **{f"FAKE_NODE_IP_{node.replace('-', '_')}": f"127.0.0.{i + 1}" for i, node in enumerate(nodes) if i}}
        for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "SLURM_GPUS_PER_TASK",
                     "MEDTUNE_HEAD_IP"):
            self.env.pop(name, None)
        self.log = folder / f"medtune-{job}.out"
        self.process: subprocess.Popen | None = None
        self.results = folder / "shared" / "results"

    def start(self, *args: str, **env: str) -> subprocess.Popen:
        """sbatch: the script with `args` for tune.py, its output in `log` (a file, not a pipe: the Ray nodes outlive
        the script and would hold a pipe open)."""
        with open(self.log, "w") as handle:
            self.process = self.popen(["bash", str(SBATCH), *args], cwd=self.folder, env={**self.env, **env},
                                      stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return self.process

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill_node(self, index: int) -> list[int]:
        """Lose node `index` (not the head) as a machine that dies: SIGKILL to every process of the job that runs
        as that node (its `ray start`, raylet, workers: they carry its address). The pids killed."""
        address, parents, node = f"127.0.0.{index + 1}", {}, set()
        for pid in _pids_in_sessions({self.process.pid}):
            try:
                parents[pid] = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
                if address in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    node.add(pid)
            except OSError:
                pass
        while grown := {pid for pid, parent in parents.items() if parent in node} - node:  # its workers
            node |= grown
        for pid in node:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return sorted(node)

    def end(self) -> list[int]:
        """End every process of the job; the pids still there after 10 s (none when all is well)."""
        left_over, sessions = [], {self.process.pid} if self.process else set()
        for pid in _pids_in_sessions(sessions):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for _ in range(100):  # gone, or zombies waiting for init
            left_over = [pid for pid in _pids_in_sessions(sessions) if not _dead(pid)]
            if not left_over:
                break
            time.sleep(0.1)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
        return left_over


def _dead(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except OSError:
        return True
