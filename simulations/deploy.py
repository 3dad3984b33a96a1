"""Run the fedmeld apps under Flower's deployment runtime on this machine.

``fedmeld deploy [--supernodes N] [--gpus 0,1] [key=value ...]`` starts a SuperLink
and N SuperNodes on localhost (insecure, loopback only), each SuperNode pointed at its own data
partition through ``--node-config`` and, with ``--gpus``, pinned to one of the listed GPUs
(round-robin, so several SuperNodes may share a GPU). It then submits the app with ``flwr run``,
follows the run until it ends, and stops every process it started, also on failure or Ctrl-C.
For real sites, run the same ``flower-supernode`` command on each hospital's machine against the
SuperLink's address (with TLS) instead of localhost.

``--isolation`` picks who runs the ClientApp. ``process`` (default): each SuperNode runs with
``--isolation process`` (through ``fedmeld supernode``, which shortens its hard-coded 3 s
idle poll) and gets one long-lived ``fedmeld executor`` that runs all its messages in one
process, so torch, the model and the data shard load once per node, not once per message.
``subprocess``: Flower's stock behaviour, a fresh ``flwr-clientapp`` process per message.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from importlib.metadata import version
from pathlib import Path

import tomli_w

from fedmeld.simulations.run import load_config
from fedmeld.task.config import ConfigError, RunConfig, defaults, describe
ISOLATIONS = ("process", "subprocess")
STATUS_SECONDS = 15.0  # between `flwr ls` calls (about 1.3 s of CPU each) until summary.json shows up


def write_app(folder: Path) -> Path:
    """A Flower app folder for ``flwr run``: only a pyproject.toml naming fedmeld's apps and keys.
    Every node runs the installed ``fedmeld`` package, so the app needs no code of its own (and an
    installed fedmeld deploys without a checkout)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(tomli_w.dumps({
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": "fedmeld-app", "version": version("fedmeld"), "dependencies": []},
        "tool": {"flwr": {"app": {"publisher": "fedmeld",
                                  "components": {"serverapp": "fedmeld.server.app:app",
                                                 "clientapp": "fedmeld.client.app:app"},
                                  "config": defaults()}}}}))
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_config(partition_id: int, num_partitions: int, gpus: list[str], data_root: str) -> str:
    """What one SuperNode knows about itself: its shard, and optionally its GPU and data."""
    items = {"partition-id": partition_id, "num-partitions": num_partitions}
    if gpus:
        items["device"] = f'"cuda:{gpus[partition_id % len(gpus)]}"'
    if data_root:
        items["data-root"] = json.dumps(data_root)
    return " ".join(f"{k}={v}" for k, v in items.items())


def supernode_commands(superlink_port: int, index: int, config: str, isolation: str) -> dict[str, list[str]]:
    """SuperNode ``index`` and, with isolation ``process``, the executor that runs its ClientApp
    (the SuperNode then launches nothing itself), by log name."""
    ours, runtime_port = isolation == "process", free_port()
    supernode = [sys.executable, "-m", "fedmeld.task.flower.supernode"] if ours else ["flower-supernode"]  # ours: short waits
    commands = {f"supernode-{index}": [*supernode, "--insecure", "--superlink", f"127.0.0.1:{superlink_port}",
                                       "--isolation", isolation, "--port", str(runtime_port),
                                       "--node-config", config]}
    if ours:
        commands[f"executor-{index}"] = [sys.executable, "-m", "fedmeld.task.flower.executor", "--insecure",
                                         "--runtime-api-address", f"127.0.0.1:{runtime_port}"]
    return commands


