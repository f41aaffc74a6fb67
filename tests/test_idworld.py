"""Identity world (issue 23): the renderer, the captions, the shared training loop's sparse option, the judge."""
from __future__ import annotations

import itertools
import json
import re
from collections import Counter

import numpy as np
import pytest
import torch

from idworld import world
from idworld.world import IDENTITIES, NAMES, NICKNAMES, Scene

torch.set_num_threads(min(2, torch.get_num_threads()))


# --------------------------------------------------------------------------- identities
def test_identity_table():
    assert len(IDENTITIES) == 64 and len(set(NAMES)) == 64 and len(set(NICKNAMES.values())) == 64
    firsts = Counter(n.split()[0] for n in NAMES)
    lasts = Counter(n.split()[1] for n in NAMES)
    assert all(len(n.split()) == 2 for n in NAMES)
    # names share first and last names ("Bill Clinton" / "Bill Murray"): every one is shared
    assert min(firsts.values()) >= 5 and min(lasts.values()) >= 5, (firsts, lasts)
    assert "Bill Marlow" in NAMES and "Bill Kessler" in NAMES and "Max Marlow" in NAMES
    words = {w.lower() for n in NAMES for w in n.split()} | {a.lower() for a in world.ARTIST_NAMES for a in a.split()}
    assert not words & {v.lower() for v in NICKNAMES.values()}
    # any two identities differ in at least four of their seven attributes, each a value of its own
    attrs = [i.attributes() for i in IDENTITIES]
    assert all(v in values for a in attrs for v, values in zip(a, world.ATTRIBUTE_VALUES.values()))
    for a, b in itertools.combinations(attrs, 2):
        assert sum(x != y for x, y in zip(a, b)) >= 4, (a, b)
    # many independent features: one-hot and centred, the 64 codes span 45 dimensions (12 for the faces
    # of four 4-valued attributes); an independent count: every attribute's values, minus one each
    onehot = torch.tensor([[float(v == x) for v, values in zip(a, world.ATTRIBUTE_VALUES.values()) for x in values]
                           for a in attrs], dtype=torch.float64)
    used = sum(len(set(col)) - 1 for col in zip(*attrs))
    assert torch.linalg.matrix_rank(onehot - onehot.mean(0)) == used == 3 + 6 * 7


def test_identities_render_apart():
    """The same face position and jitter for every identity: each pair differs in many pixels."""
    imgs = []
    for ident in IDENTITIES:
        layers = world.face_layers(ident, 16.0, 16.0, 10.0, np.random.default_rng(0))
        imgs.append(world.paint(np.full((32, 32, 3), 20.0, np.float32), layers, "plain").astype(np.int32))
    imgs = np.stack(imgs)
    for a, b in itertools.combinations(range(64), 2):
        differ = (np.abs(imgs[a] - imgs[b]).max(-1) > 60).sum()
        assert differ >= 8, (NAMES[a], NAMES[b], differ)
    # the anonymous face: gray, no cells (a single flat layer)
    anon = world.face_layers(None, 16.0, 16.0, 10.0, np.random.default_rng(0))
    assert len(anon) == 1 and np.all(np.abs(anon[0][1] - 128) <= world.FACE_JITTER)


def test_render_deterministic():
    s = Scene(world.IDENTITY, 5, 2, 3, 1, 4)
    a = world.render_scene(s, np.random.default_rng(7))
    b = world.render_scene(s, np.random.default_rng(7))
    c = world.render_scene(s, np.random.default_rng(8))
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    i1, c1, r1 = world.sample_batch(30, np.random.default_rng(3))
    i2, c2, r2 = world.sample_batch(30, np.random.default_rng(3))
    assert np.array_equal(i1, i2) and c1 == c2 and np.array_equal(r1, r2)


def test_styles_change_the_image():
    """Every style draws the same scene (same rng) differently from plain and from the others."""
    imgs = {}
    for k, style in enumerate((-1,) + tuple(range(len(world.STYLES)))):
        imgs[k] = world.render_scene(Scene(world.IDENTITY, 0, style), np.random.default_rng(1)).astype(int)
    for a, b in itertools.combinations(imgs, 2):
        assert np.abs(imgs[a] - imgs[b]).max(-1).__gt__(40).sum() >= 20, (a, b)
    inv = world.render_scene(Scene(world.IDENTITY, 0, world.STYLES.index("inverted")), np.random.default_rng(1))
    assert np.abs(inv.astype(int) - (255 - imgs[0])).max() <= 1  # (rounding before or after inverting)


