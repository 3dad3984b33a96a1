"""task/wire.py: a state dict travels as exactly one Array, bit for bit, and damage is caught."""

from __future__ import annotations

import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedmeld.task.wire import KEY, STYPE, WireError, pack, payload_bytes, unpack


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
