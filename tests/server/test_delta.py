"""server/delta.py: under client-ranks, smaller LoRA factors are zero-padded to the global rank (HetLoRA)."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedmeld.peft import adapter_state
from fedmeld.task.aggregators import AGGREGATORS
from fedmeld.task.config import RunConfig
from fedmeld.task.data import task_info
from fedmeld.task.model import build_model
from fedmeld.task.wire import pack, payload_bytes, unpack

pytestmark = pytest.mark.usefixtures("task_identity")  # conftest.py: messages need a task identity


def test_mixed_ranks_under_fedavg_are_zero_padded(medmnist_root):
    """HetLoRA's baseline: a rank-2 client trains the first 2 components of the rank-4 global
    factors and sends rank-2 factors (fewer bytes); the server zero-pads them back."""
    from fedmeld.client.app import train_handler
    from fedmeld.server.delta import DeltaProtocol
    from fedmeld.server.strategy import parse_reply

    # lora+norm: random-init timm ResNets zero the last BatchNorm γ of each block, which mutes in-block LoRA
    cfg = RunConfig.from_mapping({"model": "resnet10t", "peft": "lora+norm", "client-ranks": "2,4", "local-epochs": 1,
                                  "data-root": str(medmnist_root), "num-clients": 2})
    global_state = adapter_state(build_model(cfg.for_client(None), task_info("breastmnist")))
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 2},
                      state=RecordDict(), run_config={})
    config = ConfigRecord({**cfg.to_flower(), "server-round": 1})
    reply = train_handler(Message(RecordDict({"arrays": pack(global_state), "config": config}), dst_node_id=7,
                                  message_type="train"), context)
    sent = unpack(reply.content["arrays"])
    name = next(k for k in sent if k.endswith("lora_A"))
    assert sent[name].shape[0] == 2 and global_state[name].shape[0] == 4
    assert payload_bytes(reply.content["arrays"]) < 0.75 * payload_bytes(pack(global_state))
    delta = parse_reply(reply, DeltaProtocol(global_state, AGGREGATORS["fedavg"], pad_ranks=True)).state
    assert delta[name].shape == global_state[name].shape and not delta[name][2:].any() and delta[name][:2].any()
    b_name = name[:-1] + "B"
    assert not delta[b_name][:, 2:].any()
    with pytest.raises(ValueError):  # without padding, a smaller rank is a malformed reply
        parse_reply(reply, DeltaProtocol(global_state, AGGREGATORS["fedavg"]))
