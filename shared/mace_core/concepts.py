"""What to erase: concepts, the retain list, settings, types and presets. Plain data, no torch.

Settings resolve in layers: `Settings` defaults < the concept type's defaults (data/types.yaml)
< a preset's settings < a config file < command-line flags. Only fields a layer actually sets
override the layer below, so `--lr` changes the learning rate and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from .errors import MaceError

DATA = Path(__file__).parent / "data"


@dataclass(frozen=True)
class Settings:
    """Every knob of an erasure. Stage 1: lam, prior, domain; stage 2: rank .. cfis; stage 3: fuse_*."""

    # stage 1: closed-form refinement
    lam: float = 100.0  # ridge toward the original weights
    prior: float = 0.0  # weight of the general caption prior, per token (Gram / #embeddings)
    domain: float = 0.0  # weight of the retain-list prior, per token
    # stage 2: one LoRA per concept
    rank: int = 1
    steps: int = 50
    lr: float = 1e-4
    batch_size: int = 1
    images: int = 8
    sample_steps: int = 30
    guidance: float = 7.5
    mask: str = "attention"  # attention | sam | none
    sam_checkpoint: str | None = None
    mask_threshold: float = 0.5  # fraction of the attention map's max kept as the concept's region
    timesteps: str = "cfis"  # cfis | uniform
    cfis: tuple[float, float, float] = (200.0, 400.0, 0.05)  # t1, t2, gamma
    objective: str = "mace"  # mace (attention loss) | abo (All-but-One: guide toward `alternative`)
    alternative: str = ""  # abo: what the concept should turn into ("" = nothing in particular)
    abo_scale: float = 1.0  # abo: s, strength of the alternative's guidance direction
    abo_lambda: float = 1.0  # abo: weight keeping the unconditional prediction unchanged
    robust_rounds: int = 0  # adversarial hardening rounds after the erasure (harden.py)
    attack_steps: int = 100  # optimisation steps of each round's soft-token attack
    # stage 3: fusion
    fusion: str = "closed-form"  # closed-form | naive
    separable: bool = False  # SepME: each LoRA orthogonal to the other concepts' embeddings
    fuse_lam: float = 1e-3
    fuse_prior: float = 0.0
    # run
    seed: int = 2024
    clip_skip: int = 1
    # memory: recompute UNet activations in backward passes (gradient checkpointing) and draw the
    # training images one at a time; slower, the same LoRAs, so not part of `settings_hash`
    low_vram: bool = False

    def __post_init__(self) -> None:
        if self.mask not in ("attention", "sam", "none"):
            raise MaceError(f"--mask must be attention, sam or none, got {self.mask!r}")
        if self.mask == "sam" and not self.sam_checkpoint:
            raise MaceError("--mask sam needs --sam-checkpoint PATH (a segment-anything ViT checkpoint)")
        if self.timesteps not in ("cfis", "uniform"):
            raise MaceError(f"timesteps must be cfis or uniform, got {self.timesteps!r}")
        if self.objective not in ("mace", "abo"):
            raise MaceError(f"objective must be mace or abo, got {self.objective!r}")
        if self.fusion not in ("closed-form", "naive"):
            raise MaceError(f"fusion must be closed-form or naive, got {self.fusion!r}")
        for name in ("rank", "steps", "images", "batch_size", "sample_steps"):
            if getattr(self, name) < 1:
                raise MaceError(f"{name} must be at least 1")
        if self.lam < 0 or self.prior < 0 or self.domain < 0 or self.fuse_lam < 0 or self.fuse_prior < 0:
            raise MaceError("prior strengths and ridge weights cannot be negative")

    def overlay(self, overrides: Mapping[str, Any]) -> "Settings":
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise MaceError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        vals = {k: (tuple(v) if k == "cfis" else v) for k, v in overrides.items() if v is not None}
        return replace(self, **vals)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ConceptType:
    name: str
    anchor: str
    train_prompt: str
    templates: tuple[str, ...]
    settings: Mapping[str, Any]


@dataclass(frozen=True)
class Concept:
    """One phrase to erase, mapped to ``anchor``; ``prompts`` add to the type's templates."""

    phrase: str
    type: str = "object"
    anchor: str = ""
    prompts: tuple[str, ...] = ()
    synonyms: tuple[str, ...] = ()

    @property
    def slug(self) -> str:
        """A file-system-safe, stable name for the concept's folder."""
        base = re.sub(r"[^a-z0-9]+", "-", self.phrase.lower()).strip("-")[:40] or "concept"
        return f"{base}-{hashlib.sha1(self.phrase.encode()).hexdigest()[:8]}"

    def to_dict(self) -> dict:
        return {"phrase": self.phrase, "type": self.type, "anchor": self.anchor, "prompts": list(self.prompts),
                "synonyms": list(self.synonyms)}


