"""Hooks on attn2 projections: weight deltas without touching the host's weights, and capture of
the queries / keys that the attention loss and the attention masks need.

Forward hooks on ``to_k`` / ``to_v`` add ``context @ delta^T`` to their output, which equals running
the layer with weight ``W + delta`` — on any host whose attn2 calls its ``to_k`` / ``to_v`` modules
(diffusers, ComfyUI, A1111's ldm), and without writing into modules a host may share.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F

from ..model.backend import CrossAttentionLayer

DeltaFn = Callable[[], torch.Tensor]


@contextlib.contextmanager
def weight_deltas(layers: list[CrossAttentionLayer], deltas: Mapping[str, torch.Tensor | DeltaFn]) -> Iterator[None]:
    """Run the model as if each to_k / to_v weight (file key) were ``W + delta``.

    A delta is a tensor [C, D] or a function returning one (re-evaluated on every call, so LoRA
    factors being trained get gradients).
    """
    handles = []
    for layer in layers:
        for key, mod in ((layer.k_key, layer.to_k), (layer.v_key, layer.to_v)):
            if key in deltas:
                handles.append(mod.register_forward_hook(_add_delta(deltas[key])))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _add_delta(delta):
    def hook(module, args, output):
        d = delta() if callable(delta) else delta
        x = args[0]
        return output + F.linear(x.to(d.dtype), d).to(output.dtype)
    return hook


class QKCapture:
    """Records each attn2's query [B, N, C] and key [B, T, C] outputs during a forward pass.

    ``keep_grad_keys`` leaves the keys attached to the autograd graph; queries are detached (the
    mace loss treats them as constants, see train.py) unless ``keep_grad_queries`` (the authors'
    full-backprop loss, objectives.py).
    """

    def __init__(self, layers: list[CrossAttentionLayer], keep_grad_keys: bool = False,
                 keep_grad_queries: bool = False):
        self.layers = layers
        self.keep_grad_keys = keep_grad_keys
        self.keep_grad_queries = keep_grad_queries
        self.q: dict[str, torch.Tensor] = {}
        self.k: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> "QKCapture":
        for layer in self.layers:
            q_hook = self._store(self.q, layer.name, self.keep_grad_queries)
            self._handles.append(layer.to_q.register_forward_hook(q_hook))
            self._handles.append(layer.to_k.register_forward_hook(self._store(self.k, layer.name, self.keep_grad_keys)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @staticmethod
    def _store(target: dict, name: str, keep_grad: bool):
        def hook(module, args, output):
            target[name] = output if keep_grad else output.detach()
        return hook


def attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """Softmax attention probabilities [B, heads, N, T] (fp32) of queries q [B, N, C] on keys k [B, T, C]."""
    b, n, c = q.shape
    dh = c // heads
    qh = q.reshape(b, n, heads, dh).transpose(1, 2).float()
    kh = k.reshape(b, k.shape[1], heads, dh).transpose(1, 2).float()
    return torch.softmax(qh @ kh.transpose(-1, -2) * dh ** -0.5, dim=-1)


def token_attention(q: torch.Tensor, k: torch.Tensor, heads: int, tokens: torch.Tensor,
                    pixels: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention probabilities on chosen token positions.

    q [B, N, C], k [B, T, C]; tokens bool [B, T]; pixels bool [B, N] or None (all).
    Returns the attention mass on the chosen tokens, summed over them: [B, heads, N] (pixels not
    selected are zero). Only the [.., N, T] logits are formed, never the values' product.
    """
    probs = attention_probs(q, k, heads)
    mass = (probs * tokens[:, None, None, :].to(probs.dtype)).sum(-1)  # [B, h, N]
    if pixels is not None:
        mass = mass * pixels[:, None, :].to(mass.dtype)
    return mass
