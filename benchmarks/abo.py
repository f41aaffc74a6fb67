"""All-but-One on the toy world: erase a shape toward an alternative, against the MACE objective.

    python benchmarks/abo.py                                   # circle -> square, the default grid
    python benchmarks/abo.py --grid lr=1e-3,1e-2 --grid steps=50,200 --grid abo_scale=1,3

For each setting: Acc_e (the erased shape's prompts still judged as it), Alt (the same prompts judged
as the alternative: the conversion All-but-One aims for), Acc_s (the other shapes' prompts judged
right), and the layout drift of the other shapes' images against the base model at the same seeds
(PSNR / SSIM: higher = the model kept its layouts). The MACE objective at the toy preset is the
reference row.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "shared"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from toy import erased_backend  # noqa: E402

from mace_core.model.checkpoint import load_checkpoint  # noqa: E402
from mace_core.model.diffusers_backend import DiffusersBackend  # noqa: E402
from mace_core.eval.evaluate import psnr, ssim  # noqa: E402
from mace_core.eval.metrics import accuracy  # noqa: E402
from toyworld import TOY_MODEL  # noqa: E402
from toyworld.evaluate import judge_word  # noqa: E402
from toyworld.judge import Judge  # noqa: E402
from toyworld.world import SHAPES  # noqa: E402


def scores(be, base_images: dict, judge, concept: str, alternative: str, seeds: int) -> dict[str, float]:
    pred, _ = judge_word(be, judge, concept, seeds)
    hits, drift_p, drift_s = [], [], []
    for shape, ref in base_images.items():
        p, imgs = judge_word(be, judge, shape, seeds)
        hits += [x == shape for x in p]
        drift_p += [min(psnr(a, b), 99.0) for a, b in zip(ref, imgs)]
        drift_s += [ssim(a, b) for a, b in zip(ref, imgs)]
    return {"acc_e": accuracy(pred, concept), "alt": accuracy(pred, alternative),
            "acc_s": 100.0 * float(np.mean(hits)), "psnr": float(np.mean(drift_p)), "ssim": float(np.mean(drift_s))}


def _number(text: str):
    """A grid value: int or float (YAML reads "1e-3" as a string), else as YAML reads it."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concept", default="circle")
    ap.add_argument("--alternative", default="square", help="a toy shape: what the concept should become")
    ap.add_argument("--seeds", type=int, default=4, help="seeds per color (5 colors) per shape word")
    ap.add_argument("--grid", action="append", default=[], help="key=v1,v2,... (abo settings to sweep)")
    args = ap.parse_args()
    grid = {k: [_number(v) for v in vs.split(",")] for k, vs in (g.split("=", 1) for g in args.grid)}
    grid = grid or {"lr": [1e-3, 1e-2], "steps": [50, 200]}
    ck = load_checkpoint(TOY_MODEL)
    judge = Judge.load()
    base = DiffusersBackend.from_checkpoint(ck, device="cpu")
    base_images = {s: judge_word(base, judge, s, args.seeds)[1] for s in SHAPES
                   if s not in (args.concept, args.alternative)}
    print(f"erase {args.concept!r} toward {args.alternative!r}; {args.seeds} seeds x 5 colors per word; drift on "
          f"{', '.join(base_images)}\n")
    print("| objective | settings | Acc_e | Alt | Acc_s | PSNR | SSIM | seconds |\n|---|---|---:|---:|---:|---:|---:|---:|")
    runs = [("mace", {})] + [("abo", dict(zip(grid, values))) for values in itertools.product(*grid.values())]
    for objective, over in runs:
        t0 = time.perf_counter()
        if objective == "abo":
            over = {**over, "objective": "abo", "alternative": f"a photo of a {args.alternative}"}
        s = scores(erased_backend(ck, [args.concept], over), base_images, judge, args.concept, args.alternative,
                   args.seeds)
        shown = ", ".join(f"{k} {v}" for k, v in over.items() if k not in ("objective", "alternative")) or "toy preset"
        print(f"| {objective} | {shown} | {s['acc_e']:.1f} | {s['alt']:.1f} | {s['acc_s']:.1f} | {s['psnr']:.1f} | "
              f"{s['ssim']:.3f} | {time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
