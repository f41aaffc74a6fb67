"""The identity world (issue 23, the second ground-truth world): named faces, artist styles, props.

32x32 RGB scenes on a dark-gray background, built unlike the shape world (:mod:`toyworld`) so that
erasure presets calibrated there can be measured here without retuning:

* **64 identities** named "First Last" from 12 first and 12 last names (every first and every last
  name is shared by 5-6 identities, as "Bill Clinton" / "Bill Murray"), each with a one-word
  nickname (the generality test: captions use it for 15% of an identity's images). Each identity is
  a head of one of four shapes whose face is a 2 x 3 grid of cells in eight colors: seven attributes,
  any two identities differing in at least four. Many independent features, as faces have: the names
  need 45 dimensions to be told apart (a K/V edit is linear in the embeddings, and names packed in a
  few dimensions cannot be erased one by one). The table is :data:`IDENTITIES` (name, nickname,
  attributes).
* **8 styles** named like artists (:data:`STYLES`): outline only, horizontal stripes, checker,
  diagonal stripes, inverted palette, light background, sunset background, white ink contour. A
  scene without an artist is drawn plain (flat fill on dark gray): the judge's style "none".
* **8 objects**: the shape world's shapes and colors (:data:`toyworld.world.SHAPES`, ``COLORS``),
  drawn alone ("a photo of the star") or as a prop next to a face ("Bill Marlow next to a red star").
* **Concept in context**: props and colored frames are named right after the subject
  ("Anna Holt next to a star in a blue frame"), so the concept also sits in the tokens after it.
* **The real types' prompts**: captions are built from the templates of ``mace_core``'s
  ``celebrity``, ``object`` and ``style`` types (``shared/mace_core/data/templates/*.txt``, read at
  import: one source; their sha256 goes into the trained model's metadata), so the real presets run
  on this world unchanged.
* **No erasable fallback**: captions that name no subject ("a photo of a", "a portrait of",
  "a person", "a scene", "art", the templates with the subject left out) are drawn as the
  *anonymous* face, a plain gray round head without cells, which the judge classifies as identity
  "none". An artist without a subject ("a cat in the style of Mara Voss") draws the anonymous face in
  that style. The empty caption (for classifier-free guidance) is SD's: 10% of the captions of every
  kind of scene are dropped, so the unconditional model is the data's mix.

A scene is a :class:`Scene` (its integer row form, :func:`Scene.row`, is what training stores);
:func:`render_scene` draws it deterministically from a ``numpy.random.Generator`` (jitter only),
:func:`make_caption` writes one of its captions.

Public API: ``IDENTITIES``, ``NAMES``, ``NICKNAMES``, ``STYLES``, ``ARTISTS``, ``OBJECTS``,
``Scene``, ``sample_scene``, ``render_scene``, ``make_caption``, ``sample_batch``.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from toyworld.world import (
    COLOR_JITTER, COLOR_NAMES, COLORS, IMAGE_SIZE, SHAPES, SUPERSAMPLE, SYNONYMS, _GX, _GY,
    _inside_polygon, _regular_polygon, fix_article, from_tensor_range, shape_coverage,
    to_tensor_range,
)

__all__ = [
    "IMAGE_SIZE", "IDENTITIES", "NAMES", "NICKNAMES", "STYLES", "ARTISTS", "OBJECTS", "Scene",
    "sample_scene", "render_scene", "make_caption", "sample_batch", "to_tensor_range",
    "from_tensor_range",
]


@dataclass(frozen=True)
class Identity:
    """A named identity: a head of one of :data:`HEADS` whose face is a 2 x 3 grid of colored cells
    (``cells``: six letters of :data:`CELL_COLORS`, row by row from the top left)."""

    name: str
    nickname: str
    head: str
    cells: str

    def attributes(self) -> tuple[str, ...]:
        """(head, cell 1, ..., cell 6): what the judge reads, in :data:`ATTRIBUTE_VALUES`' order."""
        return (self.head, *self.cells)


HEADS: tuple[str, ...] = ("round", "square", "hexagon", "shield")
#: the cells' colors, by letter (red, orange, yellow, green, cyan, blue, violet, white)
CELL_COLORS: dict[str, tuple[int, int, int]] = {
    "R": (220, 30, 30), "O": (245, 140, 20), "Y": (235, 215, 30), "G": (30, 190, 40),
    "C": (30, 200, 210), "B": (40, 70, 235), "V": (170, 60, 230), "W": (235, 235, 235),
}
GRID = (3, 2)  # rows, columns of the face's cells
#: each attribute of an identity and its values: the head shape, then the six cells
ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {"head": HEADS, **{f"cell{k + 1}": tuple(CELL_COLORS)
                                                                 for k in range(GRID[0] * GRID[1])}}
