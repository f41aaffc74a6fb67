"""The toy-world judge: a small CNN that names the shape and the color of a 32x32 image.

Shape classes are the 8 shapes of :mod:`toyworld.world` plus ``"none"`` (blank, noise,
blurry blob, two shapes, a shape cut by the border, a tiny speck: anything that is not one
clear shape), so a broken image never counts as a shape. Color classes are the 5 colors plus
``"none"``.

    judge = Judge.load()
    judge.classify(images)  # -> [("circle", "red"), ("none", "none"), ...]

Weights: ``data/judge.safetensors``, trained by ``train_judge.py``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .world import COLOR_NAMES, SHAPES

SHAPE_CLASSES: tuple[str, ...] = SHAPES + ("none",)
COLOR_CLASSES: tuple[str, ...] = COLOR_NAMES + ("none",)
DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "data" / "judge.safetensors"


class JudgeNet(nn.Module):
    """A small CNN over 32x32 RGB with one linear classification head per entry of ``heads``
    ({name: number of classes}; default: the toy world's shape and color heads).
    ``forward``: float [N, 3, 32, 32] in [-1, 1] -> one logits tensor [N, classes] per head, in order."""

    def __init__(self, width: int = 24, heads: dict[str, int] | None = None):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 16
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 8
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 4
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 16, 128), nn.ReLU(inplace=True))
        heads = heads if heads is not None else {"shape": len(SHAPE_CLASSES), "color": len(COLOR_CLASSES)}
        self.head_names = tuple(heads)
        for name, n in heads.items():  # registered as <name>_head (the toy judge's weight names)
            setattr(self, f"{name}_head", nn.Linear(128, n))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.fc(self.features(x))
        return tuple(getattr(self, f"{name}_head")(h) for name in self.head_names)


def load_net(path: str | Path, heads: dict[str, int] | None = None) -> tuple[JudgeNet, dict]:
    """A :class:`JudgeNet` with the weights of ``path`` (its width from the file's metadata), and that metadata."""
    from safetensors.torch import load_file, safe_open

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
    net = JudgeNet(int(json.loads(meta.get("config", "{}")).get("width", 24)), heads)
    net.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return net.eval(), meta


@torch.no_grad()
def head_probabilities(net: JudgeNet, images, batch_size: int = 512) -> list[torch.Tensor]:
    """Softmax of each head over ``images`` (see :func:`to_judge_input`): float32 [N, classes] per head."""
    x = to_judge_input(images)
    parts = [net(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)]
    if not parts:
        return [torch.zeros(0, getattr(net, f"{n}_head").out_features) for n in net.head_names]
    return [torch.cat([p[k] for p in parts]).softmax(-1) for k in range(len(net.head_names))]


def to_judge_input(images) -> torch.Tensor:
    """uint8 [N,32,32,3] (numpy/torch) or float [N,3,32,32] in [-1,1] -> float32 [N,3,32,32]."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if images.dtype == torch.uint8:
        if images.ndim == 3:
            images = images[None]
        return images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()
    x = images.detach().float()
    if x.ndim == 3:
        x = x[None]
    if x.shape[1] != 3 and x.shape[-1] == 3:
        raise ValueError("float input must be [N, 3, 32, 32] in [-1, 1]; pass uint8 for HWC images")
    return x.clamp(-1, 1).contiguous()


class Judge:
    """Shape and color classifier for the toy world."""

    def __init__(self, net: JudgeNet, meta: dict | None = None):
        self.net = net.eval()
        self.meta = meta or {}

    @classmethod
    def load(cls, path: str | Path | None = None) -> "Judge":
        return cls(*load_net(path if path is not None else DEFAULT_WEIGHTS))

    def probabilities(self, images, batch_size: int = 512):
        """(shape probs [N, 9], color probs [N, 6]) as float32 tensors."""
        return tuple(head_probabilities(self.net, images, batch_size))

    def classify(self, images, return_confidence: bool = False, min_confidence: float = 0.0):
        """List of (shape or "none", color or "none") per image.

        With ``return_confidence`` each item is (shape, color, shape_prob, color_prob).
        A shape whose probability is below ``min_confidence`` is reported as "none".
        """
        ps, pc = self.probabilities(images)
        sconf, sidx = ps.max(-1)
        cconf, cidx = pc.max(-1)
        out = []
        for i in range(ps.shape[0]):
            shape = SHAPE_CLASSES[int(sidx[i])]
            if float(sconf[i]) < min_confidence:
                shape = "none"
            color = COLOR_CLASSES[int(cidx[i])]
            if return_confidence:
                out.append((shape, color, float(sconf[i]), float(cconf[i])))
            else:
                out.append((shape, color))
        return out
