"""Run the fedmeld apps under Flower's deployment runtime on this machine.

``fedmeld deploy [--supernodes N] [--gpus 0,1] [--certs DIR | --insecure] [--resume RUN_DIR] [key=value ...]``
starts a SuperLink and N SuperNodes on localhost (loopback only), each SuperNode pointed at its own
data partition through ``--node-config`` and, with ``--gpus``, pinned to one of the listed GPUs
(round-robin, so several SuperNodes may share a GPU). It then submits the app with ``flwr run``,
follows the run until it ends, and stops every process it started, also on failure or Ctrl-C.

Secure by default, as across real sites (README, "Deployment"): TLS (a CA and the SuperLink's
certificate), SuperNode authentication (one EC key pair per SuperNode; the SuperLink admits only the
public keys registered with ``flwr supernode register``, kept in ``HOME/superlink.db``) and SuperExec
authentication (a shared secret signs every task claim on the Runtime APIs, so no other local process
can take a ServerApp or ClientApp task). The credentials are generated into ``HOME/certs``
(``fedmeld keys``, ``simulations/security.py``) or taken from ``--certs DIR``. ``--insecure`` turns all
three off, for a laptop.

A SuperLink restart keeps the federation: its state (registered nodes, runs, messages in flight)
lives in ``HOME/superlink.db`` (``--database``), and the SuperNodes and, secure, the ServerApp
reconnect by themselves. A run whose ServerApp died (under ``--insecure``, a SuperLink crash takes it
along) continues after its last completed round: ``fedmeld deploy --resume RUN_DIR``.

``--isolation`` picks who runs the ClientApp. ``process`` (default): each SuperNode runs with
``--isolation process`` (through ``fedmeld supernode``, which shortens its hard-coded 3 s
idle poll) and gets one long-lived ``fedmeld executor`` that runs all its messages in one
process, so torch, the model and the data shard load once per node, not once per message.
``subprocess``: Flower's stock behaviour, a fresh ``flwr-clientapp`` process per message.

Every hop that polls (SuperNodes, executors, the ServerApp's Grid) waits 0.2 s between polls, or
``FEDMELD_POLL_SECONDS`` from this command's environment, which its processes inherit.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import tomli_w

from fedmeld.simulations.run import load_config, resume_config
from fedmeld.simulations.security import (
    SUPEREXEC_SECRET,
    CredentialError,
    Credentials,
    create_local_credentials,
    create_secret,
    load_local_credentials,
)
from fedmeld.task.config import ConfigError, RunConfig, defaults, describe
from fedmeld.task.flower.waits import poll_seconds_or_exit

ISOLATIONS = ("process", "subprocess")
STATUS_SECONDS = 15.0  # between `flwr ls` calls (about 1.3 s of CPU each) until summary.json shows up
CONNECTION = "deploy"  # the flwr CLI's name for this SuperLink in $FLWR_HOME/config.toml
JOINED = re.compile(r"SuperNode ID: (\d+)")  # a SuperNode's log line once the SuperLink activated it
RETRY_SECONDS = 1.0  # between attempts to restart a SuperNode that the SuperLink still counts as online
DATABASE = "superlink.db"  # the SuperLink's state in HOME: it outlives a SuperLink restart
SUPERLINK_STATES = ("disk", "memory")  # --superlink-state: DATABASE, or Flower's default (in memory)
SERVERAPP = "flwr-serverapp"  # the process Flower's SuperExec starts for each run


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


@dataclass(frozen=True)
class NodeSecurity:
    """What one SuperNode presents to a secure SuperLink (``None`` in its place: ``--insecure``)."""

    root_certificates: Path | None  # the CA that signed the SuperLink's certificate; None: the system's CAs
    private_key: Path  # its OpenSSH EC key; the SuperLink's admin registered the public half
    superexec_secret: Path | None = None  # shared with the one executor allowed to claim its tasks


def supernode_commands(superlink_port: int, index: int, config: str, isolation: str,
                       security: NodeSecurity | None = None) -> dict[str, list[str]]:
    """SuperNode ``index`` and, with isolation ``process``, the executor that runs its ClientApp
    (the SuperNode then launches nothing itself), by log name. The executor reaches the SuperNode's
    Runtime API on loopback in plain HTTP; with a SuperExec secret, it signs each task claim."""
    ours, runtime_port = isolation == "process", free_port()
    supernode = [sys.executable, "-m", "fedmeld.task.flower.supernode"] if ours else ["flower-supernode"]  # ours: short waits
    link = ["--insecure"]
    if security is not None:
        link = ["--auth-supernode-private-key", str(security.private_key)]
        if security.root_certificates is not None:
            link += ["--root-certificates", str(security.root_certificates)]
    secret = []  # Flower ignores a SuperExec secret under --isolation subprocess (its own SuperExec signs nothing)
    if ours and security is not None and security.superexec_secret is not None:
        secret = ["--superexec-auth-secret-file", str(security.superexec_secret)]
    commands = {f"supernode-{index}": [*supernode, *link, *secret, "--superlink", f"127.0.0.1:{superlink_port}",
                                       "--isolation", isolation, "--port", str(runtime_port),
                                       "--node-config", config]}
    if ours:
        commands[f"executor-{index}"] = [sys.executable, "-m", "fedmeld.task.flower.executor", "--insecure", *secret,
                                         "--runtime-api-address", f"127.0.0.1:{runtime_port}"]
    return commands


def superlink_commands(port: int, home: Path, credentials: Credentials | None,
                       secret: Path | None, state: str = "disk") -> dict[str, list[str]]:
    """The SuperLink and, when secure, the SuperExec that runs its ServerApps, by log name. Secure,
    the SuperLink runs with ``--isolation process``: Flower signs no task claims with its own
    SuperExec, and its Runtime API shares the port hospitals reach. Its state (registered nodes,
    runs, messages) lives in ``HOME/superlink.db``, so a restarted SuperLink carries on where it
    stopped (README, "Restarting the SuperLink"); ``state="memory"`` keeps it in the SuperLink's memory
    instead: no SQLite write per request, and nothing that survives a restart."""
    if state not in SUPERLINK_STATES:
        raise ValueError(f"state={state!r}; valid: {', '.join(SUPERLINK_STATES)}")
    database = ["--database", str(home / DATABASE)] if state == "disk" else []  # Flower's default: in memory
    common = [*database, "--disable-runtime-dependency-installation", "--port", str(port)]
    if credentials is None:
        return {"superlink": ["flower-superlink", "--insecure", *common]}
    return {"superlink": ["flower-superlink", "--ssl-ca-certfile", str(credentials.ca),
                          "--ssl-certfile", str(credentials.server_cert), "--ssl-keyfile", str(credentials.server_key),
                          "--enable-supernode-auth", "--isolation", "process",
                          "--superexec-auth-secret-file", str(secret), *common],
            "superexec": ["flower-superexec", "--runtime-api-address", f"127.0.0.1:{port}",
                          "--root-certificates", str(credentials.ca), "--superexec-auth-secret-file", str(secret)]}


def connection_config(port: int, ca: Path | None) -> str:
    """``$FLWR_HOME/config.toml``: the flwr CLI's connection to this SuperLink, over TLS when ``ca`` is given."""
    security = {"insecure": True} if ca is None else {"root-certificates": str(ca)}
    return tomli_w.dumps({"superlink": {"default": CONNECTION,
                                        CONNECTION: {"address": f"127.0.0.1:{port}", **security}}})


