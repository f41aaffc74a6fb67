"""Soft-token attack against plain and hardened (`--robust`) erasure, on the toy world.

    python benchmarks/robust.py --concept square --rounds 2

For each model: the erased word's own prompts (direct) and the soft-token embedding attack's success
rate (2 learned tokens, 150 steps, on the base model's images of the shape), as % of images the
toy judge reads as the erased shape; template "a photo of a blue {}", DDIM 20 steps, CFG 5.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "shared"))

from mace_core.checkpoint import load_checkpoint  # noqa: E402
from mace_core.diffusers_backend import DiffusersBackend  # noqa: E402
from mace_core.evaluate import embedding_asr, toy_classifier  # noqa: E402
from mace_core.metrics import accuracy  # noqa: E402
from mace_core.sampling import generate  # noqa: E402
from toy import erased_backend  # noqa: E402  (benchmarks/toy.py, beside this script)
from toyworld import TOY_MODEL  # noqa: E402

TEMPLATE, STEPS, GUIDANCE = "a photo of a blue {}", 20, 5.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concept", default="square")
    ap.add_argument("--rounds", type=int, default=2, help="hardening rounds of the robust model")
    ap.add_argument("--seeds", type=int, default=10)
    args = ap.parse_args()
    ck, classify = load_checkpoint(TOY_MODEL), toy_classifier()
    base = DiffusersBackend.from_checkpoint(ck, device="cpu")
    seeds = list(range(args.seeds))
    print(f"| {args.concept} | direct | soft tokens |\n|---|---:|---:|")
    for name, rounds in (("plain erasure", 0), (f"--robust-rounds {args.rounds}", args.rounds)):
        model = erased_backend(ck, [args.concept], {"robust_rounds": rounds})
        direct = accuracy(classify(generate(model, [TEMPLATE.replace("{}", args.concept)] * len(seeds), seeds,
                                            STEPS, GUIDANCE)), args.concept)
        soft = embedding_asr(model, base, classify, args.concept, args.concept, TEMPLATE, seeds, STEPS, GUIDANCE,
                             attack_steps=150)
        print(f"| {name} | {direct:.1f} | {soft:.1f} |", flush=True)


if __name__ == "__main__":
    main()
