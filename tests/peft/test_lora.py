"""peft/lora.py: LoRALinear/LoRAConv2d beyond the fold contract (tests/peft/test_fold.py), default
targets, the fast (merged-weight) path, frozen A and the folded MLP activation. Tiny random-init timm
models, CPU (one CUDA test), no downloads."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from fedmeld.peft import (LoRAConv2d, LoRALinear, PeftConfig, adapter_state, apply_peft, default_target_modules,
                          fold_adapters, unfold_adapters)

TOL = dict(rtol=1e-5, atol=1e-5)


# --- LoRA layers (their fold contract: tests/peft/test_fold.py) ---------------------

def randomized(layer):
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def test_lora_dropout_only_in_training():
    torch.manual_seed(0)
    lora = randomized(LoRALinear.from_module(nn.Linear(32, 32), rank=4, alpha=4.0, dropout=0.5))
    x = torch.randn(8, 32)
    assert not torch.allclose(lora.train()(x), lora.train()(x))
    torch.testing.assert_close(lora.eval()(x), lora.eval()(x))


def test_depthwise_conv_refused_and_skipped_with_log(caplog, tiny_timm, lora_names):
    with pytest.raises(ValueError, match="groups"):
        LoRAConv2d.from_module(nn.Conv2d(8, 8, 3, groups=8), rank=2, alpha=2.0)
    with pytest.raises(ValueError, match="padding_mode"):
        LoRAConv2d.from_module(nn.Conv2d(8, 8, 3, padding_mode="reflect"), rank=2, alpha=2.0)

    model = tiny_timm("effnet")
    with caplog.at_level(logging.INFO, logger="fedmeld.peft.lora"):
        apply_peft(model, PeftConfig(method="lora", target_modules=["conv_dw", "conv_pw"]))
    wrapped = lora_names(model)
    assert wrapped and all(n.endswith(".conv_pw") for n in wrapped)
    assert "blocks.0.0.conv_dw" in caplog.text and "groups=" in caplog.text


# --- whole models and default targets ---------------------------------------------

@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_lora_model_equals_base_at_init(family, tiny_timm, images, lora_names):
    base = tiny_timm(family).eval()
    model = apply_peft(copy.deepcopy(base), PeftConfig(method="lora")).eval()
    assert lora_names(model)
    with torch.no_grad():
        torch.testing.assert_close(model(images()), base(images()), rtol=0, atol=0)


def test_default_targets_vit(tiny_timm, adapted, lora_names):
    model = adapted("vit", "lora")
    assert default_target_modules(tiny_timm("vit")) == ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
    assert lora_names(model) == {f"blocks.{i}.{leaf}" for i in range(2)
                                 for leaf in ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]}
    assert type(model.patch_embed.proj) is nn.Conv2d and type(model.head) is nn.Linear


def test_default_targets_convnext(adapted, lora_names):
    model = adapted("convnext", "lora")
    n_blocks = sum(len(stage.blocks) for stage in model.stages)
    wrapped = lora_names(model)
    assert len(wrapped) == 2 * n_blocks
    assert all(n.endswith((".mlp.fc1", ".mlp.fc2")) for n in wrapped)


def test_default_targets_resnet(adapted, lora_names):
    model = adapted("resnet", "lora")
    wrapped = lora_names(model)
    assert wrapped == {f"layer{i}.0.conv{j}" for i in range(1, 5) for j in (1, 2)}  # stem and downsample left alone


def test_default_targets_efficientnet(adapted, lora_names):
    model = adapted("effnet", "lora")
    wrapped = lora_names(model)
    pointwise = {n for n, _ in model.named_modules() if n.endswith((".conv_pw", ".conv_pwl"))}
    assert wrapped == pointwise and pointwise
    assert not any("conv_dw" in n for n in wrapped)


def test_target_patterns(adapted, lora_names):
    model = adapted("vit", "lora", target_modules=["blocks.*.attn.qkv"])
    assert lora_names(model) == {"blocks.0.attn.qkv", "blocks.1.attn.qkv"}
    with pytest.raises(ValueError, match="available"):
        adapted("vit", "lora", target_modules=["nope"])
    with pytest.raises(ValueError, match="available"):  # the head is never wrapped
        adapted("vit", "lora", target_modules=["head"])


def test_fallback_targets_skip_classifier():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(5))
            self.out = nn.Linear(5, 2)

        def get_classifier(self):
            return self.out

    assert default_target_modules(Tiny()) == ["body.0", "body.2"]


# --- fast (merged-weight) LoRA path and frozen A ----------------------------------

def lora_linear_pair(freeze_a: bool = False) -> tuple[LoRALinear, LoRALinear]:
    """Two identical random LoRALinear layers (non-zero B): fast path on, and off."""
    torch.manual_seed(0)
    fast = randomized(LoRALinear.from_module(nn.Linear(48, 40).requires_grad_(False), rank=4, alpha=8.0))
    if freeze_a:
        fast.freeze_a(seed=3)
    naive = copy.deepcopy(fast)
    naive.fast = False
    return fast, naive


def grads(layer: nn.Module, x: torch.Tensor, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Output and gradients of a fixed random loss, optionally under CPU autocast."""
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        y = layer(x)
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).square().sum().backward()
    out = {"y": y.detach().float(), "x": x.grad}
    out.update({n: p.grad for n, p in layer.named_parameters() if p.requires_grad})
    return out


