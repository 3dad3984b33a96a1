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
