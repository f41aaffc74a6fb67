"""Where stage 1's edit lands on the identity world: how far each prompt's cross-attention keys and
values move when one name is erased, for the erased name and for the others.

    OMP_NUM_THREADS=1 python benchmarks/damage.py [--prior-captions FILE]

For every prompt, the relative change of every attn2 to_k / to_v output at a token position,
sqrt(sum_l ||dW_l e||^2 / sum_l ||W_l e||^2) with e [D] the position's context embedding and dW_l the
edit of layer l, averaged over the prompt's words, its end token and its padding. Prompts: each
identity's two scored context prompts (benchmarks/ablation.py) and its plain portrait. Then, for one
erased name and three prompts, the end token's change split into the part every other name shares
there (their mean embedding's change) and each name's own part (the change of its difference from that
mean). Last, whether the erased name is mapped onto its anchor or only moved: the residual
||W1 e - W0 a|| / ||W0 e - W0 a|| over the end token and the 19 padding positions after it (positions
stage 1 remaps past the name) of its own stage-1 prompts and of its held-out context prompts, a the mean
of its stage-1 anchors in the same prompt (0: mapped onto the anchor; 1: as far from it as before).
Stage 1 of the `celebrity` preset as shipped (CFR only), images not drawn: seconds per name.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "shared"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ablation import SINGLE, TYPE, context_prompts, shares_a_name  # noqa: E402
from idworld import ID_MODEL, world  # noqa: E402
from mace_core.method.concepts import concept_prompts, get_type, make_concept  # noqa: E402
from mace_core.model.checkpoint import load_checkpoint  # noqa: E402
from mace_core.model.diffusers_backend import DiffusersBackend  # noqa: E402
from toy import erased_backend  # noqa: E402

SPLIT_PROMPTS = ("a portrait of {}", "a portrait of {} next to a star", "a photo of {} in a red frame")


def kv_outputs(weights: dict, e: torch.Tensor) -> torch.Tensor:
    """Every to_k / to_v layer's output for the rows of e [N, D], side by side [N, sum of the widths],
    in the order of the weights' names (so two models' outputs line up)."""
    return torch.cat([e @ weights[k].T for k in sorted(weights)], 1)


def kv_change(w0: dict, w1: dict, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(||dW e||, ||W0 e||) over all to_k / to_v layers together, per row of e [N, D] -> [N], [N]."""
    y0 = kv_outputs(w0, e)
    return (kv_outputs(w1, e) - y0).norm(dim=1), y0.norm(dim=1)


def by_position(base, w0, w1, prompts: list[str]) -> list[float]:
    """Mean relative change over ``prompts`` of their words, end token and padding."""
    ctx = base.encode(prompts).context.float()  # [B, T, D]
    out = torch.zeros(3)
    for b, p in enumerate(prompts):
        n = len(base.tokenize(p))  # start, words, end
        num, den = kv_change(w0, w1, ctx[b])
        r = num / den
        out += torch.stack([r[1:n - 1].mean(), r[n - 1], r[n:].mean()])
    return (out / len(prompts)).tolist()


PAST = 20  # the end token and the padding after it compared, in every prompt whatever its length


def past_name(base, prompts: list[str]) -> torch.Tensor:
    """Context embeddings [N * PAST, D] of ``prompts`` at their end token and the padding after it."""
    ctx = base.encode(prompts).context.float()
    return torch.cat([ctx[b, len(base.tokenize(p)) - 1:][:PAST] for b, p in enumerate(prompts)])


def anchor_residual(base, w0, w1, name: str, prompts: list[str]) -> float:
    """||W1 e - W0 a|| / ||W0 e - W0 a|| over the end token and padding of ``prompts`` (which hold
    ``name``), a the mean embedding of the celebrity type's stage-1 anchors put in the name's place."""
    anchors = get_type(TYPE).stage1_anchors(make_concept(name, "", TYPE))
    e = past_name(base, prompts)
    a = sum(past_name(base, [p.replace(name, x) for p in prompts]) for x in anchors) / len(anchors)
    target = kv_outputs(w0, a)
    return float((kv_outputs(w1, e) - target).norm() / (kv_outputs(w0, e) - target).norm())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prior-captions", default="", help="general prior from this caption file (default: corpus)")
    args = ap.parse_args(argv)
    ck = load_checkpoint(ID_MODEL)
    base = DiffusersBackend.from_checkpoint(ck, device="cpu")
    w0 = {k: v.float() for k, v in base.original_weights().items()}
    over = {"prior_captions": args.prior_captions} if args.prior_captions else {}
    names = list(world.NAMES)
    print("| erased | prompts of | words | end token | padding |\n|---|---|---:|---:|---:|")
    edits = {}
    for i in SINGLE:
        er = names[i]
        be = erased_backend(ck, [er], over, True, ctype=TYPE)
        edits[er] = w1 = {k: v.float() for k, v in be.original_weights().items()}
        groups = {"the erased name": [er],
                  "names sharing a word": [n for n in names if n != er and shares_a_name(n, [er])],
                  "the other names": [n for n in names if not shares_a_name(n, [er])]}
        for label, group in groups.items():
            prompts = [p for n in group for p in context_prompts(n, world.NAME_INDEX[n])]
            prompts += [f"a portrait of {n}" for n in group]
            words, end, pad = by_position(base, w0, w1, prompts)
            print(f"| {er} | {label} | {words:.3f} | {end:.3f} | {pad:.3f} |", flush=True)
    er = names[SINGLE[1]]
    others = [n for n in names if n != er]
    print(f"\n{er} erased, end token of the 63 other names' prompts:\n"
          "| prompt | relative change | the part every name shares | each name's own part |\n|---|---:|---:|---:|")
    for tmpl in SPLIT_PROMPTS:
        prompts = [tmpl.format(n) for n in others]
        ctx = base.encode(prompts).context.float()
        e = torch.stack([ctx[b, len(base.tokenize(p)) - 1] for b, p in enumerate(prompts)])  # [63, D]
        mean = e.mean(0, keepdim=True)
        full, den = kv_change(w0, edits[er], e)
        shared = kv_change(w0, edits[er], mean)[0]
        own = kv_change(w0, edits[er], e - mean)[0]
        print(f"| {tmpl.format('{name}')!r} | {float((full / den).mean()):.3f} | {float(shared / den.mean()):.3f} | "
              f"{float((own / den).mean()):.3f} |", flush=True)
    print("\nThe erased name onto its anchor, end token and padding (0: mapped onto it; 1: as far as before):\n"
          "| erased | its stage-1 prompts | its held-out context prompts |\n|---|---:|---:|")
    for er, w1 in edits.items():
        own = concept_prompts(make_concept(er, "", TYPE))
        held = context_prompts(er, world.NAME_INDEX[er])
        own_r, held_r = anchor_residual(base, w0, w1, er, own), anchor_residual(base, w0, w1, er, held)
        print(f"| {er} | {own_r:.2f} | {held_r:.2f} |", flush=True)


if __name__ == "__main__":
    main()
