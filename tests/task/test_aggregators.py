"""task/aggregators/: the aggregation rules (mean, robust, exact) by hand and under attack."""

from __future__ import annotations

import pytest
import torch

from fedmeld.peft import adapter_state
from fedmeld.task.aggregators import AGGREGATORS
from fedmeld.task.aggregators.mean import weighted_mean
from fedmeld.task.config import RunConfig
from fedmeld.task.data import task_info
from fedmeld.task.model import build_model
from fedmeld.task.wire import pack, payload_bytes


def test_weighted_mean_matches_hand_computation(toy_state):
    deltas, weights = [toy_state(1), toy_state(2), toy_state(3)], [10, 30, 60]
    mean = weighted_mean(deltas, weights)
    for name in deltas[0]:
        by_hand = (10 * deltas[0][name] + 30 * deltas[1][name] + 60 * deltas[2][name]) / 100
        torch.testing.assert_close(mean[name], by_hand, rtol=0, atol=1e-6)
    assert AGGREGATORS["fedavg"].fn is weighted_mean
    with pytest.raises(ValueError, match="one weight per delta"):
        weighted_mean(deltas, [1, 2])


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


@pytest.mark.parametrize("ranks", [(4, 4, 4), (2, 4, 8)])
def test_exact_equals_the_mean_of_products_and_fedavg_does_not(ranks, client_factors):
    clients, weights = client_factors(ranks), [1.0, 2.0, 5.0]
    by_hand = sum(w * (c["l/B"] @ c["l/A"]) for c, w in zip(clients, weights)) / sum(weights)
    stacked = AGGREGATORS["exact"](clients, weights)
    assert stacked["l/A"].shape[0] == sum(ranks)  # rank of the update: the sum of the client ranks
    assert (stacked["l/B"] @ stacked["l/A"] - by_hand).abs().max() <= 1e-5
    if len(set(ranks)) == 1:  # fedavg needs equal shapes: it averages A and B apart
        mean = AGGREGATORS["fedavg"](clients, weights)
        assert (mean["l/B"] @ mean["l/A"] - by_hand).abs().max() > 1e-2


# --- robust rules that score the weight update s·B·A: krum, multi-krum, clipped-mean ----------------

from fedmeld.server.delta import DeltaProtocol  # noqa: E402
from fedmeld.server.strategy import Reply  # noqa: E402
from fedmeld.task.aggregators import RuleSettings  # noqa: E402
from fedmeld.task.aggregators.clipped import clip_factors  # noqa: E402
from fedmeld.task.aggregators.direction import against, median_cosines, remembered  # noqa: E402
from fedmeld.task.aggregators.effective import geometry  # noqa: E402
from fedmeld.task.aggregators.krum import krum_scores  # noqa: E402
from fedmeld.task.config import ConfigError, RunConfig  # noqa: E402

SCALE = 2.0  # LoRA's s = alpha / r in these cases


def _lora_round(honest: int, seed: int = 0) -> tuple[dict, list[dict]]:
    """A global state with one LoRA layer and a norm vector, and ``honest`` clients' deltas that
    share a direction (each with its own small noise)."""
    g = torch.Generator().manual_seed(seed)
    glob = {"l.lora_A": torch.randn(4, 6, generator=g), "l.lora_B": 0.1 * torch.randn(5, 4, generator=g),
            "n.weight": torch.randn(5, generator=g)}
    common = {k: 0.05 * torch.randn(v.shape, generator=g) for k, v in glob.items()}
    return glob, [{k: v + 0.005 * torch.randn(v.shape, generator=g) for k, v in common.items()} for _ in range(honest)]


def _effective(delta: dict, glob: dict) -> torch.Tensor:
    """A client's update of the effective weights, by hand: s·((B+dB)(A+dA) − BA) and the norm delta."""
    a, b = glob["l.lora_A"].double(), glob["l.lora_B"].double()
    da, db = delta["l.lora_A"].double(), delta["l.lora_B"].double()
    return torch.cat([(SCALE * ((b + db) @ (a + da) - b @ a)).flatten(), delta["n.weight"].double()])


def _rule(name: str, **settings):
    return AGGREGATORS[name].configured(RuleSettings(lora_scaling=SCALE, **settings))


