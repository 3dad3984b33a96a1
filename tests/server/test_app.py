"""server/app.py: federate() end to end over the in-process Grid."""

from __future__ import annotations

import pytest
from flwr.app import Array, Message
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedmeld.task.wire import unpack

pytestmark = pytest.mark.usefixtures("task_identity")  # conftest.py: messages need a task identity


def _one_array(msg: Message) -> list[Array]:
    """Every Array object Flower would move for this message (its whole object tree)."""
    return [o for o in get_all_nested_objects(msg).values() if isinstance(o, Array)]


@pytest.mark.parametrize("overrides", [{"peft": "lora+norm"}, {"peft": "lora+norm", "aggregation": "exact"}],
                         ids=["fedavg", "exact"])
def test_every_message_of_a_round_moves_one_array(overrides, tiny_config):
    """Flower moves each Array as objects of their own, one request each per hop in deployment: the
    global state (and LTE/exact broadcast) and every train reply must stay ONE Array, whatever the
    number of tensors, or the per-object cost silently comes back."""
    from fedmeld.client.app import app as client_app
    from fedmeld.task.config import RunConfig
    from fedmeld.server.app import federate
    from fedmeld.task.flower.inprocess import InProcessGrid

    class RecordingGrid(InProcessGrid):
        def _deliver(self, message: Message) -> Message:
            reply = super()._deliver(message)
            exchanged.append((message, reply))
            return reply

    exchanged: list[tuple[Message, Message]] = []
    cfg = RunConfig.from_mapping({**tiny_config, "model": "vit_pico_patch4_28", "num-server-rounds": 1, "device": "cpu",
                                  **overrides})
    federate(RecordingGrid(client_app, cfg.num_clients), cfg)
    assert {m.metadata.message_type for m, _ in exchanged} == {"train", "evaluate", "query"}
    queries = [(m, r) for m, r in exchanged if m.metadata.message_type == "query"]
    assert len(queries) == cfg.num_clients and not any(m.content.array_records for m, _ in queries)  # once per node
    for message, reply in [(m, r) for m, r in exchanged if m.metadata.message_type != "query"]:
        assert not reply.has_error(), reply.error.reason
        assert len(_one_array(message)) == 1, message.metadata.message_type
        assert len(_one_array(reply)) == (1 if message.metadata.message_type == "train" else 0)
        if "arrays" in reply.content:
            assert len(unpack(reply.content["arrays"])) > 20  # many tensors, still one Array


def test_a_dp_budget_stops_the_run_before_the_round_that_would_exceed_it_and_a_resume_keeps_it(tiny_config, capsys):
    """dp-max-epsilon between the largest client epsilon after round 1 and after round 2: the run ends
    cleanly after round 1 (exports and summary written) and says why. Resumed, the ledger comes back
    from the checkpoint, so the resumed run stops again instead of spending the budget anew."""
    import json
    from pathlib import Path

    from fedmeld.client.app import app as client_app
    from fedmeld.client.app import load_shard
    from fedmeld.server.app import federate
    from fedmeld.server.checkpoint import Checkpoint
    from fedmeld.task.config import RunConfig
    from fedmeld.task.flower.inprocess import InProcessGrid
    from fedmeld.task.privacy import DPSettings, Ledger

    dp = {**tiny_config, "model": "vit_pico_patch4_28", "device": "cpu", "num-server-rounds": 3, "dp-clip": 1.0,
          "dp-noise": 1.2}
    probe = RunConfig.from_mapping(dp)
    plans = {p: DPSettings.of(probe).plan(len(load_shard(probe, p, 2).train), probe.batch_size, probe.local_epochs)
             for p in range(2)}

    def largest_epsilon(rounds: int) -> float:
        ledger = Ledger()
        for p, plan in plans.items():
            for _ in range(rounds):
                ledger.charge(str(p), plan)
        return ledger.max_epsilon(1e-5)

    cap = (largest_epsilon(1) + largest_epsilon(2)) / 2
    cfg = RunConfig.from_mapping({**dp, "dp-max-epsilon": cap})
    run_dir = federate(InProcessGrid(client_app, 2), cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1]
    assert rows[0]["dp_epsilon"] == pytest.approx(largest_epsilon(1), rel=1e-9) and rows[0]["dp_delta"] == 1e-5
    out = capsys.readouterr().out
    assert f"round 2 would exceed dp-max-epsilon {cap:g}" in out and "the run stops after round 1" in out
    assert (run_dir / "summary.json").is_file() and (run_dir / "model_merged.safetensors").is_file()
    ledger = Ledger(Checkpoint.load(run_dir).privacy)
    assert ledger.max_epsilon(1e-5) == pytest.approx(largest_epsilon(1), rel=1e-9)

    resumed = RunConfig.from_mapping({**dp, "dp-max-epsilon": cap, "resume": str(run_dir)})
    assert federate(InProcessGrid(client_app, 2), resumed) == Path(run_dir)
    assert "round 2 would exceed" in capsys.readouterr().out  # the budget spent before the resume still counts
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1


def test_client_level_dp_moves_the_global_adapters_by_at_most_the_clip_and_records_its_epsilon(tiny_config):
    """client-dp-clip with no noise: the round's update is the equal-weight mean of clipped client
    updates, so the global adapter state moves by at most the clip; the round records client-level ε
    (infinite without noise) and no sample-level ε."""
    import json
    import math

    from safetensors.torch import load_file

    from fedmeld.client.app import app as client_app
    from fedmeld.peft import adapter_state
    from fedmeld.server.app import federate
    from fedmeld.task.config import RunConfig
    from fedmeld.task.data import task_info
    from fedmeld.task.flower.inprocess import InProcessGrid
    from fedmeld.task.model import build_model

    clip = 1e-3
    cfg = RunConfig.from_mapping({**tiny_config, "model": "vit_pico_patch4_28", "device": "cpu",
                                  "num-server-rounds": 1, "client-dp-clip": clip})
    start = adapter_state(build_model(cfg, task_info(cfg.dataset)))
    run_dir = federate(InProcessGrid(client_app, 2), cfg)
    row = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert row["applied"] and row["client_dp_epsilon"] == math.inf and "dp_epsilon" not in row
    end = load_file(str(run_dir / "adapter.safetensors"))
    moved = math.sqrt(sum(float((end[k] - v).double().square().sum()) for k, v in start.items() if k in end))
    assert 0 < moved <= clip * (1 + 1e-5)