@pytest.mark.parametrize("freeze_a", [False, True])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_fast_lora_linear_equals_naive(freeze_a, dtype):
    fast, naive = lora_linear_pair(freeze_a)
    x = torch.randn(3, 5, 48)  # (batch, tokens, features), as in a ViT
    got, want = grads(fast, x, dtype), grads(naive, x, dtype)
    assert set(got) == set(want) == ({"y", "x", "lora_B"} | (set() if freeze_a else {"lora_A"}))
    tol = 1e-5 if dtype is None else 1e-2  # relative error: float32 vs bf16 rounding
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert ((got[k] - want[k]).float().norm() / want[k].float().norm()).item() < tol, k
    if dtype is not None:
        assert got["y"].abs().max() > 0.1 and fast(x).dtype == torch.float32  # autocast off: float32 out


def test_fast_lora_linear_uses_autocast_dtype_and_falls_back():
    fast, _ = lora_linear_pair()
    x = torch.randn(4, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast(x).dtype == torch.bfloat16
    seen = []
    fast._lora_path = lambda x: seen.append(1) or LoRALinear._lora_path(fast, x)  # naive side path marker
    fast(x)
    assert not seen  # fast: no side path
    fast.lora_dropout = 0.5
    fast.eval()(x)
    assert not seen  # dropout is a no-op in eval: still fast
    fast.train()(x)
    assert seen  # dropout in training: naive path
    fast.lora_dropout, seen[:] = 0.0, []
    fast.weight.requires_grad_(True)  # a trainable base needs dW: naive path
    fast(x)
    assert seen


def test_frozen_a_reproducible_and_only_b_travels(adapted, images):
    cfg = dict(method="lora+head", lora_freeze_a=True, lora_seed=7)
    a, b = adapted("vit", seed=0, **cfg), adapted("vit", seed=1, **cfg)
    assert all(not m.lora_A.requires_grad for m in a.modules() if isinstance(m, LoRALinear))
    a_mats = {n: p for n, p in a.named_parameters() if n.endswith("lora_A")}
    b_mats = dict(b.named_parameters())
    assert a_mats and all(torch.equal(p, b_mats[n]) for n, p in a_mats.items())  # same seed, any torch RNG
    assert len({p.sum().item() for p in a_mats.values()}) == len(a_mats)  # one A per module
    other = adapted("vit", **{**cfg, "lora_seed": 8})
    assert not torch.equal(dict(other.named_parameters())["blocks.0.attn.qkv.lora_A"], a_mats["blocks.0.attn.qkv.lora_A"])

    state = adapter_state(a)
    assert not any("lora_A" in k for k in state) and any("lora_B" in k for k in state)
    a(images()).square().sum().backward()
    assert {n for n, p in a.named_parameters() if p.grad is not None} == set(state)


def test_frozen_a_conv(adapted, images):
    model = adapted("resnet", "lora", lora_freeze_a=True)
    model(images()).square().sum().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all(n.endswith("lora_B") for n in trained)


def assert_grads_close(got: dict, want: dict, tol: float = 1e-2) -> None:
    """Same keys; each tensor within ``tol`` relative error (bf16), None where the reference has None."""
    assert set(got) == set(want)
    for k in want:
        if want[k] is None:
            assert got[k] is None, k
        else:
            assert ((got[k] - want[k]).float().norm() / want[k].float().norm()).item() < tol, k


def test_frozen_casts_cached_and_invalidated():
    """The compute-dtype copies of W, b (and a frozen A) are reused across steps and rebuilt
    whenever one of them changes: optimizer step on W, merge/unmerge, load_state_dict, .to()."""
    fast, naive = lora_linear_pair(freeze_a=True)
    x = torch.randn(3, 5, 48)

    def check() -> None:
        assert_grads_close(grads(fast, x, torch.bfloat16), grads(naive, x, torch.bfloat16))  # merged: no grad for B
        for layer in (fast, naive):
            layer.zero_grad(set_to_none=True)

    check()
    cached = fast.frozen_casts(torch.bfloat16)
    assert all(t is not None and t.dtype == torch.bfloat16 for t in cached)  # W, b, frozen A
    assert all(c is n for c, n in zip(cached, fast.frozen_casts(torch.bfloat16)))  # no re-cast
    assert fast.frozen_casts(torch.float32)[0] is fast.weight  # no copy in the weight's own dtype

    # A few steps of full training on W (naive path), then frozen again: the cache follows W.
    for layer in (fast, naive):
        layer.weight.requires_grad_(True)
        opt = torch.optim.AdamW(layer.parameters(), lr=0.1)
        for _ in range(2):
            grads(layer, x, torch.bfloat16)
            opt.step()
            opt.zero_grad(set_to_none=True)
        layer.weight.requires_grad_(False)
    assert torch.equal(fast.weight, naive.weight) and not torch.equal(fast.weight.bfloat16(), cached[0])
    check()

    for layer in (fast, naive):
        layer.fold()
    assert fast._casts is None
    check()  # merged: plain forward on the merged weight
    for layer in (fast, naive):
        layer.unfold()
    check()

    state = {k: v + 0.5 for k, v in naive.state_dict().items()}
    for layer in (fast, naive):
        layer.load_state_dict(state)
    check()

    fast.double(), naive.double()  # a module cast drops the copies (and frees them)
    assert fast._casts is None
    fast.float(), naive.float()
    check()


def test_frozen_casts_not_cached_in_inference_mode():
    fast, naive = lora_linear_pair(freeze_a=True)
    x = torch.randn(4, 48)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = fast(x)
    assert fast._casts is None
    torch.testing.assert_close(y.float(), naive(x), rtol=2e-2, atol=2e-2)
    grads(fast, x, torch.bfloat16)  # training afterwards builds a normal cache
    assert fast._casts is not None and not fast._casts[1][0].is_inference()


@pytest.mark.parametrize("freeze_a", [False, True])
def test_fast_lora_linear_without_bias_and_compiled(freeze_a):
    """No bias, and the traced path (torch.compile casts inline instead of caching): one graph,
    same outputs and gradients as eager."""
    torch.manual_seed(0)
    fast = randomized(LoRALinear.from_module(nn.Linear(48, 40, bias=False).requires_grad_(False), rank=4, alpha=8.0))
    if freeze_a:
        fast.freeze_a(seed=3)
    naive = copy.deepcopy(fast)
    naive.fast = False
    x = torch.randn(3, 5, 48)
    want = grads(naive, x, torch.bfloat16)
    for layer in (fast, torch.compile(copy.deepcopy(fast), backend="aot_eager", fullgraph=True)):
        assert_grads_close({k.removeprefix("_orig_mod."): v for k, v in grads(layer, x, torch.bfloat16).items()}, want)


def test_fast_lora_linear_frozen_factors_still_pass_input_grad():
    """LoRA factors frozen (e.g. training only norms around an adapted layer): dX still flows."""
    fast, naive = lora_linear_pair()
    for layer in (fast, naive):
        layer.lora_A.requires_grad_(False)
        layer.lora_B.requires_grad_(False)
    x = torch.randn(3, 5, 48)
    want = grads(naive, x, torch.bfloat16)
    assert set(want) == {"y", "x"}
    assert_grads_close(grads(fast, x, torch.bfloat16), want)


# --- folded MLP activation (lora_recompute_act) ------------------------------------

def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of distinct storages autograd keeps for backward after one forward under bf16 autocast
    (parameters excluded: they exist anyway)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x).float().sum()
    return sum(seen.values())


