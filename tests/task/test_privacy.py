"""task/privacy.py: per-example gradients of our adapters equal a per-example loop; DP-SGD without
noise and clipping is plain SGD on the same batches; the ledger's ε is Opacus's; BatchNorm that
trains its statistics is refused; client-level DP clips and charges."""

from __future__ import annotations

import math

import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from fedmeld.peft.lora import LoRALinear
from fedmeld.task.config import ConfigError, RunConfig
from fedmeld.task.data import Split, TaskInfo
from fedmeld.task.engine import loss_fn, train
from fedmeld.task.privacy import (CLIENTS, ClientDP, DPPlan, DPSettings, Ledger, NoiseSource, PrivateOptimizer,
                                  check_model, clip_and_noise, per_sample_grads)

INFO = TaskInfo(flag="toy", task="multi-class", num_classes=3, in_chans=3)
CPU = torch.device("cpu")


def _loop_grads(model, x, y) -> dict[str, torch.Tensor]:
    """The reference: one ordinary forward/backward per example (LoRA through its fused path)."""
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    per = {n: [] for n in named}
    for i in range(len(x)):
        model.zero_grad(set_to_none=True)
        loss_fn(model(x[i:i + 1]), y[i:i + 1], INFO).backward()
        for n, p in named.items():
            per[n].append(p.grad.detach().clone())
    return {n: torch.stack(g) for n, g in per.items()}


@pytest.mark.parametrize("family,method,freeze_a", [
    ("vit", "lora+norm+head", False),  # fused LoRALinear (GELU folded into fc2), LayerNorm, head
    ("vit", "lora+head", True),  # frozen-A LoRA: only B trains
    ("convnext-linear", "lora+norm+head", False),  # Linear LoRA, LayerNorm
    ("convnext", "lora+norm+head", False),  # 1x1 LoRAConv2d, LayerNorm2d
    ("resnet", "lora+norm+head", False),  # 3x3 LoRAConv2d, BatchNorm γ/β with frozen statistics
])
def test_per_sample_grads_equal_a_per_example_loop(family, method, freeze_a, adapted, perturb_adapters, images):
    model = adapted(family, method, lora_freeze_a=freeze_a, bn_stats="frozen")
    perturb_adapters(model)  # B != 0, so A has gradients too
    fused = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert all(m.fast for m in fused)
    x, y = images(3), torch.tensor([[0], [2], [1]])
    got, losses, logits = per_sample_grads(model, x, y, INFO, CPU)
    want = _loop_grads(model, x, y)
    assert got.keys() == want.keys() and len(got) > 2
    if freeze_a:
        assert not any("lora_A" in n for n in got) and any("lora_B" in n for n in got)
    for name in want:
        assert want[name].abs().max() > 0, name
        assert (got[name] - want[name]).abs().max() <= 1e-5, name
    assert torch.allclose(losses, torch.stack([loss_fn(model(x[i:i + 1]), y[i:i + 1], INFO) for i in range(3)]),
                          atol=1e-6)
    assert logits.shape == (3, 3)
    assert all(m.fast for m in fused)  # the fused path is restored afterwards


def test_clipping_bounds_each_example_and_is_a_no_op_at_infinity():
    grads = {"a": torch.tensor([[3.0, 0.0], [0.3, 0.0]]), "b": torch.tensor([[4.0], [0.4]])}  # norms 5 and 0.5
    like = {"a": torch.zeros(2), "b": torch.zeros(1)}
    source = NoiseSource(0, secure=False, device=CPU)
    clipped = clip_and_noise(grads, 1.0, 0.0, 1.0, source, like)  # the first example scaled to norm 1
    assert torch.allclose(clipped["a"], torch.tensor([0.6 + 0.3, 0.0]), atol=1e-6)
    assert torch.allclose(clipped["b"], torch.tensor([0.8 + 0.4]), atol=1e-6)
    plain = clip_and_noise(grads, math.inf, 0.0, 2.0, source, like)
    assert torch.equal(plain["a"], grads["a"].sum(0) / 2) and torch.equal(plain["b"], grads["b"].sum(0) / 2)


@pytest.mark.parametrize("secure", [False, True])
def test_noise_has_the_std_sigma_times_clip(secure):
    source = NoiseSource(0, secure=secure, device=CPU)
    noised = clip_and_noise({}, 2.0, 1.5, 1.0, source, {"w": torch.zeros(200_000)})["w"]
    assert abs(noised.mean()) < 0.03 and abs(noised.std() - 3.0) < 0.03


def _split(n: int = 24) -> Split:
    g = torch.Generator().manual_seed(3)
    return Split(torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
                 torch.randint(0, 3, (n, 1), generator=g))


