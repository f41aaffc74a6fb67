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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "toyworld"

from toyworld import world  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = HERE / "data" / "toy-sd1.safetensors"
DEFAULT_TEMPLATE = "a photo of a {color} {shape}"
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
)
BAR = {"shape": 0.90, "color": 0.90, "synonym": 0.85}


@dataclass
class Components:
    tokenizer: object
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module


def load_components(path: str | Path | None = None) -> Components:
    """Load the toy model: the shipped single file (via mace_core) or a diffusers-style folder
    with ``text_encoder/``, ``unet/``, ``vae/`` subfolders."""
    path = Path(path) if path is not None else DEFAULT_MODEL
    if path.is_dir():
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        from toyworld.train_model import load_tokenizer

        te = CLIPTextModel.from_pretrained(path / "text_encoder").eval()
        unet = UNet2DConditionModel.from_pretrained(path / "unet").eval()
        vae = AutoencoderKL.from_pretrained(path / "vae").eval()
        return Components(load_tokenizer(), te, unet, vae)
    from mace_core.checkpoint import build_components, load_checkpoint

    c = build_components(load_checkpoint(path), dtype=torch.float32)
    return Components(c.tokenizers[0], c.text_encoders[0], c.unet, c.vae)


@torch.no_grad()
def encode_prompts(comp: Components, prompts) -> torch.Tensor:
    ids = comp.tokenizer(list(prompts), padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt").input_ids
    return comp.text_encoder(ids).last_hidden_state


@torch.no_grad()
def sample(comp: Components, prompts, seeds, steps: int = 50, cfg: float = 5.0,
           batch_size: int = 128, negative: str = "") -> np.ndarray:
    """uint8 [N, 32, 32, 3] for (prompt, seed) pairs; seed s always draws the same noise."""
    from diffusers import DDIMScheduler

    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    sched = DDIMScheduler(**SCHEDULER_CONFIG)
    sched.set_timesteps(steps)
    vae, unet = comp.vae, comp.unet
    sf = float(vae.config.scaling_factor)
    ch = int(unet.config.in_channels)
    size = int(unet.config.sample_size)
    neg = encode_prompts(comp, [negative])
    out = []
    for s in range(0, len(prompts), batch_size):
        p, sd = list(prompts[s:s + batch_size]), list(seeds[s:s + batch_size])
        cond = encode_prompts(comp, p)
        ctx = torch.cat([neg.expand(len(p), -1, -1), cond])
        x = torch.stack([torch.randn((ch, size, size), generator=torch.Generator().manual_seed(int(k)))
                         for k in sd])
        for t in sched.timesteps:
            eps = unet(torch.cat([x, x]), t, encoder_hidden_states=ctx).sample
            u, c = eps.chunk(2)
            x = sched.step(u + cfg * (c - u), t, x).prev_sample
        img = vae.decode(x / sf).sample
        out.append(world.from_tensor_range(img.clamp(-1, 1)))
    return np.concatenate(out) if out else np.zeros((0, 32, 32, 3), np.uint8)


def measure(comp: Components, judge=None, seeds: int = 40, steps: int = 50, cfg: float = 5.0,
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
    imgs = sample(comp, prompts, [j[3] for j in jobs], steps=steps, cfg=cfg, batch_size=batch_size)
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
    comp = load_components(args.model)
    res = measure(comp, seeds=args.seeds, steps=args.steps, cfg=args.cfg, synonyms=not args.no_synonyms,
                  per_color=not args.cycle_colors, template=args.template)
    if args.grid:
        save_grid(res, args.grid)
    return 0 if res["passes_bar"] else 1


if __name__ == "__main__":
    sys.exit(main())
