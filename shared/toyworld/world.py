"""The toy world (issue 10): 32x32 RGB images of one filled shape on a dark-gray background.

Everything here is fixed so that results compare across versions:

* 32x32 RGB, uniform gray background of level 0-40 (same value in R, G and B).
* One filled shape whose "radius" r (7-13 px) is the radius of the circle the shape is
  inscribed in (the circumradius of the polygons, the outer radius of star and ring); that
  circle lies fully inside the image, so the whole shape does too.
* 8 shapes, each with one synonym used interchangeably in captions; 5 colors with
  +-15 jitter per channel.
* Rendering is anti-aliased by 4x4 supersampling and deterministic given a
  ``numpy.random.Generator``.

Public API: ``SHAPES``, ``SYNONYMS``, ``COLORS``, ``TEMPLATES``, ``render``, ``render_params``,
``sample_params``, ``sample_batch``, ``make_caption``, ``all_captions``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 32
SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "cross", "heart", "ring", "diamond",
)
SYNONYMS: dict[str, str] = {
    "circle": "disk",
    "square": "box",
    "triangle": "wedge",
    "star": "pentagram",
    "cross": "plus",
    "heart": "valentine",
    "ring": "hoop",
    "diamond": "rhombus",
}
#: word -> shape, for both the main words and the synonyms
WORD_TO_SHAPE: dict[str, str] = {**{s: s for s in SHAPES}, **{v: k for k, v in SYNONYMS.items()}}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 190, 40),
    "blue": (40, 70, 235),
    "yellow": (235, 215, 30),
    "white": (235, 235, 235),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)

RADIUS_RANGE = (7.0, 13.0)  # inclusive bounds of the circumradius, px
BACKGROUND_RANGE = (0, 40)  # inclusive bounds of the gray level
COLOR_JITTER = 15  # +- per channel, inclusive
STAR_INNER = 0.4  # inner/outer radius of the 5-point star
RING_INNER = 0.55  # inner/outer radius of the annulus
CROSS_HALF_WIDTH = 0.3  # half-width of the plus arms, in units of r (arm length = r)
EMPTY_CAPTION_PROB = 0.1
SUPERSAMPLE = 4

#: caption templates; those without ``{color}`` name the shape only
TEMPLATES: tuple[str, ...] = (
    "a photo of a {color} {shape}",
    "a {color} {shape}",
    "a drawing of a {color} {shape}",
    "an image of a {color} {shape}",
    "a {color} {shape} on a dark background",
    "a picture of a {color} {shape}",
    "a {shape}",
    "a photo of a {shape}",
    "a drawing of a {shape}",
)
COLOR_TEMPLATES = tuple(t for t in TEMPLATES if "{color}" in t)
SHAPE_ONLY_TEMPLATES = tuple(t for t in TEMPLATES if "{color}" not in t)
#: probability that a non-empty caption leaves the color out
NO_COLOR_PROB = 0.2


# --------------------------------------------------------------------------- geometry
def _regular_polygon(n: int, phase: float = math.pi / 2) -> np.ndarray:
    a = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([np.cos(a), np.sin(a)], axis=1)


def _star_polygon(points: int = 5, inner: float = STAR_INNER) -> np.ndarray:
    a = math.pi / 2 + math.pi * np.arange(2 * points) / points
    rad = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([rad * np.cos(a), rad * np.sin(a)], axis=1)


def _cross_polygon(w: float = CROSS_HALF_WIDTH) -> np.ndarray:
    # a plus sign whose arm tips lie on the unit circle (arm length 1, corners at
    # (w, sqrt(1 - w^2)) so the whole shape is inscribed in the unit circle)
    e = math.sqrt(1.0 - w * w)
    return np.array([
        (w, e), (w, w), (e, w), (e, -w), (w, -w), (w, -e),
        (-w, -e), (-w, -w), (-e, -w), (-e, w), (-w, w), (-w, e),
    ])


def _heart_polygon(n: int = 96) -> np.ndarray:
    t = 2 * math.pi * np.arange(n) / n
    x = 16 * np.sin(t) ** 3
    y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    p = np.stack([x, y], axis=1)
    # center on the smallest enclosing circle (symmetric in x: search the y offset)
    best = None
    for cy in np.linspace(p[:, 1].min(), p[:, 1].max(), 2001):
        rmax = np.max(np.hypot(p[:, 0], p[:, 1] - cy))
        if best is None or rmax < best[0]:
            best = (rmax, cy)
    rmax, cy = best
    p[:, 1] -= cy
    return p / rmax


# unit-circle-inscribed outlines, y pointing up
_POLYGONS: dict[str, np.ndarray] = {
    "square": _regular_polygon(4, math.pi / 4),
    "diamond": _regular_polygon(4, math.pi / 2),
    "triangle": _regular_polygon(3, math.pi / 2),
    "star": _star_polygon(),
    "cross": _cross_polygon(),
    "heart": _heart_polygon(),
}


def _inside_polygon(px: np.ndarray, py: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd rule, vectorized over points."""
    inside = np.zeros(px.shape, dtype=bool)
    xj, yj = poly[-1]
    for xi, yi in poly:
        cond = (yi > py) != (yj > py)
        with np.errstate(divide="ignore", invalid="ignore"):
            xint = (xj - xi) * (py - yi) / (yj - yi) + xi
        inside ^= cond & (px < xint)
        xj, yj = xi, yi
    return inside


