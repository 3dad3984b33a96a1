"""The registries are the only lists: every registered adapter and aggregation rule is checked
here by iterating over them, and a new one, written as one module outside fedmeld, is usable by
name (``--help``, the run config, a run) with no other file touched."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from fedmeld.peft import ADAPTERS, PeftConfig, apply_peft, merged_state_dict, register_adapter
from fedmeld.task.aggregators import AGGREGATORS, register_aggregator
from fedmeld.task.model import vit_pico_patch4_28  # noqa: F401  (registers the tiny ViT with timm)

MODELS = {"vit": "vit_pico_patch4_28", "cnn": "resnet10t"}


def _plain(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(MODELS[family], num_classes=3, **({"img_size": 28} if family == "vit" else {}))


def _adapted(family: str, name: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    base = _plain(family)
    method = name if ADAPTERS[name].alone or name == "head" else f"{name}+head"
    return base, apply_peft(copy.deepcopy(base), PeftConfig(method=method, lora_rank=4, vera_rank=16, lte_heads=2))


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_every_adapter_starts_as_the_base_trains_only_its_own_and_merges_exactly(name, family):
    base, model = _adapted(family, name)
    x = torch.randn(8, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    base.eval(), model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x), rtol=1e-5, atol=1e-5)  # starts as the base model

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    total = {n for n, _ in model.named_parameters()}
    assert trainable and (name == "full" or len(trainable) < len(total))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).zero_grad()
    model(x).square().mean().backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= trainable  # nothing frozen moved
    # Besides the classifier, which trains with every adapter. (Random-init ResNets zero each block's
    # last BN γ, which mutes in-block adapters, so this is asked of the ViT.)
    own = changed if name == "head" else {n for n in changed if not n.startswith("head.")}
    assert own or family == "cnn", "the adapter's own parameters never train"

    model.eval()
    plain = _plain(family)
    plain.load_state_dict(merged_state_dict(model), strict=True)  # loads into plain timm
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), rtol=1e-4, atol=1e-5)  # merges exactly


def test_registering_a_name_twice_is_an_error():
    with pytest.raises(ValueError, match="'lora' is already registered"):
        register_adapter("lora", help="again")(lambda model, cfg: None)
    with pytest.raises(ValueError, match="'fedavg' is already registered"):
        register_aggregator("fedavg", help="again")(lambda deltas, weights: deltas[0])


# --- every rule against its reference, on one hand-made case ---------------------------------------

WEIGHTS = [1.0, 2.0, 3.0, 4.0, 10.0]


def _case(factors: bool) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    if factors:  # per client: a layer's low-rank change B·A (ranks differ) and a dense tensor
        return [{"l/B": torch.randn(4, r, generator=g), "l/A": torch.randn(r, 6, generator=g),
                 "n": torch.randn(3, generator=g)} for r in (1, 2, 2, 3, 4)]
    return [{"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)} for _ in WEIGHTS]


def _mean(values: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    return sum(w * v for v, w in zip(values, weights)) / sum(weights)


def _by_hand_median(values: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    return torch.stack(values).median(dim=0).values  # odd count: the middle value


def _by_hand_trimmed(values: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    return torch.stack(values).sort(dim=0).values[1:-1].mean(dim=0)  # 20 % of 5 = 1 each side


def _product_mean(deltas, weights):
    return {"l": _mean([d["l/B"] @ d["l/A"] for d in deltas], weights), "n": _mean([d["n"] for d in deltas], weights)}


def _per_key(reference):
    """A per-tensor reference applied to every tensor of the deltas."""
    return lambda deltas, weights: {k: reference([d[k] for d in deltas], weights) for k in deltas[0]}


def _flat(deltas) -> list[torch.Tensor]:
    return [torch.cat([v.flatten() for v in d.values()]).double() for d in deltas]


def _krum_order(deltas) -> list[int]:
    """Clients by Krum score (f = 1: the sum of squared distances to the n - 3 nearest others), best first."""
    flat = _flat(deltas)
    scores = [sum(sorted(float((x - y).square().sum()) for j, y in enumerate(flat) if j != i)[:len(flat) - 3])
              for i, x in enumerate(flat)]
    return sorted(range(len(flat)), key=scores.__getitem__)


def _by_hand_krum(deltas, weights):
    return deltas[_krum_order(deltas)[0]]


def _by_hand_multi_krum(deltas, weights):
    best = _krum_order(deltas)[:len(deltas) - 1]  # m = n - f
    return _per_key(_mean)([deltas[i] for i in best], [weights[i] for i in best])


def _by_hand_clipped(deltas, weights):
    norms = [float(x.norm()) for x in _flat(deltas)]
    bound = sorted(norms)[len(norms) // 2]  # odd count: the median norm
    return _per_key(_mean)([{k: v * min(1.0, bound / n) for k, v in d.items()} for d, n in zip(deltas, norms)],
                           weights)


def _middle(values: list[float]) -> float:
    """The median the rules take (torch's quantile 0.5): an even count averages the middle two."""
    ordered, half = sorted(values), len(values) // 2
    return ordered[half] if len(values) % 2 else (ordered[half - 1] + ordered[half]) / 2


def _by_hand_direction(deltas, weights):
    flat = _flat(deltas)
    cosines = [_middle([float(x @ y / (x.norm() * y.norm())) for j, y in enumerate(flat) if j != i])
               for i, x in enumerate(flat)]
    worst = min(range(len(flat)), key=cosines.__getitem__)
    kept = [i for i in range(len(flat)) if i != worst or cosines[i] >= 0]  # f = 1: at most one dropped
    bound = _middle([float(flat[i].norm()) for i in kept])
    return _per_key(_mean)([{k: v * min(1.0, bound / float(flat[i].norm())) for k, v in deltas[i].items()}
                            for i in kept], [weights[i] for i in kept])


REFERENCES = {  # rule -> what it must equal, computed the plain way
    "fedavg": _per_key(_mean), "ffa": _per_key(_mean), "median": _per_key(_by_hand_median),
    "trimmed-mean": _per_key(_by_hand_trimmed), "exact": _product_mean, "krum": _by_hand_krum,
    "multi-krum": _by_hand_multi_krum, "clipped-mean": _by_hand_clipped,
    "direction-clipped-mean": _by_hand_direction,
}


def test_every_registered_rule_has_a_reference_here():
    assert set(REFERENCES) == set(AGGREGATORS), "a new rule needs its reference in REFERENCES"


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_every_rule_equals_its_reference_on_a_hand_made_case(name):
    rule = AGGREGATORS[name]
    deltas = _case(factors=rule.protocol == "backbone-merge")
    out = rule(deltas, WEIGHTS)
    if rule.protocol == "backbone-merge":
        expected = REFERENCES[name](deltas, WEIGHTS)
        torch.testing.assert_close(out["l/B"] @ out["l/A"], expected["l"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out["n"], expected["n"], rtol=1e-6, atol=1e-6)
    else:
        expected = REFERENCES[name](deltas, WEIGHTS)
        assert set(out) == set(deltas[0])
        for key in out:
            torch.testing.assert_close(out[key], expected[key], rtol=1e-6, atol=1e-6)


# --- a new adapter and a new rule: one module each, nothing else ---------------------------------

ADAPTER_MODULE = '''
from fedmeld.peft import register_adapter
from fedmeld.peft.norm import NORM_TYPES


@register_adapter("norm-gamma", help="only the γ of every normalization layer")
def apply(model, cfg):
    for module in model.modules():
        if isinstance(module, NORM_TYPES) and module.weight is not None:
            module.weight.requires_grad_(True)
'''

RULE_MODULE = '''
import torch

from fedmeld.task.aggregators import register_aggregator


@register_aggregator("unweighted-mean", help="every client counts the same, however many examples it has")
def unweighted_mean(deltas, weights):
    return {k: torch.stack([d[k] for d in deltas]).mean(dim=0) for k in deltas[0]}
'''


def _fedmeld(args: list[str], plugin_dir: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "FEDMELD_PLUGINS": "site_adapter,site_rule",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(plugin_dir), os.environ.get("PYTHONPATH", "")]))}
    return subprocess.run([sys.executable, "-m", "fedmeld.simulations.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def test_a_new_adapter_and_rule_are_one_module_each(tmp_path, medmnist_root):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "site_adapter.py").write_text(ADAPTER_MODULE)
    (plugins / "site_rule.py").write_text(RULE_MODULE)

    shown = _fedmeld(["run", "--help"], plugins, tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "norm-gamma: only the γ of every normalization layer" in shown.stdout
    choices = "{" + "|".join(sorted([*AGGREGATORS, "unweighted-mean"])) + "}"  # the registry plus the plugin
    assert "unweighted-mean" in shown.stdout and choices in shown.stdout

    done = _fedmeld(["run", "--backend", "inprocess", "peft=norm-gamma", "aggregation=unweighted-mean",
                     f'data-root="{medmnist_root}"', 'model="resnet10t"', "num-clients=2", "num-server-rounds=1",
                     "local-epochs=1", "batch-size=64", f'out="{tmp_path / "runs"}"', 'run-name="plugin"'],
                    plugins, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "runs" / "plugin" / "summary.json").read_text())
    assert summary["config"]["peft"] == "norm-gamma" and summary["config"]["aggregation"] == "unweighted-mean"
    assert summary["num_rounds"] == 1 and summary["trainable_params"] < summary["total_params"]

    refused = _fedmeld(["run", "peft=norm-gamma+norm-gamma"], plugins, tmp_path)
    assert refused.returncode != 0 and "names a part twice" in refused.stderr
