"""The toy world as a `mace` plug-in (entry point ``mace.plugins: toyworld``): ``mace demo`` and
``mace eval --classifier toy`` (the toy world's judge). The core never imports this package."""

from __future__ import annotations

import argparse
from pathlib import Path


def register() -> None:
    from mace_core.plugins import Command, register_classifier, register_command

    register_command("demo", Command("erase a shape from the shipped toy model (CPU, offline, ~1 minute)",
                                     _demo_arguments, _demo))
    register_classifier("toy", toy_judge)


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--concept", default="circle", help="the shape to erase")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder")


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


def toy_classifier():
    """The toy world's judge as a classifier: images [N, H, W, 3] uint8 -> shape names."""
    from .judge import Judge

    judge = Judge.load()
    return lambda images: [s for s, _ in judge.classify(images)]


def toy_judge(erased: list[str], synonyms: dict[str, list[str]], retain: list[str]):
    """`mace eval --classifier toy`: the judge; each erased shape's synonym joins its synonyms, words are
    judged as the shape they name, and without retained words the other shapes are checked."""
    from .world import SHAPES, SYNONYMS, WORD_TO_SHAPE

    for c in erased:
        synonyms.setdefault(c, [SYNONYMS[c]] if c in SYNONYMS else [])
    return toy_classifier(), lambda w: WORD_TO_SHAPE.get(w, w), retain or [s for s in SHAPES if s not in erased]