@pytest.mark.parametrize("family, freeze_a", [("vit", False), ("vit", True), ("convnext-linear", False)])
def test_folded_gelu_same_outputs_and_grads_less_saved(family, freeze_a, adapted, images, perturb_adapters):
    """Folding each MLP's GELU into its LoRA fc2 changes neither outputs nor gradients (float32 and
    bf16 autocast), nor the state-dict keys; with a trainable A it keeps one tokens x hidden
    activation less per block for backward (frozen A keeps no input anyway)."""
    cfg = dict(method="lora+norm+head", lora_freeze_a=freeze_a)
    folded, kept = adapted(family, **cfg), adapted(family, **cfg, lora_recompute_act=False)
    perturb_adapters(folded)
    kept.load_state_dict(folded.state_dict())
    assert folded.state_dict().keys() == kept.state_dict().keys()
    mlps = [m for m in folded.modules() if type(m).__name__ == "Mlp"]
    assert mlps and all(isinstance(m.act, nn.Identity) and m.fc2.input_act_mode == "none" for m in mlps)
    assert not any(isinstance(m.act, nn.Identity) for m in kept.modules() if type(m).__name__ == "Mlp")
    x = images()
    for dtype, tol in ((None, 1e-5), (torch.bfloat16, 1e-2)):
        got, want = ({"y": m(x).float()} for m in (folded, kept))  # outputs
        for model, out in ((folded, got), (kept, want)):
            model.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                y = model(x)
            (y.float() * torch.linspace(-1, 1, y.shape[-1])).square().sum().backward()
            out.update({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        assert_grads_close(got, want, tol)
    hidden_bytes = sum(2 * x.shape[0] * tokens * m.fc2.in_features for m, tokens in
                       zip(mlps, mlp_tokens(folded, x)))
    saving = saved_bytes(kept, x) - saved_bytes(folded, x)
    if freeze_a:
        assert saving == 0
    else:
        assert saving == hidden_bytes > 0


def mlp_tokens(model: nn.Module, x: torch.Tensor) -> list[int]:
    """Tokens (rows per image) each MLP's fc2 sees, in module order."""
    rows: list[int] = []
    hooks = [m.fc2.register_forward_pre_hook(lambda mod, args: rows.append(args[0][0].numel() // args[0].shape[-1]))
             for m in model.modules() if type(m).__name__ == "Mlp"]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return rows


def test_folded_gelu_merges_and_falls_back(adapted, images, perturb_adapters):
    """A folded fc2 still applies its GELU when merged or on the naive path, and a non-GELU is refused."""
    model = adapted("vit", "lora+head").eval()
    perturb_adapters(model)
    x = images()
    with torch.no_grad():
        y = model(x)
        fold_adapters(model)
        torch.testing.assert_close(model(x), y, **TOL)
        unfold_adapters(model)
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.fast = False
        torch.testing.assert_close(model(x), y, **TOL)
    with pytest.raises(ValueError, match="GELU"):
        LoRALinear.from_module(nn.Linear(4, 4), rank=2, alpha=2.0).fold_input_act(nn.ReLU())
    with pytest.raises(ValueError, match="lora_recompute_act"):
        PeftConfig(lora_recompute_act="yes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("freeze_a", [False, True])
@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("compiled", [False, True])
def test_fast_lora_linear_on_cuda_equals_naive(freeze_a, fold, compiled):
    """On CUDA, eager (gradients written in float32 by addmm/mm ``out_dtype``) and compiled (plain
    ops) the fast path trains as the naive path, with and without a folded GELU."""
    fast, naive = (layer.cuda() for layer in lora_linear_pair(freeze_a))
    if fold:
        for layer in (fast, naive):
            layer.fold_input_act(nn.GELU())
    x = torch.randn(7, 131, 48, device="cuda", requires_grad=True)  # float32 in: autocast casts it
    out = []
    for layer in (torch.compile(fast, backend="aot_eager", fullgraph=True) if compiled else fast, naive):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x)
        (y.float() * torch.linspace(-1, 1, y.shape[-1], device="cuda")).square().sum().backward()
        out.append({"x": x.grad.clone(), **{n.removeprefix("_orig_mod."): p.grad.clone()
                                             for n, p in layer.named_parameters() if p.requires_grad}})
        x.grad = None
    assert all(v.dtype == torch.float32 for v in out[0].values())
    assert_grads_close(*out)
