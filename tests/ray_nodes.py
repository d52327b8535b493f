"""Real Ray nodes started with `ray start` on this machine, each in its own process group.

The tests that need a cluster of their own (Jobs API, several nodes) use these instead of
the session's `ray.init` cluster. Every node gets its own free ports, its own worker-port
range and (head) its own temp dir, so it never touches another cluster on the machine;
`ray stop` is never called, because it would stop every Ray cluster here, not just ours.
A node is stopped by killing its process group: `ray start --block` and everything it
spawned (GCS, raylet, agents, workers).

`start_cluster(auth=True)` turns Ray's token authentication on, as README's "On a cluster" does
(`RAY_AUTH_MODE=token` on every node, the token in a file): the token is made here and kept in
the cluster's temp dir (`RAY_AUTH_TOKEN_PATH`), never in ~/.ray of the machine. The test process
itself runs with authentication disabled (tests/conftest.py), so it passes the token explicitly
(`cluster.auth_headers`); the state-API helpers below need a cluster without authentication.
"""

from __future__ import annotations

import itertools
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
_worker_ports = itertools.count(21000 + (os.getpid() % 40) * 200, 200)  # disjoint ranges per node and per test run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_env() -> dict[str, str]:
    """The venv first on PATH, so `python` in a job's entrypoint is the project's interpreter."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(
        PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
        RAY_AUTH_MODE="disabled",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        RAY_USAGE_STATS_ENABLED="0",
    )
    return env


@dataclass
class Node:
    name: str
    process: subprocess.Popen
    log: Path

    def kill(self) -> None:
        """SIGKILL the node's whole process group, as when a machine drops off the network."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)


