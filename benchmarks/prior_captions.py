"""How many captions the general prior needs: the relative change of the prior matrix (Frobenius norm of
G_N - G_ref over that of G_ref) when it is computed from the first N captions of the corpus instead of
``--ref`` captions, on the toy model's text encoder and on a full-size SD1.5 text encoder (CLIP ViT-L/14
text tower, seeded random weights). fp32 on the CPU, as `prior.general_prior` computes it.

    OMP_NUM_THREADS=1 python benchmarks/prior_captions.py --model toy --ref 6000
    OMP_NUM_THREADS=1 python benchmarks/prior_captions.py --model sd15-random --ref 6000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "shared"))

from mace_core.method.corpus import general_captions  # noqa: E402
from mace_core.method.prior import accumulate_grams, normalised  # noqa: E402

STEPS = (250, 500, 1000, 1500, 2000, 3000, 4000)


def backend_for(name: str):
    from mace_core.model.checkpoint import load_checkpoint
    from mace_core.model.diffusers_backend import DiffusersBackend

    if name == "toy":
        from toyworld import TOY_MODEL

        return DiffusersBackend.from_checkpoint(load_checkpoint(TOY_MODEL), device="cpu")
    # only the text encoder matters: a full-size SD1.5 one with seeded random weights
    from mace_core.model.families import load_family
    from transformers import CLIPTextConfig, CLIPTextModel

    fam = load_family("sd1")
    torch.manual_seed(0)
    te = CLIPTextModel(CLIPTextConfig(**fam.text_encoders[0].config)).eval()
    from mace_core.model.checkpoint import make_tokenizer

    return _TextOnly(te, make_tokenizer(fam.text_encoders[0]))


class _TextOnly:
    """Just enough of a Backend for the prior: ``encode`` with SD1's last layer, padded to 77 tokens."""

    def __init__(self, te, tok):
        self.te, self.tok = te, tok
        self.device = torch.device("cpu")

    def tokenize(self, prompt: str) -> list[int]:
        return self.tok(prompt, truncation=True, max_length=77).input_ids

    def tokenize(self, prompt: str) -> list[int]:
        return self.tok(prompt, truncation=True, max_length=77).input_ids

    @torch.no_grad()
    def encode(self, prompts):
        from types import SimpleNamespace

        ids = self.tok(list(prompts), padding="max_length", max_length=77, truncation=True,
                       return_tensors="pt").input_ids
        return SimpleNamespace(context=self.te(ids).last_hidden_state, pooled=None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["toy", "sd15-random"], default="toy")
    ap.add_argument("--ref", type=int, default=6000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    be = backend_for(args.model)
    captions = general_captions(args.ref)
    snaps: dict[int, torch.Tensor] = {}
    t0 = time.time()

    def on_batch(done: int, total: int, sums: dict, counts: dict) -> None:
        for n in STEPS:
            if done == n:
                snaps[n] = normalised(sums, counts)["context"]
                print(f"  {n} captions encoded after {time.time() - t0:.0f} s", flush=True)

    grams = accumulate_grams(be, captions, batch_size=50, on_sums=on_batch)["context"]
    seconds = time.time() - t0
    print(f"{args.model}: {args.ref} captions in {seconds:.0f} s ({seconds / args.ref * 1000:.1f} ms/caption, "
          f"1 thread); D = {grams.shape[0]}")
    ref = grams.norm()
    for n in sorted(snaps):
        print(f"  N = {n:5d}: ||G_N - G_{args.ref}|| / ||G_{args.ref}|| = {(snaps[n] - grams).norm() / ref:.4f}")


if __name__ == "__main__":
    main()
