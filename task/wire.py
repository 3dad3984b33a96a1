"""How tensors travel in fedmeld's Flower messages: a whole state dict packed into ONE Array.

Why: Flower 1.41 moves every Array of an ArrayRecord as objects of their own (the Array and its
chunks), and the deployment runtime sends each object as its own HTTP request at every hop
(ServerApp -> SuperLink -> SuperNode -> ClientApp and back). A LoRA state of 55-98 tensors thus cost
hundreds of requests per message, most of a deployment round's fixed cost. Packed, a message is a
handful of objects whatever the number of tensors.

Layout of the one Array's bytes (its ``stype`` is ``STYPE``)::

    MAGIC | header length (uint32) | CRC-32 of everything after it (uint32) | header (UTF-8 JSON) |
    zero padding | tensor bytes, each starting ALIGN-aligned (offsets relative to the first tensor)

with integers little-endian and the header ``[[name, dtype, shape, offset], ...]``.
Tensors keep their exact bytes, so every dtype in ``DTYPES`` round-trips exactly (bfloat16 included,
which NumPy, and so Flower's own ``ArrayRecord(state_dict)``, cannot carry).
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Mapping

import torch
from flwr.app import Array, ArrayRecord
from torch import Tensor

State = dict[str, Tensor]  # a state dict: what every message, checkpoint and aggregation rule moves

KEY = "packed"
STYPE = "fedmeld.wire.v1"
MAGIC = b"FMW1"
ALIGN = 16  # every dtype's element size divides it, so each tensor is a plain view of the buffer
DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool)}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_PREFIX = struct.Struct("<4sII")  # MAGIC, header length, CRC-32


class WireError(ValueError):
    """A record that is not a packed fedmeld state, or whose bytes do not match their header."""


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def pack(state: Mapping[str, Tensor]) -> ArrayRecord:
    """``state`` as an ArrayRecord of exactly one Array (tensors are detached and copied to the CPU)."""
    entries, chunks, end = [], [], 0
    for name, tensor in state.items():
        if tensor.dtype not in _DTYPE_NAMES:
            raise WireError(f"{name}: dtype {tensor.dtype} cannot be packed (supported: {', '.join(DTYPES)})")
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        offset = _aligned(end)
        chunks += [bytes(offset - end), raw]
        entries.append([name, _DTYPE_NAMES[tensor.dtype], list(tensor.shape), offset])
        end = offset + raw.nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    body = [header, bytes(_aligned(_PREFIX.size + len(header)) - _PREFIX.size - len(header)), *chunks]
    crc = 0
    for part in body:
        crc = zlib.crc32(part, crc)
    data = b"".join([_PREFIX.pack(MAGIC, len(header), crc), *body])
    return ArrayRecord({KEY: Array(dtype="uint8", shape=(len(data),), stype=STYPE, data=data)})


def unpack(record: ArrayRecord) -> dict[str, Tensor]:
    """The state dict ``pack`` was given. The tensors are views into one fresh buffer (nothing is
    shared with ``record``); a record that was not packed, or is truncated or altered, raises WireError."""
    arrays = list(record.values())
    if list(record.keys()) != [KEY] or arrays[0].stype != STYPE:
        raise WireError(f"not a fedmeld-packed record (fedmeld.task.wire.pack): {len(arrays)} arrays "
                        f"{list(record.keys())[:3]}, stype {arrays[0].stype if arrays else None!r}")
    data = memoryview(arrays[0].data)
    if len(data) < _PREFIX.size:
        raise WireError(f"packed record is corrupted: {len(data)} bytes")
    magic, header_size, crc = _PREFIX.unpack_from(data)
    body = data[_PREFIX.size:]
    if magic != MAGIC or zlib.crc32(body) != crc:
        raise WireError("packed record is corrupted: wrong magic bytes or checksum")
    try:
        entries = [(name, DTYPES[dtype], tuple(shape), offset)
                   for name, dtype, shape, offset in json.loads(bytes(body[:header_size]))]
    except (ValueError, KeyError, TypeError) as err:  # checksum fine: written by another pack version
        raise WireError(f"packed record has an unreadable header: {err!r}") from None
    payload = body[_aligned(_PREFIX.size + header_size) - _PREFIX.size:]  # past the header's padding
    flat = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else torch.empty(0, dtype=torch.uint8)
    state = {}
    for name, dtype, shape, offset in entries:
        size = math.prod(shape) * dtype.itemsize
        if offset % ALIGN or offset + size > len(flat):
            raise WireError(f"packed record has an inconsistent header: {name} at byte {offset} does not fit")
        state[name] = flat[offset:offset + size].view(dtype).view(shape)
    return state


def snapshot(state: Mapping[str, Tensor]) -> State:
    """A detached CPU copy that later in-place updates of the model cannot change."""
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def nbytes(state: Mapping[str, Tensor]) -> int:
    """Bytes of a state dict's tensors (what packing them costs, less the header)."""
    return sum(t.numel() * t.element_size() for t in state.values())


def payload_bytes(record: ArrayRecord) -> int:
    """Serialized size of an ArrayRecord's tensors: what crosses the wire, headers included."""
    return sum(len(array.data) for array in record.values())