@dataclass
class LocalCluster:
    temp_dir: Path
    gcs_address: str
    dashboard_url: str
    nodes: list[Node] = field(default_factory=list)
    token_path: Path | None = None  # token authentication on: the file holding the cluster's token

    @property
    def auth_env(self) -> dict[str, str]:
        """What a node, or a client such as `ray job submit`, needs in its environment for this cluster."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path)} if self.token_path else {}

    @property
    def auth_headers(self) -> dict[str, str]:
        """The header an HTTP client of the dashboard (Jobs API) sends when token authentication is on."""
        return {"Authorization": f"Bearer {self.token_path.read_text().strip()}"} if self.token_path else {}

    def _start(
        self,
        name: str,
        args: list[str],
        num_cpus: int,
        resources: str | None,
        private: list[Path] = (),
        env: dict[str, str] | None = None,
    ) -> Node:
        first = next(_worker_ports)
        command = [
            RAY,
            "start",
            "--block",
            f"--num-cpus={num_cpus}",
            "--disable-usage-stats",
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--min-worker-port={first}",
            f"--max-worker-port={first + 199}",
            *args,
        ]
        if resources:
            command.append(f"--resources={resources}")
        if private:  # a node with a filesystem of its own: an empty tmpfs over each of these folders
            mounts = "".join(f"mkdir -p {shlex.quote(str(p))} && mount -t tmpfs tmpfs {shlex.quote(str(p))} && " for p in private)
            command = ["unshare", "-m", "--propagation", "private", "sh", "-c", f'{mounts}exec "$@"', "sh", *command]
        log = self.temp_dir / f"{name}.log"
        # RAY_ADDRESS: Ray's own helpers on these nodes (Ray Train's state lookups) must find this cluster, not
        # another one on the machine.
        env = {**(node_env() if env is None else env), "RAY_ADDRESS": self.gcs_address, **self.auth_env}
        with open(log, "wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        node = Node(name, process, log)
        self.nodes.append(node)
        return node

    def add_worker(
        self, name: str, num_cpus: int = 1, timeout: float = 180, private: list[Path] = (), env: dict[str, str] | None = None
    ) -> Node:
        """Join a worker node (the job of an autoscaler); returns once the cluster counts it alive.

        `private`: folders this node does not share with the machine (an empty tmpfs over each, in the
        node's own mount namespace), as a cloud node has none of the driver's files; `env`: its environment.

        On a busy machine a raylet can miss Ray's startup deadline and `ray start` exits: start it once more.
        """
        for attempt in range(2):
            node = self._start(
                name,
                [f"--address={self.gcs_address}", "--node-ip-address=127.0.0.1"],
                num_cpus,
                f'{{"node_{name}": 1}}',
                private,
                env,
            )
            try:
                self.wait_until(lambda names: name in names, f"node {name} alive", timeout, node.process)
                return node
            except ProcessLookupError:
                node.kill()
                self.nodes.remove(node)
                if attempt == 1:
                    raise
        raise AssertionError("unreachable")

    def kill_node(self, name: str, timeout: float = 120) -> None:
        """SIGKILL a node's processes; returns once the cluster has marked it dead."""
        self.node(name).kill()
        self.wait_until(lambda names: name not in names, f"node {name} dead", timeout)

    def wait_until(self, done, what: str, timeout: float, process: subprocess.Popen | None = None) -> None:
        deadline = time.time() + timeout
        while not done(set(self.node_names().values())):
            if process is not None and process.poll() is not None:
                raise ProcessLookupError(f"{what}: `ray start` exited {process.returncode}; logs in {self.temp_dir}")
            if time.time() > deadline:
                raise TimeoutError(f"{what}: not within {timeout} s; logs in {self.temp_dir}")
            time.sleep(0.5)

    def alive_nodes(self) -> list:
        """The cluster's alive nodes, from the dashboard's state API (HTTP: no ray.init in this process)."""
        from ray.util.state import list_nodes

        for attempt in range(5):
            try:
                # Filtered here: with a server-side filter, Ray counts the dead nodes as truncated output.
                nodes = list_nodes(address=self.dashboard_url, timeout=10, raise_on_missing_output=False)
                return [n for n in nodes if n.state == "ALIVE"]
            except Exception:  # a busy dashboard: ask again
                if attempt == 4:
                    raise
                time.sleep(1)
        return []

    def node_names(self) -> dict[str, str]:
        """Alive node id -> the name a node of ours was started with (its `node_<name>` resource)."""
        names = {}
        for n in self.alive_nodes():
            mine = [k.removeprefix("node_") for k in n.resources_total if k.startswith("node_") and ":" not in k]
            names[n.node_id] = mine[0] if mine else "head"
        return names

    def actor_nodes(self, class_name: str) -> set[str]:
        """Names of the nodes hosting alive actors whose class name contains `class_name`."""
        from ray.util.state import list_actors

        names = self.node_names()
        actors = list_actors(address=self.dashboard_url, detail=True, timeout=10, raise_on_missing_output=False)
        return {names.get(a.node_id, "?") for a in actors if a.state == "ALIVE" and class_name in a.class_name}

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def shutdown(self) -> None:
        """Kill every node's process group; the temp dir goes too unless KEEP_RAY_LOGS is set."""
        for node in reversed(self.nodes):
            node.kill()
        if not os.environ.get("KEEP_RAY_LOGS"):
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_cluster(head_cpus: int = 0, head_resources: str | None = None, timeout: float = 90, auth: bool = False) -> LocalCluster:
    """A head node with the dashboard (Jobs API, state API) on free ports, in a short temp dir (socket paths are short).

    `auth`: token authentication on, with a fresh token (what `ray get-auth-token --generate` makes) in the temp dir.
    """
    temp_dir = Path(tempfile.mkdtemp(prefix="dr", dir="/tmp"))
    port, dashboard = free_port(), free_port()
    cluster = LocalCluster(temp_dir, f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}")
    if auth:
        cluster.token_path = temp_dir / "auth_token"
        cluster.token_path.write_text(secrets.token_hex(32))
        cluster.token_path.chmod(0o600)
    head = cluster._start(
        "head",
        [
            "--head",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={temp_dir}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={free_port()}",
        ],
        head_cpus,
        head_resources,
    )
    deadline = time.time() + timeout
    while True:  # the dashboard answers last
        try:
            urllib.request.urlopen(
                urllib.request.Request(f"{cluster.dashboard_url}/api/version", headers=cluster.auth_headers), timeout=2
            )
            return cluster
        except Exception as err:
            if head.process.poll() is not None or time.time() > deadline:
                cluster.shutdown()
                raise RuntimeError(
                    f"the head node did not start: {head.log.read_text()[-2000:] if head.log.exists() else ''}"
                ) from err
            time.sleep(0.5)