def test_krum_picks_an_honest_client_among_colluding_outliers():
    glob, honest = _lora_round(5)
    flipped = {k: -5 * v for k, v in honest[0].items()}
    deltas = [flipped, *honest[:3], flipped, *honest[3:]]  # two identical attackers: each other's nearest
    weights = [500.0, 10, 20, 30, 500, 40, 50]  # they also claim the most examples
    out = _rule("krum", byzantine=2)(deltas, weights, glob)
    assert any(all(torch.equal(out[k], h[k]) for k in out) for h in honest)
    scores = krum_scores(geometry(deltas, glob, SCALE, "krum").sq_dist, 2)
    assert scores[0] > scores[1:4].max() and scores[4] > scores[5:].max()
    assert (AGGREGATORS["fedavg"](deltas, weights)["n.weight"] * honest[0]["n.weight"]).sum() < 0  # fedavg follows them


def test_multi_krum_averages_the_m_best_by_example_weight():
    glob, honest = _lora_round(5)
    scaled_up = {k: 10 * v for k, v in honest[1].items()}
    noise = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(3)) for k, v in honest[0].items()}
    deltas, weights = [*honest, scaled_up, noise], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    out = _rule("multi-krum", byzantine=2)(deltas, weights, glob)  # m = n - f = 5: exactly the honest ones
    expected = weighted_mean(honest, weights[:5])
    assert all(torch.allclose(out[k], expected[k], atol=1e-7) for k in out)
    two = _rule("multi-krum", byzantine=2, krum_keep=2)(deltas, weights, glob)
    scores = krum_scores(geometry(deltas, glob, SCALE, "multi-krum").sq_dist, 2)
    best = scores.argsort()[:2].tolist()
    assert set(best) < set(range(5))
    expected = weighted_mean([deltas[i] for i in best], [weights[i] for i in best])
    assert all(torch.allclose(two[k], expected[k], atol=1e-7) for k in two)


def test_clipped_mean_bounds_each_clients_effective_update():
    glob, honest = _lora_round(4)
    attacker = {k: 1000 * v for k, v in honest[0].items()}
    deltas, weights = [*honest, attacker], [10.0, 20.0, 30.0, 40.0, 50.0]
    norms = torch.stack([_effective(d, glob).norm() for d in deltas])
    bound = float(norms[:4].max()) * 1.01  # every honest client is within it
    lam = clip_factors(geometry(deltas, glob, SCALE, "clipped-mean"), bound)
    assert lam[:4].tolist() == [1.0] * 4 and 0 < lam[4] < 0.01
    clipped = {k: v * lam[4].item() for k, v in attacker.items()}
    assert bound * (1 - 1e-6) <= _effective(clipped, glob).norm() <= bound * (1 + 1e-6)  # on it (float32 deltas)
    out = _rule("clipped-mean", clip_norm=bound)(deltas, weights, glob)
    expected = weighted_mean([*honest, clipped], weights)
    assert all(torch.allclose(out[k], expected[k], atol=1e-7) for k in out)
    # without clip-norm the bound is the round's median norm: the honest clients above it shrink too
    adaptive = clip_factors(geometry(deltas, glob, SCALE, "clipped-mean"), float(norms.median()))
    assert (adaptive[norms <= norms.median()] == 1).all() and (adaptive[norms > norms.median()] < 1).all()


def test_the_clip_bounds_what_trains_not_the_batchnorm_statistics():
    """Running variances travel honest even from an attacker (task/attacks.py) and their deltas dwarf the
    trained ones; the norm the bound applies to leaves them out, so a reply scaled ×10 is clipped to the
    honest trained norm (factor ≈ 0.1), not let through at several times it behind the statistics."""
    glob, honest = _lora_round(4)
    g = torch.Generator().manual_seed(3)
    stats = [{"bn.running_var": 50 * torch.randn(64, generator=g), "bn.running_mean": torch.randn(64, generator=g)}
             for _ in range(5)]
    scaled10 = {**{k: 10 * v for k, v in honest[0].items()}, "bn.running_mean": 10 * stats[4]["bn.running_mean"],
                "bn.running_var": stats[4]["bn.running_var"]}
    deltas = [{**d, **st} for d, st in zip(honest, stats)] + [scaled10]
    geo = geometry(deltas, glob, SCALE, "clipped-mean")
    trained = torch.stack([_effective(d, glob).norm() for d in [*honest, {k: 10 * v for k, v in honest[0].items()}]])
    torch.testing.assert_close(geo.norms(), trained)  # the statistics are not in it
    lam = clip_factors(geo, float(trained[:4].max()))
    assert lam[:4].tolist() == [1.0] * 4 and lam[4] < 0.12
    with_stats = (geo.gram.diagonal().sqrt() / trained)  # the whole update's norm: the statistics dominate it
    assert (with_stats > 5).all()


