"""task/fractal.py: the IFS categories and their rendered images are fixed by the seed, distinct from
one another, and varied within a category."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedmeld.task.fractal import FractalConfig, FractalImages, ifs_categories

CPU = torch.device("cpu")


def test_categories_and_batches_are_fixed_by_the_seed():
    maps, probs = ifs_categories(6, seed=3)
    again, _ = ifs_categories(6, seed=3)
    assert torch.equal(maps, again) and not torch.equal(maps, ifs_categories(6, seed=4)[0])
    assert torch.allclose(probs.sum(1), torch.ones(6)) and ((probs > 0).sum(1) >= 2).all()
    cfg = FractalConfig(categories=6, seed=3, resolution=24, particles=64, steps=20, warmup=5)
    a, b = FractalImages(cfg, CPU), FractalImages(cfg, CPU)
    (x1, y1), (x2, y2) = a.batch(7, 16), b.batch(7, 16)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x3, _ = a.batch(8, 16)
    assert not torch.equal(x1, x3)
    assert x1.shape == (16, 1, 24, 24) and x1.min() >= -1 and x1.max() <= 1


def test_a_linear_classifier_separates_the_categories():
    """10 categories, instances differing by FractalDB's map jitter: a linear model on the raw pixels
    of 30 images per category classifies 10 unseen ones per category far above chance (0.1)."""
    cfg = FractalConfig(categories=10, seed=0, resolution=32, particles=128, steps=40, augment="none")
    images = FractalImages(cfg, CPU)
    x, y = zip(*(images.batch(step, 100) for step in range(4)))
    x, y = torch.cat(x).flatten(1), torch.cat(y)
    assert len(set(y[:300].tolist())) == 10
    w = torch.zeros(x.shape[1], 10, requires_grad=True)
    b = torch.zeros(10, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=100)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x[:300] @ w + b, y[:300]) + 1e-3 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    accuracy = ((x[300:] @ w + b).argmax(1) == y[300:]).float().mean().item()
    assert accuracy > 0.8


def test_instances_of_a_category_differ():
    """The jitter and the augmentation: two draws of one category are never the same image."""
    for augment in ("none", "light", "full"):
        cfg = FractalConfig(categories=2, seed=0, resolution=32, particles=64, steps=20, warmup=5, augment=augment)
        x, y = FractalImages(cfg, CPU).batch(0, 32)
        same = x[y == y[0]]
        assert len(same) >= 2 and (same[0] - same[1]).abs().mean() > 0.05


@pytest.mark.parametrize("bad", [dict(categories=1), dict(resolution=4), dict(warmup=48), dict(augment="heavy")])
def test_bad_config_is_refused(bad):
    with pytest.raises(ValueError, match="FractalConfig needs"):
        FractalConfig(**bad)
