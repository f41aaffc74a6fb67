"""Robust erasure (`--robust`): adversarial rounds against the erased model.

Each round attacks every erased concept with the soft-token embedding attack (textual inversion
against the erased model, on the base model's images of the concept), puts the tokens it found in
every one of the concept's prompt templates, as if they were one more word for the concept, and adds
those prompts' token embeddings to the concept's stage-1 statistics — mapped, like the concept's own
context, onto the anchor's — before stage 1 and fusion are re-solved. Each round's attack is kept in
the project (`Project.load_attacks`) and its end loss logged; the evaluation's red team measures
success rates with a classifier.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .attacks import embedding_attack, soft_prompt, with_soft_tokens
from .attention import weight_deltas
from ..model.backend import Backend
from .refine import ConceptStats, align, pair_stats


def adversarial_stats(backend: Backend, deltas: dict[str, torch.Tensor], latents: torch.Tensor, template: str,
                      templates: Sequence[str], anchor: str, steps: int, seed: int, n_tokens: int = 2
                      ) -> tuple[ConceptStats, float, torch.Tensor]:
    """Stage-1 sums that map an attack onto the anchor, the attack's final loss, and the attack
    itself (soft token embeddings [n_tokens, W] for ``soft_prompt(template, n_tokens)``).

    ``deltas``: erased minus original weights (the model attacked, applied as hooks); ``latents``
    [N, c, h, w]: the base model's images of the concept. The attack is learned in ``template`` and
    then treated like one more word for the concept: placed in each of ``templates`` (the concept's
    own prompt templates, "{}" where its phrase goes), so it weighs as much as the phrase itself (one
    prompt's pairs would be lost among the concept's and the prior's). In each prompt the soft-token
    positions pair with the anchor's last token; the template words, end token and padding pair
    position by position as in stage 1.
    """
    layers = backend.cross_attention()
    losses: list[float] = []
    with weight_deltas(layers, deltas):
        soft = embedding_attack(backend, latents, template, n_tokens=n_tokens, steps=steps, seed=seed,
                                on_step=lambda i, n, loss: losses.append(loss))
    prompts = [soft_prompt(t, n_tokens) for t in templates]
    anchor_prompts = [t.replace("{}", anchor) for t in templates]
    with with_soft_tokens(backend, soft):
        ctx = backend.encode(prompts).context
    actx = backend.encode(anchor_prompts).context
    T = ctx.shape[1]
    pairs = []
    for p, a in zip(prompts, anchor_prompts):
        ids, aids = backend.tokenize(p), backend.tokenize(a)
        ps = align(ids, aids, T)
        # the soft tokens themselves: the span that differs, onto the anchor's last span token
        paired, anchor_paired = {i for i, _ in ps}, {j for _, j in ps}
        last_anchor = max((j for j in range(1, len(aids) - 1) if j not in anchor_paired), default=0)
        pairs.append(ps + [(i, last_anchor) for i in range(1, min(len(ids) - 1, T)) if i not in paired])
    st = pair_stats(ctx, actx, pairs)
    return st, float(sum(losses[-10:]) / max(1, len(losses[-10:]))), soft