def test_direction_clipped_mean_drops_a_sign_flipped_reply_and_clips_the_rest():
    """A reply that points against the others (−5× an honest update) is dropped, where clipped-mean
    only shrinks it to the median norm and keeps its pull; with nobody against, it is clipped-mean."""
    glob, honest = _lora_round(4)
    flipped = {k: -5 * v for k, v in honest[0].items()}
    deltas, weights = [*honest, flipped], [10.0, 20.0, 30.0, 40.0, 50.0]
    cosines = median_cosines(geometry(deltas, glob, SCALE, "x"))
    assert (cosines[:4] > 0.5).all() and cosines[4] < -0.5
    shared = torch.full((64,), 3.0)  # running variances, sent honest by every client: not part of the score
    with_stats = [{**d, "bn.running_var": shared + 0.01 * i} for i, d in enumerate(deltas)]
    torch.testing.assert_close(median_cosines(geometry(with_stats, glob, SCALE, "x")), cosines)
    out = _rule("direction-clipped-mean")(deltas, weights, glob)
    honest_norms = torch.stack([_effective(d, glob).norm() for d in honest])
    kept = clip_factors(geometry(honest, glob, SCALE, "x"), float(honest_norms.quantile(0.5)))  # even: mid two
    expected = weighted_mean([{k: v * lam.item() for k, v in d.items()} for d, lam in zip(honest, kept)], weights[:4])
    assert all(torch.allclose(out[k], expected[k], atol=1e-7) for k in out)
    plain = _rule("clipped-mean")(deltas, weights, glob)  # the flipped reply still counts there
    assert (plain["n.weight"] - expected["n.weight"]).norm() > 2 * (out["n.weight"] - expected["n.weight"]).norm()
    nobody = _rule("direction-clipped-mean")(honest, weights[:4], glob)  # nobody against: clipped-mean
    assert all(torch.equal(nobody[k], v) for k, v in _rule("clipped-mean")(honest, weights[:4], glob).items())
    # the Byzantine budget: two flipped replies with robust-f = 1 lose only the one most against
    two = [*honest, flipped, {k: -4 * v for k, v in honest[1].items()}]
    assert against(median_cosines(geometry(two, glob, SCALE, "x")), 1) == [4]
    assert against(median_cosines(geometry(two, glob, SCALE, "x")), 2) == [4, 5]
    with pytest.raises(ValueError, match=r"direction-clipped-mean needs at least 4 replies"):
        _rule("direction-clipped-mean")(honest[:3], weights[:3], glob)


def test_direction_z_drops_only_outliers_below_the_rounds_cosines():
    """Eight small honest clients agree weakly (median cosines near 0, some just below it): direction-z keeps
    them, where the plain sign test drops the f most negative; two clearly opposed replies go either way."""
    weak = torch.tensor([0.008, 0.016, 0.026, -0.012, 0.045, 0.008, 0.014, -0.010], dtype=torch.float64)
    assert against(weak, 2) == [3, 7]
    assert against(weak, 2, z=2.0) == []
    opposed = torch.tensor([-0.090, -0.101, 0.088, 0.079, 0.088, 0.046, 0.079, 0.063], dtype=torch.float64)
    assert against(opposed, 2) == against(opposed, 2, z=2.0) == [0, 1]
    # the threshold never rises above 0: a reply pointing the others' way is kept however far below it lies
    spread = torch.tensor([0.9, 0.9, 0.9, 0.9, 0.9, 0.01], dtype=torch.float64)
    assert against(spread, 1, z=2.0) == []
    cfg = RunConfig.from_mapping({"aggregation": "direction-clipped-mean", "direction-z": 2.0, "min-clients": 4})
    assert cfg.aggregator.fn.keywords["settings"].direction_z == 2.0  # the key reaches the rule
    with pytest.raises(ConfigError, match="direction-z"):
        RunConfig.from_mapping({"direction-z": -1})