def deployment_credentials(home: Path, num_supernodes: int, certs: Path | None) -> Credentials:
    """Those in ``certs`` (``--certs DIR``); else ``HOME/certs``, generated by the first deployment in this home."""
    if certs is not None:
        return load_local_credentials(certs, num_supernodes)
    folder = home / "certs"
    if folder.exists():
        return load_local_credentials(folder, num_supernodes)
    return create_local_credentials(folder, num_supernodes)


class Deployment:
    """A SuperLink and SuperNodes as child processes, each in its own session, logging to files
    (appended, so a restarted process continues its log). Stops everything on leaving a ``with``."""

    def __init__(self, home: Path, num_supernodes: int, gpus: list[str], data_root: str,
                 isolation: str = "process", credentials: Credentials | None = None, state: str = "disk") -> None:
        self.home, self.secure = home.resolve(), credentials is not None
        self.procs: dict[str, subprocess.Popen] = {}  # by log name, in start order
        self.commands: dict[str, list[str]] = {}  # what started each, to restart it
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "FLWR_TELEMETRY_ENABLED": "0",
                    "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                    "PYTHONUNBUFFERED": "1",  # Flower spawns its helpers by name: find this environment's first
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.port = free_port()
        try:
            secret = None
            if credentials is not None:
                secret = self.home / SUPEREXEC_SECRET
                if not secret.exists():
                    create_secret(secret)
            link = superlink_commands(self.port, self.home, credentials, secret, state)
            self.start("superlink", link.pop("superlink"))
            self._wait_for_port(self.port)
            for name, cmd in link.items():
                self.start(name, cmd)
            (self.home / "config.toml").write_text(connection_config(self.port, credentials and credentials.ca))
            for i in range(num_supernodes):
                security = None
                if credentials is not None:
                    self.register(credentials.node_keys[i].with_suffix(".pub"))
                    security = NodeSecurity(credentials.ca, credentials.node_keys[i], secret)
                for name, cmd in supernode_commands(self.port, i, node_config(i, num_supernodes, gpus, data_root),
                                                    isolation, security).items():
                    self.start(name, cmd)
        except BaseException:
            self.stop()
            raise

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        """Start ``cmd`` in a session of its own (Ctrl-C here reaches us, not it), logging to ``name``.log."""
        with (self.home / f"{name}.log").open("a") as log:
            proc = subprocess.Popen(cmd, env=self.env, cwd=self.home, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.procs[name], self.commands[name] = proc, cmd
        return proc

    def _wait_for_port(self, port: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs["superlink"].poll() is not None:
                raise RuntimeError(f"the SuperLink exited; see {self.home / 'superlink.log'}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.3)
        raise TimeoutError(f"the SuperLink did not listen on port {port} within {timeout:.0f} s")

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(["flwr", *args], env=self.env, cwd=self.home, capture_output=True, text=True,
                              timeout=timeout)

    def register(self, public_key: Path) -> None:
        """Admit a SuperNode's public key (``flwr supernode register``). Flower answers "already in
        use" for a key this home's database registered before (admitted: fine) and for one unregistered
        since (refused for good: its SuperNode's log will say so). ``flwr`` exits 0 on failure too."""
        out = self.flwr("supernode", "register", str(public_key), CONNECTION, "--format", "json")
        try:
            answer = json.loads(out.stdout)
        except json.JSONDecodeError:
            answer = {"success": False, "error-message": f"{out.stdout}\n{out.stderr}"}
        if not answer["success"] and "Public key already in use" not in answer["error-message"]:
            raise RuntimeError(f"flwr supernode register {public_key} failed: {answer['error-message']}")

    def wait_for(self, name: str, pattern: str | re.Pattern, timeout: float, offset: int = 0) -> re.Match:
        """The first match of ``pattern`` in ``name``.log from byte ``offset`` on, waiting for it."""
        log, deadline = self.home / f"{name}.log", time.monotonic() + timeout
        while True:
            with log.open("rb") as f:
                f.seek(offset)
                found = re.search(pattern, f.read().decode(errors="replace"))
            if found or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if not found:
            raise TimeoutError(f"{pattern!r} did not appear in {log} within {timeout:.0f} s")
        return found

    def node_id(self, index: int) -> int:
        """The node id the SuperLink gave SuperNode ``index`` (its latest activation)."""
        text = (self.home / f"supernode-{index}.log").read_text(errors="replace")
        ids = JOINED.findall(text)
        if not ids:
            raise RuntimeError(f"SuperNode {index} has not joined; see {self.home / f'supernode-{index}.log'}")
        return int(ids[-1])

    def kill(self, name: str) -> None:
        """A crash: SIGKILL process ``name`` and every process under it, with no chance to say goodbye."""
        proc = self.procs.pop(name)
        _signal([proc.pid, *_descendants(proc.pid)], signal.SIGKILL)
        proc.wait()

    def kill_supernode(self, index: int) -> None:
        """A crash of SuperNode ``index`` and its executor. The SuperLink counts the node online until
        two missed heartbeats (``fedmeld supernode --heartbeat-interval``: 20 s at most here)."""
        for name in (f"executor-{index}", f"supernode-{index}"):
            if name in self.procs:
                self.kill(name)

    def kill_superlink(self) -> None:
        """A crash of the SuperLink. Secure, the SuperExec and the ServerApp it runs are processes of
        their own and live on; under ``--insecure`` they are Flower's children of the SuperLink and
        die with it (the run then needs a resume)."""
        self.kill("superlink")

    def restart_superlink(self, timeout: float = 60) -> None:
        """Start the SuperLink again with its own command: the same port, certificates and database,
        so it knows the registered nodes, the runs and the messages in flight. SuperNodes, the
        SuperExec and a live ServerApp reconnect by themselves (Flower retries with backoff)."""
        self.start("superlink", self.commands["superlink"])
        self._wait_for_port(self.port, timeout)

    def serverapps(self) -> list[int]:
        """The live ServerApp processes (one per running run) among those this deployment started."""
        return [pid for proc in self.procs.values() for pid in _descendants(proc.pid)
                if any(Path(arg).name == SERVERAPP for arg in _cmdline(pid)[:2])]

    def kill_serverapp(self, timeout: float = 30) -> list[int]:
        """A crash of the ServerApp (SIGKILL), everything else left running; the pids killed. Its run
        still counts as running in the SuperLink: end it with ``stop_run`` before resubmitting."""
        pids = self.serverapps()
        if not pids:
            raise RuntimeError(f"no {SERVERAPP} process is running in this deployment ({self.home})")
        _signal(pids, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while any(_alive(pid) for pid in pids):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{SERVERAPP} {pids} still alive {timeout:.0f} s after SIGKILL")
            time.sleep(0.1)
        return pids

    def stop_run(self, run_id: int) -> None:
        """``flwr stop``: end a run whose ServerApp died, so its queued messages go nowhere."""
        out = self.flwr("stop", str(run_id), CONNECTION, "--format", "json")
        try:
            answer = json.loads(out.stdout)
        except json.JSONDecodeError:
            answer = {"success": False, "error-message": f"{out.stdout}\n{out.stderr}"}
        if not answer.get("success"):
            raise RuntimeError(f"flwr stop {run_id} failed: {answer.get('error-message', answer)}")

    def restart_supernode(self, index: int, timeout: float = 180) -> int:
        """Start SuperNode ``index`` again with its own command (same key, partition and Runtime port),
        then its executor; return its node id. Until the SuperLink has marked the crashed session
        offline it refuses the activation and the SuperNode exits; we try again every RETRY_SECONDS."""
        name, deadline = f"supernode-{index}", time.monotonic() + timeout
        while True:
            offset = (self.home / f"{name}.log").stat().st_size
            proc = self.start(name, self.commands[name])
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    node = int(self.wait_for(name, JOINED, timeout=0.2, offset=offset)[1])
                except TimeoutError:
                    continue
                if f"executor-{index}" in self.commands:
                    self.start(f"executor-{index}", self.commands[f"executor-{index}"])
                return node
            if time.monotonic() >= deadline:
                raise TimeoutError(f"SuperNode {index} did not rejoin within {timeout:.0f} s; "
                                   f"see {self.home / name}.log")
            time.sleep(RETRY_SECONDS)

    def submit(self, cfg: RunConfig) -> int:
        """``flwr run`` the fedmeld app with ``cfg``; the run id."""
        overrides = self.home / "run-config.toml"
        overrides.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in cfg.to_flower().items()))
        submitted = self.flwr("run", str(write_app(self.home / "app")), CONNECTION, "--run-config", str(overrides),
                              "--format", "json")
        try:
            run_id = json.loads(submitted.stdout)["run-id"]
        except (json.JSONDecodeError, KeyError):
            raise RuntimeError(f"flwr run did not start the run:\n{submitted.stdout}\n{submitted.stderr}") from None
        print(f"[fedmeld] run {run_id} submitted to the SuperLink on 127.0.0.1:{self.port} "
              f"({'TLS, SuperNode and SuperExec authentication' if self.secure else 'insecure'}); "
              f"{sum(n.startswith('supernode-') for n in self.procs)} SuperNodes; logs in {self.home}", flush=True)
        return run_id

    def follow(self, run_id: int, run_dir: Path, poll_seconds: float = 2.0, timeout: float | None = None) -> Path:
        """Print each round as ``run_dir/metrics.jsonl`` gains it until the run ends; ``run_dir`` once it
        completed (``flwr run`` alone exits 0 on failure too). TimeoutError after ``timeout`` seconds."""
        shown, checked = 0, -STATUS_SECONDS
        deadline = time.monotonic() + timeout if timeout is not None else None
        while True:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} did not end within {timeout:.0f} s; see {self.home}/*.log")
            metrics = run_dir / "metrics.jsonl"
            lines = metrics.read_text().splitlines() if metrics.exists() else []
            for line in lines[shown:]:
                r = json.loads(line)
                print(f"[fedmeld] round {r['round']}: test acc {r['test_accuracy']:.4f} auc {r['test_auc']:.4f} "
                      f"clients ok {r['num_clients_ok']} | {r['round_seconds']:.1f} s", flush=True)
            shown = len(lines)
            if (run_dir / "summary.json").is_file() or time.monotonic() - checked >= STATUS_SECONDS:
                status, checked = self._status(run_id), time.monotonic()
                if status.startswith("finished"):
                    break
            time.sleep(poll_seconds)
        if status != "finished:completed" or not (run_dir / "summary.json").is_file():
            raise RuntimeError(f"run {run_id} ended as {status!r}; see {self.home}/*.log")
        return run_dir

    def _status(self, run_id: int) -> str:
        listed = self.flwr("ls", "--run-id", str(run_id), "--format", "json", CONNECTION)
        try:
            return json.loads(listed.stdout)["runs"][0]["status"]
        except (json.JSONDecodeError, KeyError, IndexError):
            raise RuntimeError(f"flwr ls gave no status for run {run_id}:\n{listed.stdout}\n{listed.stderr}") from None

    def stop(self) -> None:
        """Last started first (each executor, its SuperNode, ..., then the SuperLink), each with every
        process under it: Flower starts its SuperExec and app processes in sessions of their own, so
        process groups miss them. A paused (SIGSTOP) process is woken to act on the SIGTERM."""
        for proc in reversed(list(self.procs.values())):
            tree = [proc.pid, *_descendants(proc.pid)]
            _signal(tree, signal.SIGTERM)
            _signal(tree, signal.SIGCONT)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and any(_alive(pid) for pid in tree):
                proc.poll()  # reap our own child as soon as it exits
                time.sleep(0.2)
            _signal([pid for pid in tree if _alive(pid)], signal.SIGKILL)
            proc.wait()
        self.procs.clear()


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


def _cmdline(pid: int) -> list[str]:
    """The arguments process ``pid`` was started with; [] once it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace").split("\0")
    except OSError:
        return []


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
                   poll_seconds: float = 2.0, isolation: str = "process", insecure: bool = False,
                   certs: Path | None = None, state: str = "disk") -> Path:
    """Start the federation (secure unless ``insecure``), run the app to the end, stop everything;
    return the run directory."""
    credentials = None if insecure else deployment_credentials(home, num_supernodes, certs)
    with Deployment(home, num_supernodes, gpus, cfg.data_root, isolation, credentials, state) as fed:
        return fed.follow(fed.submit(cfg), Path(cfg.out) / cfg.run_name, poll_seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedmeld deploy", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0] + " Starts a local SuperLink and SuperNodes, runs, stops them.\n\n"
        + "\n\n".join(__doc__.split("\n\n")[2:6]),
        epilog="run-config keys (key = default {choices}):\n" + describe())
    parser.add_argument("--supernodes", type=int, help="SuperNodes (hospitals) to start; default 2 (with --resume: "
                                                        "the run's num-clients)")
    parser.add_argument("--gpus", default="", help="comma-separated GPU indices to spread SuperNodes over "
                                                   "round-robin, e.g. 0,1; empty: each node uses device=auto")
    parser.add_argument("--isolation", choices=ISOLATIONS, default="process",
                        help="process (default): one long-lived fedmeld executor per SuperNode runs every "
                             "message; subprocess: Flower's stock fresh flwr-clientapp process per message")
    parser.add_argument("--superlink-state", choices=SUPERLINK_STATES, default="disk",
                        help="disk (default): the SuperLink keeps nodes, runs and messages in HOME/superlink.db, so "
                             "a restarted SuperLink carries on; memory: in its own memory, faster per message "
                             "(no SQLite write per request) but a restart forgets the nodes and the run")
    security = parser.add_mutually_exclusive_group()
    security.add_argument("--certs", metavar="DIR", type=Path,
                          help="take ca.pem, server.pem, server.key and supernode-K.key/.pub (K = 0..N-1) from DIR "
                               "(as `fedmeld keys` writes them); default: generate them into HOME/certs")
    security.add_argument("--insecure", action="store_true",
                          help="INSECURE, for a laptop only: no TLS, no SuperNode or SuperExec authentication; "
                               "any local process can join the federation or claim its tasks")
    parser.add_argument("--home", help="FLWR_HOME for this deployment (state, logs, generated credentials); "
                                       "default: a new temp dir")
    parser.add_argument("--config", metavar="FILE.toml", help="TOML file with a flat table of run-config keys")
    parser.add_argument("--resume", metavar="RUN_DIR", type=Path,
                        help="continue a run whose ServerApp or deployment died, after its last completed round, "
                             "with its config (key=value may set only data-root and device); use the same --home "
                             "to keep its credentials")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="run-config overrides, TOML values")
    args = parser.parse_args(argv)
    poll_seconds_or_exit(parser)  # every process started below reads it
    try:
        if args.resume:
            if args.config:
                parser.error("--resume takes the run's own config: drop --config")
            cfg = resume_config(args.resume, args.overrides)
            nodes = cfg.num_clients
            if args.supernodes not in (None, nodes):
                parser.error(f"--supernodes {args.supernodes}: the run in {args.resume} has num-clients="
                             f"{cfg.num_clients}, one SuperNode per client; drop --supernodes")
        else:
            nodes = args.supernodes or 2
            cfg = load_config(args.config, [f"num-clients={nodes}", f"min-clients={nodes}", *args.overrides])
    except (ConfigError, OSError) as err:
        parser.error(str(err))
    home = Path(args.home or tempfile.mkdtemp(prefix="fedmeld-deploy-")).resolve()
    home.mkdir(parents=True, exist_ok=True)
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
    try:
        print(run_deployment(cfg, nodes, gpus, home, isolation=args.isolation, insecure=args.insecure,
                             certs=args.certs, state=args.superlink_state))
    except CredentialError as err:
        parser.error(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
