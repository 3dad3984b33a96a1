"""Where a federated round's time goes: timestamped events of every hop, from every process, in one file.

``FEDMELD_TRACE=/abs/path/trace.jsonl`` turns tracing on in each process that inherits it (``fedmeld
deploy`` hands its environment to the SuperLink, the SuperNodes and their executors, and through the
SuperLink's SuperExec to the ServerApp). Each event is one JSON line appended with one write, so
lines from several processes never interleave. Off (the default), ``record`` returns at once.

Events (``t``: wall-clock seconds, comparable across the processes of one host; ``pid``):
``push`` (the server hands a round's messages of one ``type`` to its Grid, ``t0`` to ``t``),
``reply`` (the server receives one node's reply: the reply's ``created`` time, ``t`` on arrival),
``client`` (a ClientApp task: the instruction's ``created`` time, ``input`` when the client holds it,
``app_done`` when the ClientApp returned, ``t`` when its reply was handed back),
``train`` and ``evaluate`` (``task/engine.py``'s loops: ``seconds``, ``samples``; in the ServerApp's
process, ``evaluate`` is the central evaluation). ``simulations/bench.py`` turns them into the
per-hop breakdown of a round (``hops``).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Iterable

TRACE_ENV = "FEDMELD_TRACE"


def enabled() -> bool:
    return bool(os.environ.get(TRACE_ENV))


def record(event: str, **fields: object) -> None:
    """Append one event (no-op unless ``FEDMELD_TRACE`` names a file)."""
    path = os.environ.get(TRACE_ENV)
    if not path:
        return
    line = json.dumps({"event": event, "t": time.time(), "pid": os.getpid(), **fields}, default=str) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)


def read(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _stats(values: Iterable[float]) -> dict[str, float] | None:
    values = list(values)
    return {"median": round(statistics.median(values), 4), "max": round(max(values), 4)} if values else None


def hops(events: list[dict], steady_from: int = 2) -> dict:
    """The per-hop breakdown of each train and evaluate phase of the rounds from ``steady_from`` on
    (round 1 pays start-up), medians over those rounds, in seconds.

    A phase starts when the server pushes its messages and ends with its last reply; ``gap_after_s``
    is the server's own work before the next phase (after the train phase: aggregation; after the
    evaluate phase: client-metric aggregation, the central evaluation (``central_evaluation_s``),
    the checkpoint write and the next round's sampling and packing). Per client, a message goes
    ``to_client_s`` (instruction created -> client holds it: ServerApp -> SuperLink -> SuperNode ->
    executor, with every poll on the way), ``client_app_s`` (the ClientApp: load state, train or
    evaluate (``engine_s``), pack the reply) and ``to_server_s`` (reply created -> the ServerApp
    has it)."""
    pushes = sorted((e for e in events if e["event"] == "push" and e["type"] in ("train", "evaluate")),
                    key=lambda e: e["t0"])
    phases = []
    for i, push in enumerate(pushes):
        end = pushes[i + 1]["t0"] if i + 1 < len(pushes) else float("inf")
        window = [e for e in events if push["t0"] <= _when(e) < end]
        replies = [e for e in window if e["event"] == "reply" and e["type"] == push["type"]]
        clients = [e for e in window if e["event"] == "client" and e["type"] == push["type"]]
        if not replies:
            continue
        last = max(r["t"] for r in replies)
        # the clients' loops end before their replies; the server's central evaluation starts after the last
        engine = [e for e in window if e["event"] == push["type"] and e["t"] <= last]
        phases.append({
            "type": push["type"],
            "phase_s": last - push["t0"],
            "push_s": push["t"] - push["t0"],
            "to_client_s": _stats(c["input"] - c["created"] for c in clients),
            "client_app_s": _stats(c["app_done"] - c["input"] for c in clients),
            "engine_s": _stats(e["seconds"] for e in engine),
            "to_server_s": _stats(r["t"] - r["created"] for r in replies),
            "gap_after_s": end - last if end != float("inf") else None,
            "central_evaluation_s": sum(e["seconds"] for e in window if e["event"] == "evaluate"
                                        and _when(e) >= last),
        })
    trains = [i for i, p in enumerate(phases) if p["type"] == "train"]
    rounds = []  # one (train, evaluate) pair of phases per round
    for k, i in enumerate(trains):
        following = phases[i + 1] if i + 1 < len(phases) and phases[i + 1]["type"] == "evaluate" else None
        rounds.append({"round": k + 1, "train": phases[i], "evaluate": following})
    # complete rounds after start-up: the last round's last phase has no gap after it; a round with no
    # evaluate phase (client-eval-every) counts by its train phase
    steady = [r for r in rounds if r["round"] >= steady_from
              and (r["evaluate"] or r["train"])["gap_after_s"] is not None] or rounds
    return {"rounds": [r["round"] for r in steady],
            "train": _median_phase([r["train"] for r in steady]),
            "evaluate": _median_phase([r["evaluate"] for r in steady if r["evaluate"]])}


def _when(event: dict) -> float:
    """When an event began (a client task: when it got its input)."""
    return event.get("input", event.get("t0", event["t"])) if event["event"] == "client" else \
        event.get("t0", event["t"] - event.get("seconds", 0.0))


def _median_phase(phases: list[dict]) -> dict | None:
    """Key by key, the median over phases (of a {median, max} pair: the median of each)."""
    if not phases:
        return None
    out: dict = {}
    for key, value in phases[0].items():
        if key == "type":
            continue
        if isinstance(value, dict):
            out[key] = {s: round(statistics.median(p[key][s] for p in phases if p[key]), 4) for s in value}
        elif value is None:
            out[key] = None
        else:
            present = [p[key] for p in phases if p[key] is not None]
            out[key] = round(statistics.median(present), 4) if present else None
    return out
