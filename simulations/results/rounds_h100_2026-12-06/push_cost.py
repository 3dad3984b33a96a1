"""What the ServerApp itself spends on pushing a phase's 8 messages, without the SuperLink.

    python3 push_cost.py   # with fedmeld importable; CPU only

The steps of ``flwr.superlink.grid.http_grid.HttpGrid.push_messages`` up to the first request: build
the 8 messages (one packed state each, ``fedmeld.task.wire.pack``), compute their object ids (hashing
the content), strip and serialise them and collect their object trees, and deflate every distinct
object once (what ``push_objects`` sends). The state: 98 float32 tensors of 2,367,744 bytes in all, the
size of the job's ViT-S LoRA r=8 + head message (``bytes_up_per_client_round`` in polls_*.json).
Median of 5 repeats."""

import statistics
import time

import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.app.message import remove_content_from_message
from flwr.common.serde import message_to_proto
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree, no_object_id_recompute

from fedmeld.task import wire
from fedmeld.task.flower.inprocess import set_task_identity

set_task_identity()
state = {f"t{i}": torch.randn(2_367_744 // 4 // 98) for i in range(98)}
steps = {"build": [], "object ids": [], "protos and trees": [], "deflate distinct objects": []}
for _ in range(5):
    t0 = time.perf_counter()
    messages = [Message(RecordDict({"arrays": wire.pack(state), "config": ConfigRecord({"server-round": 3})}),
                        message_type="train", dst_node_id=node) for node in range(1, 9)]
    t1 = time.perf_counter()
    with no_object_id_recompute():
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id
        t2 = time.perf_counter()
        objects = {}
        for m in messages:
            message_to_proto(remove_content_from_message(m))
            objects.update(get_all_nested_objects(m))
            get_object_tree(m)
        t3 = time.perf_counter()
        sent = sum(len(o.deflate()) for o in objects.values())
        t4 = time.perf_counter()
    for key, seconds in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
        steps[key].append(seconds)
for key, seconds in steps.items():
    print(f"{key}: {statistics.median(seconds):.4f} s")
print(f"all: {sum(statistics.median(s) for s in steps.values()):.4f} s; {len(objects)} distinct objects, {sent} bytes")
