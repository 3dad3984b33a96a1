"""How far each rule's aggregate lands from the honest clients' mean when partition 0 of 5 sends
sign flip x5 (task/attacks.py), on one real round of the drills' setting (BreastMNIST 28 px,
random-init ResNet-18, LoRA + norm + head, BatchNorm statistics aggregated, IID, 2 local epochs).

For rounds 1..R (each round's global state: the honest fedavg of the round before) it trains the 5
clients from the global state (the ClientApp's own train handler), makes partition 0's reply the
attack, and prints per tensor group the relative error ‖agg − ref‖/‖ref‖ and the cosine of each rule's
effective update against ref = the example-weighted mean of the 4 honest replies; "clean" rows: the
rule on the 5 honest replies, against the mean of all 5. Groups: LoRA (s·((B+dB)(A+dA) − BA) per
layer), the other learned tensors, BatchNorm running means, running variances.

    OMP_NUM_THREADS=1 python trimmed_mean_bias.py [ROUNDS]
"""

import os
import sys

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from fedmeld.client.app import train_handler
from fedmeld.server.delta import DeltaProtocol
from fedmeld.task.aggregators import AGGREGATORS, RuleSettings
from fedmeld.task.aggregators.effective import lora_layers
from fedmeld.task.aggregators.mean import weighted_mean
from fedmeld.task.attacks import ATTACKS
from fedmeld.task.config import RunConfig
from fedmeld.task.data import task_info
from fedmeld.task.wire import pack, unpack

for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", SUPERLINK_NODE_ID)):  # a runtime's task identity
    setattr(TaskIdentity, attr, value)
cfg = RunConfig.from_mapping({"dataset": "breastmnist", "model": "resnet18", "peft": "lora+norm", "local-epochs": 2,
                              "num-clients": 5, "min-clients": 5, "partition": "iid", "device": "cpu",
                              "data-root": os.environ.get("MEDMNIST_ROOT", "../shared/data/medmnist")})
protocol = DeltaProtocol.for_run(cfg, DeltaProtocol.build_model(cfg, task_info(cfg.dataset)))
settings = RuleSettings(byzantine=1, lora_scaling=cfg.lora_alpha / cfg.lora_rank)


def groups(delta: dict, glob: dict) -> dict[str, torch.Tensor]:
    """A delta's effective update, flattened per tensor group (float64)."""
    layers = lora_layers(set(delta))
    paired = {f"{l}.lora_{f}" for l in layers for f in "AB"}
    s = settings.lora_scaling
    out = {"lora s·BA": torch.cat([
        (s * ((glob[f"{l}.lora_B"] + delta[f"{l}.lora_B"]).double().flatten(1)
              @ (glob[f"{l}.lora_A"] + delta[f"{l}.lora_A"]).double().flatten(1)
              - glob[f"{l}.lora_B"].double().flatten(1) @ glob[f"{l}.lora_A"].double().flatten(1))).flatten()
        for l in layers])}
    for group, keep in (("learned", lambda k: not k.endswith(("running_mean", "running_var"))),
                        ("running_mean", lambda k: k.endswith("running_mean")),
                        ("running_var", lambda k: k.endswith("running_var"))):
        out[group] = torch.cat([delta[k].double().flatten() for k in sorted(delta) if k not in paired and keep(k)])
    return out


for rnd in range(1, int(sys.argv[1]) + 1 if len(sys.argv) > 1 else 2):
    glob = protocol.state
    config = ConfigRecord({**cfg.to_flower(), "server-round": rnd})
    honest, weights = [], []
    for p in range(cfg.num_clients):
        msg = Message(RecordDict({"arrays": pack(glob), "config": config}), dst_node_id=p, message_type="train")
        context = Context(run_id=1, node_id=p, node_config={"partition-id": p, "num-partitions": cfg.num_clients},
                          state=RecordDict(), run_config={})
        reply = train_handler(msg, context).content
        honest.append(unpack(reply["arrays"]))
        weights.append(float(reply["metrics"]["num-examples"]))
    attacked = [ATTACKS["sign-flip"].on_update(honest[0], 5.0, 0), *honest[1:]]
    refs = {"attacked": groups(weighted_mean(honest[1:], weights[1:]), glob),
            "clean": groups(weighted_mean(honest, weights), glob)}
    print(f"round {rnd}: relative error / cosine against the honest mean, per group")
    for case, deltas in (("clean", honest), ("attacked", attacked)):
        for rule in ("fedavg", "median", "trimmed-mean", "clipped-mean", "krum"):
            agg = AGGREGATORS[rule].configured(settings)(deltas, weights, glob)
            got = groups(agg, glob)
            cells = [f"{g} {(got[g] - ref).norm() / ref.norm():.3f} / "
                     f"{torch.nn.functional.cosine_similarity(got[g], ref, dim=0):+.3f}"
                     for g, ref in refs[case].items()]
            print(f"  {case:8s} {rule:12s} " + "   ".join(cells), flush=True)
    protocol.aggregate([type("R", (), {"state": d, "weight": w})() for d, w in zip(honest, weights)])
