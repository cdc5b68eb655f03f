"""A local Ray cluster for tests: a head (no CPUs) and worker nodes on 127.0.0.1, each `ray start --block` in a new
session of its own, with a temp folder of its own; stopped by killing exactly the sessions it started (never
`ray stop`, which stops every Ray process on the machine)."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")
OBJECT_STORE = str(80 << 20)  # bytes: Ray's minimum is 75 MiB; trials return a few floats


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRayCluster:
    """Head on a free port plus worker nodes added and killed by the test; ``address`` is HOST:PORT."""

    def __init__(self) -> None:
        self.temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths have a limit
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
        self.head = self._start("head", ["--head", "--port", str(self.port), "--num-cpus", "0",
                                         "--temp-dir", str(self.temp), "--include-dashboard", "false"])
        self.workers: list[subprocess.Popen] = []

    def _start(self, name: str, options: list[str]) -> subprocess.Popen:
        return start_node([*options, "--node-ip-address", "127.0.0.1"], self.temp, self.env,
                          self.temp / f"{name}-{time.monotonic_ns()}.log")

    def add_worker(self, cpus: int = 1, timeout: float = 120) -> None:
        """Start a worker node and wait until the cluster counts its CPUs."""
        self.workers.append(self._start("worker", ["--address", self.address, "--num-cpus", str(cpus)]))
        wait_for_cpus(self.address, cpus, self.env, timeout)

    def kill_worker(self, worker: subprocess.Popen) -> None:
        """SIGKILL every process of the node's session: a lost machine."""
        kill_session(worker.pid)
        worker.wait(timeout=30)
        self.workers.remove(worker)

    def stop(self) -> None:
        for process in [*self.workers, self.head]:
            kill_session(process.pid)
            process.wait(timeout=30)
        self.workers = []
        shutil.rmtree(self.temp, ignore_errors=True)


def start_node(options: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    """`ray start --block OPTIONS` in a new session (so that its processes can be found and killed), small."""
    with open(log, "w") as out:
        return subprocess.Popen([str(RAY), "start", "--block", "--disable-usage-stats", "--object-store-memory",
                                 OBJECT_STORE, *options], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def wait_for_cpus(address: str, cpus: int, env: dict[str, str], timeout: float) -> None:
    """Wait until the cluster at ``address`` counts ``cpus`` CPUs (its worker nodes have joined)."""
    script = ("import ray, sys, time\n"
              f"ray.init(address={address!r}, logging_level='ERROR', log_to_driver=False)\n"
              f"end = time.time() + {timeout}\n"
              f"while ray.cluster_resources().get('CPU', 0) < {cpus} and time.time() < end: time.sleep(0.5)\n"
              f"sys.exit(0 if ray.cluster_resources().get('CPU', 0) >= {cpus} else 1)\n")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=timeout + 60)
    assert done.returncode == 0, f"Ray cluster at {address} never had {cpus} CPUs:\n{done.stderr[-2000:]}"


def kill_session(sid: int) -> None:
    """SIGKILL the processes of session ``sid`` (a node started by start_node: raylet, agents and the Ray workers,
    which move to process groups of their own), by id."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    members.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                pass
    for pid in members:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
