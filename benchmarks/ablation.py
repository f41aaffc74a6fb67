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
closed form only on a CPU); and the other two types the world draws, each with its own preset, one
concept at a time (averaged over three), no retain list:

* ``object`` (the `object` preset, the authors' object settings): efficacy the object with a color and
  in a colored frame ("a photo of the yellow star", "a yellow star in a red frame"), generality its
  synonym ("a photo of the pentagram"), specificity the seven other objects in the same prompts;
* ``style`` (the `style` preset): efficacy the artist over a face and over an object ("a portrait of
  Bill Marlow, art by Mara Voss", "a photo of the circle in the style of Mara Voss"), no synonyms,
  specificity the seven other artists in the same prompts (H_c, as the paper's artist score pairs
  erased and kept).

For these two the column "Acc_s shared name" holds the identities instead (a quarter of them, in their
context prompts): what erasing an object or a style costs the other kind.

Variants: CFR only, the objectives, naive LoRA sum, no CFIS, the two stage-1 protections off, adversarial
hardening, and the general prior computed from the world's own captions (`--prior-captions`; "strict":
without the phrasings the scores use). Figures: percent of images the judge gives the identity (object,
style) asked for.
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
from toyworld.world import SYNONYMS  # noqa: E402

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
# variants that do not apply to a kind's preset: `object` has no general prior to replace, and the
# type's rate of `mace-authors-x10` is the celebrity type's
KIND_SKIP = {"object": ("mace-authors-x10", "own-prior", "own-prior-strict"), "style": ("mace-authors-x10",)}
SINGLE = (0, 21, 42)  # Bill Marlow, Rosa Ashby, Leo Kline: identities spread over the table
SINGLE_KIND = (0, 3, 6)  # circle, star, ring; outline (Mara Voss), diagonal (Ivo Kranz), sunset (Greta Holm)
KINDS = ("object", "style")  # cases named for the type whose preset erases them
CASES = ("single", "ten", "half", "mass", *KINDS)
IDENTITY, STYLE, OBJECT = 0, 1, 2  # the judge's verdicts, in order


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


def jobs(names: list[str], seeds: int, nick: bool) -> list[tuple[str, str, int, int]]:
    """(identity expected, prompt, seed, verdict) for ``names``: their context prompts (and nicknames if
    ``nick``)."""
    out = []
    for name in names:
        k = world.NAME_INDEX[name]
        prompts = context_prompts(name, k) + ([f"a photo of {world.NICKNAMES[name]}"] if nick else [])
        out += [(name, p, s, IDENTITY) for p in prompts for s in range(seeds)]
    return out


def kind_concept(case: str, k: int) -> str:
    """The phrase a kind's case erases for index ``k``: the object, or the artist of the style."""
    return world.OBJECTS[k] if case == "object" else world.ARTISTS[world.STYLES[k]]


def kind_jobs(case: str, items: list[int], seeds: int, synonym: bool = False) -> list[tuple[str, str, int, int]]:
    """(class expected, prompt, seed, verdict) for objects or styles ``items`` (indices): their two held-out
    prompts, or the object's synonym alone (``synonym``; styles have none)."""
    out = []
    for k in items:
        n = len(world.COLOR_NAMES)
        color, frame = world.COLOR_NAMES[k % n], world.COLOR_NAMES[(k + 2) % n]
        if case == "object":
            obj = kind_concept(case, k)
            prompts = ([f"a photo of the {SYNONYMS[obj]}"] if synonym else
                       [f"a photo of the {color} {obj}", world.fix_article(f"a {color} {obj} in a {frame} frame")])
            out += [(obj, p, s, OBJECT) for p in prompts for s in range(seeds)]
        elif not synonym:
            artist, name = kind_concept(case, k), world.NAMES[(7 * k) % len(world.NAMES)]
            prompts = [f"a portrait of {name}, art by {artist}",
                       f"a photo of the {world.OBJECTS[k]} in the style of {artist}"]
            out += [(world.STYLES[k], p, s, STYLE) for p in prompts for s in range(seeds)]
    return out


class Scorer:
    """Samples and judges prompts on a model, caching the base model's verdicts (same prompts, seeds)."""

    def __init__(self, seeds: int):
        self.seeds = seeds
        self.judge = IdJudge.load()
        self.base = DiffusersBackend.from_checkpoint(load_checkpoint(ID_MODEL), device="cpu")
        self._base: dict[tuple, bool] = {}

    def hits(self, backend, todo: list[tuple[str, str, int, int]]) -> list[bool]:
        if not todo:
            return []
        imgs = generate(backend, [j[1] for j in todo], [j[2] for j in todo], STEPS, GUIDANCE, batch_size=128)
        return [v[j[3]] == j[0] for j, v in zip(todo, self.judge.classify(imgs))]

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
        shared = [h for j, h in zip(s_jobs, s) if shares_a_name(j[0], erased)]
        out[tag] = {"acc_e": pct(e), "acc_g": pct(g), "acc_s": pct(s), "acc_s_shared": pct(shared)}
    return out


def score_kind(scorer: Scorer, backend, case: str, k: int) -> dict:
    """Acc_e, Acc_g, Acc_s of object or style ``k`` erased (``case``), and the identities' accuracy in the
    column of shared names, on ``backend`` and on the base model."""
    others = [i for i in range(len(world.OBJECTS if case == "object" else world.STYLES)) if i != k]
    todo = {"acc_e": kind_jobs(case, [k], scorer.seeds), "acc_g": kind_jobs(case, [k], scorer.seeds, synonym=True),
            "acc_s": kind_jobs(case, others, scorer.seeds),
            "acc_s_shared": jobs(list(world.NAMES[::4]), scorer.seeds, False)}
    return {tag: {key: pct(hits(t)) for key, t in todo.items()}
            for tag, hits in (("erased", lambda t: scorer.hits(backend, t)), ("base", scorer.base_hits))}


def run_case(scorer: Scorer, ck, case: str, overrides: dict, cfo: bool, seconds: list) -> dict:
    names = list(world.NAMES)
    t0 = time.perf_counter()
    if case in ("single", *KINDS):
        if case == "single":
            rows = [score(scorer, erased_backend(ck, [names[i]], overrides, cfo, ctype=TYPE), [names[i]],
                          [n for n in names if n != names[i]]) for i in SINGLE]
        else:
            rows = [score_kind(scorer, erased_backend(ck, [kind_concept(case, i)], overrides, cfo, ctype=case), case, i)
                    for i in SINGLE_KIND]
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
    # styles have no synonyms (Acc_g nan): no H_o
    h = "-" if np.isnan(e["acc_g"]) else f"{harmonic_object(e['acc_e'], e['acc_s'], e['acc_g']):.1f}"
    hc = harmonic_celebrity(e["acc_e"], e["acc_s"])
    g = "-" if np.isnan(e["acc_g"]) else f"{e['acc_g']:.1f}"
    return (f"| {case} | {label} | {e['acc_e']:.1f} | {g} | {e['acc_s']:.1f} ({b['acc_s']:.1f}) | "
            f"{e['acc_s_shared']:.1f} ({b['acc_s_shared']:.1f}) | {h} | {hc:.1f} | {secs:.0f} |")


def variants_for(case: str, variants: list[str]) -> list[str]:
    """Those of ``variants`` that ``case`` runs (`MASS_VARIANTS`, `KIND_SKIP`)."""
    if case == "mass":
        return [v for v in variants if v in MASS_VARIANTS]
    return [v for v in variants if v not in KIND_SKIP.get(case, ())]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=CASES)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--seeds", type=int, default=4, help="seeds per prompt")
    args = ap.parse_args(argv)
    ck = load_checkpoint(ID_MODEL)
    scorer = Scorer(args.seeds)
    print(f"identity world, `{TYPE}` preset as shipped (objects and styles: their own), seeds 0..{args.seeds - 1}, "
          f"DDIM {STEPS} steps, CFG {GUIDANCE}; "
          "Acc_s and Acc_s shared: the base model's in brackets")
    print("| case | variant | Acc_e | Acc_g | Acc_s (base) | Acc_s shared name (base) | H_o | H_c | seconds |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    for case in args.cases:
        for v in variants_for(case, args.variants):
            label, over = VARIANTS[v]
            over = {k: val() if callable(val) else val for k, val in over.items()}
            cfo = over.pop("closed_form_only", False)
            secs: list = []
            print(row(case, label, run_case(scorer, ck, case, over, cfo, secs), secs[0]), flush=True)


if __name__ == "__main__":
    main()
