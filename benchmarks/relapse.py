"""Relapse on the toy world: does an erased shape come back after unrelated fine-tuning?

    python benchmarks/relapse.py [--concept circle] [--steps 100] [--robust 0]

Erases the shape with the toy preset, then fine-tunes the erased model (text encoder and UNet, as
the toy model was trained) for ``--steps`` steps on renders of the *other* shapes only, with their
captions, and measures the erased shape's accuracy before erasure, after it, and after the
fine-tune (same seeds). The relapse figure is the recovered share of the original rate.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "shared"))

from mace_core.checkpoint import load_checkpoint  # noqa: E402
from mace_core.diffusers_backend import DiffusersBackend  # noqa: E402
from toy import erased_backend  # noqa: E402  (benchmarks/toy.py, beside this script)
from toyworld import TOY_MODEL, world  # noqa: E402
from toyworld.evaluate import object_scores  # noqa: E402
from toyworld.judge import Judge  # noqa: E402
from toyworld.train_model import encode_all, train_diffusion  # noqa: E402


def finetune_without(backend: DiffusersBackend, shape: str, steps: int, n_images: int = 2000, seed: int = 0) -> None:
    """Fine-tune ``backend``'s text encoder and UNet in place on renders of every shape but ``shape``."""
    rng = np.random.default_rng(seed)
    keep = [i for i, s in enumerate(world.SHAPES) if s != shape]
    labels = np.array([(keep[int(rng.integers(len(keep)))], int(rng.integers(len(world.COLOR_NAMES))))
                       for _ in range(n_images)])
    imgs = np.stack([world.render(world.SHAPES[s], world.COLOR_NAMES[c], rng) for s, c in labels])
    c = backend.components
    mean, std = encode_all(c.vae, torch.from_numpy(world.to_tensor_range(imgs)))
    for m in (c.text_encoders[0], c.unet):
        m.requires_grad_(True)
    with torch.enable_grad():
        train_diffusion(c.text_encoders[0], c.unet, mean, std, labels, c.tokenizers[0], steps=steps, batch=32,
                        lr=1e-4, ema_decay=0.0, seed=seed, scaling_factor=float(c.vae.config.scaling_factor),
                        log_every=max(1, steps // 4))
    for m in (c.text_encoders[0], c.unet):
        m.eval().requires_grad_(False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concept", default="circle")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--robust", type=int, default=0, help="hardening rounds of the erasure")
    ap.add_argument("--seeds", type=int, default=6, help="seeds per color")
    args = ap.parse_args()
    ck, judge = load_checkpoint(TOY_MODEL), Judge.load()
    base = DiffusersBackend.from_checkpoint(ck, device="cpu")
    erased = erased_backend(ck, [args.concept], {"robust_rounds": args.robust})
    score = lambda be: object_scores(be, judge, [args.concept], args.seeds)  # noqa: E731
    b, e = score(base), score(erased)
    finetune_without(erased, args.concept, args.steps)
    f = score(erased)
    share = (f.acc_e - e.acc_e) / max(b.acc_e, 1e-9)
    print("| model | Acc_e | Acc_g | Acc_s |\n|---|---:|---:|---:|")
    for name, s in (("base", b), ("erased", e), (f"erased + {args.steps} unrelated fine-tuning steps", f)):
        print(f"| {name} | {s.acc_e:.1f} | {s.acc_g:.1f} | {s.acc_s:.1f} |")
    print(f"\nrelapse: {100 * share:.1f}% of the base model's rate came back (target <= 20%)")


if __name__ == "__main__":
    main()
