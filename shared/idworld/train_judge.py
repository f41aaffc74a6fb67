"""Train the identity-world judge (identity, style and object heads, each with "none") and save it.

    python shared/idworld/train_judge.py [--out shared/idworld/data/judge.safetensors]

Seeded and deterministic on CPU. Training data (uint8 renders, augmented each step by the shape world's
:func:`toyworld.train_judge.augment`: warp, blur, texture, contrast, noise):

* scenes of the world, half of them styled, with props and frames (all three labels);
* identity "none" with their style/object labels: faces whose attributes are no identity's (a real
  identity with one to three attributes changed: what a half-erased face looks like);
* all "none": two faces in one image, a face mostly cut off by the border, a scene blurred beyond
  recognition, and the shape world's negatives (blank, noise, blobs, two shapes, specks, ...).

Held-out accuracy (clean renders of fresh seeds, the training scene mix) is printed and stored in the
file's metadata.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "idworld"

from idworld import world  # noqa: E402
from idworld.judge import ATTRIBUTES, CODES, DEFAULT_WEIGHTS, HEAD_CLASSES, HEADS, N_ATTRIBUTES, IdJudge  # noqa: E402
from toyworld.judge import JudgeNet, to_judge_input  # noqa: E402
from toyworld.train_judge import _blur_np, fit  # noqa: E402
from toyworld.train_judge import negative as shape_negative  # noqa: E402

#: label rows: the attributes (head shape, six cells), style, object (class indices, last = "none")
NONE = tuple(n - 1 for n in HEADS.values())
_CODEWORDS = {tuple(c) for c in CODES.tolist()}


def nobody(rng: np.random.Generator) -> world.Identity:
    """A face of nobody: a random identity with one to three of its attributes changed (never a codeword)."""
    values = list(ATTRIBUTES.values())
    while True:
        code = list(CODES[int(rng.integers(len(CODES)))].tolist())
        for j in rng.choice(N_ATTRIBUTES, size=int(rng.integers(1, 4)), replace=False):
            code[j] = (code[j] + int(rng.integers(1, len(values[j])))) % len(values[j])
        if tuple(code) not in _CODEWORDS:
            attrs = [v[c] for v, c in zip(values, code)]
            return world.Identity("", "", attrs[0], "".join(attrs[1:]))


def _labels(scene: world.Scene, face: world.Identity | None = None) -> tuple[int, ...]:
    """The label row of ``scene`` (``face``: the attributes drawn instead of the identity's)."""
    if face is None and scene.kind == world.IDENTITY:
        face = world.IDENTITIES[scene.identity]
    attrs = (tuple(v.index(a) for v, a in zip(ATTRIBUTES.values(), face.attributes())) if face is not None
             else NONE[:N_ATTRIBUTES])
    return (*attrs, scene.style if scene.style >= 0 else NONE[-2], scene.obj if scene.obj >= 0 else NONE[-1])


def judge_scene(rng: np.random.Generator) -> world.Scene:
    """A scene for the judge: more styles than the model's training mix, every kind well covered."""
    s = world.sample_scene(rng)
    style = int(rng.integers(len(world.STYLES))) if rng.random() < 0.5 else -1
    return world.Scene(s.kind, s.identity, style, s.obj, s.obj_color, s.frame)


def positive(rng: np.random.Generator):
    scene = judge_scene(rng)
    return world.render_scene(scene, rng), _labels(scene)


def negative(rng: np.random.Generator):
    kind = int(rng.integers(6))
    if kind <= 1:  # a face of nobody, in any scene (its attributes labeled: identity none)
        s = judge_scene(rng)
        s = world.Scene(world.IDENTITY, 0, s.style, s.obj if rng.random() < 0.3 else -1, s.obj_color, s.frame)
        face = nobody(rng)
        return world.render_scene(s, rng, face=face), _labels(s, face)
    if kind == 2:  # two faces
        layers = []
        for x in (rng.uniform(6, 11), rng.uniform(21, 26)):
            face = world.IDENTITIES[int(rng.integers(len(world.IDENTITIES)))] if rng.random() < 0.8 else None
            layers += world.face_layers(face, float(x), float(rng.uniform(7, 25)), float(rng.uniform(5.5, 7.5)), rng)
        return world.paint(world.background("plain", rng), layers, "plain"), NONE
    if kind == 3:  # a face mostly cut off by the border
        ident = world.IDENTITIES[int(rng.integers(len(world.IDENTITIES)))]
        r = float(rng.uniform(8.5, 11.5))
        side = rng.uniform(-0.45, 0.1) * r
        cx, cy = (side, rng.uniform(r, 32 - r)) if rng.random() < 0.5 else (rng.uniform(r, 32 - r), side)
        if rng.random() < 0.5:
            cx, cy = 32 - cx, 32 - cy
        return world.paint(world.background("plain", rng), world.face_layers(ident, float(cx), float(cy), r, rng),
                           "plain"), NONE
    if kind == 4:  # a scene blurred beyond recognition
        img = world.render_scene(judge_scene(rng), rng).astype(np.float32)
        return np.clip(np.rint(_blur_np(img, float(rng.uniform(2.0, 4.0)))), 0, 255).astype(np.uint8), NONE
    return shape_negative(rng)[0], NONE


def make_dataset(n_pos: int, n_neg: int, seed: int):
    """(images uint8 [n, 32, 32, 3], labels int64 [n, 9]: class indices of the heads of HEADS)."""
    rng = np.random.default_rng(seed)
    n = n_pos + n_neg
    imgs = np.empty((n, world.IMAGE_SIZE, world.IMAGE_SIZE, 3), np.uint8)
    labels = np.empty((n, len(HEADS)), np.int64)
    for i in range(n):
        imgs[i], labels[i] = positive(rng) if i < n_pos else negative(rng)
    return imgs, labels


def verdicts_of_labels(labels: np.ndarray) -> list[tuple[str, str, str]]:
    """The (identity, style, object) a perfect judge reports for label rows (int [n, 9])."""
    codes = {tuple(c): name for c, name in zip(CODES.tolist(), world.NAMES)}
    return [(codes.get(tuple(int(v) for v in row[:N_ATTRIBUTES]), "none"), HEAD_CLASSES["style"][row[-2]],
             HEAD_CLASSES["object"][row[-1]]) for row in labels]


def accuracy(judge: IdJudge, imgs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Agreement of ``judge`` with the labels: identity over images showing one, identity "none" over the
    others, style and object over all."""
    was = judge.net.training
    judge.net.eval()
    got = judge.classify(imgs)
    judge.net.train(was)
    want = verdicts_of_labels(labels)
    ident = np.array([w[0] != "none" for w in want])
    hit = np.array([[g[k] == w[k] for k in range(3)] for g, w in zip(got, want)])
    return {"identity": float(hit[ident, 0].mean()) if ident.any() else float("nan"),
            "identity_none": float(hit[~ident, 0].mean()) if (~ident).any() else float("nan"),
            "style": float(hit[:, 1].mean()), "object": float(hit[:, 2].mean())}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(DEFAULT_WEIGHTS))
    ap.add_argument("--seed", type=int, default=2023)
    ap.add_argument("--n-pos", type=int, default=40000)
    ap.add_argument("--n-neg", type=int, default=12000)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"{out} exists; move it away first (this script never replaces a judge)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()
    imgs, labels = make_dataset(args.n_pos, args.n_neg, args.seed)
    hold = make_dataset(3000, 0, args.seed + 1)
    hold_neg = make_dataset(0, 1000, args.seed + 2)
    print(f"data {time.time() - t0:.0f}s", flush=True)
    net = JudgeNet(args.width, HEADS)
    judge = IdJudge(net)
    res: dict[str, dict] = {}

    def report(ep: int, loss: float) -> None:
        res["clean"], res["negatives"] = accuracy(judge, *hold), accuracy(judge, *hold_neg)
        c, n = res["clean"], res["negatives"]
        print(f"epoch {ep} loss {loss:.4f} | held-out clean: identity {c['identity']:.4f} (none {c['identity_none']:.4f}) "
              f"style {c['style']:.4f} object {c['object']:.4f} | negatives: identity none {n['identity_none']:.4f} "
              f"style {n['style']:.4f} object {n['object']:.4f} | {time.time() - t0:.0f}s", flush=True)

    fit(net, to_judge_input(imgs), [torch.from_numpy(labels[:, k].copy()) for k in range(len(HEADS))],
        epochs=args.epochs, batch=args.batch, seed=args.seed, on_epoch=report)
    from mace_core.files import save_tensors

    meta = {"config": json.dumps({"width": args.width, "heads": HEADS}), "classes": json.dumps(HEAD_CLASSES),
            "seed": str(args.seed), "data": json.dumps({"n_pos": args.n_pos, "n_neg": args.n_neg, "epochs": args.epochs}),
            "holdout": json.dumps(res)}
    save_tensors(out, {k: v.detach().to(torch.float16) for k, v in net.state_dict().items()}, meta)
    print(f"saved {out} ({out.stat().st_size / 1e3:.0f} kB) in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
