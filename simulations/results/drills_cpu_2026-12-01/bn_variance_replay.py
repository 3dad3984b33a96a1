"""Replay the round after a run's last checkpoint, in process, and name the BatchNorm running
variances its aggregate makes negative (what turns a global model's outputs into NaN).

    fedmeld run --backend inprocess model=resnet18 num-server-rounds=5 aggregation=clipped-mean \\
        attack=sign-flip attack-scale=5 num-clients=5 min-clients=5 robust-f=1 attackers=0 \\
        partition=iid device=cpu run-name=diag        # stops with NaN in round 4; checkpoint: round 3
    python bn_variance_replay.py runs/diag
"""

import sys
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from fedmeld.client.app import train_handler
from fedmeld.server.checkpoint import Checkpoint
from fedmeld.task.config import RunConfig
from fedmeld.task.wire import pack, unpack

for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", SUPERLINK_NODE_ID)):  # a runtime's task identity
    setattr(TaskIdentity, attr, value)
ckpt = Checkpoint.load(Path(sys.argv[1]))
cfg = RunConfig.from_mapping({k: v for k, v in ckpt.config.items() if k not in ("out", "run-name")})
state = ckpt.parts["global"]
variances = [k for k in state if k.endswith("running_var")]
print("checkpoint round", ckpt.round, "smallest running_var", min(state[k].min().item() for k in variances))
config = ConfigRecord({**cfg.to_flower(), "server-round": ckpt.round + 1})
deltas = []
for p in range(cfg.num_clients):
    msg = Message(RecordDict({"arrays": pack(state), "config": config}), dst_node_id=p, message_type="train")
    context = Context(run_id=1, node_id=p, node_config={"partition-id": p, "num-partitions": cfg.num_clients},
                      state=RecordDict(), run_config={})
    deltas.append(unpack(train_handler(msg, context).content["arrays"]))
for name, step in ((cfg.aggregation, cfg.aggregator(deltas, [1.0] * len(deltas), state)),
                   ("fedavg", {k: sum(d[k] for d in deltas) / len(deltas) for k in state})):
    negative = {k: round((state[k] + step[k]).min().item(), 3) for k in variances if (state[k] + step[k]).min() < 0}
    print(f"round {ckpt.round + 1}, {name}: negative running_var {negative}")
