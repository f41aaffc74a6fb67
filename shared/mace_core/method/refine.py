"""Stage 1: closed-form cross-attention refinement (CFR).

For every attn2 to_k / to_v weight W (d_out x D) the refinement minimises

    sum_i ||W e_i - W0 e*_i||^2 + lam ||W - W0||^2 + s ||(W - W0) P^1/2||^2 + s2 ||(W - W0) Q^1/2||^2

over aligned token pairs (e_i with the concept, e*_i with the anchor), with P, Q the per-token
general and retain-list Gram matrices. Its normal equations, W A = W0 B with

    A = lam I + sum_i e_i e_i^T + s P + s2 Q            (symmetric positive definite)
    B = lam I + sum_i e*_i e_i^T + s P + s2 Q,

do not involve the layer, so ONE D x D solve gives M = B A^-1 and every layer's refined weight is
W0 M. Each concept contributes its own sums C_c = sum e* e^T and G_c = sum e e^T (`ConceptStats`),
so the refinement of any subset of concepts is re-solved exactly (restore = drop its sums).

SDXL also feeds the pooled text embedding to the UNet outside cross-attention, through the
added-condition projection (ldm ``label_emb.0.0``, [1280, 2816] whose first P = 1280 columns read
the pooled embedding). The same closed form, on (concept, anchor) pooled pairs with a pooled-caption
prior, edits those columns, so the concept cannot leak through that path.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from ..model.backend import Backend, TextBatch


@dataclass
class ConceptStats:
    """Per-concept sums over aligned token pairs, [D, D] float64: cross = sum e* e^T, gram = sum e e^T;
    ``fusion_gram`` = sum e e^T over all T positions of the concept's prompts (stage 3)."""

    cross: torch.Tensor
    gram: torch.Tensor
    fusion_gram: torch.Tensor
    pairs: int
    pooled_cross: torch.Tensor | None = None  # [P, P] SDXL: sum over prompts of pooled(anchor) pooled^T
    pooled_gram: torch.Tensor | None = None  # [P, P]
    hardened: int = 0  # adversarial rounds already added (harden.py)

    def add(self, other: "ConceptStats", hardened: int) -> "ConceptStats":
        """These sums plus another set of token pairs (e.g. an attack's), pooled sums unchanged."""
        return ConceptStats(self.cross + other.cross, self.gram + other.gram, self.fusion_gram + other.fusion_gram,
                            self.pairs + other.pairs, self.pooled_cross, self.pooled_gram, hardened)

    @staticmethod
    def mean(parts: Sequence["ConceptStats"]) -> "ConceptStats":
        """The mean of several pairings' sums (the same concept prompts onto several anchors): a least-
        squares fit to each, weighted 1/K, is a fit to their mean target."""
        k = len(parts)

        def avg(name: str):
            vals = [getattr(p, name) for p in parts]
            return None if vals[0] is None else sum(vals) / k

        return ConceptStats(avg("cross"), avg("gram"), avg("fusion_gram"), round(sum(p.pairs for p in parts) / k),
                            avg("pooled_cross"), avg("pooled_gram"), parts[0].hardened)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"cross": self.cross, "gram": self.gram, "fusion_gram": self.fusion_gram}
        if self.pooled_gram is not None:
            out.update(pooled_cross=self.pooled_cross, pooled_gram=self.pooled_gram)
        return out


def align(concept_ids: Sequence[int], anchor_ids: Sequence[int], context: int = 77) -> list[tuple[int, int]]:
    """Aligned (concept position, anchor position) pairs of two tokenised prompts (with start/end).

    The common prefix and the common suffix (template words, end token) pair up position by
    position; so do the padding positions after the end token. The span that differs — the target
    phrase and its anchor — is left out. Positions beyond the context are dropped.
    """
    lc, la = len(concept_ids), len(anchor_ids)
    p = 0
    while p < min(lc, la) and concept_ids[p] == anchor_ids[p]:
        p += 1
    s = 0
    while s < min(lc, la) - p and concept_ids[lc - 1 - s] == anchor_ids[la - 1 - s]:
        s += 1
    pairs = [(i, i) for i in range(p)]
    pairs += [(lc - s + j, la - s + j) for j in range(s)]
    pairs += [(lc + j, la + j) for j in range(context - max(lc, la))]
    return [(i, j) for i, j in pairs if i < context and j < context]


def concept_stats(backend: Backend, prompts: Sequence[str], anchor_prompts: Sequence[str],
                  concept_text: TextBatch | None = None, anchor_text: TextBatch | None = None) -> ConceptStats:
    """Stage-1 and stage-3 sums of one concept from its prompts and the anchor's (same order);
    ``concept_text`` / ``anchor_text``: their encodings when already at hand (concepts sharing an
    anchor share its encodings)."""
    ct = concept_text if concept_text is not None else backend.encode(list(prompts))
    at = anchor_text if anchor_text is not None else backend.encode(list(anchor_prompts))
    T = ct.context.shape[1]
    pairs = [align(backend.tokenize(p), backend.tokenize(a), T) for p, a in zip(prompts, anchor_prompts)]
    st = pair_stats(ct.context, at.context, pairs)
    if ct.pooled is not None:
        st.pooled_cross, st.pooled_gram = outer_sum(at.pooled, ct.pooled), outer_sum(ct.pooled, ct.pooled)
    return st