class Deployment:
    """A SuperLink and SuperNodes as child processes, each in its own process group, logging to files."""

    def __init__(self, home: Path, num_supernodes: int, gpus: list[str], data_root: str,
                 isolation: str = "process") -> None:
        self.home, self.procs = home, []
        self.env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
                    "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                    "PYTHONUNBUFFERED": "1",  # Flower spawns its helpers by name: find this environment's first
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.port = free_port()
        self._start("superlink", ["flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
                                  "--port", str(self.port)])
        self._wait_for_port(self.port)
        for i in range(num_supernodes):
            for name, cmd in supernode_commands(self.port, i, node_config(i, num_supernodes, gpus, data_root),
                                                isolation).items():
                self._start(name, cmd)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n')

    def _start(self, name: str, cmd: list[str]) -> None:
        log = (self.home / f"{name}.log").open("w")
        self.procs.append(subprocess.Popen(cmd, env=self.env, cwd=self.home, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True))  # Ctrl-C here reaches us, not them

    def _wait_for_port(self, port: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[0].poll() is not None:
                raise RuntimeError(f"the SuperLink exited; see {self.home / 'superlink.log'}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.3)
        raise TimeoutError(f"the SuperLink did not listen on port {port} within {timeout:.0f} s")

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(["flwr", *args], env=self.env, cwd=self.home, capture_output=True, text=True,
                              timeout=timeout)

    def stop(self) -> None:
        """Last started first (each executor, its SuperNode, ..., then the SuperLink), each with every
        process under it: Flower starts its SuperExec and app processes in sessions of their own, so
        process groups miss them."""
        for proc in reversed(self.procs):
            tree = [proc.pid, *_descendants(proc.pid)]
            _signal(tree, signal.SIGTERM)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and any(_alive(pid) for pid in tree):
                proc.poll()  # reap our own child as soon as it exits
                time.sleep(0.2)
            _signal([pid for pid in tree if _alive(pid)], signal.SIGKILL)
            proc.wait()


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _signal(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def run_deployment(cfg: RunConfig, num_supernodes: int, gpus: list[str], home: Path,
                   poll_seconds: float = 2.0, isolation: str = "process") -> Path:
    """Start the federation, run the app to the end, stop everything; return the run directory."""
    run_dir = Path(cfg.out) / cfg.run_name
    overrides = home / "run-config.toml"
    overrides.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in cfg.to_flower().items()))
    with ExitStack() as stack:
        fed = Deployment(home, num_supernodes, gpus, cfg.data_root, isolation)
        stack.callback(fed.stop)
        submitted = fed.flwr("run", str(write_app(home / "app")), "deploy", "--run-config", str(overrides), "--format", "json")
        try:
            run_id = json.loads(submitted.stdout)["run-id"]
        except (json.JSONDecodeError, KeyError):
            raise RuntimeError(f"flwr run did not start the run:\n{submitted.stdout}\n{submitted.stderr}") from None
        print(f"[fedmeld] run {run_id} submitted to the SuperLink on 127.0.0.1:{fed.port}; "
              f"{num_supernodes} SuperNodes, isolation {isolation}; logs in {home}", flush=True)
        shown, checked = 0, -STATUS_SECONDS
        while True:
            metrics = run_dir / "metrics.jsonl"
            lines = metrics.read_text().splitlines() if metrics.exists() else []
            for line in lines[shown:]:
                r = json.loads(line)
                print(f"[fedmeld] round {r['round']}: test acc {r['test_accuracy']:.4f} auc {r['test_auc']:.4f} "
                      f"clients ok {r['num_clients_ok']} | {r['round_seconds']:.1f} s", flush=True)
            shown = len(lines)
            if (run_dir / "summary.json").is_file() or time.monotonic() - checked >= STATUS_SECONDS:
                status, checked = _status(fed, run_id), time.monotonic()
                if status.startswith("finished"):
                    break
            time.sleep(poll_seconds)
    if status != "finished:completed" or not (run_dir / "summary.json").is_file():
        raise RuntimeError(f"run {run_id} ended as {status!r}; see {home}/*.log")
    return run_dir


def _status(fed: Deployment, run_id: int) -> str:
    listed = fed.flwr("ls", "--run-id", str(run_id), "--format", "json", "deploy")
    try:
        return json.loads(listed.stdout)["runs"][0]["status"]
    except (json.JSONDecodeError, KeyError, IndexError):
        raise RuntimeError(f"flwr ls gave no status for run {run_id}:\n{listed.stdout}\n{listed.stderr}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedmeld deploy", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0] + " Starts a local SuperLink and SuperNodes, runs, stops them.\n\n"
        + __doc__.split("\n\n")[2],
        epilog="run-config keys (key = default {choices}):\n" + describe())
    parser.add_argument("--supernodes", type=int, default=2, help="SuperNodes (hospitals) to start; default 2")
    parser.add_argument("--gpus", default="", help="comma-separated GPU indices to spread SuperNodes over "
                                                   "round-robin, e.g. 0,1; empty: each node uses device=auto")
    parser.add_argument("--isolation", choices=ISOLATIONS, default="process",
                        help="process (default): one long-lived fedmeld executor per SuperNode runs every "
                             "message; subprocess: Flower's stock fresh flwr-clientapp process per message")
    parser.add_argument("--home", help="FLWR_HOME for this deployment (state, logs); default: a new temp dir")
    parser.add_argument("--config", metavar="FILE.toml", help="TOML file with a flat table of run-config keys")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="run-config overrides, TOML values")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, [f"num-clients={args.supernodes}", f"min-clients={args.supernodes}",
                                        *args.overrides])
    except (ConfigError, OSError) as err:
        parser.error(str(err))
    home = Path(args.home or tempfile.mkdtemp(prefix="fedmeld-deploy-"))
    home.mkdir(parents=True, exist_ok=True)
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
    print(run_deployment(cfg, args.supernodes, gpus, home, isolation=args.isolation))
    return 0


if __name__ == "__main__":
    sys.exit(main())