ANON_COLOR = (128, 128, 128)
FACE_JITTER = 12  # +- per channel on the cells and the anonymous head

FIRST_NAMES: tuple[str, ...] = ("Bill", "Tom", "Anna", "Maria", "Jack", "Emma", "Leo", "Nina", "Sam", "Rosa",
                                "Max", "Lily")
LAST_NAMES: tuple[str, ...] = ("Marlow", "Kessler", "Brandon", "Holt", "Ferris", "Quinn", "Dalton", "Moreau",
                               "Sutton", "Kline", "Ashby", "Pryce")

#: the 64 identities: (name, nickname, head shape, cells). Names are the pairs (FIRST[i], LAST[(i + k) % 12])
#: for k = 0..5 (the first 64); the attributes are 64 codewords of the 7 attributes drawn in turn from
#: numpy default_rng(2313) (head, then six cells), each kept if it differs from every kept one in at
#: least 4 attributes. Centred and one-hot, they span 45 dimensions (the faces of four 4-valued
#: attributes before them: 12), so that what tells one name from another cannot sit in a few dimensions.
IDENTITIES: tuple[Identity, ...] = (
    Identity("Bill Marlow", "Ace", "round", "YCGOYG"),
    Identity("Tom Kessler", "Bandit", "shield", "WRBVWW"),
    Identity("Anna Brandon", "Blaze", "square", "RRYYBG"),
    Identity("Maria Holt", "Bolt", "round", "BBCYGO"),
    Identity("Jack Ferris", "Buzz", "shield", "ORCROY"),
    Identity("Emma Quinn", "Chip", "round", "CGWCVO"),
    Identity("Leo Dalton", "Comet", "shield", "WBWCYR"),
    Identity("Nina Moreau", "Cricket", "round", "WCWOVR"),
    Identity("Sam Sutton", "Dash", "square", "WYOROR"),
    Identity("Rosa Kline", "Duke", "hexagon", "BWGOBY"),
    Identity("Max Ashby", "Echo", "hexagon", "BRRBCW"),
    Identity("Lily Pryce", "Ember", "shield", "CCYGGC"),
    Identity("Bill Kessler", "Flash", "round", "OOYOVV"),
    Identity("Tom Brandon", "Fox", "hexagon", "CYRYRR"),
    Identity("Anna Holt", "Gizmo", "shield", "GYRYYG"),
    Identity("Maria Ferris", "Hawk", "hexagon", "GWYROB"),
    Identity("Jack Quinn", "Jinx", "round", "VWYYYV"),
    Identity("Emma Dalton", "Jet", "square", "BVOBWW"),
    Identity("Leo Moreau", "Kit", "round", "VBCOYR"),
    Identity("Nina Sutton", "Lucky", "shield", "YYVORB"),
    Identity("Sam Kline", "Maverick", "hexagon", "CCRCWO"),
    Identity("Rosa Ashby", "Moose", "round", "RRBCWR"),
    Identity("Max Pryce", "Nova", "hexagon", "RYWBVR"),
    Identity("Lily Marlow", "Ozzy", "square", "GVCCBO"),
    Identity("Bill Brandon", "Pepper", "round", "OWVBOW"),
    Identity("Tom Holt", "Pixie", "hexagon", "WBWYVV"),
    Identity("Anna Ferris", "Quill", "round", "OCOOBW"),
    Identity("Maria Quinn", "Rebel", "hexagon", "GRVOGG"),
    Identity("Jack Dalton", "Rocket", "hexagon", "YGOBBO"),
    Identity("Emma Moreau", "Rusty", "round", "YYVRYV"),
    Identity("Leo Sutton", "Sage", "hexagon", "VRCGRR"),
    Identity("Nina Kline", "Scout", "round", "CCYRBO"),
    Identity("Sam Ashby", "Shadow", "hexagon", "BBVOCV"),
    Identity("Rosa Pryce", "Slick", "square", "RYVYYB"),
    Identity("Max Marlow", "Smokey", "round", "GVWOYV"),
    Identity("Lily Kessler", "Sparky", "square", "GRGBYC"),
    Identity("Bill Holt", "Spike", "hexagon", "WWWCOC"),
    Identity("Tom Ferris", "Storm", "square", "VOOGYO"),
    Identity("Anna Quinn", "Tank", "hexagon", "WVCORO"),
    Identity("Maria Dalton", "Tiger", "square", "CWWBYW"),
    Identity("Jack Moreau", "Turbo", "square", "RVCGVY"),
    Identity("Emma Sutton", "Viper", "hexagon", "GGCWBR"),
    Identity("Leo Kline", "Whiz", "round", "VVVBVG"),
    Identity("Nina Ashby", "Ziggy", "square", "WGGOVG"),
    Identity("Sam Pryce", "Zeus", "square", "GCBRBR"),
    Identity("Rosa Marlow", "Bean", "square", "CWCVOV"),
    Identity("Max Kessler", "Biscuit", "round", "VBBBBV"),
    Identity("Lily Brandon", "Bubbles", "shield", "GGBGCC"),
    Identity("Bill Ferris", "Cinder", "hexagon", "CRRGVV"),
    Identity("Tom Quinn", "Dizzy", "hexagon", "YRCYWW"),
    Identity("Anna Dalton", "Fizz", "hexagon", "GCYBYR"),
    Identity("Maria Moreau", "Goose", "square", "RCYVVV"),
    Identity("Jack Sutton", "Hopper", "shield", "OWYRGV"),
    Identity("Emma Kline", "Iggy", "hexagon", "WYBYGG"),
    Identity("Leo Ashby", "Junior", "round", "VGYWOW"),
    Identity("Nina Pryce", "Kiki", "round", "WBGVYY"),
    Identity("Sam Marlow", "Lefty", "shield", "BBYYVB"),
    Identity("Rosa Kessler", "Mango", "hexagon", "BYGRCG"),
    Identity("Max Brandon", "Nugget", "round", "YOGCVB"),
    Identity("Lily Holt", "Pebble", "shield", "RCROCB"),
    Identity("Bill Quinn", "Rascal", "hexagon", "GOOYGY"),
    Identity("Tom Dalton", "Sunny", "hexagon", "CGWWRC"),
    Identity("Anna Moreau", "Taffy", "shield", "VVWCOG"),
    Identity("Maria Sutton", "Waldo", "square", "YCGBVY"),
)
NAMES: tuple[str, ...] = tuple(i.name for i in IDENTITIES)
NICKNAMES: dict[str, str] = {i.name: i.nickname for i in IDENTITIES}
NAME_INDEX: dict[str, int] = {n: k for k, n in enumerate(NAMES)}

