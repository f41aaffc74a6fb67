"""Base quality of an identity-world model, measured by its judge (issue 23).

    python shared/idworld/quality.py [--model PATH] [--seeds 4] [--steps 25] [--cfg 5]

Every prompt below is sampled with seeds 0..N-1 (DDIM, eta 0, classifier-free guidance against the
empty prompt; noise seeds are never those of training, which draws its noise from torch generators
seeded otherwise) and judged; a "none" verdict is a miss:

* identity: ``"a portrait of {name}"`` (even seeds) and ``"a photo of {name}"`` (odd seeds) for each of
  the 64 identities; the per-identity accuracy's mean and minimum;
* nickname: ``"a photo of {nickname}"`` (generality);
* context: ``"{name} next to a {object}"`` with object i % 8: identity and object accuracy in a scene;
* style: ``"an image in the style of {artist}"`` for the 8 artists;
* object: ``"a photo of the {object}"`` for the 8 objects;
* fallback: prompts whose subject carries nothing ("a photo of a", "a portrait of", the types'
  anchors, ""): the share the judge calls identity/style/object "none", and what else it sees.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "idworld"

from idworld import world  # noqa: E402
from mace_core.model.checkpoint import Components, family_of_modules  # noqa: E402
from mace_core.model.diffusers_backend import DiffusersBackend  # noqa: E402
from mace_core.model.sampling import generate  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = HERE / "data" / "id-sd1.safetensors"
IDENTITY_TEMPLATES = ("a portrait of {}", "a photo of {}")
FALLBACK_PROMPTS = ("a photo of a", "a portrait of", "a photo of", "a person", "a scene", "art", "")


def backend_of_modules(tokenizer, text_encoder, unet, vae) -> DiffusersBackend:
    """A backend over in-memory modules (used while training); shares their weights."""
    fam = family_of_modules("sd1", unet, vae, [text_encoder], resolution=world.IMAGE_SIZE)
    return DiffusersBackend(Components(fam, unet, vae, [text_encoder], [tokenizer]))


def load_backend(path: str | Path | None = None) -> DiffusersBackend:
    """The identity-world model (the shipped single file by default) on the CPU, float32."""
    return DiffusersBackend.from_file(path if path is not None else DEFAULT_MODEL, device="cpu", dtype=torch.float32)


def prompt_jobs(seeds: int) -> list[tuple[str, str, str, int]]:
    """(group, target, prompt, seed) for every image :func:`measure` samples; target is the class the
    group's head should report (for "context": "name|object")."""
    jobs = []
    for k, name in enumerate(world.NAMES):
        for i in range(seeds):
            jobs.append(("identity", name, IDENTITY_TEMPLATES[i % 2].format(name), i))
            jobs.append(("nickname", name, f"a photo of {world.NICKNAMES[name]}", i))
        obj = world.OBJECTS[k % len(world.OBJECTS)]
        jobs += [("context", f"{name}|{obj}", world.fix_article(f"{name} next to a {obj}"), i) for i in range(seeds)]
    for style, artist in world.ARTISTS.items():
        jobs += [("style", style, f"an image in the style of {artist}", i) for i in range(2 * seeds)]
    for obj in world.OBJECTS:
        jobs += [("object", obj, f"a photo of the {obj}", i) for i in range(2 * seeds)]
    for p in FALLBACK_PROMPTS:
        jobs += [("fallback", "none", p, i) for i in range(2 * seeds)]
    return jobs


