"""Train the toy-world judge (shape + color CNN with a "none" class) and save its weights.

    python shared/toyworld/train_judge.py [--out shared/toyworld/data/judge.safetensors]

Seeded and deterministic on CPU (a few minutes on 2 cores). Training data:

* positives: renders of the world with a slightly wider radius range (6-14 px) and
  background range (0-50), augmented with mild noise / blur / contrast jitter so the judge
  also reads slightly imperfect generated images;
* negatives labeled shape "none": blank backgrounds, several kinds of noise, blurred shapes
  and blobs, two shapes in one image, shapes mostly cut off by the border, tiny specks.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "toyworld"

from toyworld.judge import COLOR_CLASSES, DEFAULT_WEIGHTS, SHAPE_CLASSES, JudgeNet, to_judge_input  # noqa: E402
from toyworld.world import (  # noqa: E402
    COLOR_JITTER, COLOR_NAMES, COLORS, IMAGE_SIZE, SHAPES, ShapeParams, render, render_params,
    shape_coverage,
)

NONE_SHAPE = len(SHAPES)
NONE_COLOR = len(COLOR_NAMES)


def _jitter(color: str, rng) -> tuple[int, int, int]:
    j = rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3)
    return tuple(int(v) for v in np.clip(np.array(COLORS[color]) + j, 0, 255))


def _blur_np(img: np.ndarray, sigma: float) -> np.ndarray:
    x = torch.from_numpy(img.astype(np.float32)).permute(2, 0, 1)[None]
    return _gauss_blur(x, sigma)[0].permute(1, 2, 0).numpy()


def _gauss_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    rad = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-rad, rad + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (rad, rad, rad, rad), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def _u8(x) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def positive(rng):
    s, c = int(rng.integers(8)), int(rng.integers(5))
    r = float(rng.uniform(6.0, 14.0))
    r = min(r, 15.0)
    p = ShapeParams(SHAPES[s], COLOR_NAMES[c], _jitter(COLOR_NAMES[c], rng), int(rng.integers(0, 51)),
                    float(rng.uniform(r, IMAGE_SIZE - r)), float(rng.uniform(r, IMAGE_SIZE - r)), r)
    return render_params(p), s, c


def negative(rng):
    kind = int(rng.integers(9))
    bg = int(rng.integers(0, 61))
    c = int(rng.integers(5))
    color = COLOR_NAMES[c]
    if kind == 0:  # blank
        img = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), bg, np.float32)
        if rng.random() < 0.5:
            img = img + rng.normal(0, rng.uniform(1, 8), img.shape)
        return _u8(img), NONE_SHAPE, NONE_COLOR
    if kind == 1:  # pixel noise: uniform or gaussian around a random level
        if rng.random() < 0.5:
            img = rng.uniform(0, 255, (IMAGE_SIZE, IMAGE_SIZE, 3))
        else:
            img = rng.normal(rng.uniform(0, 200), rng.uniform(20, 90), (IMAGE_SIZE, IMAGE_SIZE, 3))
        return _u8(img), NONE_SHAPE, NONE_COLOR
    if kind == 2:  # low-frequency colored noise (what a broken generator tends to make)
        g = int(rng.choice([2, 3, 4, 6, 8, 12]))
        z = torch.from_numpy(rng.uniform(0, 255, (1, 3, g, g)).astype(np.float32))
        img = F.interpolate(z, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
        img = img[0].permute(1, 2, 0).numpy()
        if rng.random() < 0.5:
            img = img * rng.uniform(0.2, 1.0) + rng.normal(0, rng.uniform(0, 20), img.shape)
        return _u8(img), NONE_SHAPE, NONE_COLOR
    if kind == 3:  # a shape blurred beyond recognition
        img = render(SHAPES[int(rng.integers(8))], color, rng).astype(np.float32)
        return _u8(_blur_np(img, float(rng.uniform(2.2, 4.5)))), NONE_SHAPE, c
    if kind == 4:  # a soft colored blob
        yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] + 0.5
        cx, cy = rng.uniform(8, 24, 2)
        sx, sy = rng.uniform(2.5, 7, 2)
        a = np.exp(-0.5 * (((xx - cx) / sx) ** 2 + ((yy - cy) / sy) ** 2))[..., None]
        img = bg * (1 - a) + np.array(_jitter(color, rng), np.float32) * a
        return _u8(img), NONE_SHAPE, c
    if kind == 5:  # two shapes, both clearly visible
        c2 = c if rng.random() < 0.5 else int(rng.integers(5))
        img = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), bg, np.float32)
        for _ in range(100):
            r1, r2 = rng.uniform(5, 10, 2)
            p1 = rng.uniform(r1, IMAGE_SIZE - r1, 2)
            p2 = rng.uniform(r2, IMAGE_SIZE - r2, 2)
            if np.hypot(*(p1 - p2)) >= 0.75 * (r1 + r2):
                break
        for (col, r, p) in ((c, r1, p1), (c2, r2, p2)):
            a = shape_coverage(SHAPES[int(rng.integers(8))], float(p[0]), float(p[1]), float(r))[..., None]
            img = img * (1 - a) + np.array(_jitter(COLOR_NAMES[col], rng), np.float32) * a
        return _u8(img), NONE_SHAPE, (c if c == c2 else NONE_COLOR)
    if kind == 6:  # a shape mostly cut off by the border
        shape = SHAPES[int(rng.integers(8))]
        r = float(rng.uniform(7, 13))
        full = shape_coverage(shape, 16.0, 16.0, r).sum()
        for _ in range(100):
            cx, cy = rng.uniform(-r, IMAGE_SIZE + r, 2)
            cov = shape_coverage(shape, float(cx), float(cy), r)
            frac = cov.sum() / full
            if 0.15 <= frac <= 0.55:
                break
        img = bg * (1 - cov[..., None]) + np.array(_jitter(color, rng), np.float32) * cov[..., None]
        return _u8(img), NONE_SHAPE, c
    if kind == 7:  # a tiny speck
        r = float(rng.uniform(1.5, 3.5))
        cov = shape_coverage(SHAPES[int(rng.integers(8))], *rng.uniform(4, 28, 2), r)[..., None]
        img = bg * (1 - cov) + np.array(_jitter(color, rng), np.float32) * cov
        return _u8(img), NONE_SHAPE, NONE_COLOR
    # kind 8: a shape dissolved in heavy noise
    img = render(SHAPES[int(rng.integers(8))], color, rng).astype(np.float32)
    img = img + rng.normal(0, rng.uniform(60, 110), img.shape)
    return _u8(img), NONE_SHAPE, NONE_COLOR


def make_dataset(n_pos: int, n_neg: int, seed: int):
    rng = np.random.default_rng(seed)
    imgs = np.empty((n_pos + n_neg, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    ys = np.empty((n_pos + n_neg,), np.int64)
    yc = np.empty((n_pos + n_neg,), np.int64)
    for i in range(n_pos + n_neg):
        imgs[i], ys[i], yc[i] = positive(rng) if i < n_pos else negative(rng)
    return imgs, ys, yc


def _smooth_field(n: int, ch: int, grid: int, g: torch.Generator) -> torch.Tensor:
    """[n, ch, 32, 32] smooth random field in [-1, 1] (bicubic upsampling of a coarse grid)."""
    z = torch.rand(n, ch, grid, grid, generator=g) * 2 - 1
    return F.interpolate(z, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bicubic", align_corners=False).clamp(-1, 1)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Mild corruption of a batch in [-1, 1], so that slightly imperfect generated images of a
    clear shape are still read as that shape: a smooth warp (<= ~1.4 px), blur (sigma 0.3-0.9),
    low-frequency color texture and background tint, contrast/brightness jitter, pixel noise."""
    n = x.shape[0]
    u = torch.rand(n, 6, generator=g)
    # smooth elastic warp on half of the batch
    amp = torch.where(u[:, 4] < 0.5, u[:, 4] * 2.8, torch.zeros(n))[:, None, None, None]  # px
    disp = _smooth_field(n, 2, 5, g) * amp * (2.0 / IMAGE_SIZE)
    lin = torch.linspace(-1 + 1 / IMAGE_SIZE, 1 - 1 / IMAGE_SIZE, IMAGE_SIZE)
    gy, gx = torch.meshgrid(lin, lin, indexing="ij")
    base = torch.stack([gx, gy], -1)[None]
    x = F.grid_sample(x, base + disp.permute(0, 2, 3, 1), mode="bilinear", padding_mode="border",
                      align_corners=False)
    # blur a third of the batch with sigma in [0.3, 0.9]
    idx = (u[:, 0] < 0.33).nonzero().flatten()
    if len(idx):
        sig = 0.3 + 0.6 * float(torch.rand(1, generator=g))
        x = x.clone()
        x[idx] = _gauss_blur(x[idx], sig)
    # low-frequency color texture (+-8%) and a background tint (+-8 levels) on a third
    tex = torch.where(u[:, 5:6] < 0.33, torch.ones(n, 1), torch.zeros(n, 1))[:, :, None, None]
    x01 = (x + 1) / 2
    x01 = x01 * (1 + 0.08 * tex * _smooth_field(n, 3, 4, g))
    x01 = x01 + tex * (torch.rand(n, 3, 1, 1, generator=g) * 2 - 1) * (8 / 255)
    x = x01 * 2 - 1
    # contrast/brightness jitter
    scale = 1 + (u[:, 1:2] - 0.5)[:, :, None, None] * 0.2
    shift = (u[:, 2:3] - 0.5)[:, :, None, None] * 0.1
    x = x * scale + shift
    # gaussian noise on half
    sigma = torch.where(u[:, 3] < 0.5, u[:, 3] * 0.12, torch.zeros(n))[:, None, None, None]
    x = x + sigma * torch.randn(x.shape, generator=g)
    return x.clamp(-1, 1)


