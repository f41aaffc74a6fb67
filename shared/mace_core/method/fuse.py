"""Stage 3: closed-form fusion of many per-concept LoRAs into one weight per layer.

For each to_k / to_v weight, with W' the refined weight and dW_i concept i's LoRA delta:

    minimise  sum_i ||(W* - W' - dW_i) G_i^1/2||^2 + lam ||W* - W'||^2 + f ||(W* - W0) P^1/2||^2
    =>  W* A = W' (lam I + sum_i G_i) + sum_i dW_i G_i + f W0 P,   A = lam I + sum_i G_i + f P

G_i = sum of e e^T over every token position of concept i's prompts. A is the same for every
layer (one Cholesky factorisation); dW_i G_i = up_i (down_i G_i) is accumulated from rank-r
factors, so each concept costs r x D per layer while it streams past — memory does not grow with
the number of concepts beyond those factors.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch

from .train import LoRA


def fuse(original: Mapping[str, torch.Tensor], refined: Mapping[str, torch.Tensor],
         concepts: Iterable[tuple[LoRA, torch.Tensor]], lam: float = 1e-3,
         prior: torch.Tensor | None = None, f: float = 0.0) -> dict[str, torch.Tensor]:
    """Fused weights by file key (float32). ``concepts`` yields (LoRA, fusion Gram [D, D]) pairs and
    is consumed once; ``original`` / ``refined`` hold W0 and W' [C, D] for every to_k / to_v."""
    gsum = None
    down_g: dict[str, list[torch.Tensor]] = {}
    ups: dict[str, list[torch.Tensor]] = {}
    for lora, g in concepts:
        g = g.double()
        gsum = g.clone() if gsum is None else gsum + g
        scale = lora.alpha / lora.rank
        for key in lora.down:
            down_g.setdefault(key, []).append(lora.down[key].double() @ g)
            ups.setdefault(key, []).append(lora.up[key].double() * scale)
    if gsum is None:
        return {k: v.float() for k, v in refined.items()}
    d = gsum.shape[0]
    eye = torch.eye(d, dtype=torch.float64)
    a = lam * eye + gsum
    if prior is not None and f:
        a = a + f * prior.double()
    chol = torch.linalg.cholesky(a)
    keep = lam * eye + gsum
    out = {}
    for key, w1 in refined.items():
        rhs = w1.double() @ keep
        if key in down_g:
            rhs = rhs + sum(u @ dg for u, dg in zip(ups[key], down_g[key]))
        if prior is not None and f:
            rhs = rhs + f * (original[key].double() @ prior.double())
        out[key] = torch.cholesky_solve(rhs.T.contiguous(), chol).T.float()
    return out


def naive_sum(refined: Mapping[str, torch.Tensor], loras: Iterable[LoRA]) -> dict[str, torch.Tensor]:
    """W' + sum_i dW_i: the interfering baseline of the paper's ablation."""
    out = {k: v.double().clone() for k, v in refined.items()}
    for lora in loras:
        for key in lora.down:
            out[key] += lora.delta(key).double()
    return {k: v.float() for k, v in out.items()}


def separate(loras: list[LoRA], grams: list[torch.Tensor], energy: float = 0.99) -> list[LoRA]:
    """SepME-style separable increments: each LoRA's input side projected onto the orthogonal
    complement of the other concepts' embeddings, so dW_i e = 0 for every e of concept j != i.

    The other concepts' subspace is the top eigenvectors of sum_{j != i} G_j holding ``energy`` of
    its trace. Capacity is bounded by the text width minus that subspace's rank.
    """
    total = sum(g.double() for g in grams)
    out = []
    for i, lora in enumerate(loras):
        others = total - grams[i].double()
        vals, vecs = torch.linalg.eigh(others)
        vals, vecs = vals.flip(0).clamp_min(0), vecs.flip(1)
        k = int((vals.cumsum(0) < energy * vals.sum()).sum()) + 1 if vals.sum() > 0 else 0
        u = vecs[:, :k]
        proj = torch.eye(total.shape[0], dtype=torch.float64) - u @ u.T
        down = {key: (d.double() @ proj).to(d.dtype) for key, d in lora.down.items()}
        out.append(LoRA(down, dict(lora.up), lora.alpha))
    return out
