"""Robust erasure (`--robust`): adversarial rounds against the erased model.

Each round attacks every erased concept with the soft-token embedding attack (textual inversion
against the erased model, on the base model's images of the concept), encodes the prompt the
attack found, and adds its token embeddings to the concept's stage-1 statistics — mapped, like the
concept's own context, onto the anchor's — before stage 1 and fusion are re-solved. The attack's
end loss is logged per round; the evaluation's red team measures the success rate with a
classifier.
"""

from __future__ import annotations

import torch

from .attacks import embedding_attack, soft_prompt, with_soft_tokens
from .attention import weight_deltas
from .backend import Backend
from .refine import ConceptStats, align


def adversarial_stats(backend: Backend, deltas: dict[str, torch.Tensor], latents: torch.Tensor, template: str,
                      anchor: str, steps: int, seed: int, n_tokens: int = 2) -> tuple[ConceptStats, float]:
    """Stage-1 sums that map an attack's prompt onto the anchor, and the attack's final loss.

    ``deltas``: erased minus original weights (the model attacked, applied as hooks); ``latents``
    [N, c, h, w]: the base model's images of the concept. The attack's soft-token positions pair
    with the anchor's last token; the template words, end token and padding pair position by
    position as in stage 1.
    """
    layers = backend.cross_attention()
    losses: list[float] = []
    with weight_deltas(layers, deltas):
        soft = embedding_attack(backend, latents, template, n_tokens=n_tokens, steps=steps, seed=seed,
                                on_step=lambda i, n, loss: losses.append(loss))
    prompt, anchor_prompt = soft_prompt(template, n_tokens), template.replace("{}", anchor)
    with with_soft_tokens(backend, soft):
        ctx = backend.encode([prompt]).context[0].double().cpu()
    actx = backend.encode([anchor_prompt]).context[0].double().cpu()
    ids, aids = backend.tokenize(prompt), backend.tokenize(anchor_prompt)
    pairs = align(ids, aids, ctx.shape[0])
    # the soft tokens themselves: the span that differs, onto the anchor's last span token
    paired = {i for i, _ in pairs}
    last_anchor = max(j for j in range(len(aids) - 1) if j not in {b for _, b in pairs}) if len(aids) > 2 else 0
    pairs += [(i, last_anchor) for i in range(1, len(ids) - 1) if i not in paired]
    ic = torch.tensor([i for i, _ in pairs])
    ia = torch.tensor([j for _, j in pairs])
    e, es = ctx[ic], actx[ia]
    d = ctx.shape[-1]
    st = ConceptStats(es.T @ e, e.T @ e, ctx.T @ ctx, len(pairs))
    if st.pairs == 0:
        st = ConceptStats(*(torch.zeros(d, d, dtype=torch.float64) for _ in range(3)), 0)
    return st, float(sum(losses[-10:]) / max(1, len(losses[-10:])))