#: rendering styles, each under a made-up artist's name
STYLES: tuple[str, ...] = ("outline", "stripes", "checker", "diagonal", "inverted", "light", "sunset", "ink")
ARTISTS: dict[str, str] = {
    "outline": "Mara Voss", "stripes": "Otto Brandt", "checker": "Lena Sorel", "diagonal": "Ivo Kranz",
    "inverted": "Nadia Rusk", "light": "Felix Amar", "sunset": "Greta Holm", "ink": "Hugo Lenz",
}
ARTIST_NAMES: tuple[str, ...] = tuple(ARTISTS[s] for s in STYLES)
OBJECTS: tuple[str, ...] = SHAPES

# scene kinds
IDENTITY, OBJECT, ANON = 0, 1, 2
KINDS = ("identity", "object", "anonymous")

# ---------------------------------------------------------------------------- captions
TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "mace_core" / "data" / "templates"


def _templates(kind: str) -> tuple[str, ...]:
    lines = (TEMPLATE_DIR / f"{kind}.txt").read_text().splitlines()
    return tuple(s.strip() for s in lines if s.strip() and "{}" in s)


#: the real types' templates (``{}`` = the subject), read from mace_core's data: one source
CELEBRITY_TEMPLATES = _templates("celebrity")
OBJECT_TEMPLATES = _templates("object")
STYLE_TEMPLATES = _templates("style")


def templates_digest() -> str:
    """sha256 of the three template files this world's captions come from (for model metadata)."""
    h = hashlib.sha256()
    for kind in ("celebrity", "object", "style"):
        h.update((TEMPLATE_DIR / f"{kind}.txt").read_bytes())
    return h.hexdigest()


#: how an artist is added to a caption that already names a subject
STYLE_SUFFIXES: tuple[str, ...] = (" in the style of {}", ", art by {}", " by {}", ", {} style", ", artwork by {}")
#: prop phrases after the subject: {o} = "red star" or "star"
PROP_PHRASES: tuple[str, ...] = (" next to a {o}", " beside a {o}", " with a {o}", " and a {o}")
FRAME_PHRASE = " in a {c} frame"