# median cosines the H200 drill run logged (simulations/results/h200_2026-12-02/drills-direction/runs/
# 2of8_iid_direction-clipped-mean_{sign-flip5,clean}_seed0/aggregator.log): 8 clients of ~68 BreastMNIST images,
# partitions 0 and 1 send -5x their delta under sign flip; one row per round
SIGN_FLIP_2OF8 = [[-0.106, -0.144, 0.0807, 0.0715, 0.112, 0.0807, 0.0971, 0.0871],
                  [-0.132, -0.0836, 0.0912, 0.0356, 0.125, -0.0118, 0.11, 0.0356],
                  [0.0131, 0.0238, -0.0175, -0.081, 0.0147, 0.0219, 0.0359, 0.0219],
                  [-0.0719, -0.0136, 0.0203, 0.00945, 0.0184, 0.0318, 0.00971, 0.0257],
                  [0.0432, 0.0419, 0.0719, -0.0276, 0.0432, 0.0998, 0.0405, 0.0996],
                  [0.000505, 0.0142, 0.0236, -0.0297, 0.0907, 0.0389, 0.0142, 0.0722],
                  [-0.0344, -0.0214, 0.00536, -0.0222, -0.00696, 0.0376, -0.0214, -0.0159],
                  [0.0309, 0.00193, 0.00599, -0.0127, 0.0156, 0.0219, -0.0127, 0.035]]
CLEAN_2OF8 = [[0.127, 0.144, 0.112, 0.0775, 0.112, 0.0807, 0.114, 0.102],
              [0.173, 0.141, 0.198, 0.0861, 0.144, 0.0291, 0.124, 0.137],
              [0.0228, 0.0361, 0.0269, -0.0237, 0.0196, 0.0253, 0.0036, 0.0143],
              [0.212, 0.0762, 0.175, -0.0479, 0.212, 0.195, 0.234, 0.172],
              [0.0749, 0.0656, 0.0656, 0.00935, 0.0528, 0.104, 0.0456, 0.0895],
              [0.00406, 0.0259, 0.0325, -0.0314, 0.0219, 0.0325, 0.0566, 0.0622],
              [0.0188, 0.0171, -0.0151, 0.0244, -0.000429, 0.0513, -0.000429, 0.0388],
              [0.0647, 0.0647, 0.0232, -0.0269, 0.0669, 0.0357, 0.0267, 0.0374]]


def _replay(rounds: list[list[float]], beta: float) -> list[list[int]]:
    """What the rule drops each round (f = 2) when its clients' median cosines are ``rounds``."""
    memory: dict[str, float] = {}
    clients = [f"partition {i}" for i in range(8)]
    return [against(remembered(torch.tensor(r, dtype=torch.float64), clients, memory, beta), 2) for r in rounds]


def test_direction_memory_finds_attackers_that_single_rounds_miss():
    """One round's cosines among 8 small clients miss the attackers (from round 3 the rule dropped honest
    partitions 2, 3 and 6 and kept an attacker); their sum over rounds drops exactly partitions 0 and 1 in
    every round, and in the clean run the sum drops nobody. β = 0 is the rule without memory."""
    alone = _replay(SIGN_FLIP_2OF8, 0.0)
    assert alone[:2] == [[0, 1], [0, 1]] and alone[2] == [2, 3] and sum(r == [0, 1] for r in alone) == 3
    assert _replay(SIGN_FLIP_2OF8, 1.0) == [[0, 1]] * 8
    assert _replay(SIGN_FLIP_2OF8, 0.8)[:5] == [[0, 1]] * 5  # forgets: a round 5 back counts 0.8^5 = 0.33
    assert _replay(CLEAN_2OF8, 1.0) == [[]] * 8
    assert sum(map(len, _replay(CLEAN_2OF8, 0.0))) == 6  # without memory it drops honest clients