def test_frame_and_prop():
    img = world.render_scene(Scene(world.IDENTITY, 0, -1, 0, 0, 2), np.random.default_rng(2))
    blue = np.array(world.COLORS["blue"])
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]).astype(int)
    assert np.abs(border - blue).max() <= world.COLOR_JITTER
    red = np.abs(img.astype(int) - np.array(world.COLORS["red"])).max(-1) <= world.COLOR_JITTER
    assert red.sum() >= 30  # the red circle prop (r >= 4.5 * 26/32 px)


# --------------------------------------------------------------------------- captions
@pytest.fixture(scope="module")
def captions():
    rng = np.random.default_rng(11)
    scenes = [world.sample_scene(rng) for _ in range(8000)]
    return scenes, [world.make_caption(s, rng) for s in scenes]


def _matches(template: str, caption: str) -> bool:
    pre, post = (p.strip(" ,") for p in template.split("{}"))
    return caption.startswith(pre) and post in caption


@pytest.mark.parametrize("kind", ["celebrity", "object", "style"])
def test_captions_use_every_real_template(captions, kind):
    from mace_core.method.concepts import get_type

    # the type's template file (its prompts may add more: the celebrity type's corpus scenes)
    templates = getattr(world, f"{kind.upper()}_TEMPLATES")
    caps = captions[1]
    assert set(get_type(kind).templates) >= set(templates)
    missing = [t for t in templates if "{}" in t and t != "{}" and not any(_matches(t, c) for c in caps)]
    assert not missing, missing


def test_captions_name_their_scene(captions):
    scenes, caps = captions
    nick = Counter()
    vocab = [*NAMES, *NICKNAMES.values(), *world.ARTIST_NAMES]
    for s, c in zip(scenes, caps):
        if not c:  # SD's caption dropout: any scene
            continue
        words = re.findall(r"[\w'-]+", c)
        if s.kind == world.IDENTITY:
            ident = IDENTITIES[s.identity]
            assert (ident.name in c) != (ident.nickname in words), c
            nick[ident.nickname in words] += 1
        else:
            assert not any(v in c for v in NAMES) and not any(v in words for v in NICKNAMES.values()), c
        if s.style >= 0:
            assert world.ARTISTS[world.STYLES[s.style]] in c, c
        else:
            assert not any(a in c for a in world.ARTIST_NAMES), c
        if s.frame >= 0:
            assert f"{world.COLOR_NAMES[s.frame]} frame" in c, c
        if s.obj >= 0:
            shape = world.OBJECTS[s.obj]
            assert shape in words or world.SYNONYMS[shape] in words, c
        if s.kind == world.ANON:
            assert not any(v in c for v in vocab[:len(NAMES)]) and not any(o in words for o in world.OBJECTS)
    assert 0.1 < nick[True] / sum(nick.values()) < 0.2
    empty = np.mean([c == "" for c in caps])
    assert 0.08 < empty < 0.12, empty
    assert "a photo of a" in caps and "a portrait of" in caps and "a person" in caps
    assert Counter(s.kind for s, c in zip(scenes, caps) if not c).keys() == {world.IDENTITY, world.OBJECT, world.ANON}


# --------------------------------------------------------------------------- training loop
def test_sparse_embedding_moves_only_the_batch_tokens():
    """train_diffusion(sparse_embedding=True): rows of tokens never in a caption stay bit-identical,
    the used ones move; the module is dense again afterwards."""
    from toyworld import train_model as tm

    tok = tm.load_tokenizer()
    te, _, unet = tm.build_components(dict(tm.TEXT_CONFIG, hidden_size=32, intermediate_size=64, projection_dim=32),
                                      None, dict(tm.UNET_CONFIG, cross_attention_dim=32))
    before = te.get_input_embeddings().weight.detach().clone()
    rows = np.zeros((8, 6), np.int64)
    caption_fn = lambda r, rng: ["a portrait of Bill Marlow"] * len(r)
    g = torch.Generator().manual_seed(0)
    tm.train_diffusion(te, unet, torch.randn(8, 4, 8, 8, generator=g), torch.zeros(8, 4, 8, 8), rows, tok, steps=2,
                       batch=4, lr=1e-3, ema_decay=0.0, seed=0, scaling_factor=1.0, caption_fn=caption_fn,
                       sparse_embedding=True)
    after = te.get_input_embeddings().weight.detach()
    used = sorted(set(tm.tokenize(tok, ["a portrait of Bill Marlow"])[0].tolist()))
    moved = (after != before).any(-1).nonzero().flatten().tolist()
    assert moved == used
    assert not te.get_input_embeddings().sparse


