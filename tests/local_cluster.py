"""A real multi-node Ray cluster on this machine: one `ray start --head` and more `ray start --address` nodes.

    with LocalCluster(nodes=2, cpus_per_node=1) as cluster:
        subprocess.run([..., "tune.py", "--address", cluster.address, ...], env=cluster.env)
        cluster.query("result = len(ray.nodes())")  # a question answered by a driver on the cluster

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