def evaluate(net, imgs, ys, yc):
    net.eval()
    with torch.no_grad():
        x = to_judge_input(imgs)
        ls, lc = [], []
        for i in range(0, len(x), 1000):
            a, b = net(x[i:i + 1000])
            ls.append(a.argmax(-1))
            lc.append(b.argmax(-1))
    ps, pc = torch.cat(ls).numpy(), torch.cat(lc).numpy()
    net.train()
    return float((ps == ys).mean()), float((pc == yc).mean())


def clean_holdout(n: int, seed: int):
    rng = np.random.default_rng(seed)
    imgs = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    ys = np.empty(n, np.int64)
    yc = np.empty(n, np.int64)
    for i in range(n):
        ys[i], yc[i] = i % 8, (i // 8) % 5
        imgs[i] = render(SHAPES[ys[i]], COLOR_NAMES[yc[i]], rng)
    return imgs, ys, yc


def fit(net: JudgeNet, x_all: torch.Tensor, targets: list[torch.Tensor], *, epochs: int, batch: int, seed: int,
        on_epoch=None, lr: float = 2e-3) -> None:
    """Train ``net`` on ``x_all`` (float [N, 3, 32, 32] in [-1, 1]) with :func:`augment`: the sum of the
    heads' cross-entropies against ``targets`` (int64 [N] per head, in the net's head order), AdamW with
    one-cycle lr; ``on_epoch(epoch, mean loss)`` after each epoch (the net in train mode)."""
    g = torch.Generator().manual_seed(seed)
    steps = epochs * (len(x_all) // batch)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    net.train()
    for ep in range(epochs):
        perm = torch.randperm(len(x_all), generator=g)
        tot = 0.0
        for i in range(0, len(perm) - batch + 1, batch):
            b = perm[i:i + batch]
            logits = net(augment(x_all[b], g))
            loss = sum(F.cross_entropy(lg, t[b], label_smoothing=0.02) for lg, t in zip(logits, targets))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach())
        if on_epoch is not None:
            on_epoch(ep, tot / (len(perm) // batch))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(DEFAULT_WEIGHTS))
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--n-pos", type=int, default=40000)
    ap.add_argument("--n-neg", type=int, default=20000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--width", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()
    imgs, ys, yc = make_dataset(args.n_pos, args.n_neg, args.seed)
    hold = clean_holdout(2000, args.seed + 1)
    hold_neg = make_dataset(0, 1000, args.seed + 2)
    print(f"data {time.time() - t0:.0f}s", flush=True)
    x_all = to_judge_input(imgs)
    ys_t, yc_t = torch.from_numpy(ys), torch.from_numpy(yc)
    net = JudgeNet(args.width)

    def report(ep: int, loss: float) -> None:
        nonlocal sa, ca, na
        sa, ca = evaluate(net, *hold)
        na, nc = evaluate(net, *hold_neg)
        print(f"epoch {ep} loss {loss:.4f} clean shape {sa:.4f} color {ca:.4f} "
              f"| negatives shape {na:.4f} color {nc:.4f} | {time.time() - t0:.0f}s", flush=True)

    sa = ca = na = float("nan")
    fit(net, x_all, [ys_t, yc_t], epochs=args.epochs, batch=args.batch, seed=args.seed, on_epoch=report)
    from mace_core.files import save_tensors

    sd = {k: v.detach().to(torch.float16) for k, v in net.state_dict().items()}
    meta = {
        "config": json.dumps({"width": args.width}),
        "shape_classes": json.dumps(list(SHAPE_CLASSES)),
        "color_classes": json.dumps(list(COLOR_CLASSES)),
        "seed": str(args.seed),
        "holdout_clean_shape_acc": f"{sa:.4f}",
        "holdout_clean_color_acc": f"{ca:.4f}",
        "holdout_negative_shape_acc": f"{na:.4f}",
    }
    save_tensors(args.out, sd, meta, overwrite=True)  # retraining the shipped judge replaces it, as before
    print(f"saved {args.out} ({Path(args.out).stat().st_size / 1e3:.0f} kB) in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
