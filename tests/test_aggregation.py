"""Aggregation rules, server optimizers, FedProx and local (personal) parameters."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedmeld.task.config import ConfigError, RunConfig
from fedmeld.task.data import load_split, task_info
from fedmeld.task.engine import pick_device, train
from fedmeld.task.model import build_model, is_local
from fedmeld.task.wire import pack, unpack
from fedmeld.peft import adapter_state
from fedmeld.task.aggregators import AGGREGATORS
from fedmeld.server.optimizers import ServerOptimizer
from fedmeld.task.wire import payload_bytes

pytestmark = pytest.mark.usefixtures("task_identity")  # conftest.py: messages need a task identity


def _deltas(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"a": torch.randn(3, 4, generator=g) * 0.01, "b": torch.randn(5, generator=g) * 0.01} for _ in range(n)]


def test_robust_rules_survive_a_client_scaled_by_1e6():
    honest = _deltas(5)
    attacked = honest[:4] + [{k: v * 1e6 for k, v in honest[4].items()}]
    weights = [100.0] * 5
    for rule in ("median", "trimmed-mean"):
        clean, hit = AGGREGATORS[rule](honest, weights), AGGREGATORS[rule](attacked, weights)
        assert all(hit[k].abs().max() < 0.05 for k in hit), rule  # stays at the honest clients' scale
        assert all((hit[k] - clean[k]).abs().max() < 0.05 for k in hit), rule
    fedavg = AGGREGATORS["fedavg"](attacked, weights)
    assert max(v.abs().max() for v in fedavg.values()) > 100  # the mean follows the attacker


def test_median_and_trimmed_mean_by_hand():
    deltas = [{"x": torch.tensor([v])} for v in (1.0, 2.0, 3.0, 4.0, 100.0)]
    assert AGGREGATORS["median"](deltas, [1] * 5)["x"].item() == 3.0
    assert AGGREGATORS["trimmed-mean"](deltas, [1] * 5)["x"].item() == pytest.approx(3.0)  # drops 1 and 100


def test_server_optimizers_follow_their_update_rules():
    d1, d2 = {"w": torch.tensor([0.5, -1.0])}, {"w": torch.tensor([0.1, 0.3])}
    assert torch.equal(ServerOptimizer("sgd", lr=0.5).step(d1)["w"], torch.tensor([0.25, -0.5]))

    momentum = ServerOptimizer("momentum", lr=1.0, beta1=0.9)
    momentum.step(d1)
    torch.testing.assert_close(momentum.step(d2)["w"], 0.9 * d1["w"] + d2["w"])

    for rule in ("adam", "yogi"):
        opt = ServerOptimizer(rule, lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
        m = v = torch.zeros(2, dtype=torch.float64)
        for d in (d1["w"].double(), d2["w"].double()):
            m = 0.9 * m + 0.1 * d
            v = 0.99 * v + 0.01 * d * d if rule == "adam" else v - 0.01 * d * d * torch.sign(v - d * d)
            expected = 0.1 * m / (v.sqrt() + 1e-3)
            torch.testing.assert_close(opt.step({"w": d.float()})["w"], expected.float())


def test_fedprox_keeps_the_client_near_the_global_model(medmnist_root):
    info = task_info("breastmnist")
    data = load_split("breastmnist", "train", data_root=str(medmnist_root)).subset(torch.arange(128).numpy())
    drift = {}
    for mu in (0.0, 10.0):
        cfg = RunConfig.from_mapping({"model": "resnet10t", "peft": "norm", "data-root": str(medmnist_root)})
        model = build_model(cfg, info)
        start = adapter_state(model)
        train(model, data, info, epochs=2, batch_size=32, lr=0.05, weight_decay=0.0, device=pick_device("cpu"),
              seed=0, prox_mu=mu)
        end = adapter_state(model)
        drift[mu] = sum((end[k] - start[k]).pow(2).sum().item() for k in start if "running" not in k)
    assert drift[10.0] < 0.8 * drift[0.0]


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


def test_ffa_sends_only_b_and_its_mean_is_exact(medmnist_root):
    """Frozen-A LoRA: A is regenerated from the seed on every node, so only B travels, and the mean
    of the clients' B deltas gives exactly the mean of their s·B·A updates."""
    cfg = RunConfig.from_mapping({"model": "resnet10t", "peft": "lora", "aggregation": "ffa"})
    plain = RunConfig.from_mapping({"model": "resnet10t", "peft": "lora"})
    info = task_info("breastmnist")
    a, b = build_model(cfg, info), build_model(cfg, info)
    sent = adapter_state(a)
    assert not [k for k in sent if k.endswith("lora_A")] and [k for k in sent if k.endswith("lora_B")]
    assert payload_bytes(pack(sent)) < 0.6 * payload_bytes(pack(adapter_state(build_model(plain, info))))
    layer_a, layer_b = a.layer1[0].conv1, b.layer1[0].conv1
    assert torch.equal(layer_a.lora_A, layer_b.lora_A)  # same A on every node, never sent
    deltas = [{"B": torch.randn_like(layer_a.lora_B)} for _ in range(3)]
    mean_b = AGGREGATORS["ffa"](deltas, [1.0, 2.0, 3.0])["B"]
    per_client = [layer_a.scaling * (d["B"] @ layer_a.lora_A.flatten(1)) for d in deltas]
    exact = (1 * per_client[0] + 2 * per_client[1] + 3 * per_client[2]) / 6
    torch.testing.assert_close(layer_a.scaling * (mean_b @ layer_a.lora_A.flatten(1)), exact, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("peft", ["vera+norm", "dora", "bitfit+norm"])
def test_adapters_are_selectable_from_the_run_config(peft):
    cfg = RunConfig.from_mapping({"model": "vit_tiny_patch16_224", "peft": peft})
    model = build_model(cfg, task_info("breastmnist"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"head.weight", "head.bias"} <= trainable and len(trainable) > 2


def test_peft_combinations_are_checked():
    with pytest.raises(Exception, match=r"at most one of dora/lora/vera"):
        RunConfig.from_mapping({"peft": "lora+dora"})


def test_galore_optimizer_from_the_run_config():
    from fedmeld.task.model import make_optimizer
    from fedmeld.peft import GaLoreAdamW

    cfg = RunConfig.from_mapping({"model": "resnet10t", "peft": "full", "optimizer": "galore-adamw", "galore-rank": 4})
    opt = make_optimizer(build_model(cfg, task_info("breastmnist")), cfg)
    assert isinstance(opt, GaLoreAdamW) and opt.param_groups[0]["rank"] == 4



def _factors(ranks: tuple[int, ...], out: int = 6, inp: int = 5, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"l/B": torch.randn(out, r, generator=g), "l/A": torch.randn(r, inp, generator=g)} for r in ranks]


@pytest.mark.parametrize("ranks", [(4, 4, 4), (2, 4, 8)])
def test_exact_equals_the_mean_of_products_and_fedavg_does_not(ranks):
    clients, weights = _factors(ranks), [1.0, 2.0, 5.0]
    by_hand = sum(w * (c["l/B"] @ c["l/A"]) for c, w in zip(clients, weights)) / sum(weights)
    stacked = AGGREGATORS["exact"](clients, weights)
    assert stacked["l/A"].shape[0] == sum(ranks)  # rank of the update: the sum of the client ranks
    assert (stacked["l/B"] @ stacked["l/A"] - by_hand).abs().max() <= 1e-5
    if len(set(ranks)) == 1:  # fedavg needs equal shapes: it averages A and B apart
        mean = AGGREGATORS["fedavg"](clients, weights)
        assert (mean["l/B"] @ mean["l/A"] - by_hand).abs().max() > 1e-2


def test_exact_merges_mixed_ranks_into_the_backbone():
    """What the server of aggregation=exact does with the stacked factors: the backbone moves by
    exactly the weighted mean of the clients' products, whatever their ranks."""
    from fedmeld.task.backbone_merge import BackboneMergeServer

    clients = _factors((2, 4, 8), out=4, inp=6)
    server = BackboneMergeServer({"l.weight": torch.ones(4, 6)}, {})
    server.aggregate([({f"factor/{k}": v for k, v in c.items()}, w) for c, w in zip(clients, (1.0, 1.0, 2.0))])
    by_hand = (clients[0]["l/B"] @ clients[0]["l/A"] + clients[1]["l/B"] @ clients[1]["l/A"]
               + 2 * clients[2]["l/B"] @ clients[2]["l/A"]) / 4
    assert (server.backbone.base["l.weight"] - 1 - by_hand).abs().max() <= 1e-5


def test_client_ranks_are_cycled_with_one_scale_and_checked():
    cfg = RunConfig.from_mapping({"peft": "lora+norm", "client-ranks": "4,8,16", "lora-alpha": 16.0})
    assert [cfg.for_client(p).lora_rank for p in range(4)] == [4, 8, 16, 4]
    assert cfg.for_client(None).lora_rank == 16
    assert {c.lora_alpha / c.lora_rank for c in map(cfg.for_client, (0, 1, 2, None))} == {1.0}
    for bad in ({"client-ranks": "4,x"}, {"client-ranks": "4,0"}, {"client-ranks": "4,8", "aggregation": "median"},
                {"client-ranks": "4,8", "peft": "vera"}, {"aggregation": "exact", "peft": "norm"},
                {"aggregation": "exact", "proximal-mu": 0.1}, {"aggregation": "exact", "server-optimizer": "adam"}):
        with pytest.raises(ConfigError):
            RunConfig.from_mapping({"peft": "lora", **bad})


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


def test_exact_federation_with_mixed_ranks(medmnist_root, tmp_path):
    """aggregation=exact with client-ranks through Flower (in-process Grid): every client's replica
    equals the server's backbone after every round, uploads are each client's own factors plus its
    norm and head deltas, and the backbone moves."""
    import json

    from fedmeld.simulations.run import load_config, simulate

    cfg = load_config(None, [f'data-root="{medmnist_root}"', f'out="{tmp_path}"', 'run-name="exact"',
                             'model="resnet10t"', 'peft="lora+norm"', 'aggregation="exact"', 'client-ranks="2,4"',
                             "num-clients=2", "num-server-rounds=2", "local-epochs=1", 'device="cpu"'])
    run = simulate(cfg, backend="inprocess")
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    from fedmeld.task.backbone_merge import base_state, build_merge_model, dense_state
    from fedmeld.task.wire import nbytes

    info = task_info(cfg.dataset)
    shapes = {k: (v.shape[0], v[0].numel()) for k, v in base_state(build_merge_model(cfg, info)).items()}
    dense = nbytes(dense_state(build_merge_model(cfg, info)))
    upload = sum(4 * r * (o + i) for r in (2, 4) for o, i in shapes.values()) + 2 * dense
    for record in rounds:
        assert record["num_clients_ok"] == 2 and record["backbone_checksum_rel_diff"] < 1e-9
        assert upload < record["bytes_up"] < upload * 1.05
    assert summary["final_test_auc"] != summary["initial_test_auc"]
