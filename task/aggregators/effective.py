"""What each client's delta does to the model's effective weights: the geometry robust rules score.

LoRA travels as deltas of its factors, but what changes the model is a layer's weight update. With
the global factors B (out, r) and A (r, in) and a client's deltas dB, dA, that update is

    s·((B + dB)(A + dA) − B·A) = u + w,    u = s·(dB·A + B·dA),    w = s·dB·dA

(u first order in the deltas, w second order). A client's *effective update* v_k joins that
update of every LoRA layer with the delta of every other floating tensor (norm γ/β, biases, the
head, BatchNorm statistics under bn-stats=aggregate), which act on the model as they are. Two
clients whose factors differ but whose products are equal have the same v_k: scoring factors
would keep them apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedmeld.peft.norm import BN_STATISTICS

from . import Delta

A_SUFFIX, B_SUFFIX = ".lora_A", ".lora_B"


@dataclass(frozen=True)
class Geometry:
    """The clients' effective updates as far as the robust rules need them, float64."""

    gram: torch.Tensor  # (n, n): ⟨v_i, v_j⟩
    first_gram: torch.Tensor  # (n, n): ⟨u_i, u_j⟩ over trained tensors (BatchNorm statistics left out): the
    # direction a reply trains in, which flips sign with the deltas
    first: torch.Tensor  # (n,): ‖u_k‖² over trained tensors, dense deltas included (BatchNorm statistics left out)
    cross: torch.Tensor  # (n,): ⟨u_k, w_k⟩
    second: torch.Tensor  # (n,): ‖w_k‖²

    @property
    def sq_dist(self) -> torch.Tensor:
        """(n, n) ‖v_i − v_j‖²."""
        sq = self.gram.diagonal()
        return (sq[:, None] + sq[None, :] - 2 * self.gram).clamp_min(0).fill_diagonal_(0)

    def norms(self, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
        """(n,) ‖v_k‖ over the trained tensors when client k's deltas are all multiplied by ``scale[k]``: u
        scales with it, w with its square, so ‖v‖² = λ²‖u‖² + 2λ³⟨u, w⟩ + λ⁴‖w‖². BatchNorm statistics are
        left out: their deltas are large and honest even from an attacker (task/attacks.py), so in the norm
        they hid a reply's ×10 trained update behind the honest clients' (clip factor 0.47, not ≈ 0.1)."""
        lam = torch.as_tensor(scale, dtype=torch.float64)
        sq = lam ** 2 * self.first + 2 * lam ** 3 * self.cross + lam ** 4 * self.second
        return sq.clamp_min(0).sqrt()


def lora_layers(names: Sequence[str] | set[str]) -> list[str]:
    """The layers (name prefixes) whose LoRA factors A and B both travel."""
    return sorted(n[: -len(A_SUFFIX)] for n in names
                  if n.endswith(A_SUFFIX) and n[: -len(A_SUFFIX)] + B_SUFFIX in names)


def _inner(x1: torch.Tensor, y1: torch.Tensor, x2: torch.Tensor, y2: torch.Tensor, pairs: bool) -> torch.Tensor:
    """Frobenius products of low-rank matrices x·y, never formed: ⟨x1·y1, x2·y2⟩ = Σ (x1ᵀx2) ∘ (y1·y2ᵀ).
    x: (n, out, k), y: (n, k, in). ``pairs``: (n, n) over all client pairs; else (n,) client by client."""
    if not pairs:
        return (x1.transpose(1, 2) @ x2 * (y1 @ y2.transpose(1, 2))).sum((1, 2))
    (n, out, k), k2 = x1.shape, x2.shape[2]
    xx = x1.transpose(0, 1).reshape(out, n * k).T @ x2.transpose(0, 1).reshape(out, n * k2)  # (n·k, n·k2)
    yy = y1.reshape(n * k, -1) @ y2.reshape(n * k2, -1).T
    return (xx * yy).view(n, k, n, k2).sum((1, 3))


def geometry(deltas: Sequence[Delta], global_state: Delta | None, scaling: float, rule: str) -> Geometry:
    """The effective updates' Gram matrix and norm parts. A LoRA layer's update stays factored,
    v = s·[dB | B+dB]·[A; dA] (rank 2r), u = s·[dB | B]·[A; dA], w = s·dB·dA, so its products cost
    O(n²r²(out+in)) and no out × in matrix is formed; the other tensors are flattened."""
    layers = lora_layers(set(deltas[0]))
    if layers and global_state is None:
        raise ValueError(f"aggregation={rule} scores LoRA layers by their weight update s·B·A and needs the "
                         f"global state the deltas apply to; call it as AGGREGATORS[{rule!r}](deltas, weights, "
                         f"global_state)")
    n = len(deltas)
    gram, first_gram = torch.zeros(n, n, dtype=torch.float64), torch.zeros(n, n, dtype=torch.float64)
    first, cross, second = (torch.zeros(n, dtype=torch.float64) for _ in range(3))
    paired = set()
    for layer in layers:
        a_name, b_name = layer + A_SUFFIX, layer + B_SUFFIX
        paired |= {a_name, b_name}
        a = global_state[a_name].double().flatten(1).expand(n, -1, -1)  # (n, r, in)
        b = global_state[b_name].double().expand(n, -1, -1)  # (n, out, r)
        da = torch.stack([d[a_name].double().flatten(1) for d in deltas])  # (n, r, in)
        db = scaling * torch.stack([d[b_name].double() for d in deltas])  # (n, out, r), s folded in
        ay = torch.cat([a, da], 1)  # (n, 2r, in)
        vx, ux = torch.cat([db, scaling * b + db], 2), torch.cat([db, scaling * b], 2)  # (n, out, 2r)
        gram += _inner(vx, ay, vx, ay, pairs=True)
        first_gram += _inner(ux, ay, ux, ay, pairs=True)
        first += _inner(ux, ay, ux, ay, pairs=False)
        cross += _inner(ux, ay, db, da, pairs=False)
        second += _inner(db, da, db, da, pairs=False)
    for name in deltas[0]:
        if name not in paired and deltas[0][name].is_floating_point():
            flat = torch.stack([d[name].double().flatten() for d in deltas])  # (n, numel)
            gram += flat @ flat.T
            if not name.endswith(BN_STATISTICS):  # statistics are not trained: neither a direction nor a step size
                first_gram += flat @ flat.T
                first += flat.square().sum(1)
    return Geometry(gram, first_gram, first, cross, second)


def scaled(delta: Delta, factor: float) -> Delta:
    """Every floating tensor of ``delta`` times ``factor`` (integer tensors unchanged)."""
    return {k: v * factor if v.is_floating_point() else v for k, v in delta.items()}
