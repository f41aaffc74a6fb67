"""A generated caption corpus for the "general prior" of the closed-form stages.

MACE's refinement (stage 1) and fusion (stage 3) keep the model's behaviour on ordinary
prompts by adding a penalty over the text embeddings of a large, generic caption set. The
authors use all MS-COCO captions. This project may not download anything at run time and
does not ship third-party caption data. So we *generate* a stand-in corpus instead: short
everyday English captions (people, animals, objects, food, vehicles, places, art,
photography terms) built from our own templates and word lists in ``data/corpus.yaml``.

Only the spread of the captions over ordinary vocabulary and sentence shapes matters for the
prior, so a few thousand varied captions are enough: the prior is a sum of ``e e^T`` over
every token position, a ``d x d`` Gram matrix, and a large set of unrelated captions makes it
well conditioned.

The output is deterministic: the same ``(n, seed)`` gives the same list in the same order
on every run, platform and Python version. The expansion therefore uses only
``random.Random.random()`` (the Mersenne Twister stream, stable across versions) and
ordered containers; sets are used for membership tests only, never iterated.

Plain Python and PyYAML; no torch.
"""

from __future__ import annotations

import hashlib
import random
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = ["general_captions", "subject_captions", "load_corpus_spec", "read_captions", "captions_id", "CORPUS_FILE",
           "MIN_CAPTIONS"]

CORPUS_FILE = Path(__file__).resolve().parents[1] / "data" / "corpus.yaml"

_SLOT = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_A_BEFORE_VOWEL = re.compile(r"\b([Aa]) (?=[aeioAEIO])")
_MAX_DEPTH = 4
_MAX_WORDS = 25


@lru_cache(maxsize=1)
def _load(path: str) -> tuple[tuple[tuple[str, tuple[str, ...]], ...], dict[str, tuple[str, ...]]]:
    import yaml

    with open(path, "r", encoding="utf-8") as fh:
        raw: dict[str, Any] = yaml.safe_load(fh)
    if not isinstance(raw, dict) or "templates" not in raw or "lists" not in raw:
        raise ValueError(f"{path}: expected top-level keys 'templates' and 'lists'")
    categories = tuple(
        (str(name), tuple(str(t) for t in temps)) for name, temps in raw["templates"].items()
    )
    lists = {str(k): tuple(str(v) for v in vals) for k, vals in raw["lists"].items()}
    for name, temps in categories:
        if not temps:
            raise ValueError(f"{path}: template category {name!r} is empty")
    for key, vals in lists.items():
        if not vals:
            raise ValueError(f"{path}: word list {key!r} is empty")
    # every slot used anywhere must name a list
    texts = [t for _, temps in categories for t in temps] + [v for vals in lists.values() for v in vals]
    for text in texts:
        for slot in _SLOT.findall(text):
            if slot not in lists:
                raise ValueError(f"{path}: unknown slot {{{slot}}} in {text!r}")
    return categories, lists


def load_corpus_spec(path: str | Path | None = None) -> tuple[tuple, dict]:
    """Return ``(categories, lists)`` parsed from ``corpus.yaml`` (or ``path``).

    ``categories`` is a tuple of ``(category_name, templates)`` in file order; ``lists`` maps
    slot names to their word lists.
    """
    return _load(str(path or CORPUS_FILE))


def _pick(rng: random.Random, seq: tuple[str, ...]) -> str:
    # rng.random() is the one draw whose stream is guaranteed stable across Python versions
    return seq[min(int(rng.random() * len(seq)), len(seq) - 1)]


def _expand(text: str, lists: dict[str, tuple[str, ...]], rng: random.Random, depth: int = 0) -> str:
    if depth > _MAX_DEPTH:
        raise ValueError(f"slot expansion too deep in {text!r}")

    def repl(match: re.Match) -> str:
        return _expand(_pick(rng, lists[match.group(1)]), lists, rng, depth + 1)

    return _SLOT.sub(repl, text)


