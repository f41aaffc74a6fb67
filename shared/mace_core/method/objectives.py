"""Stage-2 objectives that backpropagate through the UNet: the MACE authors' own loss, ESD's negative
guidance and ANT's trajectory-aware objective. (train.py holds the project's attention loss, `mace`,
and All-but-One, `abo`; `train_lora` picks one by ``settings.objective``.)

Every objective trains one rank-r LoRA per concept on top of the refined weights W' (hooks, see
attention.py); the frozen reference eps0 is the original model (weights W0, no hooks). Latents x_t
are the model's own training images (drawn with the concept's prompt) noised to t; v-prediction
models work unchanged, since every target below is linear in the model's output.

- ``mace-authors``: the authors' stage 2 (github Shilin-LU/MACE) — LoRA on to_k and to_v, the UNet
  run with the LoRA and differentiated end to end (queries too: a K/V change in one layer moves the
  hidden states, hence the queries, of every later layer), loss

      L = sum_l || A_l[:, M_l, S] ||_F

  A_l = softmax attention probabilities [heads, pixels, T] of attn2 layer l, M_l the concept's
  mask resized (nearest) to the layer, S its token positions (words + end + padding): unsquared,
  unnormalised, summed over layers. Per sample of a batch, then averaged over the batch (the
  authors train at batch 1, where the two agree). A layer where the mask is empty contributes 0
  (as theirs; our `mace` loss falls back to the whole map there). Their LoRA initialisation too
  (`lora_down_std`) and their learning rate: a tenth of the type's unless the user sets one
  (`concepts.OBJECTIVE_LR_SCALE`); steps, rank and masks (theirs: GroundingDINO + SAM) are the concept
  type's settings, as for every objective.
- ``esd``: ESD (Gandikota et al. 2023) negative guidance on the LoRA, ESD-x style (K/V of the
  cross-attention):  || eps(x_t, c) - [eps0(x_t, "") - eta (eps0(x_t, c) - eps0(x_t, ""))] ||^2.
- ``ant``: see `ant_loss`.

Each loss function runs its own backward inside the LoRA hooks' lifetime (gradient checkpointing
reruns the UNet in the backward pass and must see the hooks again) and returns the detached value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from .attention import QKCapture, attention_probs, weight_deltas
from ..model.backend import Backend, CrossAttentionLayer, TextBatch
from .concepts import Settings
from .masks import ConceptData, resize_mask

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x, t, idx, pidx)

# Per objective: (UNet passes per training sample and step, rows differentiated at once per sample,
# whether its LoRA has to_v factors). A differentiated pass counts as one pass, as for abo.
_COSTS: dict[str, tuple[Callable[[Settings], int], int, bool]] = {
    "mace": (lambda s: 1, 0, False),  # one no-grad pass; keys are rebuilt with gradient against its queries
    "abo": (lambda s: 3 + bool(s.alternative), 2, True),  # eps0(""), [eps0(alt)], eps(c), eps("")
    "mace-authors": (lambda s: 1, 1, True),
    "esd": (lambda s: 3, 1, True),  # eps0(""), eps0(c), eps(c)
    "ant": (lambda s: 8, 2, True),  # per stage (late, early): eps0(""), eps0(c), eps(""), eps(c)
}


def unet_passes(s: Settings) -> int:
    """UNet passes (batch-of-one units) per training sample and step of ``s.objective``."""
    return _COSTS[s.objective][0](s)


def grad_rows(s: Settings) -> int:
    """UNet batch rows per training sample that one backward differentiates through (0: none)."""
    return _COSTS[s.objective][1]


def trains_values(s: Settings) -> bool:
    """Whether the objective's LoRA has to_v factors (the mace loss only sees keys: theirs would get
    no gradient)."""
    return _COSTS[s.objective][2]


@dataclass
class LossContext:
    """What an objective's loss needs. ``deltas``: hook deltas W' - W0 (+ the LoRA, re-evaluated per
    call); ``predict``: backend.predict for differentiated passes (train.predict_for_backward);
    ``text_all``: the training prompts [P]; ``tokens`` bool [P, T]: the concept's positions in them;
    ``generator``: the training run's seeded generator (for ANT's second timestep)."""

    backend: Backend
    predict: Callable[..., torch.Tensor]
    layers: list[CrossAttentionLayer]
    deltas: Mapping
    text_all: TextBatch
    tokens: torch.Tensor
    data: ConceptData
    settings: Settings
    generator: torch.Generator


def authors_attention_loss(cap: QKCapture, layers: list[CrossAttentionLayer], tokens: torch.Tensor,
                           masks: torch.Tensor) -> torch.Tensor:
    """sum over layers of ||A_l[:, M_l, S]||_F per sample, averaged over the batch (scalar).

    ``cap`` holds each layer's queries [B, N, C] and keys [B, T, C] with their graphs; ``tokens``
    bool [B, T]; ``masks`` bool [B, h, w] at latent resolution."""
    total = 0.0
    for layer in layers:
        probs = attention_probs(cap.q[layer.name], cap.k[layer.name], layer.heads)  # [B, h, N, T]
        pix = resize_mask(masks, probs.shape[2]).to(probs.device)
        keep = pix[:, None, :, None] & tokens.to(probs.device)[:, None, None, :]
        total = total + (probs * keep).flatten(1).norm(dim=1)  # [B]; an empty selection: 0 (gradient 0)
    return total.mean()


def mace_authors_loss(ctx: LossContext) -> LossFn:
    def loss(x, t, idx, pidx):
        with weight_deltas(ctx.layers, ctx.deltas), \
                QKCapture(ctx.layers, keep_grad_keys=True, keep_grad_queries=True) as cap:  # after the deltas' hooks
            ctx.predict(x, t, ctx.text_all.select(pidx))
            value = authors_attention_loss(cap, ctx.layers, ctx.tokens[pidx], ctx.data.masks[idx])
            value.backward()
        return value.detach()
    return loss


def _frozen(backend: Backend, x: torch.Tensor, t: torch.Tensor, unc: TextBatch, text: TextBatch
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The original model's (eps0(x, ""), eps0(x, c)) [B, c, h, w] fp32, in one no-grad pass of 2B rows."""
    with torch.no_grad():
        out = backend.predict(torch.cat([x, x]), torch.cat([t, t]), TextBatch.cat([unc, text])).float()
    return out.chunk(2)


