"""Deterministic DDIM sampling with classifier-free guidance, on any `Backend`.

Image i of a request uses its own seed: the initial noise is drawn on the CPU from
``torch.Generator().manual_seed(seed)``, so a seed gives the same image whatever the batch size,
and the same image on every run of a given device.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from .backend import Backend, TextBatch

StepCallback = Callable[[int, int], None]  # (step index, number of steps)


def ddim_timesteps(steps: int, num_train: int = 1000) -> list[int]:
    """SD's "leading" spacing with offset 1: e.g. 50 steps -> 981, 961, ..., 1."""
    stride = num_train // steps
    return [i * stride + 1 for i in range(steps)][::-1]


def initial_noise(seeds: Sequence[int], shape: tuple[int, int, int]) -> torch.Tensor:
    """[B, c, h, w] float32 noise on the CPU, one generator per seed."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def to_x0_eps(backend: Backend, x: torch.Tensor, out: torch.Tensor, a: torch.Tensor):
    """(x0, eps) from a model output at alpha_cumprod ``a`` (broadcastable), eps or v prediction."""
    sa, s1 = a.sqrt(), (1 - a).sqrt()
    if backend.prediction_type == "v_prediction":
        return sa * x - s1 * out, sa * out + s1 * x
    return (x - s1 * out) / sa, out


@torch.no_grad()
def sample_latents(backend: Backend, text: TextBatch, uncond: TextBatch | None, seeds: Sequence[int],
                   steps: int = 50, guidance: float = 7.5, size: int | None = None,
                   on_step: StepCallback | None = None) -> torch.Tensor:
    """DDIM (eta 0) from per-seed noise; ``uncond`` None or guidance 1 disables CFG.

    text/uncond: [B] batches. Returns latents [B, c, h, w] float32 on the CPU.
    """
    size = size or backend.resolution
    h = size // backend.vae_scale
    x = initial_noise(seeds, (backend.latent_channels, h, h)).to(backend.device, torch.float32)
    ac = backend.alphas_cumprod.to(backend.device)
    ts = ddim_timesteps(steps, len(ac))
    cfg = uncond is not None and guidance != 1.0
    both = TextBatch.cat([uncond, text]) if cfg else text
    for i, t in enumerate(ts):
        inp = torch.cat([x, x]) if cfg else x
        out = backend.predict(inp, torch.full((inp.shape[0],), t, device=backend.device), both).float()
        if cfg:
            u, c = out.chunk(2)
            out = u + guidance * (c - u)
        a = ac[t].float()
        a_prev = ac[ts[i + 1]].float() if i + 1 < len(ts) else ac[0].float()
        x0, eps = to_x0_eps(backend, x, out, a)
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        if on_step:
            on_step(i + 1, len(ts))
    return x.cpu()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3]."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def generate(backend: Backend, prompts: Sequence[str], seeds: Sequence[int], steps: int = 50,
             guidance: float = 7.5, negative: str = "", size: int | None = None, batch_size: int = 8,
             on_batch: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Images for (prompt, seed) pairs, in order, as uint8 [N, H, W, 3]."""
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    out = []
    neg = backend.encode([negative])
    for s in range(0, len(prompts), batch_size):
        p, sd = list(prompts[s:s + batch_size]), list(seeds[s:s + batch_size])
        text = backend.encode(p)
        uncond = TextBatch.cat([neg] * len(p))
        lat = sample_latents(backend, text, uncond, sd, steps, guidance, size)
        out.append(to_uint8(backend.decode_latents(lat).cpu()))
        if on_batch:
            on_batch(min(s + batch_size, len(prompts)), len(prompts))
    return np.concatenate(out)