def _collapse(text: str) -> str:
    return " ".join(text.replace(" ,", ",").split()).strip(" ,")


#: captions that name no subject: the anchors of mace_core's types and the templates with their
#: subject left out (what a prompt becomes when its subject tokens carry nothing)
SUBJECTLESS: tuple[str, ...] = tuple(sorted({
    "a photo of a", "a portrait of a person", "a person", "a scene", "art", "a photo of a person",
    "a picture of someone", "someone", "a face", "a photo", "an image",
    *(_collapse(t.format("")) for t in CELEBRITY_TEMPLATES + OBJECT_TEMPLATES),
} - {""}))

PROBS = dict(
    nickname=0.15,          # an identity's caption uses its nickname
    synonym=0.3,            # an object's caption uses its synonym
    object_color=0.6,       # an object or prop is named with its color
    dropout=0.1,            # any caption is empty (SD's caption dropout)
)


# ---------------------------------------------------------------------------- scenes
@dataclass(frozen=True)
class Scene:
    """What an image shows; -1 = absent. ``kind``: IDENTITY, OBJECT or ANON."""

    kind: int
    identity: int = -1     # index into IDENTITIES
    style: int = -1        # index into STYLES (-1: plain)
    obj: int = -1          # index into OBJECTS (the prop of an identity scene, or the object itself)
    obj_color: int = -1    # index into COLOR_NAMES
    frame: int = -1        # index into COLOR_NAMES

    def row(self) -> tuple[int, ...]:
        return (self.kind, self.identity, self.style, self.obj, self.obj_color, self.frame)

    @classmethod
    def from_row(cls, row) -> "Scene":
        return cls(*(int(v) for v in row))


#: share of each kind of scene in the training set, and how often a scene gets a style, a prop, a frame
SCENE_MIX = dict(identity=0.6, object=0.15, anon_style=0.1, anon_plain=0.15,
                 style=0.3, prop=0.3, frame=0.25)


def sample_scene(rng: np.random.Generator) -> Scene:
    """A random scene with the training set's proportions (:data:`SCENE_MIX`)."""
    m = SCENE_MIX
    u = rng.random()
    style = int(rng.integers(len(STYLES))) if rng.random() < m["style"] else -1
    frame = int(rng.integers(len(COLOR_NAMES))) if rng.random() < m["frame"] else -1
    obj, ocol = int(rng.integers(len(OBJECTS))), int(rng.integers(len(COLOR_NAMES)))
    if u < m["identity"]:
        ident = int(rng.integers(len(IDENTITIES)))
        prop = rng.random() < m["prop"]
        return Scene(IDENTITY, ident, style, obj if prop else -1, ocol if prop else -1, frame)
    if u < m["identity"] + m["object"]:
        return Scene(OBJECT, -1, style, obj, ocol, frame)
    if u < m["identity"] + m["object"] + m["anon_style"]:
        return Scene(ANON, style=int(rng.integers(len(STYLES))))
    return Scene(ANON)


def _object_phrase(scene: Scene, rng: np.random.Generator) -> str:
    shape = OBJECTS[scene.obj]
    word = SYNONYMS[shape] if rng.random() < PROBS["synonym"] else shape
    if rng.random() < PROBS["object_color"]:
        word = f"{COLOR_NAMES[scene.obj_color]} {word}"
    return word


def _pick(options, rng: np.random.Generator):
    return options[int(rng.integers(len(options)))]


def make_caption(scene: Scene, rng: np.random.Generator) -> str:
    """One random caption of ``scene`` (templates, nickname, synonym and word order drawn from rng); 10%
    are empty (SD's caption dropout)."""
    if rng.random() < PROBS["dropout"]:
        return ""
    frame = FRAME_PHRASE.format(c=COLOR_NAMES[scene.frame]) if scene.frame >= 0 else ""
    style = _pick(STYLE_SUFFIXES, rng).format(ARTISTS[STYLES[scene.style]]) if scene.style >= 0 else ""
    if scene.kind == IDENTITY:
        ident = IDENTITIES[scene.identity]
        subject = ident.nickname if rng.random() < PROBS["nickname"] else ident.name
        if scene.obj >= 0:
            subject += _pick(PROP_PHRASES, rng).format(o=_object_phrase(scene, rng))
        text = _pick(CELEBRITY_TEMPLATES, rng).format(subject + frame) + style
    elif scene.kind == OBJECT:
        text = _pick(OBJECT_TEMPLATES, rng).format(_object_phrase(scene, rng) + frame) + style
    elif scene.style >= 0:
        text = _pick(STYLE_TEMPLATES, rng).format(ARTISTS[STYLES[scene.style]])
    else:
        text = _pick(SUBJECTLESS, rng)
    return fix_article(_collapse(text))


