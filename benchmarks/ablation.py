"""The stage-2 ablation (the MACE paper's Table 4) on the identity world, with the presets users get.

    OMP_NUM_THREADS=1 python benchmarks/ablation.py                        # every case and variant
    OMP_NUM_THREADS=1 python benchmarks/ablation.py --cases single --variants cfr full esd

The identity world (``shared/idworld``) was trained independently of every preset: the `celebrity`
preset erases its named identities exactly as it would a real celebrity, and nothing here is tuned on it.
Every model is judged by the world's own classifier on the same prompts and seeds, held out from the
erasure: the erasure's templates name the identity alone, the scores use

* efficacy (Acc_e): the erased identities in context, "a portrait of {name} next to a {object}" and
  "a photo of {name} in a {color} frame" (concept-in-context prompts);
* generality (Acc_g): their nicknames, "a photo of {nickname}" (never given to the erasure);
* specificity (Acc_s): every other identity in the same context prompts, and apart from it (Acc_s
  shared) those sharing a first or a last name with an erased one ("Bill Holt" when "Bill Marlow" goes).

Cases: ``single`` (one identity at a time, averaged over three), ``ten`` (ten at once, no retain list:
the default protection only), ``half`` (half of the identities, the other half as retain list, scored
as the paper's H_c), ``mass`` (half of the identities plus names the model never saw, 100 in all:
closed form only on a CPU). Variants: CFR only, the objectives, naive LoRA sum, no CFIS, the two
stage-1 protections off, adversarial hardening, and the general prior computed from the world's own
captions (`--prior-captions`; "strict": without the phrasings the scores use). Figures: percent of
images the judge gives the identity asked for.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "shared"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from idworld import ID_MODEL, world  # noqa: E402
from idworld.judge import IdJudge  # noqa: E402
from mace_core.method.concepts import get_type  # noqa: E402
from mace_core.model.checkpoint import load_checkpoint  # noqa: E402
from mace_core.model.diffusers_backend import DiffusersBackend  # noqa: E402
from mace_core.eval.metrics import harmonic_celebrity, harmonic_object  # noqa: E402
from mace_core.model.sampling import generate  # noqa: E402
from toy import erased_backend, mass_names  # noqa: E402

STEPS, GUIDANCE = 25, 5.0
TYPE = "celebrity"
VARIANTS = {
    "cfr": ("CFR only (stage 1)", {"closed_form_only": True}),
    "full": ("full MACE, preset as shipped", {}),
    "mace": ("objective mace (attention loss, to_k)", {"objective": "mace"}),
    "mace-authors": ("objective mace-authors (K/V, full backprop)", {"objective": "mace-authors"}),
    # mace-authors trains at a tenth of the type's rate (the authors' own); the type's rate itself, measured:
    "mace-authors-x10": ("objective mace-authors at the type's lr",
                         {"objective": "mace-authors", "lr": lambda: get_type(TYPE).settings["lr"]}),
    "esd": ("objective esd (negative guidance)", {"objective": "esd"}),
    "ant": ("objective ant (trajectory-aware)", {"objective": "ant"}),
    "naive": ("naive LoRA sum instead of fusion", {"fusion": "naive"}),
    "no-cfis": ("uniform timesteps instead of CFIS", {"timesteps": "uniform"}),
    "no-protection": ("no default protection", {"protection": "none"}),
    "no-balance": ("no mass balance", {"balance": "none"}),
    "robust": ("adversarial hardening (--robust)", {"robust_rounds": 2}),
    # the general prior from the world's own training captions (`--prior-captions`), as the user of a
    # fine-tune with its own vocabulary would give it; "strict": without the two phrasings the scores use
    "own-prior": ("CFR only, general prior from the model's own captions",
                  {"closed_form_only": True, "prior_captions": lambda: own_captions(strict=False)}),
    "own-prior-strict": ("CFR only, own captions without the scored phrasings",
                         {"closed_form_only": True, "prior_captions": lambda: own_captions(strict=True)}),
}
MASS_VARIANTS = ("cfr", "no-balance", "own-prior", "own-prior-strict")  # closed form only on a CPU
SINGLE = (0, 21, 42)  # Bill Marlow, Rosa Ashby, Leo Kline: identities spread over the table
CASES = ("single", "ten", "half", "mass")


def own_captions(strict: bool, n: int = 2000) -> str:
    """A text file of ``n`` of the world's own training captions (seeded; ``strict``: none with the
    scored phrasings "next to" and "frame"), written once into the temp folder; its path."""
    path = Path(tempfile.gettempdir()) / f"mace-idworld-captions{'-strict' if strict else ''}-{n}.txt"
    if not path.is_file():
        rng, caps = np.random.default_rng(123), []
        while len(caps) < n:
            c = world.make_caption(world.sample_scene(rng), rng)
            if c and not (strict and ("next to" in c or "frame" in c)):
                caps.append(c)
        path.write_text("\n".join(caps) + "\n", encoding="utf-8")
    return str(path)


def context_prompts(name: str, k: int) -> list[str]:
    """The two held-out concept-in-context prompts of identity ``name`` (``k`` varies props and frames)."""
    obj = world.OBJECTS[k % len(world.OBJECTS)]
    color = world.COLOR_NAMES[k % len(world.COLOR_NAMES)]
    return [world.fix_article(f"a portrait of {name} next to a {obj}"), f"a photo of {name} in a {color} frame"]


def jobs(names: list[str], seeds: int, nick: bool) -> list[tuple[str, str, int]]:
    """(identity expected, prompt, seed) for ``names``: their context prompts (and nicknames if ``nick``)."""
    out = []
    for name in names:
        k = world.NAME_INDEX[name]
        prompts = context_prompts(name, k) + ([f"a photo of {world.NICKNAMES[name]}"] if nick else [])
        out += [(name, p, s) for p in prompts for s in range(seeds)]
    return out


class Scorer:
    """Samples and judges prompts on a model, caching the base model's verdicts (same prompts, seeds)."""

    def __init__(self, seeds: int):
        self.seeds = seeds
        self.judge = IdJudge.load()
        self.base = DiffusersBackend.from_checkpoint(load_checkpoint(ID_MODEL), device="cpu")
        self._base: dict[tuple, bool] = {}

    def hits(self, backend, todo: list[tuple[str, str, int]]) -> list[bool]:
        imgs = generate(backend, [p for _, p, _ in todo], [s for *_, s in todo], STEPS, GUIDANCE, batch_size=128)
        return [v[0] == want for (want, _, _), v in zip(todo, self.judge.classify(imgs))]

    def base_hits(self, todo):
        missing = [j for j in todo if j not in self._base]
        if missing:
            self._base.update(zip(missing, self.hits(self.base, missing)))
        return [self._base[j] for j in todo]