def test_no_noise_and_no_clipping_is_plain_sgd_on_the_same_batches(adapted, perturb_adapters):
    """DP-SGD with sigma 0 and clip inf, against an ordinary loop that draws the same Poisson batches and
    minimises the summed loss over the expected batch size."""
    data, seed, batch, epochs = _split(), 7, 8, 2
    models = [adapted("vit", "lora+norm+head") for _ in range(2)]
    for m in models:
        perturb_adapters(m)
    models[1].load_state_dict(models[0].state_dict())
    initial = [p.detach().clone() for p in models[0].parameters()]
    settings = DPSettings(clip=math.inf, noise=0.0, epsilon=0.0, delta=1e-5, rounds=1, secure_rng=False)
    params = [p for p in models[0].parameters() if p.requires_grad]
    stats = train(models[0], data, INFO, epochs=epochs, batch_size=batch, lr=0.1, weight_decay=0.0, device=CPU,
                  seed=seed, optimizer=PrivateOptimizer(torch.optim.SGD(params, lr=0.1), settings))
    plan = settings.plan(len(data), batch, epochs)
    assert stats["dp_steps"] == plan.steps == 6 and stats["dp_round_epsilon"] == math.inf

    from fedmeld.task.engine import Inputs
    ref = models[1].train()
    opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.1)
    source, inputs, seen = NoiseSource(seed, secure=False, device=CPU), Inputs(), 0
    for _ in range(plan.steps):
        idx = source.poisson(len(data), plan.sample_rate)
        opt.zero_grad()
        logits = ref(inputs(data.images[idx], CPU))
        loss = torch.nn.functional.cross_entropy(logits, data.labels[idx][:, 0], reduction="sum")
        (loss / (plan.sample_rate * len(data))).backward()
        opt.step()
        seen += len(idx)
    assert stats["samples_seen"] == seen
    moved = 0.0
    for (name, a), b, start in zip(models[0].named_parameters(), ref.parameters(), initial):
        if a.requires_grad:
            assert (a - b).abs().max() <= 1e-5, name
            moved = max(moved, float((a - start).detach().abs().max()))
    assert moved > 1e-3  # both trained


def test_the_ledger_composes_rounds_as_opacus_computes_them_directly():
    plan, delta, rounds = DPPlan(sample_rate=0.25, steps=8, noise_multiplier=1.1), 1e-5, 5
    ledger = Ledger()
    for _ in range(rounds):
        ledger.charge("3", plan)
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = rdp_analysis.compute_rdp(q=0.25, noise_multiplier=1.1, steps=8 * rounds, orders=orders)
    direct, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    assert ledger.epsilon("3", delta) == pytest.approx(float(direct), rel=1e-12)
    assert ledger.epsilon("3", delta, then=plan) > ledger.epsilon("3", delta)  # one more round costs
    assert Ledger(ledger.to_json()).epsilon("3", delta) == ledger.epsilon("3", delta)  # JSON round trip
    assert ledger.max_epsilon(delta) == ledger.epsilon("3", delta) and Ledger().max_epsilon(delta) == 0


def test_a_target_epsilon_gives_each_client_a_sigma_that_spends_it_over_the_planned_rounds():
    settings = DPSettings(clip=1.0, noise=0.0, epsilon=3.0, delta=1e-5, rounds=4, secure_rng=False)
    plan = settings.plan(num_examples=120, batch_size=32, epochs=2)
    assert (plan.sample_rate, plan.steps) == (32 / 120, 8)
    ledger = Ledger()
    for _ in range(4):
        ledger.charge("0", plan)
    assert 2.95 <= ledger.epsilon("0", 1e-5) <= 3.0


def test_batchnorm_that_trains_its_statistics_is_refused(adapted):
    with pytest.raises(ConfigError, match="bn-stats=frozen"):
        check_model(adapted("resnet", "lora+norm+head"))
    check_model(adapted("resnet", "lora+norm+head", bn_stats="frozen"))
    check_model(adapted("vit", "lora+norm+head"))


def test_client_level_dp_clips_each_update_weighs_clients_equally_and_charges_the_ledger():
    ledger = Ledger()
    rule = ClientDP(clip=1.0, noise=0.0, expected_clients=2, ledger=ledger)
    big, small = {"w": torch.tensor([30.0, 40.0])}, {"w": torch.tensor([0.3, 0.4])}
    out = rule([big, small], [1000.0, 1.0])  # example counts are ignored
    assert torch.allclose(out["w"], (torch.tensor([0.6, 0.8]) + small["w"]) / 2)
    noisy = ClientDP(clip=1.0, noise=2.0, expected_clients=2, ledger=ledger)
    assert not torch.equal(noisy([big, small], [1.0, 1.0])["w"], out["w"])
    assert ledger.histories[CLIENTS] == [[0.0, 1.0, 1], [2.0, 1.0, 1]]
    assert ledger.epsilon(CLIENTS, 1e-5) == math.inf  # a release without noise spends everything
    accountant = RDPAccountant()
    accountant.history = [(2.0, 1.0, 3)]  # three releases at z = 2, no amplification
    assert Ledger({CLIENTS: [[2.0, 1.0, 3]]}).epsilon(CLIENTS, 1e-5) == accountant.get_epsilon(delta=1e-5)


@pytest.mark.parametrize("overrides,message", [
    ({"dp-noise": 1.0}, "need dp-clip"),
    ({"dp-clip": 1.0, "dp-noise": 1.0, "dp-epsilon": 3.0}, "not both"),
    ({"dp-clip": 1.0, "peft": "dora"}, "trains lora, norm and the head"),
    ({"dp-clip": 1.0, "aggregation": "exact"}, "delta protocol"),
    ({"dp-clip": 1.0, "compile": "default"}, "set compile=off"),
    ({"dp-max-epsilon": 3.0}, "need DP on"),
    ({"client-dp-clip": 1.0, "client-ranks": "4,8"}, "aggregation=fedavg or ffa without client-ranks"),
    ({"client-dp-noise": 1.0}, "needs client-dp-clip"),
])
def test_dp_keys_that_do_not_fit_together_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_mapping(overrides)
