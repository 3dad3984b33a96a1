"""task/trace.py's hop breakdown on a hand-made trace: which rounds count as steady."""

from __future__ import annotations

from fedmeld.task import trace


def _phase(kind: str, t0: float, seconds: float) -> list[dict]:
    """One phase of one client: pushed at t0, the client busy for ``seconds``, the reply 0.1 s later."""
    return [{"event": "push", "type": kind, "t0": t0, "t": t0 + 0.1},
            {"event": "client", "type": kind, "created": t0, "input": t0 + 0.2, "app_done": t0 + 0.2 + seconds,
             "t": t0 + 0.2 + seconds},
            {"event": kind, "t": t0 + 0.2 + seconds, "seconds": seconds},
            {"event": "reply", "type": kind, "created": t0 + 0.2 + seconds, "t": t0 + 0.3 + seconds}]


def test_rounds_without_an_evaluate_phase_count_by_their_train_phase():
    """client-eval-every = rounds: four rounds, only the last evaluates. Rounds 2 and 3 are steady
    (round 1 pays start-up, the last round's last phase has no gap after it); a slow round 1 stays out."""
    events = _phase("train", 0.0, 5.0) + _phase("train", 10.0, 1.0) + _phase("train", 20.0, 1.0) \
        + _phase("train", 30.0, 1.0) + _phase("evaluate", 32.0, 0.5)
    hops = trace.hops(events)
    assert hops["rounds"] == [2, 3]
    assert hops["train"]["engine_s"]["median"] == 1.0 and hops["train"]["phase_s"] == 1.3
    assert hops["evaluate"] is None
    every_round = [e for r in range(4)
                   for e in _phase("train", 10.0 * r, 1.0) + _phase("evaluate", 10.0 * r + 2, 0.5)]
    assert trace.hops(every_round)["rounds"] == [2, 3]