def esd_loss(ctx: LossContext) -> LossFn:
    empty = ctx.backend.encode([""])
    eta = ctx.settings.eta

    def loss(x, t, idx, pidx):
        text = ctx.text_all.select(pidx)
        u0, c0 = _frozen(ctx.backend, x, t, TextBatch.cat([empty] * x.shape[0]), text)
        with weight_deltas(ctx.layers, ctx.deltas):
            value = F.mse_loss(ctx.predict(x, t, text).float(), u0 - eta * (c0 - u0))
            value.backward()
        return value.detach()
    return loss


def ant_loss(ctx: LossContext) -> LossFn:
    """ANT ("Set You Straight", Li, Lu et al., ACM MM 2025; github lileyang1210/ANT), multi-concept
    variant (one LoRA per concept, fused by MACE's closed form).

    What ANT does: reversing the direction of classifier-free guidance only in the mid-to-late
    denoising steps removes the concept's content while the early steps — which lay out structure
    and pull samples toward the image manifold — keep their score field, so no anchor concept is
    needed and the trajectory is not derailed. With g the CFG scale, eta the negative guidance and
    the guided prediction eps^g(x, c) = eps(x, "") + g (eps(x, c) - eps(x, "")):

      late  (t <  split):  E_l = || eps^g(x_t, c) - [eps0(x_t, "") - eta g (eps0(x_t, c) - eps0(x_t, ""))] ||^2
      early (t >= split):  E_e = || eps^g(x_t, c) - eps0^g(x_t, c) ||^2
      unconditional kept:  U   = || eps(x_t, "") - eps0(x_t, "") ||^2   at both timesteps
      L = E_l + a_u U_l + a_e (E_e + a_u U_e)

    Their code: split after DDIM step 4 of 50 (t ~ 920), a_u = 2.5, a_e = 0.5, g = 7.5, eta = 1;
    one late and one early timestep per step; the early target uses eta too (+eta g (...)), equal
    to the frozen guided prediction at their eta = 1 — here it is that prediction at any eta, as
    the paper describes (keep the early field intact). Their single-concept variant adds a weight
    saliency mask (not used by their multi-concept pipeline, nor here).

    What we implement differently: (1) x_t is the model's own training image noised to t, not a
    partial DDIM trajectory from fresh noise (the same marginal for a model that samples its own
    distribution; no sampling passes per step); (2) the late timestep follows ``settings.timesteps``
    (CFIS or uniform) restricted to t < ``ant_split``, the early one is uniform in [ant_split, T)
    (theirs: uniform over DDIM steps on each side); (3) the LoRA sits on attn2 to_k / to_v only and
    on the refined weights W' (they train every layer on the original model, and the fusion keeps
    only the K/V part); (4) no LoRA scale-up at fusion (theirs: 4.3). g is ``settings.guidance``.
    Each stage backpropagates on its own (peak: one stage's 2B rows).
    """
    s = ctx.settings
    g = s.guidance
    empty = ctx.backend.encode([""])
    ac = ctx.backend.alphas_cumprod.float()

    def stage(x, t, text, unc, late: bool) -> torch.Tensor:
        u0, c0 = _frozen(ctx.backend, x, t, unc, text)
        target = u0 - s.eta * g * (c0 - u0) if late else u0 + g * (c0 - u0)
        with weight_deltas(ctx.layers, ctx.deltas):
            u, c = ctx.predict(torch.cat([x, x]), torch.cat([t, t]), TextBatch.cat([unc, text])).float().chunk(2)
            value = F.mse_loss(u + g * (c - u), target) + s.ant_uncond * F.mse_loss(u, u0)
            if not late:
                value = s.ant_early * value
            value.backward()
        return value.detach()

    def loss(x, t, idx, pidx):
        b = x.shape[0]
        text, unc = ctx.text_all.select(pidx), TextBatch.cat([empty] * b)
        value = stage(x, t, text, unc, late=True)  # train_lora draws t < ant_split for ant (`erase_below`)
        te = torch.randint(s.ant_split, len(ac), (b,), generator=ctx.generator)
        x0 = ctx.data.latents[idx]
        a = ac[te].view(-1, 1, 1, 1)
        xe = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=ctx.generator)
        dev = x.device
        return value + stage(xe.to(dev), te.to(dev), text, unc, late=False)
    return loss


def lora_down_std(s: Settings) -> float | None:
    """The LoRA's down-factor init: the authors' (diffusers' LoRALinearLayer: normal, std 1 / rank) for
    mace-authors — with up = 0 it sets how far one Adam step on up moves the weights, ~50x peft's
    kaiming-uniform at SD's text width, so their learning rates mean what they meant; None: train.py's."""
    return 1.0 / s.rank if s.objective == "mace-authors" else None


def erase_below(s: Settings) -> int | None:
    """Upper bound (exclusive) of the training loop's timesteps: ANT's late stage; None: no bound."""
    return s.ant_split if s.objective == "ant" else None


LOSSES: dict[str, Callable[[LossContext], LossFn]] = {
    "mace-authors": mace_authors_loss, "esd": esd_loss, "ant": ant_loss}