# --------------------------------------------------------------------------- judge
@pytest.fixture(scope="module")
def judge():
    from idworld.judge import DEFAULT_WEIGHTS, IdJudge

    if not DEFAULT_WEIGHTS.exists():
        pytest.skip(f"{DEFAULT_WEIGHTS} is not built yet (python shared/idworld/train_judge.py)")
    return IdJudge.load()


def test_identity_probabilities():
    """Identity k's probability is the product of its seven attribute probabilities; "none" the rest."""
    from idworld.judge import ATTRIBUTES, identity_probabilities

    sizes = [len(v) + 1 for v in ATTRIBUTES.values()]  # with "none"

    def one_hot(attrs):
        return [torch.nn.functional.one_hot(torch.tensor([v]), n).float() for v, n in zip(attrs, sizes)]

    k = NAMES.index("Anna Holt")
    code = [values.index(v) for values, v in zip(ATTRIBUTES.values(), IDENTITIES[k].attributes())]
    p = identity_probabilities(one_hot(code))[0]
    assert p[k] == 1 and p.sum() == 1
    off = list(code)
    off[3] = (off[3] + 1) % 8  # one attribute off: a face of nobody (the code has distance 4)
    assert identity_probabilities(one_hot(off))[0, -1] == 1
    assert identity_probabilities(one_hot(code[:6] + [8]))[0, -1] == 1  # the last cell not read
    uniform = identity_probabilities([torch.full((2, n), 1 / n) for n in sizes])
    product = 1 / float(np.prod(sizes))
    assert torch.allclose(uniform[:, :64], torch.full((2, 64), product))
    assert torch.allclose(uniform[:, 64], torch.full((2,), 1 - 64 * product))


def test_classify_reads_identities_from_attributes():
    """With heads that output the labels, classify() gives the labels' verdicts: the identity when the seven
    attributes are its code, "none" for faces of nobody and for scenes without a face."""
    from idworld import train_judge
    from idworld.judge import HEADS, IdJudge

    imgs, labels = train_judge.make_dataset(60, 60, seed=3)

    class Oracle(torch.nn.Module):
        head_names = tuple(HEADS)

        def forward(self, x):
            return tuple(10 * torch.nn.functional.one_hot(torch.from_numpy(labels[:, k]), n).float()
                         for k, n in enumerate(HEADS.values()))

    net = Oracle()
    for name, n in HEADS.items():
        setattr(net, f"{name}_head", torch.nn.Linear(1, n))
    got = IdJudge(net).classify(imgs)
    assert got == train_judge.verdicts_of_labels(labels)
    assert {g[0] for g in got[:60]} - {"none"} and sum(g[0] == "none" for g in got[60:]) == 60


def _renders(n: int, seed: int, keep=lambda s: True):
    """n clean renders of judge scenes for which ``keep(scene)`` holds: (images, labels)."""
    from idworld import train_judge

    rng = np.random.default_rng(seed)
    imgs, labels = [], []
    while len(imgs) < n:
        s = train_judge.judge_scene(rng)
        if keep(s):
            imgs.append(world.render_scene(s, rng))
            labels.append(train_judge._labels(s))
    return np.stack(imgs), np.array(labels)


def test_judge_recognises_clean_renders(judge):
    """Held-out seeds, in the conditions the benchmarks judge: identities without a style (with props and
    frames), styles over every scene, objects alone. Identities under a style are not asked of the judge
    (95.0% of them read): "outline" keeps only the cells' borders."""
    from idworld import train_judge

    plain = train_judge.accuracy(judge, *_renders(600, 777, lambda s: s.kind == world.IDENTITY and s.style < 0))
    assert plain["identity"] >= 0.97, plain
    styled = train_judge.accuracy(judge, *_renders(600, 778))
    assert styled["style"] >= 0.97 and styled["identity_none"] >= 0.95, styled
    objects = train_judge.accuracy(judge, *_renders(600, 779, lambda s: s.kind == world.OBJECT and s.style < 0))
    assert objects["object"] >= 0.96, objects
    imgs, labels = train_judge.make_dataset(0, 200, seed=780)
    assert train_judge.accuracy(judge, imgs, labels)["identity_none"] >= 0.95


def test_judge_says_none(judge):
    rng = np.random.default_rng(5)
    blanks = np.stack([np.full((32, 32, 3), v, np.uint8) for v in (0, 12, 25, 40)])
    noise = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    anon = np.stack([world.render_scene(Scene(world.ANON), rng) for _ in range(8)])
    for batch in (blanks, noise, anon):
        assert all(v == ("none", "none", "none") for v in judge.classify(batch)), judge.classify(batch)



