"""client/wire.py: a state dict travels as exactly one Array, bit for bit, and damage is caught."""

from __future__ import annotations

import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedmeld.task.wire import KEY, STYPE, WireError, pack, payload_bytes, unpack

pytestmark = pytest.mark.usefixtures("task_identity")  # conftest.py: messages need a task identity


def _mixed() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "lora_A": torch.randn(8, 27, generator=g),
        "lora_B": torch.randn(5, 3, generator=g).t(),  # not contiguous
        "half": torch.randn(3, 2, 2, generator=g).bfloat16(),
        "fp16": torch.randn(7, generator=g).half(),
        "double": torch.randn(2, generator=g).double(),
        "scalar": torch.tensor(3.5),
        "steps": torch.tensor(12345678901, dtype=torch.int64),
        "ids": torch.arange(-3, 4, dtype=torch.int8),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
        "odd/name with spaces é": torch.ones(1, dtype=torch.uint8),
    }


def _one_array(msg: Message) -> list[Array]:
    """Every Array object Flower would move for this message (its whole object tree)."""
    return [o for o in get_all_nested_objects(msg).values() if isinstance(o, Array)]


def _with_data(record: ArrayRecord, data: bytes) -> ArrayRecord:
    array = record[KEY]
    return ArrayRecord({KEY: Array(dtype=array.dtype, shape=(len(data),), stype=array.stype, data=data)})


def test_round_trip_is_exact_for_mixed_dtypes_and_shapes():
    state = _mixed()
    record = pack(state)
    assert list(record.keys()) == [KEY] and record[KEY].stype == STYPE
    back = unpack(record)
    assert list(back) == list(state)
    for name, tensor in state.items():
        assert back[name].dtype == tensor.dtype and back[name].shape == tensor.shape, name
        assert torch.equal(back[name], tensor), name
    back["lora_A"] += 1  # the tensors are the receiver's own: the record is untouched
    assert torch.equal(unpack(record)["lora_A"], state["lora_A"])
    raw = sum(t.numel() * t.element_size() for t in state.values())
    assert raw < payload_bytes(record) < raw + 64 * len(state) + 64  # header: names, dtypes, shapes, padding


def test_an_empty_state_round_trips():
    assert unpack(pack({})) == {}


@pytest.mark.parametrize("record", [ArrayRecord({"w": torch.ones(2)}), ArrayRecord(),
                                    ArrayRecord({KEY: Array(dtype="uint8", shape=(3,), stype="numpy.ndarray",
                                                            data=b"abc")})],
                         ids=["plain", "empty", "foreign-stype"])
def test_a_record_that_is_not_packed_is_refused(record):
    with pytest.raises(WireError, match="not a fedmeld-packed record"):
        unpack(record)


@pytest.mark.parametrize("damage", [
    lambda d: d[:-1],                           # truncated
    lambda d: d + b"\0",                        # extended
    lambda d: d[:10],                           # cut inside the header
    lambda d: b"XXXX" + d[4:],                  # wrong magic
    lambda d: d[:30] + bytes([d[30] ^ 1]) + d[31:],  # a header byte flipped
    lambda d: d[:-5] + bytes([d[-5] ^ 1]) + d[-4:],  # a tensor byte flipped
    lambda d: b"",
], ids=["truncated", "extended", "cut-header", "magic", "header-bit", "payload-bit", "empty"])
def test_damaged_bytes_are_refused(damage):
    record = pack(_mixed())
    with pytest.raises(WireError, match="corrupted"):
        unpack(_with_data(record, damage(record[KEY].data)))


def test_a_dtype_without_exact_bytes_is_refused_when_packing():
    with pytest.raises(WireError, match="complex64 cannot be packed"):
        pack({"z": torch.zeros(2, dtype=torch.complex64)})


def test_the_server_rejects_an_unpacked_reply_as_a_bad_reply():
    from fedmeld.server.delta import DeltaProtocol
    from fedmeld.server.strategy import BadReply, parse_reply

    reference = {"w": torch.zeros(2)}
    instruction = Message(RecordDict({"arrays": pack(reference)}), dst_node_id=3, message_type="train")
    reply = Message(RecordDict({"arrays": ArrayRecord({"w": torch.ones(2)}),
                                "metrics": MetricRecord({"num-examples": 4})}), reply_to=instruction)
    with pytest.raises(BadReply, match="not a fedmeld-packed record"):
        parse_reply(reply, DeltaProtocol(reference, lambda d, w: d[0]))


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
    assert {m.metadata.message_type for m, _ in exchanged} == {"train", "evaluate"}
    for message, reply in exchanged:
        assert not reply.has_error(), reply.error.reason
        assert len(_one_array(message)) == 1, message.metadata.message_type
        assert len(_one_array(reply)) == (1 if message.metadata.message_type == "train" else 0)
        if "arrays" in reply.content:
            assert len(unpack(reply.content["arrays"])) > 20  # many tensors, still one Array