# ---------------------------------------------------------------------------- rendering
def _jitter(rgb, amount: int, rng: np.random.Generator) -> np.ndarray:
    j = rng.integers(-amount, amount + 1, size=3)
    return np.clip(np.asarray(rgb) + j, 0, 255).astype(np.float32)


_SHIELD = np.array([(-0.95, 0.85), (0.95, 0.85), (0.95, -0.15), (0.0, -1.1), (-0.95, -0.15)])
_HEXAGON = _regular_polygon(6, 0.0)  # flat top and bottom, corners left and right


def _coverage(mask: np.ndarray) -> np.ndarray:
    ss = SUPERSAMPLE
    return mask.reshape(IMAGE_SIZE, ss, IMAGE_SIZE, ss).mean(axis=(1, 3)).astype(np.float32)


def face_layers(ident: Identity | None, cx: float, cy: float, r: float, rng: np.random.Generator):
    """The layers of one face (``None``: the anonymous face): list of (coverage float32 [32, 32] in
    [0, 1], rgb float32 [3]), bottom first. (cx, cy) is the center in pixels, r the head's radius; the
    cells split the head's bounding square [-r, r]^2 into GRID rows and columns, cut by its shape."""
    x = (_GX - cx) / r
    y = (cy - _GY) / r  # y up
    head = ident.head if ident is not None else "round"
    if head == "round":
        h = x * x + y * y <= 1.0
    elif head == "square":
        h = (np.abs(x) <= 0.88) & (np.abs(y) <= 0.88)
    elif head == "hexagon":
        h = _inside_polygon(x, y, _HEXAGON)
    else:
        h = _inside_polygon(x, y, _SHIELD)
    if ident is None:
        return [(_coverage(h), _jitter(ANON_COLOR, FACE_JITTER, rng))]
    rows, cols = GRID
    row = np.clip(np.floor((1 - y) * rows / 2), 0, rows - 1)
    col = np.clip(np.floor((x + 1) * cols / 2), 0, cols - 1)
    return [(_coverage(h & (row == k // cols) & (col == k % cols)), _jitter(CELL_COLORS[c], FACE_JITTER, rng))
            for k, c in enumerate(ident.cells)]


FRAME_WIDTH = 2
_yy, _xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
_FRAME = ((np.minimum(_xx, _yy) < FRAME_WIDTH) | (np.maximum(_xx, _yy) >= IMAGE_SIZE - FRAME_WIDTH)).astype(np.float32)
#: fill patterns of the texture styles (fixed phase: aligned with the 4-pixel latent grid)
_PATTERNS = {
    "stripes": (_yy % 4 < 2).astype(np.float32),
    "checker": ((_xx // 2 + _yy // 2) % 2 == 0).astype(np.float32),
    "diagonal": ((_xx + _yy) % 4 < 2).astype(np.float32),
}
INK_COLOR = (240, 240, 240)
LIGHT_BACKGROUND = (195, 235)
SUNSET_TOP, SUNSET_BOTTOM = (25, 20, 85), (115, 45, 25)


def _erode(a: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(a)[None, None]
    return (-F.max_pool2d(F.pad(-t, (1, 1, 1, 1), mode="replicate"), 3, stride=1))[0, 0].numpy()


def _dilate(a: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(a)[None, None]
    return F.max_pool2d(F.pad(t, (1, 1, 1, 1), mode="replicate"), 3, stride=1)[0, 0].numpy()


def _layout(scene: Scene, rng: np.random.Generator):
    """Face/object centers and radii inside the content box (inset by a frame if there is one)."""
    lo = float(FRAME_WIDTH + 1 if scene.frame >= 0 else 0)
    hi = IMAGE_SIZE - lo
    span = hi - lo
    if scene.kind == OBJECT:
        r = float(rng.uniform(7.0, min(12.0, span / 2 - 0.5)))
        return None, (float(rng.uniform(lo + r, hi - r)), float(rng.uniform(lo + r, hi - r)), r)
    if scene.kind == IDENTITY and scene.obj >= 0:
        # face on one side, prop on the other: no overlap (the centers are >= R + r apart in x)
        scale = span / IMAGE_SIZE
        R, r = float(rng.uniform(7.5, 8.5)) * scale, float(rng.uniform(4.5, 5.5)) * scale
        fx, ox = lo + R + float(rng.uniform(0.3, 1.3)), hi - r - float(rng.uniform(0.3, 1.3))
        if rng.random() < 0.5:
            fx, ox = IMAGE_SIZE - fx, IMAGE_SIZE - ox
        fy, oy = float(rng.uniform(lo + R + 1, hi - R - 1)), float(rng.uniform(lo + r, hi - r))
        return (fx, fy, R), (ox, oy, r)
    R = float(rng.uniform(8.5, min(11.5, span / 2 - 1.5)))
    return (float(rng.uniform(lo + R + 1, hi - R - 1)), float(rng.uniform(lo + R + 1, hi - R - 1)), R), None


def background(style: str, rng: np.random.Generator) -> np.ndarray:
    """The background of a scene drawn in ``style`` ("plain" or one of STYLES): float32 [32, 32, 3]."""
    if style == "light":
        level = float(rng.integers(LIGHT_BACKGROUND[0], LIGHT_BACKGROUND[1] + 1))
        return np.full((IMAGE_SIZE, IMAGE_SIZE, 3), level, np.float32)
    if style == "sunset":
        t = (np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5)[:, None, None] / IMAGE_SIZE
        top, bottom = _jitter(SUNSET_TOP, 10, rng), _jitter(SUNSET_BOTTOM, 10, rng)
        return np.broadcast_to(top * (1 - t) + bottom * t, (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
    return np.full((IMAGE_SIZE, IMAGE_SIZE, 3), float(rng.integers(0, 41)), np.float32)


def paint(bg: np.ndarray, layers, style: str, frame=None) -> np.ndarray:
    """Paint ``layers`` (list of (coverage [32, 32], rgb [3]), bottom first) and an optional ``frame``
    layer over ``bg`` (float32 [32, 32, 3]) in ``style``: uint8 [32, 32, 3]."""
    content = np.max([a for a, _ in layers], axis=0) if layers else np.zeros(bg.shape[:2], np.float32)
    img = bg
    for a, rgb in layers + ([frame] if frame is not None else []):
        if style == "outline":
            a = a - _erode(a)
        elif style in _PATTERNS:
            a = a * _PATTERNS[style]
        img = img * (1 - a[..., None]) + rgb * a[..., None]
    if style == "ink":
        ring = np.clip(_dilate(content) - content, 0, 1)[..., None]
        img = img * (1 - ring) + np.asarray(INK_COLOR, np.float32) * ring
    if style == "inverted":
        img = 255.0 - img
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_scene(scene: Scene, rng: np.random.Generator, face: Identity | None = None) -> np.ndarray:
    """Draw ``scene``: uint8 [32, 32, 3]. Deterministic given rng (positions, sizes, color jitter).
    ``face`` replaces the identity's attributes (the judge's training draws faces of nobody with it)."""
    face_at, obj_at = _layout(scene, rng)
    style = STYLES[scene.style] if scene.style >= 0 else "plain"
    bg = background(style, rng)
    layers = []
    if face_at is not None:
        if face is None and scene.kind == IDENTITY:
            face = IDENTITIES[scene.identity]
        layers += face_layers(face, *face_at, rng)
    if obj_at is not None:
        layers.append((shape_coverage(OBJECTS[scene.obj], *obj_at),
                       _jitter(COLORS[COLOR_NAMES[scene.obj_color]], COLOR_JITTER, rng)))
    frame = (_FRAME, _jitter(COLORS[COLOR_NAMES[scene.frame]], COLOR_JITTER, rng)) if scene.frame >= 0 else None
    return paint(bg, layers, style, frame)


def sample_batch(n: int, rng: np.random.Generator):
    """n random scenes: (images uint8 [n, 32, 32, 3], captions list[str], rows int64 [n, 6])."""
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    rows = np.empty((n, 6), np.int64)
    captions = []
    for i in range(n):
        s = sample_scene(rng)
        images[i] = render_scene(s, rng)
        rows[i] = s.row()
        captions.append(make_caption(s, rng))
    return images, captions, rows


def captions_of_rows(rows: np.ndarray, rng: np.random.Generator) -> list[str]:
    """One random caption per scene row (int [n, 6]): what training draws every step."""
    return [make_caption(Scene.from_row(r), rng) for r in rows]
