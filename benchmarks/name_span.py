"""How many dimensions the identity world's names take where the UNet reads them, and how much of the
kept names lies in what the erased names span.

    OMP_NUM_THREADS=1 python benchmarks/name_span.py

For each scored prompt form and for the end token and two padding positions after it: the 64 names'
cross-attention keys and values there (every attn2 to_k / to_v output of the base model, concatenated:
y = [W_1 e; ...; W_L e] for the context embedding e [D]), centred over the names (what tells one name
from another); how much of y's norm that is; how many dimensions hold 50 / 80 / 90% of its variance;
and the mean share of a kept name's centred y inside the span of the erased names' (the ten-name case
of benchmarks/ablation.py; one name: the mean over the single case's three names). An edit linear in e
that moves the erased names' centred y moves that share of every kept name's with it, unless a kept
name is named to hold it. Text encoder and weights only, no images: seconds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "shared"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ablation import SINGLE  # noqa: E402
from damage import kv_outputs  # noqa: E402
from idworld import ID_MODEL, world  # noqa: E402
from mace_core.model.checkpoint import load_checkpoint  # noqa: E402
from mace_core.model.diffusers_backend import DiffusersBackend  # noqa: E402

PROMPTS = ("a portrait of {}", "a portrait of {} next to a star", "a photo of {} in a red frame")
POSITIONS = {"end token": 0, "padding +1": 1, "padding +10": 10}  # offset from the end token


def share_in_span(y: torch.Tensor, erased: list[int]) -> float:
    """Mean over the rows of ``y`` [N, F] not in ``erased`` of the squared share of each row inside the
    span of the ``erased`` rows."""
    q, _ = torch.linalg.qr(y[erased].T)  # [F, len(erased)], orthonormal columns
    kept = [i for i in range(y.shape[0]) if i not in erased]
    return float((((y[kept] @ q).norm(dim=1) / y[kept].norm(dim=1)) ** 2).mean())


def dims_for(y: torch.Tensor, fractions=(0.5, 0.8, 0.9)) -> list[int]:
    """How many principal directions of ``y`` [N, F] hold each fraction of its variance."""
    sv2 = torch.linalg.svdvals(y) ** 2
    cum = sv2.cumsum(0) / sv2.sum()
    return [int((cum < f).sum()) + 1 for f in fractions]


def main() -> None:
    base = DiffusersBackend.from_checkpoint(load_checkpoint(ID_MODEL), device="cpu")
    weights = {k: w.double() for k, w in base.original_weights().items()}
    names = list(world.NAMES)
    ten = list(range(0, len(names), 6))[:10]  # benchmarks/ablation.py's ten-name case: names[::6][:10]
    print("| prompt | position | names' share of the K/V norm | dims for 50 / 80 / 90% | a kept name inside "
          "the ten erased names' span | inside one erased name's |\n|---|---|---:|---:|---:|---:|")
    for form in PROMPTS:
        prompts = [form.format(n) for n in names]
        ctx = base.encode(prompts).context.double()
        for label, off in POSITIONS.items():
            e = torch.stack([ctx[b, len(base.tokenize(p)) - 1 + off] for b, p in enumerate(prompts)])  # [64, D]
            y = kv_outputs(weights, e)  # [64, sum of the layers' widths]
            yc = y - y.mean(0)
            share = float((yc.norm(dim=1) / y.norm(dim=1)).mean())
            one = sum(share_in_span(yc, [i]) for i in SINGLE) / len(SINGLE)
            print(f"| {form.format('{name}')!r} | {label} | {share:.2f} | {' / '.join(map(str, dims_for(yc)))} | "
                  f"{share_in_span(yc, ten):.2f} | {one:.2f} |", flush=True)


if __name__ == "__main__":
    main()