def _finish(text: str) -> str:
    text = " ".join(text.split())
    text = _A_BEFORE_VOWEL.sub(lambda m: m.group(1) + "n ", text)
    return text[:1].upper() + text[1:]


def general_captions(n: int = 6000, seed: int = 0, path: str | Path | None = None) -> list[str]:
    """Generate ``n`` distinct generic captions, deterministically from ``seed``.

    Captions are short (at most 25 words, typically 5-20), so each fits well inside CLIP's
    77-token context. Raises ``ValueError`` if the templates cannot yield ``n`` distinct
    captions (the default word lists allow far more than 100,000).
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    categories, lists = load_corpus_spec(path)
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[str] = []
    attempts = 0
    max_attempts = 50 * n + 1000
    while len(out) < n:
        attempts += 1
        if attempts > max_attempts:
            raise ValueError(
                f"could only generate {len(out)} distinct captions of the {n} requested"
            )
        _, templates = categories[min(int(rng.random() * len(categories)), len(categories) - 1)]
        caption = _finish(_expand(_pick(rng, templates), lists, rng))
        if len(caption.split()) > _MAX_WORDS or caption in seen:
            continue
        seen.add(caption)
        out.append(caption)
    return out


def subject_captions(slot: str, n: int, seed: int = 0, path: str | Path | None = None) -> list[str]:
    """``n`` distinct templates (``{}`` = the subject) made of the corpus's captions whose ``{slot}``
    (e.g. ``person``) occurs exactly once: everyday scenes around a subject, "{} holding a small puppy
    in a garden". Deterministic in ``(slot, n, seed)`` as `general_captions`.

    A concept type puts its phrase in these scenes (types.yaml ``scenes``) so stage 1 sees the phrase
    followed by open-ended words, and sees what it protects in the same scenes.
    """
    categories, lists = load_corpus_spec(path)
    if slot not in lists:
        raise ValueError(f"the corpus has no slot {{{slot}}}")
    marked = {**lists, slot: ("{}",)}
    usable = tuple(t for _, temps in categories for t in temps if f"{{{slot}}}" in t)
    rng = random.Random(seed)
    out: list[str] = []
    for _ in range(50 * n + 1000):
        if len(out) == n:
            return out
        caption = _finish(_expand(_pick(rng, usable), marked, rng))
        if caption.count("{}") == 1 and len(caption.split()) <= _MAX_WORDS and caption not in out:
            out.append(caption)
    raise ValueError(f"could only make {len(out)} distinct {{{slot}}} captions of the {n} requested")


#: fewest captions a user's caption file may hold: the prior is a mean Gram over every token position, so 50
#: captions already give thousands of embeddings, while a handful would describe a few prompts, not a model
MIN_CAPTIONS = 50


def read_captions(path: str | Path) -> list[str]:
    """The captions of a user's text file for the general prior (`Settings.prior_captions`): one per line,
    blank lines and repeats dropped, in file order. Raises `errors.MaceError` with a one-line fix when the
    file is missing, not UTF-8 text, or holds fewer than `MIN_CAPTIONS` captions."""
    from ..errors import MaceError

    p = Path(path).expanduser()
    if not p.is_file():
        raise MaceError(f"the prior captions file {str(path)!r} is not a file; give a text file with one caption "
                        "per line (e.g. your fine-tune's training captions)")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise MaceError(f"the prior captions file {str(path)!r} cannot be read as UTF-8 text ({exc.__class__.__name__});"
                        " save it as plain UTF-8 text, one caption per line") from None
    captions = list(dict.fromkeys(c for c in (line.strip() for line in lines) if c))
    if len(captions) < MIN_CAPTIONS:
        raise MaceError(f"the prior captions file {str(path)!r} holds {len(captions)} distinct captions; it needs at "
                        f"least {MIN_CAPTIONS} (one per line) to stand for what the model draws")
    return captions


def captions_id(captions: list[str]) -> str:
    """sha256 of a caption list (what a prior made from it is keyed and recorded by)."""
    return hashlib.sha256("\n".join(captions).encode("utf-8")).hexdigest()
