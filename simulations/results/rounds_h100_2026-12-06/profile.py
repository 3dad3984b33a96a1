"""Where the ServerApp's push and pull wait, from py-spy's raw stacks, and each run's hops from its trace.

    python3 profile.py   # from this folder, with fedmeld importable

``spy_h100_2026-12-06.kept.txt.gz``: the stacks of the ServerApp, the SuperLink, one SuperNode and its
executor from ``py-spy record --subprocesses --idle --nonblocking -r 50 -f raw`` over the whole ``spy``
deployment (run.sh step 2; the full file of every process was 54 MB). Samples are counted at 50 Hz per
thread, idle included, so a count / 50 is thread-seconds spent under that frame."""

import collections
import gzip
import json
import statistics
from pathlib import Path

from fedmeld.task import trace

HERE = Path(__file__).parent


def stacks(process: str):
    with gzip.open(HERE / "spy_h100_2026-12-06.kept.txt.gz", "rt") as f:
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            frames = stack.split(";")
            owner = [p for p in frames if p.startswith("process ")][-1]
            if process in owner:
                yield [p for p in frames if not p.startswith("process ")], int(n)


def under(process: str, frame: str, depth: int = 2, leaf: bool = False) -> None:
    """Thread-seconds under ``frame``, split by the ``depth`` frames below it (``leaf``: the innermost
    ``depth`` frames, where the thread was)."""
    split, total = collections.Counter(), 0
    for frames, n in stacks(process):
        hits = [i for i, f in enumerate(frames) if frame in f]
        if hits:
            below = frames[-depth:] if leaf else frames[hits[-1] + 1:hits[-1] + 1 + depth]
            split[" > ".join(f.split(" (")[0] for f in below) or "(itself)"] += n
            total += n
    print(f"\n{process}: {total / 50:.2f} thread-s under {frame}")
    for what, n in split.most_common(6):
        print(f"  {n / 50:6.2f} s {n / total:6.1%}  {what}")


under("flwr-serverapp", "HttpGrid.push_messages")
under("flwr-serverapp", "RuntimeHttpClient.PushObject", 3, leaf=True)
under("flwr-serverapp", "HttpGrid.pull_messages")
print("\nsteady rounds (median of 2-5), hops of rounds 2-4 (fedmeld.task.trace.hops):")
for run in sorted((HERE / "runs").glob("*.trace.jsonl")):
    name = run.name.removesuffix(".trace.jsonl")
    rounds = [json.loads(line)["round_seconds"] for line in (HERE / "runs" / name / "metrics.jsonl").open()]
    hops = trace.hops(trace.read(run))["train"]
    print(f"  {name}: round {statistics.median(rounds[1:]):.3f} s; train phase {hops['phase_s']} s: push {hops['push_s']}, "
          f"to client {hops['to_client_s']['median']}, ClientApp {hops['client_app_s']['median']} "
          f"(max {hops['client_app_s']['max']}), to server {hops['to_server_s']['median']}; "
          f"gap after {hops['gap_after_s']}, central evaluation {hops['central_evaluation_s']}")