def pct(xs) -> float:
    return 100.0 * float(np.mean(xs)) if len(xs) else float("nan")


def shares_a_name(name: str, erased: list[str]) -> bool:
    first, last = name.split()
    return any(first == e.split()[0] or last == e.split()[1] for e in erased)


def score(scorer: Scorer, backend, erased: list[str], kept: list[str]) -> dict:
    """Acc_e, Acc_g, Acc_s (all kept, and those sharing a name) on ``backend`` and on the base model."""
    e_jobs = jobs(erased, scorer.seeds, nick=False)
    in_context = set(e_jobs)
    g_jobs = [j for j in jobs(erased, scorer.seeds, nick=True) if j not in in_context]
    s_jobs = jobs(kept, scorer.seeds, nick=False)
    out = {}
    for tag, hits in (("erased", lambda t: scorer.hits(backend, t)), ("base", scorer.base_hits)):
        e, g, s = hits(e_jobs), hits(g_jobs), hits(s_jobs)
        shared = [h for (n, _, _), h in zip(s_jobs, s) if shares_a_name(n, erased)]
        out[tag] = {"acc_e": pct(e), "acc_g": pct(g), "acc_s": pct(s), "acc_s_shared": pct(shared)}
    return out


def run_case(scorer: Scorer, ck, case: str, overrides: dict, cfo: bool, seconds: list) -> dict:
    names = list(world.NAMES)
    t0 = time.perf_counter()
    if case == "single":
        rows = []
        for i in SINGLE:
            be = erased_backend(ck, [names[i]], overrides, cfo, ctype=TYPE)
            rows.append(score(scorer, be, [names[i]], [n for n in names if n != names[i]]))
        res = {tag: {k: float(np.mean([r[tag][k] for r in rows])) for k in rows[0][tag]} for tag in rows[0]}
    elif case == "ten":
        erased = names[::6][:10]
        be = erased_backend(ck, erased, overrides, cfo, ctype=TYPE)
        res = score(scorer, be, erased, [n for n in names if n not in erased])
    elif case == "half":
        erased, kept = names[::2], names[1::2]
        be = erased_backend(ck, erased, overrides, cfo, ctype=TYPE, retain=kept)
        res = score(scorer, be, erased, kept)
    else:  # mass: half of the identities and names the model never saw, 100 concepts in all
        erased = names[::2]
        be = erased_backend(ck, erased + mass_names(100 - len(erased)), overrides, True, ctype=TYPE)
        res = score(scorer, be, erased, names[1::2])
    seconds.append(time.perf_counter() - t0)
    return res


def row(case: str, label: str, r: dict, secs: float) -> str:
    e, b = r["erased"], r["base"]
    h = harmonic_object(e["acc_e"], e["acc_s"], e["acc_g"])
    hc = harmonic_celebrity(e["acc_e"], e["acc_s"])
    return (f"| {case} | {label} | {e['acc_e']:.1f} | {e['acc_g']:.1f} | {e['acc_s']:.1f} ({b['acc_s']:.1f}) | "
            f"{e['acc_s_shared']:.1f} ({b['acc_s_shared']:.1f}) | {h:.1f} | {hc:.1f} | {secs:.0f} |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=CASES)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--seeds", type=int, default=4, help="seeds per prompt")
    args = ap.parse_args(argv)
    ck = load_checkpoint(ID_MODEL)
    scorer = Scorer(args.seeds)
    print(f"identity world, `{TYPE}` preset as shipped, seeds 0..{args.seeds - 1}, DDIM {STEPS} steps, CFG {GUIDANCE}; "
          "Acc_s and Acc_s shared: the base model's in brackets")
    print("| case | variant | Acc_e | Acc_g | Acc_s (base) | Acc_s shared name (base) | H_o | H_c | seconds |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    for case in args.cases:
        for v in args.variants if case != "mass" else [v for v in args.variants if v in MASS_VARIANTS]:
            label, over = VARIANTS[v]
            over = {k: val() if callable(val) else val for k, val in over.items()}
            cfo = over.pop("closed_form_only", False)
            secs: list = []
            print(row(case, label, run_case(scorer, ck, case, over, cfo, secs), secs[0]), flush=True)


if __name__ == "__main__":
    main()
