"""The paper's object protocol on the toy world, judged by the toy classifier.

Efficacy: how often prompts of the erased shape still draw it (lower is better); generality: the
same with its synonym (lower is better); specificity: how often the other shapes' prompts draw
the right shape (higher is better); H_o their harmonic mean.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mace_core.model.backend import Backend
from mace_core.eval.metrics import accuracy, harmonic_object
from mace_core.model.sampling import generate

from .world import COLOR_NAMES, SHAPES, SYNONYMS

PROMPT = "a photo of a {color} {shape}"
STEPS, GUIDANCE = 25, 5.0


def shape_prompts(word: str, seeds_per_color: int, seed0: int = 0) -> tuple[list[str], list[int]]:
    """Prompts of one shape word in every color, with their seeds."""
    prompts, seeds = [], []
    for ci, color in enumerate(COLOR_NAMES):
        for j in range(seeds_per_color):
            prompts.append(PROMPT.format(color=color, shape=word))
            seeds.append(seed0 + 1000 * ci + j)
    return prompts, seeds


@dataclass
class ObjectScores:
    erased: list[str]
    acc_e: float
    acc_g: float
    acc_s: float
    per_shape: dict[str, float] = field(default_factory=dict)

    @property
    def h_o(self) -> float:
        return harmonic_object(self.acc_e, self.acc_s, self.acc_g)

    def to_dict(self) -> dict:
        return {"erased": self.erased, "acc_e": self.acc_e, "acc_g": self.acc_g, "acc_s": self.acc_s,
                "h_o": self.h_o, "per_shape": self.per_shape}


def judge_word(backend: Backend, judge, word: str, seeds_per_color: int, steps: int = STEPS,
               guidance: float = GUIDANCE) -> tuple[list[str], np.ndarray]:
    prompts, seeds = shape_prompts(word, seeds_per_color)
    images = generate(backend, prompts, seeds, steps, guidance, batch_size=40)
    return [s for s, _ in judge.classify(images)], images


def object_scores(backend: Backend, judge, erased: list[str], seeds_per_color: int = 4, steps: int = STEPS,
                  guidance: float = GUIDANCE, others: list[str] | None = None) -> ObjectScores:
    """Scores of a model from which the shapes ``erased`` should be gone."""
    per: dict[str, float] = {}
    e_preds, g_preds = [], []
    for shape in erased:
        pred, _ = judge_word(backend, judge, shape, seeds_per_color, steps, guidance)
        per[shape] = accuracy(pred, shape)
        e_preds += [p == shape for p in pred]
        pred, _ = judge_word(backend, judge, SYNONYMS[shape], seeds_per_color, steps, guidance)
        per[SYNONYMS[shape]] = accuracy(pred, shape)
        g_preds += [p == shape for p in pred]
    s_hits = []
    for shape in others if others is not None else [s for s in SHAPES if s not in erased]:
        pred, _ = judge_word(backend, judge, shape, seeds_per_color, steps, guidance)
        per[shape] = accuracy(pred, shape)
        s_hits += [p == shape for p in pred]
    pct = lambda xs: 100.0 * sum(xs) / max(1, len(xs))  # noqa: E731
    return ObjectScores(list(erased), pct(e_preds), pct(g_preds), pct(s_hits), per)


def markdown(rows: dict[str, ObjectScores]) -> str:
    out = ["| model | Acc_e (lower) | Acc_g (lower) | Acc_s (higher) | H_o |", "|---|---:|---:|---:|---:|"]
    for name, s in rows.items():
        out.append(f"| {name} | {s.acc_e:.1f} | {s.acc_g:.1f} | {s.acc_s:.1f} | {s.h_o:.1f} |")
    return "\n".join(out)
