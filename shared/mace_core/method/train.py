"""Stage 2: one LoRA per concept, trained with the attention loss and concept-focal timesteps.

The LoRA (rank r, fp32 whatever the model's dtype) sits on the to_k of every attn2 layer, on top
of the refined weights W' (applied as hooks, the host's weights are never written). The attention
loss only sees keys, so to_v has no LoRA: its gradient would be exactly zero.

Loss: at every attn2 layer l, the softmax attention mass that the masked pixels M_l give to the
concept's tokens S (its words, plus the end and padding positions, which carry it under causal
attention), averaged over heads, pixels and layers — a number in [0, 1] that is read as "the
share of the concept's attention left". (The authors sum unsquared Frobenius norms; their loss
barely moved in 50 steps at lr 1e-5, see the method notes.) Queries are a stop-gradient: each
layer's loss is differentiated through its own keys only, so one step is one no-grad UNet pass
plus small per-layer products instead of a backward pass through the whole UNet.

The abo objective (and objectives.py's: the authors' loss, ESD, ANT, whose LoRAs also have to_v
factors) does backpropagate through the UNet; ``settings.low_vram`` then recomputes its activations
in the backward pass (gradient checkpointing, `predict_for_backward`). Each loss function runs its
own backward, inside its hooks' lifetime, because that recomputation must see the LoRA hooks again.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from . import objectives
from .attention import QKCapture, token_attention, weight_deltas
from ..model.backend import Backend, TextBatch, differentiable
from .concepts import Settings
from .masks import ConceptData, resize_mask


@dataclass
class LoRA:
    """Rank-r factors per to_k file key: down [r, D], up [C, r]; delta = up @ down * alpha / r."""

    down: dict[str, torch.Tensor]
    up: dict[str, torch.Tensor]
    alpha: float

    @property
    def rank(self) -> int:
        return next(iter(self.down.values())).shape[0]

    def delta(self, key: str) -> torch.Tensor:
        return (self.up[key] @ self.down[key]) * (self.alpha / self.rank)

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for k in self.down:
            stem = k.removesuffix(".weight")
            out[f"{stem}.lora_down.weight"] = self.down[k].detach().cpu().contiguous()
            out[f"{stem}.lora_up.weight"] = self.up[k].detach().cpu().contiguous()
        return out

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], alpha: float) -> "LoRA":
        down = {k.removesuffix(".lora_down.weight") + ".weight": v for k, v in sd.items() if k.endswith(".lora_down.weight")}
        up = {k.removesuffix(".lora_up.weight") + ".weight": v for k, v in sd.items() if k.endswith(".lora_up.weight")}
        return cls(down, up, alpha)


def cfis_pmf(t1: float = 200, t2: float = 400, gamma: float = 0.05, n: int = 1000) -> torch.Tensor:
    """Concept-focal importance sampling: p(t) ∝ sigmoid(g (t - t1)) - sigmoid(g (t - t2)), t = 0..n-1."""
    t = torch.arange(n, dtype=torch.float64)
    p = torch.sigmoid(gamma * (t - t1)) - torch.sigmoid(gamma * (t - t2))
    return p / p.sum()


def sample_timesteps(k: int, settings: Settings, generator: torch.Generator, n: int = 1000,
                     below: int | None = None) -> torch.Tensor:
    """k timesteps [k] by ``settings.timesteps`` (CFIS or uniform) over 0..n-1, or 0..below-1 when given."""
    hi = n if below is None else below
    if settings.timesteps == "uniform":
        return torch.randint(0, hi, (k,), generator=generator)
    return torch.multinomial(cfis_pmf(*settings.cfis, n=n)[:hi].float(), k, replacement=True, generator=generator)


def attention_loss(cap: QKCapture, layers, lora: LoRA, base_delta: Mapping[str, torch.Tensor],
                   text: TextBatch, k0: Mapping[str, torch.Tensor], tokens: torch.Tensor,
                   masks: torch.Tensor) -> torch.Tensor:
    """Mean attention mass on ``tokens`` [B, T] at masked pixels (``masks`` bool [B, h, w] latent size).

    Keys are rebuilt with gradient: k = W0 c (``k0``, precomputed) + c (W' - W0 + B A)^T.
    """
    total = 0.0
    ctx = text.context.float()
    for layer in layers:
        q = cap.q[layer.name].float()
        key = layer.k_key
        d = base_delta[key].to(ctx.device) + lora.delta(key)
        k = k0[layer.name] + ctx @ d.T
        pix = resize_mask(masks, q.shape[1]).to(q.device)
        empty = ~pix.any(1)
        if empty.any():  # object too small for this layer's resolution: use the whole map
            pix[empty] = True
        mass = token_attention(q, k, layer.heads, tokens.to(q.device), pix)  # [B, h, N]
        total = total + (mass.sum(-1) / pix.sum(-1, keepdim=True)).mean()
    return total / len(layers)


def init_lora(layers, keys: list[str], rank: int, g: torch.Generator, device, down_std: float | None = None
              ) -> LoRA:
    """Factors for ``keys``: down kaiming-uniform (as peft initialises lora_A) or, with ``down_std``,
    normal with that std (diffusers' LoRALinearLayer, the MACE authors': 1 / rank); up zero (delta 0
    at start). Drawn in sorted key order: hosts list their layers in different orders (diffusers: down,
    up, mid; ComfyUI: input, middle, output), and the same seed must give the same LoRA on every host."""
    shapes = {key: mod.weight.shape for layer in layers for key, mod in ((layer.k_key, layer.to_k),
                                                                          (layer.v_key, layer.to_v))}
    down, up = {}, {}
    for key in sorted(keys):
        c, dim = shapes[key]
        if down_std is None:
            d = (torch.rand(rank, dim, generator=g) * 2 - 1) / math.sqrt(dim)
        else:
            d = torch.randn(rank, dim, generator=g) * down_std
        down[key] = d.to(device).requires_grad_()
        up[key] = torch.zeros(c, rank, device=device, requires_grad=True)
    return LoRA(down, up, alpha=float(rank))


def train_lora(backend: Backend, data: ConceptData, prompts: list[str], tokens: torch.Tensor,
               base_delta: Mapping[str, torch.Tensor], settings: Settings, seed: int,
               on_step: Callable[[int, int, float], None] | None = None,
               original: Mapping[str, torch.Tensor] | None = None) -> tuple[LoRA, list[float]]:
    """Train one concept's LoRA on the refined model (base_delta = W' - W0 per file key).

    ``original``: W0 [C, D] per file key, the weights ``base_delta`` was taken from (default:
    ``backend.original_weights()``); the attention loss's base keys W0 c are computed from it.

    prompts: training prompts; tokens bool [len(prompts), T]: the positions of the attention loss.
    ``settings.objective`` picks the loss: "mace" (attention loss, to_k LoRA), "abo" (All-but-One:
    guidance toward ``settings.alternative`` with the unconditional prediction held, to_k and to_v
    LoRA) or one of objectives.py's ("mace-authors", "esd", "ant"; to_k and to_v LoRA). Returns the
    LoRA and the loss at every step.
    """
    layers = backend.cross_attention()
    g = torch.Generator().manual_seed(seed)
    dev = backend.device
    keys = [l.k_key for l in layers] + ([l.v_key for l in layers] if objectives.trains_values(settings) else [])
    lora = init_lora(layers, keys, settings.rank, g, dev, objectives.lora_down_std(settings))
    params = list(lora.down.values()) + list(lora.up.values())
    opt = torch.optim.AdamW(params, lr=settings.lr, betas=(0.9, 0.999), weight_decay=0.01)
    text_all = backend.encode(prompts)
    base = {k: v.to(dev) for k, v in base_delta.items()}
    ac = backend.alphas_cumprod.float()
    losses = []
    n, bs = data.latents.shape[0], settings.batch_size
    with predict_for_backward(backend, settings.low_vram) as predict:
        if settings.objective == "abo":
            loss_fn = _abo_loss(backend, predict, layers, lora, base, text_all, settings)
        elif settings.objective == "mace":
            loss_fn = _mace_loss(backend, layers, lora, base, text_all, tokens, data,
                                 backend.original_weights() if original is None else original)
        else:
            loss_fn = objectives.LOSSES[settings.objective](objectives.LossContext(
                backend, predict, layers, _lora_deltas(lora, base), text_all, tokens, data, settings, g))
        for step in range(settings.steps):
            idx = torch.randint(0, n, (bs,), generator=g)
            pidx = torch.randint(0, len(prompts), (bs,), generator=g)
            t = sample_timesteps(bs, settings, g, len(ac), objectives.erase_below(settings))
            noise = torch.randn(data.latents[idx].shape, generator=g)
            a = ac[t].view(-1, 1, 1, 1)
            x = (a.sqrt() * data.latents[idx] + (1 - a).sqrt() * noise).to(dev)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(x, t.to(dev), idx, pidx)  # runs its own backward (see the module docstring)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(float(loss))
            if on_step:
                on_step(step + 1, settings.steps, losses[-1])
    return LoRA({k: v.detach().cpu() for k, v in lora.down.items()},
                {k: v.detach().cpu() for k, v in lora.up.items()}, lora.alpha), losses


@contextlib.contextmanager
def predict_for_backward(backend: Backend, low_vram: bool) -> Iterator[Callable[..., torch.Tensor]]:
    """``backend.predict`` for UNet passes that are differentiated through (the abo loss).

    Runs inside the backend's `differentiable` context (ComfyUI's weights are inference tensors).
    low_vram: activations are recomputed during the backward pass instead of kept (gradient
    checkpointing): block by block where the backend can switch it on (``gradient_checkpointing``,
    e.g. diffusers' UNet), else around the whole UNet call, which at least keeps one call's
    activations at a time. The arithmetic is the same, so the LoRA is the same.
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(differentiable(backend))
        switch = getattr(backend, "gradient_checkpointing", None)
        if not low_vram:
            yield backend.predict
        elif switch is None:
            def predict(x: torch.Tensor, t: torch.Tensor, text: TextBatch) -> torch.Tensor:
                # non-reentrant: the LoRA factors reach the UNet through hooks, not through the arguments
                return torch.utils.checkpoint.checkpoint(backend.predict, x, t, text, use_reentrant=False)
            yield predict
        else:
            switch(True)
            stack.callback(switch, False)
            yield backend.predict


def _lora_deltas(lora: LoRA, base: Mapping[str, torch.Tensor]) -> dict:
    """Hook deltas: W' - W0 everywhere, plus the LoRA where it has factors (re-evaluated per call)."""
    out: dict = dict(base)
    for k in lora.down:
        out[k] = lambda k=k: base[k] + lora.delta(k)
    return out


def _mace_loss(backend, layers, lora, base, text_all, tokens, data, original):
    dev = backend.device
    ctx = text_all.context.to(dev).float()
    # k0 = W0 c from the W0 that base_delta is relative to, not from the live to_k modules: a host may
    # load and patch its UNet only when it next runs it (ComfyUI's low-VRAM mode, whose encode() can
    # offload the UNet), so before the first predict those modules may hold stale or offloaded weights
    k0_all = {l.name: ctx @ original[l.k_key].to(dev, torch.float32).T for l in layers}

    def loss(x, t, idx, pidx):
        text = text_all.select(pidx)
        with torch.no_grad(), QKCapture(layers) as cap, weight_deltas(layers, _lora_deltas(lora, base)):
            backend.predict(x, t, text)
        k0 = {name: v[pidx] for name, v in k0_all.items()}
        value = attention_loss(cap, layers, lora, base, text, k0, tokens[pidx], data.masks[idx])
        value.backward()
        return value.detach()
    return loss


def _abo_loss(backend, predict, layers, lora, base, text_all, settings):
    """|| [eps(x,c) - eps(x,0)] - s [eps0(x,alt) - eps0(x,0)] ||^2 + lambda || eps(x,0) - eps0(x,0) ||^2,
    eps with the refined weights + LoRA, eps0 the frozen original model; no alternative: target 0."""
    empty = backend.encode([""])
    alt = backend.encode([settings.alternative]) if settings.alternative else None

    def loss(x, t, idx, pidx):
        b = x.shape[0]
        text, unc = text_all.select(pidx), TextBatch.cat([empty] * b)
        with torch.no_grad():
            u0 = backend.predict(x, t, unc).float()
            target = (settings.abo_scale * (backend.predict(x, t, TextBatch.cat([alt] * b)).float() - u0)
                      if alt is not None else torch.zeros_like(u0))
        with weight_deltas(layers, _lora_deltas(lora, base)):
            ec = predict(x, t, text).float()
            eu = predict(x, t, unc).float()
            value = F.mse_loss(ec - eu, target) + settings.abo_lambda * F.mse_loss(eu, u0)
            # backward while the LoRA hooks are on: gradient checkpointing reruns the UNet in it
            value.backward()
        return value.detach()
    return loss


@torch.no_grad()
def measure_attention_loss(backend: Backend, data: ConceptData, prompts: list[str], tokens: torch.Tensor,
                           deltas: Mapping[str, torch.Tensor], timesteps: list[int], seed: int = 0) -> float:
    """The attention loss of a fixed model (weights W0 + deltas) on fixed samples, for before/after checks."""
    layers = backend.cross_attention()
    g = torch.Generator().manual_seed(seed)
    dev = backend.device
    ac = backend.alphas_cumprod.float()
    text_all = backend.encode(prompts)
    zero = LoRA({l.k_key: torch.zeros(1, l.to_k.weight.shape[1], device=dev) for l in layers},
                {l.k_key: torch.zeros(l.to_k.weight.shape[0], 1, device=dev) for l in layers}, 1.0)
    full = {k: v.to(dev) for k, v in deltas.items()}
    vals = []
    for i in range(data.latents.shape[0]):
        for t in timesteps:
            pidx = torch.tensor([i % len(prompts)])
            a = ac[t]
            noise = torch.randn(data.latents[i:i + 1].shape, generator=g)
            x = (a.sqrt() * data.latents[i:i + 1] + (1 - a).sqrt() * noise).to(dev)
            text = text_all.select(pidx)
            with QKCapture(layers) as cap, weight_deltas(layers, full):
                backend.predict(x, torch.tensor([t], device=dev), text)
            k0 = {l.name: l.to_k(text.context.to(dev, l.to_k.weight.dtype)).float() for l in layers}
            kd = {k: v for k, v in full.items() if k.endswith("to_k.weight")}
            kd.update({l.k_key: torch.zeros_like(l.to_k.weight, dtype=torch.float32) for l in layers if l.k_key not in kd})
            vals.append(float(attention_loss(cap, layers, zero, kd, text, k0, tokens[pidx], data.masks[i:i + 1])))
    return sum(vals) / len(vals)
