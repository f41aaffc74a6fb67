"""Soft-token attacks against plain and hardened (`--robust`) erasure, on the toy world.

    python benchmarks/robust.py --concept square --rounds 2

Erases the concept, then hardens the same project for ``--rounds`` rounds (the LoRA is reused). For
each model: the erased word's own prompts (direct), a fresh soft-token embedding attack (2 learned
tokens, 150 steps, on the base model's images of the shape, learned against that model), and the
attacks the hardening rounds found (kept in the project) replayed on both models; as % of images the
toy judge reads as the erased shape, 10 seeds; template "a photo of a blue {}" (the rounds' attacks:
their own template), DDIM 20 steps, CFG 5.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "shared"))

from mace_core.model.checkpoint import load_checkpoint, with_edits  # noqa: E402
from mace_core.method.concepts import ErasureSpec, make_concept  # noqa: E402
from mace_core.model.diffusers_backend import DiffusersBackend  # noqa: E402
from mace_core.method.erase import erase  # noqa: E402
from mace_core.eval.evaluate import embedding_asr, soft_token_asr  # noqa: E402
from mace_core.eval.metrics import accuracy  # noqa: E402
from mace_core.method.project import Project  # noqa: E402
from mace_core.model.sampling import generate  # noqa: E402
from toyworld import TOY_MODEL  # noqa: E402
from toyworld.plugin import toy_classifier  # noqa: E402

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
    c = make_concept(args.concept, "", "toy")
    with tempfile.TemporaryDirectory() as d:
        proj = Project(d)
        results = {"plain erasure": erase(base, ErasureSpec((c,)), proj, ck.sha256),
                   f"--robust-rounds {args.rounds}": erase(base, ErasureSpec((c,), (), {"robust_rounds": args.rounds}),
                                                           proj, ck.sha256)}
        attacks = proj.load_attacks(c)
    heads = " | ".join(f"round {i + 1}'s attack" for i in range(len(attacks)))
    print(f"| {args.concept} | direct | fresh soft tokens | {heads} |\n|---|---:|---:|" + "---:|" * len(attacks))
    for name, res in results.items():
        model = DiffusersBackend.from_checkpoint(with_edits(ck, res.weights), device="cpu")
        direct = accuracy(classify(generate(model, [TEMPLATE.replace("{}", args.concept)] * len(seeds), seeds,
                                            STEPS, GUIDANCE)), args.concept)
        soft = embedding_asr(model, base, classify, args.concept, args.concept, TEMPLATE, seeds, STEPS, GUIDANCE,
                             attack_steps=150)
        replay = [soft_token_asr(model, a, classify, args.concept, t, seeds, STEPS, GUIDANCE) for a, t in attacks]
        print(f"| {name} | {direct:.1f} | {soft:.1f} | " + " | ".join(f"{r:.1f}" for r in replay) + " |", flush=True)


if __name__ == "__main__":
    main()
