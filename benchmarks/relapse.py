"""Relapse on the toy world: does an erased shape come back after unrelated fine-tuning?

    python benchmarks/relapse.py [--concept circle] [--steps 100] [--robust 0]

Erases the shape with the toy preset, then (1) fine-tunes the erased model (text encoder and UNet,
as the toy model was trained) for ``--steps`` steps on renders of the *other* shapes only, with
their captions, and (2) applies to the erased model an unrelated LoRA (rank 4 on every attention
projection, trained on the *base* model for ``--steps`` steps on the same unrelated renders, as a
user would download one), and measures the erased shape's accuracy before erasure, after it, and
after each (same seeds). The relapse figure is the recovered share of the original rate.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "shared"))

from mace_core.model.checkpoint import load_checkpoint  # noqa: E402
from mace_core.model.diffusers_backend import DiffusersBackend  # noqa: E402
from toy import erased_backend  # noqa: E402  (benchmarks/toy.py, beside this script)
from toyworld import TOY_MODEL, world  # noqa: E402
from toyworld.evaluate import object_scores  # noqa: E402
from toyworld.judge import Judge  # noqa: E402
from toyworld.train_model import encode_all, train_diffusion  # noqa: E402


def finetune_without(backend: DiffusersBackend, shape: str, steps: int, n_images: int = 2000, seed: int = 0,
                     trainable=lambda name: True) -> None:
    """Fine-tune ``backend``'s text encoder and UNet in place on renders of every shape but ``shape``
    (only the parameters whose names ``trainable`` accepts)."""
    rng = np.random.default_rng(seed)
    keep = [i for i, s in enumerate(world.SHAPES) if s != shape]
    labels = np.array([(keep[int(rng.integers(len(keep)))], int(rng.integers(len(world.COLOR_NAMES))))
                       for _ in range(n_images)])
    imgs = np.stack([world.render(world.SHAPES[s], world.COLOR_NAMES[c], rng) for s, c in labels])
    c = backend.components
    mean, std = encode_all(c.vae, torch.from_numpy(world.to_tensor_range(imgs)))
    for m in (c.text_encoders[0], c.unet):
        for name, p in m.named_parameters():
            p.requires_grad_(trainable(name))
    with torch.enable_grad():
        train_diffusion(c.text_encoders[0], c.unet, mean, std, labels, c.tokenizers[0], steps=steps, batch=32,
                        lr=1e-4, ema_decay=0.0, seed=seed, scaling_factor=float(c.vae.config.scaling_factor),
                        log_every=max(1, steps // 4))
    for m in (c.text_encoders[0], c.unet):
        m.eval().requires_grad_(False)


def unrelated_lora(base: DiffusersBackend, shape: str, steps: int, rank: int = 4) -> dict[str, torch.Tensor]:
    """Weight deltas {UNet module path: [out, in]} of a LoRA (peft, every attention projection) trained
    on a copy of ``base`` on renders of every shape but ``shape``; ``base`` is left as it was."""
    import copy

    import peft

    twin = copy.deepcopy(base)
    c = twin.components
    c.unet = peft.inject_adapter_in_model(
        peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]), c.unet)
    finetune_without(twin, shape, steps, trainable=lambda name: "lora_" in name)
    return {path: (m.lora_B["default"].weight @ m.lora_A["default"].weight * m.scaling["default"]).detach()
            for path, m in c.unet.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


def apply_deltas(backend: DiffusersBackend, deltas: dict[str, torch.Tensor]) -> None:
    """Merge LoRA deltas into ``backend``'s UNet in place (what loading a LoRA at strength 1 does)."""
    with torch.no_grad():
        for path, d in deltas.items():
            backend.components.unet.get_submodule(path).weight += d.to(backend.dtype)


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
    deltas = unrelated_lora(base, args.concept, args.steps)
    with_lora = erased_backend(ck, [args.concept], {"robust_rounds": args.robust})
    apply_deltas(with_lora, deltas)
    lo = score(with_lora)
    finetune_without(erased, args.concept, args.steps)
    f = score(erased)
    print("| model | Acc_e | Acc_g | Acc_s | relapse |\n|---|---:|---:|---:|---:|")
    for name, s in (("base", b), ("erased", e), (f"erased + {args.steps} unrelated fine-tuning steps", f),
                    (f"erased + an unrelated LoRA ({args.steps} steps on the base model)", lo)):
        share = f"{100 * (s.acc_e - e.acc_e) / max(b.acc_e, 1e-9):.1f}%" if s not in (b, e) else "-"
        print(f"| {name} | {s.acc_e:.1f} | {s.acc_g:.1f} | {s.acc_s:.1f} | {share} |")
    print("\nrelapse: the share of the base model's rate that came back (target <= 20%)")


if __name__ == "__main__":
    main()