def _subpixel_grid(size: int = IMAGE_SIZE, ss: int = SUPERSAMPLE):
    # sample positions (x right, y down) in pixel units; pixel i covers [i, i+1)
    o = (np.arange(size * ss) + 0.5) / ss
    return np.meshgrid(o, o, indexing="xy")


_GX, _GY = _subpixel_grid()


def shape_coverage(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    """Fraction of each pixel covered by the shape: float32 [32, 32] in [0, 1].

    (cx, cy) is the center in pixel units (x right, y down; the image spans [0, 32)).
    """
    x = (_GX - cx) / r
    y = (cy - _GY) / r  # y up
    if shape == "circle":
        m = x * x + y * y <= 1.0
    elif shape == "ring":
        d = x * x + y * y
        m = (d <= 1.0) & (d >= RING_INNER ** 2)
    elif shape in _POLYGONS:
        m = _inside_polygon(x, y, _POLYGONS[shape])
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    ss = SUPERSAMPLE
    return m.reshape(IMAGE_SIZE, ss, IMAGE_SIZE, ss).mean(axis=(1, 3)).astype(np.float32)


# --------------------------------------------------------------------------- sampling
@dataclass(frozen=True)
class ShapeParams:
    shape: str
    color: str
    rgb: tuple[int, int, int]  # jittered color
    background: int
    cx: float
    cy: float
    r: float


def sample_params(shape: str, color: str, rng: np.random.Generator) -> ShapeParams:
    """Draw background, jittered color, radius and a position that keeps the shape inside."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    if color not in COLORS:
        raise ValueError(f"unknown color {color!r}; known: {tuple(COLORS)}")
    bg = int(rng.integers(BACKGROUND_RANGE[0], BACKGROUND_RANGE[1] + 1))
    jitter = rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3)
    rgb = tuple(int(v) for v in np.clip(np.array(COLORS[color]) + jitter, 0, 255))
    r = float(rng.uniform(*RADIUS_RANGE))
    cx = float(rng.uniform(r, IMAGE_SIZE - r))
    cy = float(rng.uniform(r, IMAGE_SIZE - r))
    return ShapeParams(shape, color, rgb, bg, cx, cy, r)


def render_params(p: ShapeParams) -> np.ndarray:
    """Render fixed parameters: uint8 [32, 32, 3]."""
    a = shape_coverage(p.shape, p.cx, p.cy, p.r)[..., None]
    img = p.background * (1.0 - a) + np.asarray(p.rgb, np.float32) * a
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render(shape: str, color: str, rng: np.random.Generator, return_params: bool = False):
    """Render one image of ``shape`` in ``color``: uint8 [32, 32, 3] (and its parameters)."""
    p = sample_params(shape, color, rng)
    img = render_params(p)
    return (img, p) if return_params else img


def make_caption(shape: str, color: str, rng: np.random.Generator,
                 empty_prob: float = EMPTY_CAPTION_PROB, no_color_prob: float = NO_COLOR_PROB,
                 synonym_prob: float = 0.5) -> str:
    """A random caption for (shape, color): either word for the shape, ~10% empty."""
    if rng.random() < empty_prob:
        return ""
    word = SYNONYMS[shape] if rng.random() < synonym_prob else shape
    if rng.random() < no_color_prob:
        t = SHAPE_ONLY_TEMPLATES[int(rng.integers(len(SHAPE_ONLY_TEMPLATES)))]
    else:
        t = COLOR_TEMPLATES[int(rng.integers(len(COLOR_TEMPLATES)))]
    return fix_article(t.format(color=color, shape=word))


def fix_article(text: str) -> str:
    """'a' -> 'an' before a vowel ('an image' stays)."""
    words = text.split(" ")
    for i in range(len(words) - 1):
        if words[i] == "a" and words[i + 1][:1] in "aeiou":
            words[i] = "an"
        elif words[i] == "an" and words[i + 1][:1] not in "aeiou":
            words[i] = "a"
    return " ".join(words)


def all_captions() -> list[str]:
    """Every non-empty caption the world can produce, sorted (plus the empty one first)."""
    out = set()
    for shape in SHAPES:
        for word in (shape, SYNONYMS[shape]):
            for t in TEMPLATES:
                for color in COLORS:
                    out.add(fix_article(t.format(color=color, shape=word)))
    return [""] + sorted(out)


def sample_batch(n: int, rng: np.random.Generator, empty_prob: float = EMPTY_CAPTION_PROB):
    """n random images with captions.

    Returns (images uint8 [n, 32, 32, 3], captions list[str], labels int64 [n, 2]) where
    labels[:, 0] indexes SHAPES and labels[:, 1] indexes COLOR_NAMES.
    """
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    labels = np.empty((n, 2), np.int64)
    captions = []
    for i in range(n):
        s = int(rng.integers(len(SHAPES)))
        c = int(rng.integers(len(COLOR_NAMES)))
        images[i] = render(SHAPES[s], COLOR_NAMES[c], rng)
        captions.append(make_caption(SHAPES[s], COLOR_NAMES[c], rng, empty_prob=empty_prob))
        labels[i] = (s, c)
    return images, captions, labels


def to_tensor_range(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 32, 32, 3] -> float32 [N, 3, 32, 32] in [-1, 1]."""
    return (images.astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2).copy()


def from_tensor_range(x) -> np.ndarray:
    """float [N, 3, 32, 32] in [-1, 1] (numpy or torch) -> uint8 [N, 32, 32, 3]."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    x = np.clip((np.asarray(x, np.float32) + 1.0) * 127.5, 0, 255)
    return np.rint(x).astype(np.uint8).transpose(0, 2, 3, 1).copy()
