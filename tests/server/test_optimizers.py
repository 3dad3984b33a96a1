"""server/optimizers.py: each server optimizer follows its update rule."""

from __future__ import annotations

import torch

from fedmeld.server.optimizers import ServerOptimizer


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