def score(jobs, verdicts) -> dict:
    """Accuracies from the jobs of :func:`prompt_jobs` and the judge's (identity, style, object) verdicts."""
    def rows(group):
        return [(j, v) for j, v in zip(jobs, verdicts) if j[0] == group]

    def per_class(group, head):
        by = {}
        for j, v in rows(group):
            by.setdefault(j[1], []).append(v[head] == j[1])
        return {k: float(np.mean(x)) for k, x in by.items()}

    res = {}
    for group, head in (("identity", 0), ("nickname", 0), ("style", 1), ("object", 2)):
        pc = per_class(group, head)
        res[group] = {"acc": float(np.mean(list(pc.values()))), "min": min(pc.values()), "per_class": pc}
    ctx = rows("context")
    res["context"] = {"identity_acc": float(np.mean([v[0] == j[1].split("|")[0] for j, v in ctx])),
                      "object_acc": float(np.mean([v[2] == j[1].split("|")[1] for j, v in ctx]))}
    fb = {}
    for p in FALLBACK_PROMPTS:
        vs = [v for j, v in rows("fallback") if j[2] == p]
        fb[p] = {"identity_none": float(np.mean([v[0] == "none" for v in vs])),
                 "style_none": float(np.mean([v[1] == "none" for v in vs])),
                 "object_none": float(np.mean([v[2] == "none" for v in vs])),
                 "seen": dict(Counter(x for v in vs for x in v if x != "none").most_common(3))}
    res["fallback"] = fb
    return res


def measure(backend: DiffusersBackend, judge=None, seeds: int = 4, steps: int = 25, cfg: float = 5.0,
            batch_size: int = 128, verbose: bool = True) -> dict:
    """Sample every prompt of :func:`prompt_jobs` and judge it; returns :func:`score`'s dict plus the
    settings (and "images" uint8 [N, 32, 32, 3], "jobs", "verdicts")."""
    if judge is None:
        from idworld.judge import IdJudge

        judge = IdJudge.load()
    jobs = prompt_jobs(seeds)
    t0 = time.time()
    imgs = generate(backend, [j[2] for j in jobs], [j[3] for j in jobs], steps=steps, guidance=cfg, batch_size=batch_size)
    verdicts = judge.classify(imgs)
    res = score(jobs, verdicts)
    res.update(n_images=len(jobs), seeds=seeds, steps=steps, cfg=cfg, seconds=time.time() - t0)
    if verbose:
        print(format_table(res))
    res.update(images=imgs, jobs=jobs, verdicts=verdicts)
    return res


def format_table(res: dict) -> str:
    worst = sorted(res["identity"]["per_class"].items(), key=lambda kv: kv[1])[:5]
    lines = ["| prompt group | accuracy | worst class |", "|---|---|---|"]
    for g, head in (("identity", "a portrait of / a photo of {name}"), ("nickname", "a photo of {nickname}"),
                    ("style", "an image in the style of {artist}"), ("object", "a photo of the {object}")):
        r = res[g]
        lines.append(f"| {g}: {head} | {100 * r['acc']:.1f}% | {100 * r['min']:.1f}% |")
    c = res["context"]
    lines.append(f"| context: {{name}} next to a {{object}} | identity {100 * c['identity_acc']:.1f}%, "
                 f"object {100 * c['object_acc']:.1f}% | |")
    lines += ["", "worst identities: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in worst), "",
              "| fallback prompt | identity none | style none | object none | judged otherwise (most often) |",
              "|---|---|---|---|---|"]
    for p, f in res["fallback"].items():
        lines.append(f"| {p!r} | {100 * f['identity_none']:.0f}% | {100 * f['style_none']:.0f}% | "
                     f"{100 * f['object_none']:.0f}% | {json.dumps(f['seen'])} |")
    lines.append(f"\n{res['n_images']} images, seeds 0..{res['seeds'] - 1} per identity prompt (twice as many for "
                 f"styles, objects, fallbacks), DDIM {res['steps']} steps, CFG {res['cfg']}; {res['seconds']:.0f}s.")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="id-sd1.safetensors (default) or a diffusers-style folder")
    ap.add_argument("--judge", default=None, help="judge weights (default: data/judge.safetensors)")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write the figures (no images) to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from idworld.judge import IdJudge

    res = measure(load_backend(args.model), IdJudge.load(args.judge), seeds=args.seeds, steps=args.steps, cfg=args.cfg)
    if args.json:
        Path(args.json).write_text(json.dumps({k: v for k, v in res.items() if k not in ("images", "jobs", "verdicts")},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
