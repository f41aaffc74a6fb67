"""The identity-world judge: a small CNN (the shape world's :class:`toyworld.judge.JudgeNet`) whose heads
read, independently of the prompt, the face's seven attributes (head shape and the colors of its six
cells; each or "none"), the style and the object. Its verdicts:

* identity: one of the 64 names of :data:`idworld.world.NAMES` when the seven attributes read are that
  identity's, else "none" (the anonymous face, a face whose attributes are no identity's, as a half-erased
  face is; two faces, a face cut by the border, blur, noise, blank, an object alone): the identity
  whose attributes are the seven heads' most likely classes. :meth:`IdJudge.probabilities` gives each
  identity the product of its attributes' probabilities, "none" the rest;
* style: one of the 8 styles of :data:`idworld.world.STYLES` or "none" (drawn plain);
* object: one of the 8 objects (a prop or the object alone) or "none".

    judge = IdJudge.load()
    judge.classify(images)  # -> [("Bill Marlow", "none", "star"), ("none", "inverted", "none"), ...]

Weights: ``data/judge.safetensors``, trained by ``train_judge.py`` (12 epochs, width 32, 41 min on one
core; its held-out accuracy is in the file's metadata). On clean renders of seeds it never saw: identity
99.7% on unstyled faces (with props and frames; the benchmarks' identity prompts), 95.0% under a style,
style 98.7%, an object alone 97.3%, a prop beside a face 65% (its colors are the cells'), "none" for
the negatives (faces of nobody, two faces, cut, blurred, blank, noise) 98.3%. Identities under a style
are not asked of it by the benchmarks: "outline" keeps only the cells' borders.
"""
from __future__ import annotations

from pathlib import Path

import torch

from toyworld.judge import head_probabilities, load_net

from .world import ATTRIBUTE_VALUES as ATTRIBUTES, IDENTITIES, NAMES, OBJECTS, STYLES

IDENTITY_CLASSES: tuple[str, ...] = NAMES + ("none",)
STYLE_CLASSES: tuple[str, ...] = STYLES + ("none",)
OBJECT_CLASSES: tuple[str, ...] = OBJECTS + ("none",)
#: the net's heads, in order: the attributes (+ "none"), style, object
HEAD_CLASSES: dict[str, tuple[str, ...]] = {**{k: v + ("none",) for k, v in ATTRIBUTES.items()},
                                            "style": STYLE_CLASSES, "object": OBJECT_CLASSES}
HEADS = {k: len(v) for k, v in HEAD_CLASSES.items()}
N_ATTRIBUTES = len(ATTRIBUTES)
#: [64, 7] the attribute indices of each identity
CODES = torch.tensor([[values.index(v) for values, v in zip(ATTRIBUTES.values(), i.attributes())] for i in IDENTITIES])
DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "data" / "judge.safetensors"


def identity_probabilities(attribute_probs: list[torch.Tensor]) -> torch.Tensor:
    """[N, 65] from the attribute heads' probabilities ([N, values + 1] each): identity k gets the product of
    its attributes' probabilities, "none" (last) the rest."""
    p = torch.ones(attribute_probs[0].shape[0], len(IDENTITIES))
    for j, probs in enumerate(attribute_probs):
        p = p * probs[:, CODES[:, j]]
    return torch.cat([p, (1 - p.sum(-1, keepdim=True)).clamp_min(0)], -1)


class IdJudge:
    """Identity, style and object classifier for the identity world."""

    def __init__(self, net, meta: dict | None = None):
        self.net = net.eval()
        self.meta = meta or {}

    @classmethod
    def load(cls, path: str | Path | None = None) -> "IdJudge":
        return cls(*load_net(path if path is not None else DEFAULT_WEIGHTS, HEADS))

    def probabilities(self, images, batch_size: int = 512):
        """(identity probs [N, 65], style probs [N, 9], object probs [N, 9]) as float32 tensors; images
        uint8 [N, 32, 32, 3] or float [N, 3, 32, 32] in [-1, 1]."""
        heads = head_probabilities(self.net, images, batch_size)
        return identity_probabilities(heads[:N_ATTRIBUTES]), heads[-2], heads[-1]

    def classify(self, images) -> list[tuple[str, str, str]]:
        """(identity, style, object) per image, each a class name or "none". The identity is the one
        whose attributes are the attribute heads' most likely classes, "none" if no identity has them."""
        heads = [p.argmax(-1) for p in head_probabilities(self.net, images)]
        attrs = torch.stack(heads[:N_ATTRIBUTES], 1)  # [N, 7]
        match = (attrs[:, None, :] == CODES[None]).all(-1)  # [N, 64]
        ident = torch.where(match.any(-1), match.float().argmax(-1), len(IDENTITIES))
        return [(IDENTITY_CLASSES[i], STYLE_CLASSES[s], OBJECT_CLASSES[o])
                for i, s, o in zip(ident.tolist(), heads[-2].tolist(), heads[-1].tolist())]