def test_direction_memory_is_kept_per_client_and_through_a_checkpoint(toy_state):
    """The delta protocol hands the rule each reply's client and keeps the scores as protocol metadata:
    a protocol restored from round 1's checkpoint aggregates round 2 as the uninterrupted one does."""
    glob, honest = _lora_round(5)
    flipped = {k: -5 * v for k, v in honest[0].items()}
    rule = _rule("direction-clipped-mean", direction_memory=1.0)
    rounds = [[*honest, flipped], [flipped, *honest]]  # the attacker replies first in round 2
    clients = [[f"partition {i}" for i in range(6)], ["partition 5", *(f"partition {i}" for i in range(5))]]

    def replies(i: int) -> list[Reply]:
        return [Reply(node, d, 10.0, {}, partition=int(c.split()[1]))
                for node, (d, c) in enumerate(zip(rounds[i], clients[i]))]

    whole = DeltaProtocol(dict(glob), rule)
    whole.aggregate(replies(0))
    cosines = median_cosines(geometry(rounds[0], glob, SCALE, "x"))
    assert whole.memory == {c: pytest.approx(v) for c, v in zip(clients[0], cosines.tolist())}
    extra, meta = whole.extra_state()
    resumed = DeltaProtocol(dict(glob), rule)
    resumed.restore({k: v.clone() for k, v in whole.global_state().items()}, extra, meta)
    for protocol in (whole, resumed):
        protocol.aggregate(replies(1))
    assert resumed.memory == whole.memory and whole.memory["partition 5"] < 2 * cosines[5].item() < 0
    assert all(torch.equal(whole.state[k], resumed.state[k]) for k in whole.state)
    with pytest.raises(ValueError, match="one client per reply"):
        rule(rounds[0], [1.0] * 6, glob, ["partition 0"] * 6, {})
    cfg = RunConfig.from_mapping({"aggregation": "direction-clipped-mean", "direction-memory": 0.5, "min-clients": 4})
    assert cfg.aggregator.fn.keywords["settings"].direction_memory == 0.5  # the key reaches the rule
    for bad in ({"direction-memory": 1.5}, {"direction-memory": 1.0},  # out of range; fedavg keeps no scores
                {"direction-memory": 1.0, "aggregation": "direction-clipped-mean", "peft": "lte", "min-clients": 4}):
        with pytest.raises(ConfigError, match="direction-memory"):
            RunConfig.from_mapping(bad)


def test_scores_see_the_weight_update_not_the_factors():
    """Two clients whose factors differ but whose B·A products are equal (B' = B·M, A' = M⁻¹·A) make
    the same weight update: every robust score treats them as one; their factor deltas are far apart."""
    glob, deltas = _lora_round(5)
    glob, deltas = {k: v.double() for k, v in glob.items()}, [{k: v.double() for k, v in d.items()} for d in deltas]
    m = torch.eye(4, dtype=torch.float64) * 2 + 0.3 * torch.randn(4, 4, generator=torch.Generator().manual_seed(1),
                                                                  dtype=torch.float64)
    b, a = glob["l.lora_B"] + deltas[0]["l.lora_B"], glob["l.lora_A"] + deltas[0]["l.lora_A"]
    twin = {"l.lora_B": b @ m - glob["l.lora_B"], "l.lora_A": torch.linalg.solve(m, a) - glob["l.lora_A"],
            "n.weight": deltas[0]["n.weight"]}
    assert (twin["l.lora_A"] - deltas[0]["l.lora_A"]).norm() > 1  # far apart as factors
    deltas[1] = twin
    geo = geometry(deltas, glob, SCALE, "krum")
    assert geo.sq_dist[0, 1] < 1e-20 and geo.norms()[0] == pytest.approx(geo.norms()[1].item(), rel=1e-12)
    assert geo.norms()[0] == pytest.approx(_effective(deltas[0], glob).norm().item(), rel=1e-12)
    by_hand = (_effective(deltas[0], glob) - _effective(deltas[2], glob)).square().sum()
    assert geo.sq_dist[0, 2] == pytest.approx(by_hand.item(), rel=1e-9)
    scores = krum_scores(geo.sq_dist, 1)
    assert scores[0] == pytest.approx(scores[1].item(), rel=1e-9)
    as_factors = geometry([{k.replace(".lora_", "_"): v for k, v in d.items()} for d in deltas], None, SCALE, "krum")
    assert as_factors.sq_dist[0, 1] > 1  # what scoring A and B apart would see