@dataclass(frozen=True)
class ErasureSpec:
    """The whole request: concepts, the retain list, and user overrides of the settings."""

    concepts: tuple[Concept, ...]
    retain: tuple[str, ...] = ()
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def settings_for(self, concept: Concept | None = None) -> Settings:
        """Settings of one concept (its type's defaults + overrides); None: the run's, from the first
        concept's type (stage 1 and 3 solve all concepts together)."""
        ctype = get_type((concept or self.concepts[0]).type)
        return Settings().overlay(ctype.settings).overlay(self.overrides)

    def to_dict(self) -> dict:
        return {"concepts": [c.to_dict() for c in self.concepts], "retain": list(self.retain),
                "overrides": dict(self.overrides)}


# ---------------------------------------------------------------------------------------------
# Types and templates


@lru_cache(maxsize=None)
def concept_types() -> dict[str, ConceptType]:
    raw = yaml.safe_load((DATA / "types.yaml").read_text())
    out = {}
    for name, t in raw.items():
        lines = (DATA / "templates" / f"{name}.txt").read_text().splitlines()
        out[name] = ConceptType(name, t["anchor"], t["train_prompt"], tuple(s for s in lines if s.strip()),
                                dict(t.get("settings", {})))
    return out


def get_type(name: str) -> ConceptType:
    types = concept_types()
    if name not in types:
        raise MaceError(f"unknown concept type {name!r}; known types: {', '.join(sorted(types))}")
    return types[name]


def concept_prompts(concept: Concept, phrase: str | None = None) -> list[str]:
    """The augmentation prompts of a concept with ``phrase`` (default: the concept's) filled in."""
    ctype = get_type(concept.type)
    p = concept.phrase if phrase is None else phrase
    prompts = [t.replace("{}", p) for t in ctype.templates]
    prompts += [x.replace(concept.phrase, p) for x in concept.prompts]
    return prompts


def train_prompt(concept: Concept) -> str:
    return get_type(concept.type).train_prompt.replace("{}", concept.phrase)


# ---------------------------------------------------------------------------------------------
# Parsing


def parse_lines(text: str, default_type: str = "object") -> list[Concept]:
    """One concept per line, ``phrase`` or ``phrase | anchor`` or ``phrase | anchor | type``.

    Blank lines and ``#`` comments are skipped; an empty anchor means the type's default.
    """
    out = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = [p.strip() for p in line.split("|")]
        if len(parts) > 3:
            raise MaceError(f"line {n}: expected 'phrase | anchor | type', got {raw!r}")
        phrase, anchor, ctype = (parts + ["", ""])[:3]
        out.append(make_concept(phrase, anchor, ctype or default_type))
    return out


def make_concept(phrase: str, anchor: str = "", ctype: str = "object", prompts: Iterable[str] = (),
                 synonyms: Iterable[str] = ()) -> Concept:
    phrase = " ".join(str(phrase).split())
    if not phrase:
        raise MaceError("a concept phrase is empty")
    t = get_type(ctype)
    return Concept(phrase, ctype, " ".join(str(anchor).split()) if anchor else t.anchor, tuple(prompts),
                   tuple(synonyms))