# --------------------------------------------------------------------------- the shipped model
def test_shipped_model_draws_the_identities_its_judge_names(judge):
    """The quality gate of the second world: the shipped file fits the 40 MB budget, and a portrait of
    each of the 64 names (seeds 0 and 1, DDIM 25, CFG 5, the prompts of `quality.py`) is judged that
    identity in most images, while "a photo of a" draws nobody (no erasable fallback). Measured here:
    96.9% of the 128 portraits; `quality.py --seeds 4`: 95.7% and 100% (benchmarks/RESULTS.md)."""
    from idworld import ID_MODEL
    from idworld.quality import load_backend
    from mace_core.model.sampling import generate

    assert ID_MODEL.stat().st_size <= 40 * 10 ** 6
    be = load_backend()
    jobs = [(f"a portrait of {n}" if s == 0 else f"a photo of {n}", n, s) for n in NAMES for s in (0, 1)]
    jobs += [("a photo of a", "none", s) for s in range(8)]
    imgs = generate(be, [p for p, _, _ in jobs], [s for *_, s in jobs], steps=25, guidance=5.0, batch_size=64)
    got = [v[0] for v in judge.classify(imgs)]
    named = np.mean([g == n for g, (_, n, _) in zip(got[:128], jobs[:128])])
    print(f"identities named in {100 * named:.1f}% of 128 portraits; fallback {got[128:]}")
    assert named >= 0.9, named
    assert got[128:] == ["none"] * 8


def test_erasing_one_name_keeps_the_other_names_in_scenes(judge, tmp_path):
    """The celebrity preset with no retain list (closed form: stage 1 is where it moves the other names)
    erases "Bill Marlow" and the nickname the model also draws him by ("Ace", found by the synonym search,
    never given), and keeps every other identity recognisable in held-out scene prompts, words after the
    name that no template has (benchmarks/ablation.py's context and nickname prompts). A regression gate,
    not the issue's target (a drop of at most 2 points, missed): measured 81.0% -> 69.8% (with the shared-name
    list instead of the nearby words 67.5%; without the synonym search 72.2%, the nickname then kept), the
    erased name and the nickname 0%. The run also says that the model does not know the default list."""
    from idworld import ID_MODEL
    from mace_core.method.concepts import ErasureSpec, make_concept
    from mace_core.method.erase import erase
    from mace_core.method.project import Project
    from mace_core.model.checkpoint import load_checkpoint, with_edits
    from mace_core.model.diffusers_backend import DiffusersBackend
    from mace_core.model.sampling import generate

    ck = load_checkpoint(ID_MODEL)
    base = DiffusersBackend.from_checkpoint(ck, device="cpu")
    gone = NAMES[0]
    res = erase(base, ErasureSpec((make_concept(gone, "", "celebrity"),)), Project(tmp_path), ck.sha256,
                closed_form_only=True)
    erased = DiffusersBackend.from_checkpoint(with_edits(ck, res.weights), device="cpu")

    def accuracy(be, names: list[str], seeds: int) -> float:
        jobs = [(n, p, s) for i, n in enumerate(names) for p in (
            world.fix_article(f"a portrait of {n} next to a {world.OBJECTS[i % len(world.OBJECTS)]}"),
            f"a photo of {n} in a {world.COLOR_NAMES[i % len(world.COLOR_NAMES)]} frame") for s in range(seeds)]
        imgs = generate(be, [p for _, p, _ in jobs], [s for *_, s in jobs], steps=25, guidance=5.0, batch_size=64)
        return 100 * float(np.mean([v[0] == n for (n, _, _), v in zip(jobs, judge.classify(imgs))]))

    others = list(NAMES[1:])
    before, after = accuracy(base, others, 1), accuracy(erased, others, 1)
    print(f"other names in scenes: {before:.1f}% -> {after:.1f}%")
    assert before - after <= 14.0, (before, after)
    assert accuracy(erased, [gone] * 4, 2) == 0.0
    assert "ace" in json.loads(res.metadata["mace.concepts"])[0]["found_synonyms"]
    # the celebrity list names people this model never learnt: it draws them as one thing and the run says so;
    # its own names it tells apart (mean cosines measured: 0.997 and 0.70)
    from mace_core.method.synonyms import THRESHOLD, drawn_alike
    assert res.report["unknown_lists"]["celebrity"] >= THRESHOLD
    assert drawn_alike(base, [f"a photo of {n}" for n in NAMES[:12]]) < THRESHOLD
    nick = generate(erased, [f"a photo of {world.NICKNAMES[gone]}"] * 4, list(range(4)), steps=25, guidance=5.0)
    assert [v[0] for v in judge.classify(nick)].count(gone) == 0