def test_krum_in_the_delta_protocol_scores_against_the_global_adapters(medmnist_root):
    """The server's rule gets the run's settings and the global state: the round applies one honest
    client's delta to a real ResNet's LoRA + norm adapters."""
    cfg = RunConfig.from_mapping({"model": "resnet10t", "aggregation": "krum", "num-clients": 5, "min-clients": 5})
    protocol = DeltaProtocol.for_run(cfg, build_model(cfg, task_info("breastmnist")))
    start = dict(protocol.state)
    g = torch.Generator().manual_seed(0)
    common = {k: 0.01 * torch.randn(v.shape, generator=g) for k, v in start.items()}
    honest = [{k: v + 0.001 * torch.randn(v.shape, generator=g) for k, v in common.items()} for _ in range(4)]
    replies = [Reply(i, d, 100.0, None) for i, d in enumerate([{k: -5 * v for k, v in common.items()}, *honest])]
    protocol.aggregate(replies)
    applied = {k: protocol.state[k] - start[k] for k in start}
    assert any(all(torch.allclose(applied[k], h[k], atol=1e-6) for k in start) for h in honest)


def test_robust_rules_refuse_impossible_settings():
    glob, deltas = _lora_round(4)
    with pytest.raises(ValueError, match=r"krum needs at least 5 replies.*robust-f.*min-clients"):
        _rule("krum")(deltas, [1.0] * 4, glob)
    with pytest.raises(ValueError, match=r"trimmed-mean needs at least 5 replies"):
        _rule("trimmed-mean", byzantine=2)(deltas, [1.0] * 4, glob)
    with pytest.raises(ValueError, match="needs the global state"):
        _rule("clipped-mean")(deltas, [1.0] * 4)
    for bad, named in (({"aggregation": "krum", "num-clients": 4}, "min-clients >= 5"),
                       ({"aggregation": "krum", "num-clients": 5}, "min-clients >= 5"),  # min-clients 2: too few
                       ({"aggregation": "krum", "num-clients": 10, "min-clients": 5, "fraction-train": 0.4},
                        "fraction-train"),
                       ({"aggregation": "multi-krum", "num-clients": 8, "min-clients": 8, "robust-f": 2, "krum-m": 7},
                        "krum-m=7 needs at least 9"),
                       ({"aggregation": "median", "num-clients": 2, "min-clients": 2}, "robust-f=1 needs at least 3")):
        with pytest.raises(ConfigError, match=named):
            RunConfig.from_mapping(bad)
    RunConfig.from_mapping({"aggregation": "krum", "num-clients": 5, "min-clients": 5})  # n = 2f + 3: fine
    RunConfig.from_mapping({"aggregation": "median", "num-clients": 2, "min-clients": 2, "robust-f": 0})


def test_trimmed_mean_drops_robust_f_values_at_each_side():
    deltas = [{"x": torch.tensor([v])} for v in (-90.0, 1.0, 2.0, 3.0, 4.0, 5.0, 100.0)]
    assert _rule("trimmed-mean", byzantine=2)(deltas, [1.0] * 7)["x"].item() == pytest.approx(3.0)  # mean of 2, 3, 4
    assert _rule("trimmed-mean", byzantine=1)(deltas, [1.0] * 7)["x"].item() == pytest.approx(3.0)  # 1..5
    assert _rule("trimmed-mean", byzantine=0)(deltas, [1.0] * 7)["x"].item() == pytest.approx(25 / 7)
    counted = [{**d, "steps": torch.tensor(i)} for i, d in enumerate(deltas)]  # an integer tensor, as median keeps it
    assert _rule("trimmed-mean", byzantine=2)(counted, [1.0] * 7)["steps"].item() == 0
    assert AGGREGATORS["median"](counted, [1.0] * 7)["steps"].item() == 0


def test_trimmed_mean_stays_within_the_honest_range_of_every_coordinate():
    """1 sign-flipped attacker (x5) of 5, robust-f=1: every coordinate of the trimmed mean lies between
    the smallest and largest honest value (the drills' −22 points under sign flip were not a trimming
    error; trimmed_mean_bias.py in simulations/results/drills_cpu_2026-12-01 measures its real rounds)."""
    glob, honest = _lora_round(4)
    flipped = {k: -5 * v for k, v in honest[0].items()}
    for deltas in ([flipped, *honest], [*honest[:2], flipped, *honest[2:]]):
        out = _rule("trimmed-mean", byzantine=1)(deltas, [1.0] * 5, glob)
        for k, v in out.items():
            values = torch.stack([h[k] for h in honest])
            assert (values.min(0).values - 1e-7 <= v).all() and (v <= values.max(0).values + 1e-7).all(), k