def pair_stats(concept: torch.Tensor, anchor: torch.Tensor, pairs: Sequence[Sequence[tuple[int, int]]]
               ) -> ConceptStats:
    """The sums of `ConceptStats` from contexts [B, T, D] of B prompts and of their anchor versions,
    over ``pairs[k]``: the aligned (prompt position, anchor position) pairs of prompt k."""
    T, d = concept.shape[1], concept.shape[2]
    ic = [k * T + i for k, ps in enumerate(pairs) for i, _ in ps]
    ia = [k * T + j for k, ps in enumerate(pairs) for _, j in ps]
    e = concept.reshape(-1, d)[torch.tensor(ic, dtype=torch.long, device=concept.device)]
    es = anchor.reshape(-1, d)[torch.tensor(ia, dtype=torch.long, device=anchor.device)]
    allpos = concept.reshape(-1, d)
    return ConceptStats(outer_sum(es, e), outer_sum(e, e), outer_sum(allpos, allpos), len(ic))


def outer_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_i a_i b_i^T = a^T b [D, D] float64 on the CPU, from rows a [n, D], b [n, D].

    Computed where the encodings are. On a GPU in float32 with TF32 off (`exact_fp32_matmul`):
    fp32 accumulation over ~10^4 rows errs ~1e-6 relative, far below the solve's ridge, while a host
    that enables TF32 (A1111 does) would round fp32 encodings to 10 mantissa bits (~5e-4); moved to
    the CPU as float64 these products are most of stage 1's time (~30 GFLOP per SD1.5 concept)."""
    if a.device.type == "cpu":
        return a.double().T @ b.double()
    with exact_fp32_matmul():
        return (a.float().T @ b.float()).double().cpu()


@contextlib.contextmanager
def exact_fp32_matmul() -> Iterator[None]:
    """CUDA float32 matmuls in full IEEE precision inside the block, the host's TF32 setting restored
    after. Through the API the running torch has: ``fp32_precision`` (torch >= 2.9, where reading the
    legacy ``allow_tf32`` after a host set the new one raises) or else ``allow_tf32``."""
    mm = torch.backends.cuda.matmul
    name, exact = ("fp32_precision", "ieee") if hasattr(mm, "fp32_precision") else ("allow_tf32", False)
    before = getattr(mm, name)
    setattr(mm, name, exact)
    try:
        yield
    finally:
        setattr(mm, name, before)


def overlap(stats: Sequence[ConceptStats]) -> float:
    """How far the concepts' edits add up in the same directions, k^2 = ||sum_c D_c||^2 / sum_c ||D_c||^2
    (Frobenius), D_c = cross_c - gram_c = sum (e* - e) e^T [D, D]: the pull concept c's pairs put on W0.

    1 for one concept and for concepts whose pulls are orthogonal (they do not compete with what is
    kept in the same directions); n for n concepts pulling the same way (e.g. the template words and
    end positions of 100 names, all pulled toward one anchor), where the erasure's weight in those
    directions is n times one concept's. Stage 1 multiplies its protection (ridge and priors) by it, so
    the balance between erasing and keeping does not drift with the number of concepts. At least 1
    (by Cauchy-Schwarz at most n)."""
    pulls = [st.cross - st.gram for st in stats]
    own = sum(float(d.norm() ** 2) for d in pulls)
    return max(1.0, float(sum(pulls).norm() ** 2) / own) if own > 0 else 1.0


def refinement_map(crosses: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], lam: float,
                   prior: torch.Tensor | None = None, s: float = 0.0, domain: torch.Tensor | None = None,
                   s2: float = 0.0) -> torch.Tensor:
    """M [D, D] float64 such that the refined weight of every layer is W0 @ M.

    ``crosses`` / ``grams``: each concept's sum e* e^T and e e^T. Solves A X = B^T with a Cholesky
    factorisation of the SPD matrix A (no explicit inverse); M = X^T = B A^-1.
    """
    d = grams[0].shape[0]
    reg = lam * torch.eye(d, dtype=torch.float64)
    if prior is not None and s:
        reg = reg + s * prior
    if domain is not None and s2:
        reg = reg + s2 * domain
    A = reg + sum(grams)
    B = reg + sum(crosses)
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        raise ValueError("the refinement system is singular: use a ridge (lam > 0) or a prior strength > 0")
    return torch.cholesky_solve(B.T.contiguous(), L).T


def context_map(stats: Sequence[ConceptStats], lam: float, **priors) -> torch.Tensor:
    return refinement_map([st.cross for st in stats], [st.gram for st in stats], lam, **priors)


def pooled_map(stats: Sequence[ConceptStats], lam: float, **priors) -> torch.Tensor:
    return refinement_map([st.pooled_cross for st in stats], [st.pooled_gram for st in stats], lam, **priors)


def apply_pooled(weight: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The added-condition projection [C, P + extra] with its first P (pooled) columns refined."""
    p = m.shape[0]
    out = weight.float().clone()
    out[:, :p] = (weight[:, :p].double() @ m).float()
    return out


def apply_map(weights: dict[str, torch.Tensor], m: torch.Tensor) -> dict[str, torch.Tensor]:
    """Refined weights W0 @ M for every to_k / to_v weight [C, D] (float32 out)."""
    return {k: (w.double() @ m).float() for k, w in weights.items()}
