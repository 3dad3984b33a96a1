"""client/delta.py: local (personal) parameters never leave the client."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedmeld.peft import adapter_state
from fedmeld.task.config import RunConfig
from fedmeld.task.data import task_info
from fedmeld.task.model import build_model, is_local
from fedmeld.task.wire import pack, payload_bytes, unpack

pytestmark = pytest.mark.usefixtures("task_identity")  # conftest.py: messages need a task identity


def test_local_params_never_leave_the_client(medmnist_root):
    """FedPer-style: the head stays home. The reply names and bytes hold only the shared tensors,
    and the client's own head persists in its context between rounds."""
    from fedmeld.client.app import run_config, train_handler
    from fedmeld.client.delta import LOCAL_KEY, _global_state, _load_model

    cfg = RunConfig.from_mapping({"model": "resnet10t", "peft": "norm", "local-params": "fc.*", "local-epochs": 1,
                                  "data-root": str(medmnist_root), "num-clients": 2})
    model = build_model(cfg, task_info("breastmnist"))
    state = adapter_state(model)
    shared = {k: v for k, v in state.items() if not is_local(k, cfg)}
    assert {"fc.weight", "fc.bias"} <= state.keys() and not {"fc.weight", "fc.bias"} & shared.keys()

    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 2},
                      state=RecordDict(), run_config={})
    heads = []
    for server_round in (1, 2):
        config = ConfigRecord({**cfg.to_flower(), "server-round": server_round})
        instruction = Message(RecordDict({"arrays": pack(shared), "config": config}), dst_node_id=7,
                              message_type="train")
        reply = train_handler(instruction, context)
        sent = reply.content["arrays"]
        assert set(unpack(sent)) == set(shared) and payload_bytes(sent) == payload_bytes(pack(shared))
        heads.append(unpack(context.state[LOCAL_KEY])["fc.weight"])
        cfg_now = run_config(instruction, context)
        loaded = _load_model(cfg_now, _global_state(instruction, cfg_now), context)  # next round's start
        assert torch.equal(loaded.fc.weight.detach().cpu(), heads[-1])
    assert not torch.equal(heads[0], state["fc.weight"]) and not torch.equal(heads[1], heads[0])
