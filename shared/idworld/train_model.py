"""Train the identity-world text-to-image model: a tiny SD 1.x, the shape world's recipe and stages.

    python shared/idworld/train_model.py                 # full run, writes data/id-sd1.safetensors
    python shared/idworld/train_model.py --preset proto --workdir /tmp/idproto --no-single-file

Same classes, block layout, noise schedule and stages as :mod:`toyworld.train_model` (VAE, then text
encoder + UNet with EMA and min-SNR weighting, then decoder hardening, then one SD1-layout file via
``mace_core.model.checkpoint.save_new_checkpoint``), which this script calls; what differs is the world
(:mod:`idworld.world`) and the text width: 256, i.e. 4.0 dims per identity for the 64 identities, at
SD's ratio (768 dims for the MACE paper's 200 celebrities: 3.84). The UNet's cross-attention width
follows it. The token embedding (49408 x 256) gets a lazy sparse Adam (only the rows of the batch's
tokens move), which keeps a step near the shape world's cost. Seeded; reproducible on one CPU thread.

The UNet is wider than the shape world's (4.7M parameters; a 1.85M-parameter one named the identity in
31% of portraits of the first identity world, this one in 72%), and the empty caption is SD's 10%
caption dropout from the first step (an empty caption kept for the anonymous face alone made the
unconditional prediction insist on a gray face, and guidance 5 extrapolated every prompt into blobs).
Diffusion runs two schedules (``steps`` at ``lr``, then ``polish_steps`` at ``polish_lr``): the
identities' seven attributes take both (12% of portraits right after the first, 95.7% after both). The
shipped file is this command's output, preset ``full``, one thread: 127 min on one core of this
project's 2-core VM (VAE 11 min).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "idworld"

from idworld import world  # noqa: E402
from toyworld import train_model as base  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "data" / "id-sd1.safetensors"
DIFFUSERS_CACHE = HERE.parents[1] / ".cache" / "id_diffusers"

WIDTH = 256
TEXT_CONFIG = dict(base.TEXT_CONFIG, hidden_size=WIDTH, intermediate_size=2 * WIDTH, projection_dim=WIDTH,
                   num_attention_heads=4)
UNET_CONFIG = dict(base.UNET_CONFIG, cross_attention_dim=WIDTH)
# 4.7M parameters instead of the shape world's 1.85M (whose loss flattened at 0.043 here, and a quarter
# of its samples came out washed-out white); the file stays under 40 MB
UNET_CONFIG = dict(UNET_CONFIG, block_out_channels=[64, 64, 96, 96], attention_head_dim=4)
VAE_CONFIG = base.VAE_CONFIG

PRESETS = {
    # the shipped model
    "full": dict(n_images=24000, vae_steps=3000, vae_batch=16, steps=4000, batch=48,
                 lr=1e-3, ema=0.999, polish_steps=2500, polish_lr=5e-4, polish_ema=0.998, decoder_steps=1200),
    # a few minutes, to see that a configuration learns
    "proto": dict(n_images=8000, vae_steps=600, vae_batch=16, steps=1000, batch=64,
                  lr=1e-3, ema=0.995, polish_steps=0, polish_lr=5e-4, polish_ema=0.998, decoder_steps=200),
}


def render_set(n: int, seed: int, cache_dir: str | Path | None = None):
    """n scenes drawn with the training mix: (images uint8 [n, 32, 32, 3], rows int64 [n, 6])."""
    cache = Path(cache_dir) / f"id_renders_{n}_{seed}.npz" if cache_dir else None
    if cache is not None and cache.exists():
        d = np.load(cache)
        return d["images"], d["rows"]
    rng = np.random.default_rng(seed)
    imgs = np.empty((n, world.IMAGE_SIZE, world.IMAGE_SIZE, 3), np.uint8)
    rows = np.empty((n, 6), np.int64)
    for i in range(n):
        s = world.sample_scene(rng)
        imgs[i] = world.render_scene(s, rng)
        rows[i] = s.row()
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, images=imgs, rows=rows)
    return imgs, rows


def save_reconstructions(vae, x: torch.Tensor, path: Path, n: int = 64) -> None:
    """A PNG of n training images (odd rows) over their VAE reconstructions (even rows)."""
    from PIL import Image

    with torch.no_grad():
        rec = vae.decode(vae.encode(x[:n]).latent_dist.mean).sample
    a, b = world.from_tensor_range(x[:n]), world.from_tensor_range(rec)
    rows = [np.concatenate(list(t[i:i + 16]), 1) for i in range(0, n, 16) for t in (a, b)]
    g = np.concatenate(rows, 0)
    Image.fromarray(g).resize((g.shape[1] * 3, g.shape[0] * 3), Image.NEAREST).save(path)


def save_samples(tokenizer, te, unet, vae, path: Path, seeds: int = 4) -> None:
    """A PNG of samples (rows: 12 identities, their nicknames, 4 artists, 4 objects, 'a photo of a')."""
    from PIL import Image

    from idworld.quality import backend_of_modules
    from mace_core.model.sampling import generate

    prompts = ([f"a portrait of {n}" for n in world.NAMES[:12]] + [f"a photo of {world.NICKNAMES[n]}" for n in world.NAMES[:4]]
               + [f"an image in the style of {a}" for a in world.ARTIST_NAMES[:4]]
               + [f"a photo of the {o}" for o in world.OBJECTS[:4]] + ["a photo of a"])
    jobs = [(p, s) for p in prompts for s in range(seeds)]
    imgs = generate(backend_of_modules(tokenizer, te, unet, vae), [p for p, _ in jobs], [s for _, s in jobs],
                    steps=20, guidance=5.0, batch_size=128)
    g = imgs.reshape(len(prompts), seeds, *imgs.shape[1:]).transpose(0, 2, 1, 3, 4)
    g = g.reshape(len(prompts) * imgs.shape[1], seeds * imgs.shape[2], 3)
    Image.fromarray(g).resize((g.shape[1] * 3, g.shape[0] * 3), Image.NEAREST).save(path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="full", choices=sorted(PRESETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: reproducible)")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--workdir", default=str(DIFFUSERS_CACHE), help="diffusers folders and sample grids go here")
    ap.add_argument("--steps", type=int, help="override the preset's diffusion steps")
    ap.add_argument("--n-images", type=int)
    ap.add_argument("--render-cache", help="folder to cache the rendered training images in")
    ap.add_argument("--samples-every", type=int, default=0, help="write a sample grid every N diffusion steps")
    ap.add_argument("--no-single-file", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if not args.no_single_file and out.exists():
        raise SystemExit(f"{out} exists; move it away first (this script never replaces a model)")
    cfg = dict(PRESETS[args.preset])
    for k in ("steps", "n_images"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start, cpu_start = time.time(), time.process_time()
    print(f"config {json.dumps(cfg)} seed {args.seed} threads {args.threads}", flush=True)
    tokenizer = base.load_tokenizer()
    te, vae, unet = base.build_components(TEXT_CONFIG, VAE_CONFIG, UNET_CONFIG)
    n_par = lambda m: sum(p.numel() for p in m.parameters())
    print(f"params: text {n_par(te) / 1e6:.2f}M unet {n_par(unet) / 1e6:.2f}M vae {n_par(vae) / 1e6:.2f}M", flush=True)

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    imgs, rows = render_set(cfg["n_images"], args.seed + 1, args.render_cache)
    x = torch.from_numpy(world.to_tensor_range(imgs))
    print(f"rendered {len(imgs)} images {time.time() - t_start:.0f}s", flush=True)
    base.train_vae(vae, x, cfg["vae_steps"], cfg["vae_batch"], 2e-3, args.seed + 2)
    t_vae = time.time() - t_start
    lat_mean, lat_std = base.encode_all(vae, x)
    scaling = float(1.0 / lat_mean.std())
    vae.register_to_config(scaling_factor=scaling)
    print(f"vae done {t_vae:.0f}s; latent std {1 / scaling:.4f} -> scaling_factor {scaling:.4f}", flush=True)
    save_reconstructions(vae, x, workdir / "vae_reconstructions.png")

    samples = lambda step: save_samples(tokenizer, te, unet, vae, workdir / f"samples_{step}.png")
    schedule = functools.partial(base.train_diffusion, te, unet, lat_mean, lat_std, rows, tokenizer, batch=cfg["batch"],
                                 scaling_factor=scaling, caption_fn=world.captions_of_rows, sparse_embedding=True)
    schedule(steps=cfg["steps"], lr=cfg["lr"], ema_decay=cfg["ema"], seed=args.seed + 3,
             eval_fn=samples if args.samples_every else None, eval_every=args.samples_every)
    if cfg["polish_steps"]:
        # a second schedule at half the rate: after the first the model drew the asked identity in 12%
        # of portraits (session 13), after both in 95.7%
        schedule(steps=cfg["polish_steps"], lr=cfg["polish_lr"], ema_decay=cfg["polish_ema"], seed=args.seed + 5)
    base.harden_decoder(vae, x, cfg["decoder_steps"], args.seed + 4)
    t_total, cpu_total = time.time() - t_start, time.process_time() - cpu_start
    load = os.getloadavg()[1] if hasattr(os, "getloadavg") else float("nan")
    print(f"training done: wall {t_total / 60:.1f} min (vae {t_vae / 60:.1f} min), CPU {cpu_total / 60:.1f} min, "
          f"load average (5 min) at the end {load:.1f}", flush=True)
    samples("final")

    base.save_diffusers(te, vae, unet, workdir, tokenizer)
    meta = {
        "idworld.train": json.dumps({**cfg, "seed": args.seed, "threads": args.threads, "text_width": WIDTH,
                                     "train_minutes": round(t_total / 60, 1), "cpu_minutes": round(cpu_total / 60, 1)}),
        "idworld.world": json.dumps({"identities": len(world.IDENTITIES), "styles": len(world.STYLES),
                                     "objects": len(world.OBJECTS), "scene_mix": world.SCENE_MIX,
                                     "caption_probs": world.PROBS, "templates_sha256": world.templates_digest()}),
        "idworld.decoder": json.dumps(base._decoder_settings(cfg)),
        "idworld.scheduler": json.dumps(base.SCHEDULER_CONFIG),
    }
    (workdir / "train_info.json").write_text(json.dumps(meta, indent=1))
    if not args.no_single_file and base.save_single_file(te, vae, unet, out, meta):
        print(f"saved {out} ({out.stat().st_size / 1e6:.1f} MB)")
    print(f"saved diffusers folders in {workdir}")


if __name__ == "__main__":
    main()
