"""Toy world: synthetic shapes, a judge CNN and a tiny SD1-family text-to-image model (issue 10)."""

from pathlib import Path as _Path

#: the shipped toy model: a single-file SD1-layout checkpoint (its tiny architecture in `mace.arch`)
TOY_MODEL = _Path(__file__).resolve().parent / "data" / "toy-sd1.safetensors"
