"""Quality of a toy-world model, measured by the judge (issue 10's bar).

    python shared/toyworld/quality.py [--model PATH] [--seeds 40] [--steps 50] [--cfg 5]

For every shape, both of its words (main word and synonym) and every color, the prompt
``"a photo of a {color} {word}"`` is sampled with seeds 0..N-1 (DDIM, eta 0, classifier-free
guidance against the empty prompt) and judged. Shape accuracy counts the judge's shape (a
"none" verdict is a miss), color accuracy the judge's color. The bar: shape >= 90% for every
shape, color >= 90%, synonyms >= 85%.

``measure(..., per_color=False)`` instead gives seed i the color ``COLOR_NAMES[i % 5]`` (a
smaller sample: N seeds per word rather than per word and color), as the CI test does.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "toyworld"

from mace_core.model.checkpoint import Components, family_of_modules  # noqa: E402
from mace_core.model.diffusers_backend import DiffusersBackend  # noqa: E402
from mace_core.model.sampling import generate  # noqa: E402
from toyworld import world  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = HERE / "data" / "toy-sd1.safetensors"
DEFAULT_TEMPLATE = "a photo of a {color} {shape}"
BAR = {"shape": 0.90, "color": 0.90, "synonym": 0.85}


def load_backend(path: str | Path | None = None) -> DiffusersBackend:
    """The toy model (the shipped single file by default) on the CPU, float32."""
    return DiffusersBackend.from_file(path if path is not None else DEFAULT_MODEL, device="cpu",
                                      dtype=torch.float32)


def backend_of_modules(tokenizer, text_encoder, unet, vae) -> DiffusersBackend:
    """A backend over in-memory toy modules (used while training); shares their weights."""
    fam = family_of_modules("sd1", unet, vae, [text_encoder], resolution=world.IMAGE_SIZE)
    return DiffusersBackend(Components(fam, unet, vae, [text_encoder], [tokenizer]))


def measure(backend: DiffusersBackend, judge=None, seeds: int = 40, steps: int = 50, cfg: float = 5.0,
            synonyms: bool = True, per_color: bool = True, template: str = DEFAULT_TEMPLATE,
            batch_size: int = 128, verbose: bool = True) -> dict:
    """Sample and judge; returns a dict with per-shape rows and overall accuracies."""
    if judge is None:
        from toyworld.judge import Judge

        judge = Judge.load()
    jobs = []  # (shape, word_kind, color, seed)
    for shape in world.SHAPES:
        for kind in (("main", "synonym") if synonyms else ("main",)):
            for i in range(seeds):
                colors = world.COLOR_NAMES if per_color else (world.COLOR_NAMES[i % len(world.COLOR_NAMES)],)
                for color in colors:
                    jobs.append((shape, kind, color, i))
    prompts = [world.fix_article(template.format(
        color=c, shape=s if k == "main" else world.SYNONYMS[s])) for s, k, c, _ in jobs]
    t0 = time.time()
    imgs = generate(backend, prompts, [j[3] for j in jobs], steps=steps, guidance=cfg, batch_size=batch_size)
    verdicts = judge.classify(imgs)
    elapsed = time.time() - t0
    rows = {}
    for shape in world.SHAPES:
        r = {}
        for kind in ("main", "synonym"):
            sel = [v for j, v in zip(jobs, verdicts) if j[0] == shape and j[1] == kind]
            if sel:
                r[kind] = float(np.mean([v[0] == shape for v in sel]))
        selc = [(j, v) for j, v in zip(jobs, verdicts) if j[0] == shape]
        r["color"] = float(np.mean([v[1] == j[2] for j, v in selc]))
        r["none"] = float(np.mean([v[0] == "none" for _, v in selc]))
        r["n"] = len(selc)
        rows[shape] = r

    def acc(pred):
        sel = [(j, v) for j, v in zip(jobs, verdicts) if pred(j)]
        return float(np.mean([v[0] == j[0] for j, v in sel])) if sel else float("nan")

    res = {
        "rows": rows,
        "shape_acc": acc(lambda j: j[1] == "main"),
        "synonym_shape_acc": acc(lambda j: j[1] == "synonym"),
        "min_shape_acc": min(r["main"] for r in rows.values()),
        "min_synonym_shape_acc": min(r.get("synonym", 1.0) for r in rows.values()),
        "color_acc": float(np.mean([v[1] == j[2] for j, v in zip(jobs, verdicts)])),
        "none_rate": float(np.mean([v[0] == "none" for v in verdicts])),
        "n_images": len(jobs), "seeds": seeds, "steps": steps, "cfg": cfg, "per_color": per_color,
        "template": template, "seconds": elapsed,
    }
    res["passes_bar"] = bool(res["min_shape_acc"] >= BAR["shape"] and res["color_acc"] >= BAR["color"]
                             and res["min_synonym_shape_acc"] >= BAR["synonym"])
    if verbose:
        print(format_table(res))
    res["images"] = imgs
    res["jobs"] = jobs
    res["verdicts"] = verdicts
    return res


def format_table(res: dict) -> str:
    syn = any("synonym" in r for r in res["rows"].values())
    head = "| shape | main word | synonym | color | judged none |" if syn else "| shape | shape | color | judged none |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for shape, r in res["rows"].items():
        cells = [f"{shape}", f"{100 * r['main']:.1f}%"]
        if syn:
            cells.append(f"{world.SYNONYMS[shape]}: {100 * r['synonym']:.1f}%")
        cells += [f"{100 * r['color']:.1f}%", f"{100 * r['none']:.1f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    tot = ["**all**", f"{100 * res['shape_acc']:.1f}%"]
    if syn:
        tot.append(f"{100 * res['synonym_shape_acc']:.1f}%")
    tot += [f"{100 * res['color_acc']:.1f}%", f"{100 * res['none_rate']:.1f}%"]
    lines.append("| " + " | ".join(tot) + " |")
    per = "per (shape, word, color) prompt" if res["per_color"] else "per (shape, word), colors cycling"
    lines.append(f"\n{res['n_images']} images, {res['seeds']} seeds {per}, DDIM {res['steps']} steps, "
                 f"CFG {res['cfg']}, template {res['template']!r}; {res['seconds']:.0f}s. "
                 f"Bar (shape >= 90% each, color >= 90%, synonyms >= 85% each): "
                 f"{'PASS' if res['passes_bar'] else 'FAIL'}")
    return "\n".join(lines)


def save_grid(res: dict, path: str | Path, per_row: int = 20) -> None:
    """A PNG of the first images of each shape (rows) with the judge's misses framed in red."""
    from PIL import Image

    imgs, jobs, verdicts = res["images"], res["jobs"], res["verdicts"]
    rows = []
    for shape in world.SHAPES:
        idx = [i for i, j in enumerate(jobs) if j[0] == shape][:per_row]
        tiles = []
        for i in idx:
            t = np.pad(imgs[i], ((1, 1), (1, 1), (0, 0)))
            if verdicts[i][0] != shape:
                t[0, :], t[-1, :], t[:, 0], t[:, -1] = (255, 0, 0), (255, 0, 0), (255, 0, 0), (255, 0, 0)
            tiles.append(t)
        tiles += [np.zeros_like(tiles[0])] * (per_row - len(tiles))
        rows.append(np.concatenate(tiles, 1))
    g = np.concatenate(rows, 0)
    Image.fromarray(g).resize((g.shape[1] * 3, g.shape[0] * 3), Image.NEAREST).save(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="toy-sd1.safetensors (default) or a diffusers-style folder")
    ap.add_argument("--seeds", type=int, default=40)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--cycle-colors", action="store_true", help="seed i gets color i %% 5 (smaller sample)")
    ap.add_argument("--no-synonyms", action="store_true")
    ap.add_argument("--template", default=DEFAULT_TEMPLATE)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--grid", help="write a PNG grid of samples here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = measure(load_backend(args.model), seeds=args.seeds, steps=args.steps, cfg=args.cfg, synonyms=not args.no_synonyms,
                  per_color=not args.cycle_colors, template=args.template)
    if args.grid:
        save_grid(res, args.grid)
    return 0 if res["passes_bar"] else 1


if __name__ == "__main__":
    sys.exit(main())