def _concepts_from_yaml(items: Iterable, default_type: str) -> list[Concept]:
    out = []
    for it in items:
        if isinstance(it, str):
            out.append(make_concept(it, "", default_type))
        else:
            out.append(make_concept(it["phrase"], it.get("anchor", ""), it.get("type", default_type),
                                    it.get("prompts", ()), it.get("synonyms", ())))
    return out


def load_preset(name: str) -> ErasureSpec:
    path = DATA / "presets" / f"{name}.yaml"
    if not path.is_file():
        raise MaceError(f"unknown preset {name!r}; available: {', '.join(preset_names())}")
    return _spec_from_mapping(yaml.safe_load(path.read_text()))


def preset_names() -> list[str]:
    return sorted(p.stem for p in (DATA / "presets").glob("*.yaml"))


def load_config(path: str | Path) -> ErasureSpec:
    """A YAML config: ``preset``, ``type``, ``concepts``, ``retain``, ``settings`` (all optional)."""
    path = Path(path)
    if not path.is_file():
        raise MaceError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise MaceError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise MaceError(f"{path}: expected a mapping with concepts / retain / settings")
    base = load_preset(data["preset"]) if "preset" in data else ErasureSpec(())
    spec = _spec_from_mapping(data)
    return merge_specs(base, spec)


def _spec_from_mapping(data: Mapping) -> ErasureSpec:
    ctype = data.get("type", "object")
    concepts = _concepts_from_yaml(data.get("concepts", []) or [], ctype)
    return ErasureSpec(tuple(concepts), tuple(data.get("retain", []) or []), dict(data.get("settings", {}) or {}))


def merge_specs(base: ErasureSpec, top: ErasureSpec) -> ErasureSpec:
    """Concepts and retain lists concatenate; top's overrides win."""
    return ErasureSpec(base.concepts + top.concepts, base.retain + top.retain, {**base.overrides, **top.overrides})


def validate(spec: ErasureSpec, tokenize=None, max_tokens: int = 77) -> ErasureSpec:
    """Check the request; returns it unchanged or raises `MaceError` saying what to fix.

    ``tokenize(prompt) -> ids`` (with start/end tokens) enables the context-length check.
    """
    if not spec.concepts:
        raise MaceError("no concepts to erase: give at least one --concept, a --config or a --preset")
    seen: dict[str, str] = {}
    for c in spec.concepts:
        key = c.phrase.lower()
        if key in seen:
            raise MaceError(f"concept {c.phrase!r} is listed twice")
        seen[key] = c.phrase
    retain = {r.lower() for r in spec.retain}
    both = [c.phrase for c in spec.concepts if c.phrase.lower() in retain]
    if both:
        raise MaceError(f"{', '.join(both)} cannot be both erased and retained; remove it from one list")
    spec.settings_for()
    for c in spec.concepts:
        spec.settings_for(c)
        if tokenize is not None:
            longest = max(concept_prompts(c) + [train_prompt(c)], key=lambda p: len(tokenize(p)))
            n = len(tokenize(longest))
            if n > max_tokens:
                raise MaceError(f"concept {c.phrase!r} is too long for the text encoder's context: the prompt "
                                f"{longest[:60]!r}... needs {n} tokens, the limit is {max_tokens}. Shorten the phrase.")
    return spec


def settings_hash(spec: ErasureSpec, concept: Concept) -> str:
    """Identity of a concept's stage-2 work: what changes its LoRA changes this hash."""
    s = spec.settings_for(concept).to_dict()
    stage2 = {k: s[k] for k in ("rank", "steps", "lr", "batch_size", "images", "sample_steps", "guidance", "mask",
                                "mask_threshold", "timesteps", "cfis", "seed", "clip_skip", "objective", "alternative",
                                "abo_scale", "abo_lambda")}
    return hashlib.sha256(json.dumps([concept.to_dict(), stage2], sort_keys=True).encode()).hexdigest()[:16]
