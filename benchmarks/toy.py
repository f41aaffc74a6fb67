"""The toy-world benchmark: the paper's object protocol on the shipped toy model.

    python benchmarks/toy.py                      # all variants, erase "circle", prints a Markdown table
    python benchmarks/toy.py --variants full cfr  # a subset
    python benchmarks/toy.py --set lr=0.02 --set steps=80   # try settings (calibration)

Variants (the paper's ablation): base model; full MACE; CFR only (stage 1); LoRA without CFIS
(uniform timesteps); naive LoRA sum instead of closed-form fusion; All-but-One objective toward
"square". Extra cases: shared words (erase "red circle": "red square" and "blue circle" stay),
the close pair (erase "circle": "ring" stays), mass erasure (4 of 8 shapes at once).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "shared"))

from mace_core.model.checkpoint import load_checkpoint, with_edits  # noqa: E402
from mace_core.method.concepts import ErasureSpec, load_preset, make_concept  # noqa: E402
from mace_core.model.diffusers_backend import DiffusersBackend  # noqa: E402
from mace_core.method.erase import erase  # noqa: E402
from mace_core.eval.metrics import accuracy  # noqa: E402
from mace_core.method.project import Project  # noqa: E402
from mace_core.model.sampling import generate  # noqa: E402
from toyworld import TOY_MODEL  # noqa: E402
from toyworld.evaluate import GUIDANCE, STEPS, object_scores  # noqa: E402
from toyworld.judge import Judge  # noqa: E402
from toyworld.world import SHAPES  # noqa: E402

VARIANTS = {
    "full": {},
    "cfr": {"closed_form_only": True},
    "no-cfis": {"timesteps": "uniform"},
    "naive-sum": {"fusion": "naive"},
    "abo": {"objective": "abo", "alternative": "a photo of a square", "steps": 200},  # calibrated: benchmarks/abo.py
}


def erased_backend(ck, concepts, overrides, closed_form_only=False, report: dict | None = None, ctype: str = "toy",
                   retain: list[str] = ()):
    """The model of checkpoint ``ck`` with ``concepts`` (of type ``ctype``) erased, ``retain`` kept
    (``report``, if given, receives the run's report)."""
    with tempfile.TemporaryDirectory() as d:
        base = DiffusersBackend.from_checkpoint(ck, device="cpu")
        res = erase(base, ErasureSpec(tuple(make_concept(c, "", ctype) for c in concepts), tuple(retain), overrides),
                    Project(d), ck.sha256, closed_form_only=closed_form_only)
    if report is not None:
        report.update(res.report)
    return DiffusersBackend.from_checkpoint(with_edits(ck, res.weights), device="cpu")


def phrase_accuracy(backend, judge, prompt: str, shape: str, seeds: int) -> float:
    imgs = generate(backend, [prompt] * seeds, list(range(seeds)), STEPS, GUIDANCE)
    return accuracy([s for s, _ in judge.classify(imgs)], shape)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concept", default="circle")
    ap.add_argument("--variants", nargs="*", default=["base", *VARIANTS])
    ap.add_argument("--seeds", type=int, default=8, help="seeds per color (5 colors) per shape word")
    ap.add_argument("--set", action="append", default=[], help="setting override key=value")
    ap.add_argument("--extra", action="store_true", help="also the shared-word, close-pair and mass cases")
    ap.add_argument("--type", default="toy", help="concept type whose preset erases (calibrate the real types here)")
    ap.add_argument("--mass", type=int, default=0, metavar="N",
                    help="instead of the variants' concept alone, erase it with N-1 other names (the MACE "
                         "paper's 100 celebrities): the other shapes must stay")
    args = ap.parse_args()
    over = {}
    for kv in args.set:
        k, v = kv.split("=", 1)
        over[k] = yaml.safe_load(v)
    ck = load_checkpoint(TOY_MODEL)
    judge = Judge.load()
    rows = {}
    print("| variant | Acc_e | Acc_g | Acc_s | H_o | LoRA loss, first -> last 5 steps | seconds |\n"
          "|---|---:|---:|---:|---:|---|---:|", flush=True)
    for name in args.variants:
        t0 = time.perf_counter()
        report: dict = {}
        if name == "base":
            be = DiffusersBackend.from_checkpoint(ck, device="cpu")
        else:
            v = dict(VARIANTS[name])
            cfo = v.pop("closed_form_only", False)
            erased = [args.concept, *mass_names(args.mass - 1)]
            be = erased_backend(ck, erased, {**over, **v}, cfo, report, args.type)
        s = object_scores(be, judge, [args.concept], args.seeds)
        rows[name] = s
        losses = report.get("losses", {}).get(args.concept) or []
        loss = (f"{sum(losses[:5]) / 5:.3f} -> {sum(losses[-5:]) / 5:.3f}" if len(losses) >= 10 else "-")
        print(f"| {name} | {s.acc_e:.1f} | {s.acc_g:.1f} | {s.acc_s:.1f} | {s.h_o:.1f} | {loss} | "
              f"{time.perf_counter() - t0:.0f} |", flush=True)
    if args.extra:
        extra_cases(ck, judge, over, args.seeds * 5)


def mass_names(n: int) -> list[str]:
    """The first ``n`` names of the MACE paper's 100-celebrity erasure group: words the toy model never saw."""
    return [c.phrase for c in load_preset("celebrities-100").concepts[:n]] if n > 0 else []


def extra_cases(ck, judge, over: dict, n: int) -> None:
    """The shared-word, close-pair and mass cases, each against the base model on the same seeds."""
    base = DiffusersBackend.from_checkpoint(ck, device="cpu")
    print("\n| case | prompt | base | erased | drop |\n|---|---|---:|---:|---:|")

    def row(case, be, prompt, shape):
        b, a = phrase_accuracy(base, judge, prompt, shape, n), phrase_accuracy(be, judge, prompt, shape, n)
        print(f"| {case} | {prompt} | {b:.1f} | {a:.1f} | {b - a:.1f} |", flush=True)

    be = erased_backend(ck, ["red circle"], over)
    for prompt, shape in (("a photo of a red circle", "circle"), ("a photo of a red square", "square"),
                          ("a photo of a blue circle", "circle")):
        row("erase 'red circle'", be, prompt, shape)
    be = erased_backend(ck, ["circle"], over)
    for prompt, shape in (("a photo of a ring", "ring"), ("a photo of a hoop", "ring")):
        row("erase 'circle' (close pair)", be, prompt, shape)
    mass = list(SHAPES[:4])
    s = object_scores(erased_backend(ck, mass, over), judge, mass, max(1, n // 5))
    print(f"\nmass erasure of {', '.join(mass)}: Acc_e {s.acc_e:.1f} Acc_g {s.acc_g:.1f} Acc_s {s.acc_s:.1f} "
          f"H_o {s.h_o:.1f}")

if __name__ == "__main__":
    main()
