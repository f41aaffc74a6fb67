"""What to erase: concepts, the retain list, settings, types and presets. Plain data, no torch.

Settings resolve in layers: `Settings` defaults < the concept type's defaults (data/types.yaml)
< a preset's settings < a config file < command-line flags. Only fields a layer actually sets
override the layer below, so `--lr` changes the learning rate and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from ..errors import MaceError
from .corpus import captions_id, read_captions, subject_captions

DATA = Path(__file__).parents[1] / "data"


def _knob(default: Any, help: str, label: str = "", *, min: float | None = None, above: float | None = None,
          max: float | None = None, choices: tuple[str, ...] = (), hidden: bool = False,
          lora: str = "concept") -> Any:
    """A `Settings` field with what every front-end needs to offer it: ``help`` (the CLI's flag help, the
    nodes' tooltip), ``label`` (the tab's field name and the name in error messages; default: the
    help), the valid range (``min`` inclusive, ``above`` exclusive, ``max`` inclusive) or ``choices``,
    and ``hidden`` for internals no front-end offers; ``lora`` says how it enters `settings_hash`
    ("concept": the concept's own value, "run": the run's (stage 1), "no": it does not change the LoRA).
    The CLI flags, the tab's fields and the nodes'
    widgets are generated from this (`setting_infos`): a new setting is one field here."""
    return field(default=default, metadata={"help": help, "label": label or help, "min": min, "above": above,
                                            "max": max, "choices": tuple(choices), "hidden": hidden,
                                            "lora": lora})


@dataclass(frozen=True)
class Settings:
    """Every knob of an erasure. Stage 1: lam, prior, domain; stage 2: rank .. attack_steps; stage 3: fusion ..."""

    # stage 1: closed-form refinement
    lam: float = _knob(100.0, "stage-1 ridge toward the original weights", "stage-1 ridge (lam)", min=0, lora="run")
    prior: float = _knob(0.0, "general-prior strength (per token: Gram / #embeddings)", "general prior strength",
                         min=0, lora="run")
    domain: float = _knob(0.0, "retain-prior strength, per kept concept (each weighs this many average token "
                               "pairs)", "retain prior strength", min=0, lora="run")
    protection: str = _knob("type", "what stage 1 keeps when no retain list is given: 'type' = the concept type's "
                                    "own kind (types.yaml `protect`: other celebrities, other artists, common "
                                    "objects, ...) and each concept's nearby words in the model, 'none' = nothing "
                                    "but the general prior", "default protection",
                            choices=("type", "none"), lora="run")
    balance: str = _knob("overlap", "stage 1 protection (ridge and priors) x the concepts' overlap: 1 for one "
                                    "concept, up to n for n concepts whose edits point the same way, so many "
                                    "similar concepts cannot outweigh what is kept ('none': off)", "mass balance",
                         choices=("overlap", "none"), lora="run")
    # stage 2: one LoRA per concept
    rank: int = _knob(1, "LoRA rank", min=1, max=256)
    steps: int = _knob(50, "LoRA training steps per concept", "LoRA steps", min=1)
    lr: float = _knob(1e-4, "LoRA learning rate (left to the type: a tenth of it for objective mace-authors, "
                            "the authors' own rate)", "learning rate", above=0)
    batch_size: int = _knob(1, "LoRA batch size", min=1)
    images: int = _knob(8, "training images per concept, drawn by the original model", "images per concept", min=1)
    sample_steps: int = _knob(30, "DDIM steps for the training images", "sampling steps", min=1)
    guidance: float = _knob(7.5, "CFG scale for the training images", "guidance scale", above=0)
    mask: str = _knob("attention", "where the concept is in the training images", "mask source",
                      choices=("attention", "sam", "none"))
    sam_checkpoint: str | None = _knob(None, "segment-anything checkpoint for mask 'sam'", lora="no")  # a path
    mask_threshold: float = _knob(0.5, "fraction of the attention map's maximum kept as the concept's region",
                                  "mask threshold", min=0, max=1)
    timesteps: str = _knob("cfis", "LoRA timestep sampling", choices=("cfis", "uniform"))
    cfis: tuple[float, float, float] = _knob((200.0, 400.0, 0.05), "CFIS t1, t2, gamma", hidden=True)
    objective: str = _knob("mace", "stage-2 loss: mace (the attention loss), abo (All-but-One: turn the concept "
                                   "into 'alternative' while keeping the unconditional prediction), mace-authors "
                                   "(the MACE authors' loss: K/V LoRA, full backprop), esd (negative guidance, "
                                   "strength eta) or ant (ANT: negative guidance in mid-to-late steps, early steps "
                                   "kept); all but mace backpropagate through the UNet (slower)", "objective",
                           choices=("mace", "abo", "mace-authors", "esd", "ant"))
    alternative: str = _knob("", "abo: what the erased concept should become, e.g. 'a cow' (empty: nothing in "
                                 "particular)", "alternative")
    abo_scale: float = _knob(1.0, "abo: strength of the alternative's guidance direction", "abo scale", min=0)
    abo_lambda: float = _knob(1.0, "abo: weight keeping the unconditional prediction unchanged", "abo lambda", min=0)
    eta: float = _knob(1.0, "esd, ant: strength of the negative guidance the concept's prediction is steered to",
                       "negative guidance (eta)", above=0)
    ant_split: int = _knob(920, "ant: timesteps from this one up (the early, high-noise steps) are kept, below it "
                                "the concept is erased", "ANT split timestep", min=1, max=999)
    ant_early: float = _knob(0.5, "ant: weight of keeping the early steps' guided prediction", "ANT early weight",
                             min=0)
    ant_uncond: float = _knob(2.5, "ant: weight of keeping the unconditional prediction", "ANT unconditional weight",
                              min=0)
    robust_rounds: int = _knob(0, "adversarial hardening rounds after the erasure (soft-token attack, re-solve; "
                                  "--robust is 2)", "robust hardening rounds", min=0, lora="no")
    attack_steps: int = _knob(100, "optimisation steps of each hardening round's soft-token attack",
                              "attack steps", min=1, lora="no")
    # stage 3: fusion
    fusion: str = _knob("closed-form", "how LoRAs combine (naive = ablation)", choices=("closed-form", "naive"),
                       lora="no")
    separable: bool = _knob(False, "SepME: keep each concept's increment orthogonal to the other concepts' "
                                   "embeddings", lora="no")
    fuse_lam: float = _knob(1e-3, "fusion ridge toward the refined weights", "fusion ridge", min=0, lora="no")
    fuse_prior: float = _knob(0.0, "general-prior strength in fusion", "fusion prior strength", min=0, lora="no")
    # run
    seed: int = _knob(2024, "random seed (image drawing and training)", "seed", min=0, max=2 ** 31 - 1)
    clip_skip: int = _knob(1, "text-encoder layer, as in A1111 (1: the last)", "CLIP skip", min=1)
    # memory: recompute UNet activations in backward passes (gradient checkpointing) and draw the
    # training images one at a time; slower, the same LoRAs, so not part of `settings_hash`
    low_vram: bool = _knob(False, "fit a smaller GPU: draw training images one at a time and recompute UNet "
                                  "activations in backward passes; slower, the same result", "low VRAM", lora="no")
    # stage 1 again, last so that the nodes' optional widgets of saved workflows keep their positions
    prior_captions: str = _knob("", "a text file of captions in your model's own style, one per line (e.g. its "
                                    "training captions): the general prior is computed from them instead of the "
                                    "built-in corpus, for fine-tunes whose prompts the corpus does not speak "
                                    "(booru tags, a house vocabulary); needs a general prior strength > 0",
                                "general prior captions file", lora="run")
    # before stage 1, last for the same reason
    synonyms: str = _knob("model", "'model': before stage 1, look up in the model's vocabulary the words it draws "
                                   "as each concept (erased with it, e.g. a celebrity's nickname) and those it "
                                   "draws near it but otherwise (kept by the default protection), named in the "
                                   "log and the metadata; 'none': only the phrase, and the type's fixed list",
                          "model's own synonyms",
                          choices=("model", "none"), lora="no")

    def __post_init__(self) -> None:
        for info in setting_infos(hidden=True):
            check_setting(info, getattr(self, info.name))
        if self.mask == "sam" and not self.sam_checkpoint:
            raise MaceError("--mask sam needs --sam-checkpoint PATH (a segment-anything ViT checkpoint)")

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
class SettingInfo:
    """One `Settings` field as front-ends offer it (see `_knob`); ``kind`` is int, float, str or bool."""

    name: str
    kind: type
    default: Any
    help: str
    label: str
    min: float | None
    above: float | None
    max: float | None
    choices: tuple[str, ...]
    hidden: bool

    @property
    def flag(self) -> str:
        """The CLI's flag: ``--batch-size`` for ``batch_size``."""
        return "--" + self.name.replace("_", "-")

    def type_defaults(self) -> str:
        """The default and where a concept type changes it, e.g. "1e-4; celebrity 0.001, style 0.001"."""
        own = [f"{t.name} {t.settings[self.name]}" for t in concept_types().values()
               if self.name in t.settings and t.settings[self.name] != self.default]
        return f"{self.default}" + (f"; {', '.join(own)}" if own else "")


#: Learning-rate factor of an objective whose loss has another scale than `mace`'s, applied to the type's
#: rate when the user sets none. The types' rates are set for `mace`'s normalised attention loss; the
#: authors' unnormalised sum trains at a tenth of them for every type (their 1e-5 for objects and explicit
#: content, 1e-4 for celebrities and styles), and at ten times that it wiped every identity of the
#: identity world (benchmarks/RESULTS.md, "The rest of the table on it").
OBJECTIVE_LR_SCALE = {"mace-authors": 0.1}


_KINDS = {"int": int, "float": float, "str": str, "bool": bool}


@lru_cache(maxsize=None)
def _all_infos() -> tuple[SettingInfo, ...]:
    out = []
    for f in fields(Settings):
        m = f.metadata
        kind = _KINDS.get(str(f.type).split("|")[0].split("[")[0].strip(), str)
        out.append(SettingInfo(f.name, kind, f.default, m.get("help", f.name.replace("_", " ")),
                               m.get("label") or f.name.replace("_", " "), m.get("min"), m.get("above"),
                               m.get("max"), tuple(m.get("choices", ())), bool(m.get("hidden", False))))
    return tuple(out)


def setting_infos(hidden: bool = False) -> list[SettingInfo]:
    """Every setting front-ends offer, in `Settings` order (with ``hidden``: internals too)."""
    return [i for i in _all_infos() if hidden or not i.hidden]


def setting_info(name: str) -> SettingInfo:
    for i in _all_infos():
        if i.name == name:
            return i
    raise MaceError(f"unknown setting {name!r}")


_KIND_NAMES = {int: "a whole number", float: "a number", str: "a string", bool: "true or false"}


def check_setting(info: SettingInfo, value: Any, where: str = "") -> None:
    """Raise `MaceError` (naming the setting as ``where``, default its name, and by its label) when
    ``value`` is of the wrong type, not finite, or outside its declared range or choices."""
    if value is None or info.hidden:
        return
    name = where or info.name
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (isinstance(value, info.kind) and not (info.kind is int and isinstance(value, bool))
            or (info.kind is float and number)):
        raise MaceError(f"{name} ({info.label}): expected {_KIND_NAMES[info.kind]}, got {type(value).__name__} "
                        f"{value!r}"[:200])
    if number and not math.isfinite(value):
        raise MaceError(f"{name} ({info.label}) must be a finite number, got {value}")
    if info.choices and value not in info.choices:
        raise MaceError(f"{info.label}: must be {' or '.join(info.choices)}, got {value!r}")
    if number:
        if info.min is not None and value < info.min:
            raise MaceError(f"{name} ({info.label}) must be at least {info.min}, got {value}")
        if info.above is not None and not value > info.above:
            raise MaceError(f"{name} ({info.label}) must be more than {info.above}, got {value}")
        if info.max is not None and value > info.max:
            raise MaceError(f"{name} ({info.label}) must be at most {info.max}, got {value}")


@dataclass(frozen=True)
class ConceptType:
    name: str
    anchor: str
    train_prompt: str
    templates: tuple[str, ...]
    settings: Mapping[str, Any]
    protect: tuple[str, ...] = ()  # kept when the user gives no retain list (types.yaml `protect`)
    anchor_names: int = 0  # stage 1 maps onto the mean of this many ordinary names (types.yaml)

    def stage1_anchors(self, concept: "Concept") -> tuple[str, ...]:
        """What stage 1 maps ``concept`` onto: its anchor, or, for a type with ``anchor_names`` N and the
        type's default anchor, N ordinary names ("Mary Johnson": common first names and surnames paired,
        none sharing a word with the phrase), whose mean it becomes. Mapping a name onto "a person" also
        removes what every name has in common, which the other names then lose; the mean of other
        names keeps it and removes only what is this name's own."""
        if not self.anchor_names or concept.anchor != self.anchor:
            return (concept.anchor,)
        words = {w.casefold() for w in concept.phrase.split()}
        pairs = zip(_name_list("first-names"), _name_list("last-names"))
        return tuple(f"{f} {l}" for f, l in pairs if not {f.casefold(), l.casefold()} & words)[:self.anchor_names]

    @property
    def templates_key(self) -> str:
        """A hash of the templates: stage-1 sums and LoRAs made with other templates are recomputed."""
        return hashlib.sha256("\n".join(self.templates).encode()).hexdigest()[:16]

    @property
    def keeps_nearby_words(self) -> bool:
        """Whether the default protection keeps a concept's nearby words: only a type with a fixed list of its
        own kind does (`toy` has none, and its world's untrained words draw shapes: benchmarks/RESULTS.md)."""
        return bool(self.protect)

    def protection_of(self, concept: "Concept") -> tuple[str, ...]:
        """What this type keeps, without a retain list, when ``concept`` is erased: its fixed list (the
        names, artists or objects a model usually knows) and the concept's nearby words, those the model
        draws near it but not as it (`synonyms.find_words`): on a model that never learnt the fixed list's
        names, they are the other people it did learn."""
        return (*self.protect, *concept.found_neighbours)


@dataclass(frozen=True)
class Concept:
    """One phrase to erase, mapped to ``anchor``; ``prompts`` add to the type's templates. ``synonyms``: words
    for it that evaluation tests (a preset's held-out synonyms); ``found_synonyms``: the words the model
    draws as it, found before stage 1 (`synonyms.find_words`), which stage 1 erases with it;
    ``found_neighbours``: the words it draws near it but not as it, which the default protection keeps."""

    phrase: str
    type: str = "object"
    anchor: str = ""
    prompts: tuple[str, ...] = ()
    synonyms: tuple[str, ...] = ()
    found_synonyms: tuple[str, ...] = ()
    found_neighbours: tuple[str, ...] = ()

    @property
    def slug(self) -> str:
        """A file-system-safe, stable name for the concept's folder."""
        base = re.sub(r"[^a-z0-9]+", "-", self.phrase.lower()).strip("-")[:40] or "concept"
        return f"{base}-{hashlib.sha1(self.phrase.encode()).hexdigest()[:8]}"

    def to_dict(self) -> dict:
        return {"phrase": self.phrase, "type": self.type, "anchor": self.anchor, "prompts": list(self.prompts),
                "synonyms": list(self.synonyms), "found_synonyms": list(self.found_synonyms),
                "found_neighbours": list(self.found_neighbours)}


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
        s = Settings().overlay(ctype.settings).overlay(self.overrides)
        if self.overrides.get("lr") is None:  # the type's rate, set for `mace`: scaled to the objective's loss
            s = replace(s, lr=float(f"{s.lr * OBJECTIVE_LR_SCALE.get(s.objective, 1.0):.6g}"))
        return s

    def protected(self) -> tuple[tuple[str, ...], str]:
        """What stage 1 keeps and where that comes from: the retain list ("retain list"), else, with
        protection "type", every concept type's default protection less the phrases being erased
        ("default protection of <types> (N phrases, K of them the model's nearby words)"), else nothing."""
        if self.retain:
            return self.retain, "retain list"
        if not self.concepts or self.settings_for().protection != "type":
            return (), ""
        erased = {p.casefold() for c in self.concepts for p in (c.phrase, *c.found_synonyms)}
        kinds = list(dict.fromkeys(c.type for c in self.concepts))
        kept = tuple(dict.fromkeys(x for c in self.concepts for x in get_type(c.type).protection_of(c)
                                   if x.casefold() not in erased))
        nearby = len(set(kept) - {x for c in self.concepts for x in get_type(c.type).protect})
        of_model = f", {nearby} of them the model's nearby words" if nearby else ""
        return kept, (f"default protection of {', '.join(kinds)} ({len(kept)} phrases{of_model})" if kept else "")

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
        protect = dict(t.get("protect") or {})
        scenes = dict(t.get("scenes") or {})
        # the phrase also in everyday scenes (`scenes`): stage 1 then remaps the open-ended words that
        # follow it, and keeps what it protects in the same scenes; with the templates alone, another
        # name followed by words no template has ("X next to a star") lost what those words carried
        extra = subject_captions(scenes["slot"], int(scenes["count"])) if scenes else []
        templates = tuple(s for s in lines if s.strip()) + tuple(extra)
        out[name] = ConceptType(name, t["anchor"], t["train_prompt"], templates,
                                dict(t.get("settings", {})), _protect_list(protect), int(t.get("anchor_names", 0)))
    return out


def _protect_list(source: Mapping[str, Any]) -> tuple[str, ...]:
    """A type's default protection: ``{preset: NAME}`` (that preset's retain list, e.g. the paper's 100
    retained celebrities) or ``{list: NAME}`` (data/protect/NAME.txt, one phrase per line)."""
    if "preset" in source:
        return tuple(yaml.safe_load((DATA / "presets" / f"{source['preset']}.yaml").read_text())["retain"])
    return _name_list(source["list"]) if "list" in source else ()


@lru_cache(maxsize=None)
def _name_list(name: str) -> tuple[str, ...]:
    """data/protect/NAME.txt: one phrase per line, ``#`` comments."""
    lines = (DATA / "protect" / f"{name}.txt").read_text().splitlines()
    return tuple(x.strip() for x in lines if x.strip() and not x.startswith("#"))


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


def anchor_prompt_sets(concept: Concept) -> list[tuple[str, ...]]:
    """The prompts of each of ``concept``'s stage-1 anchors (`ConceptType.stage1_anchors`): concepts with
    the same set share its encodings (`erase._stats`), and the estimate counts each set once."""
    return [tuple(concept_prompts(concept, a)) for a in get_type(concept.type).stage1_anchors(concept)]


def stage1_key(concept: Concept) -> str:
    """Identity of what stage 1 encodes for ``concept``: its type's templates and what it maps onto;
    stage-1 sums and LoRAs made from other ones are recomputed."""
    t = get_type(concept.type)
    return hashlib.sha256(json.dumps([t.templates_key, t.stage1_anchors(concept), concept.found_synonyms]
                                     ).encode()).hexdigest()[:16]


def train_prompt(concept: Concept) -> str:
    return get_type(concept.type).train_prompt.replace("{}", concept.phrase)


# ---------------------------------------------------------------------------------------------
# Parsing


def parse_lines(text: str, default_type: str = "object", comments: bool = True) -> list[Concept]:
    """One concept per line, ``phrase`` or ``phrase | anchor`` or ``phrase | anchor | type``.

    Blank lines are skipped and an empty anchor means the type's default. With ``comments`` (files,
    text boxes) a line whose first non-blank character is ``#`` is a comment; a ``#`` anywhere else is
    part of the text ('C# logo'). A command-line ``--concept`` is parsed without comments
    ('#hashtag' is a concept there).
    """
    out = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or (comments and line.startswith("#")):
            continue
        parts = [p.strip() for p in line.split("|")]
        if len(parts) > 3:
            raise MaceError(f"line {n}: expected 'phrase | anchor | type', got {raw!r}")
        phrase, anchor, ctype = (parts + ["", ""])[:3]
        out.append(make_concept(phrase, anchor, ctype or default_type))
    return out


def read_text_file(path: str | Path, what: str) -> str:
    """A UTF-8 text file (a BOM is dropped), or `MaceError` naming ``what`` and the file."""
    path = Path(path)
    if not path.is_file():
        raise MaceError(f"{what} not found: {path}" if not path.exists() else f"{what} {path} is not a regular file")
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise MaceError(f"{what} {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise MaceError(f"{what} {path} cannot be read ({e.strerror})") from None


_TYPE_NAMES = {str: "a string", list: "a list", dict: "a mapping"}


def _expect(value: Any, typ: type, where: str) -> Any:
    if not isinstance(value, typ):
        raise MaceError(f"{where}: expected {_TYPE_NAMES[typ]}, got {type(value).__name__} {value!r}"[:200])
    return value


def _strings(value: Any, where: str) -> list[str]:
    """A YAML list of strings (a lone string is refused: `retain: dog` would be d, o, g)."""
    for i, v in enumerate(_expect(value, list, where)):
        _expect(v, str, f"{where}[{i}]")
    return value


_CONCEPT_KEYS = ("phrase", "anchor", "type", "prompts", "synonyms")
# `name` and `description` document a preset or a config (the shipped presets carry both)
_CONFIG_KEYS = ("preset", "type", "concepts", "retain", "settings", "name", "description")


def _concepts_from_yaml(items: Any, default_type: str, where: str = "concepts") -> list[Concept]:
    """``concepts:``: a list of phrases or of mappings with ``_CONCEPT_KEYS`` (phrase required)."""
    out = []
    for i, it in enumerate(_expect(items, list, where)):
        at = f"{where}[{i}]"
        if isinstance(it, str):
            out.append(make_concept(it, "", default_type))
            continue
        if not isinstance(it, dict):
            raise MaceError(f"{at}: expected a phrase or a mapping with {', '.join(_CONCEPT_KEYS)}, got "
                            f"{type(it).__name__} {it!r}"[:200])
        unknown = sorted(set(map(str, it)) - set(_CONCEPT_KEYS))
        if unknown:
            raise MaceError(f"{at}: unknown key(s) {', '.join(unknown)}; a concept has {', '.join(_CONCEPT_KEYS)}")
        if "phrase" not in it:
            raise MaceError(f"{at}: a concept needs a 'phrase'")
        for k in ("phrase", "anchor", "type"):
            if k in it:
                _expect(it[k], str, f"{at}.{k}")
        out.append(make_concept(it["phrase"], it.get("anchor", ""), it.get("type", default_type),
                                _strings(it.get("prompts", []), f"{at}.prompts"),
                                _strings(it.get("synonyms", []), f"{at}.synonyms")))
    return out


def load_preset(name: str) -> ErasureSpec:
    path = DATA / "presets" / f"{name}.yaml"
    if not path.is_file():
        raise MaceError(f"unknown preset {name!r}; available: {', '.join(preset_names())}")
    return _spec_from_mapping(yaml.safe_load(path.read_text()), f"preset {name}")


def preset_names() -> list[str]:
    return sorted(p.stem for p in (DATA / "presets").glob("*.yaml"))


def load_config(path: str | Path) -> ErasureSpec:
    """A YAML config: ``preset``, ``type``, ``concepts``, ``retain``, ``settings`` (all optional;
    any other top-level key is refused, as are values of the wrong type)."""
    path = Path(path)
    text = read_text_file(path, "config file")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise MaceError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise MaceError(f"{path}: expected a mapping with {', '.join(_CONFIG_KEYS)}, got {type(data).__name__}")
    try:
        base = load_preset(_expect(data["preset"], str, "preset")) if "preset" in data else ErasureSpec(())
        return merge_specs(base, _spec_from_mapping(data))
    except MaceError as e:
        raise MaceError(f"{path}: {e}") from None


def _spec_from_mapping(data: Mapping, where: str = "") -> ErasureSpec:
    """The request a config or preset mapping describes (keys validated, see `load_config`)."""
    unknown = sorted(set(map(str, data)) - set(_CONFIG_KEYS))
    if unknown:
        raise MaceError(f"{where + ': ' if where else ''}unknown key(s) {', '.join(unknown)}; a config has "
                        f"{', '.join(_CONFIG_KEYS)}")
    ctype = _expect(data.get("type", "object"), str, "type")
    concepts = _concepts_from_yaml(data.get("concepts") or [], ctype)
    retain = _strings(data.get("retain") or [], "retain")
    settings = _expect(data.get("settings") or {}, dict, "settings")
    for k, v in settings.items():
        check_setting(setting_info(str(k)), v, where=f"settings.{k}")
    return ErasureSpec(tuple(concepts), tuple(retain), dict(settings))


def make_concept(phrase: str, anchor: str = "", ctype: str = "object", prompts: Iterable[str] = (),
                 synonyms: Iterable[str] = (), found_synonyms: Iterable[str] = (),
                 found_neighbours: Iterable[str] = ()) -> Concept:
    phrase = " ".join(str(phrase).split())
    if not phrase:
        raise MaceError("a concept phrase is empty")
    t = get_type(ctype)  # an unknown type is refused whether or not an anchor is given
    anchor = " ".join(str(anchor).split()) if anchor else t.anchor
    if anchor.casefold() == phrase.casefold():  # mapped onto itself: the edit would change nothing
        raise MaceError(f"concept {phrase!r} has itself as anchor, so nothing would be erased; give another anchor "
                        "(what to draw instead) or none for the type's default")
    return Concept(phrase, ctype, anchor, tuple(prompts), tuple(synonyms), tuple(found_synonyms),
                   tuple(found_neighbours))


def load_concept_file(path: str | Path, default_type: str = "object") -> ErasureSpec:
    """A concept file by its suffix: YAML (`load_config`), CSV (columns phrase, anchor, type[, role];
    role "retain" puts the row in the retain list; a header row naming the columns is optional) or
    text (one ``phrase | anchor | type`` per line, `parse_lines`)."""
    path = Path(path)
    if path.suffix.lower() in (".yaml", ".yml"):
        return load_config(path)
    text = read_text_file(path, "concept file")
    if path.suffix.lower() != ".csv":
        return ErasureSpec(tuple(parse_lines(text, default_type)))
    return _spec_from_csv(text, path.name, default_type)


CSV_COLUMNS = ("phrase", "anchor", "type", "role")
CSV_ROLES = ("", "erase", "retain", "keep", "preserve")


def _spec_from_csv(text: str, name: str, default_type: str) -> ErasureSpec:
    import csv
    import io

    rows = [r for r in csv.reader(io.StringIO(text)) if any(cell.strip() for cell in r)]
    cols = list(CSV_COLUMNS)
    if rows and rows[0] and rows[0][0].strip().lower() in ("phrase", "concept"):
        cols = [c.strip().lower().replace("concept", "phrase") for c in rows[0]]
        rows = rows[1:]
        if "phrase" not in cols:
            raise MaceError(f"{name}: the header row needs a 'phrase' column")
        unknown = [c for c in cols if c not in CSV_COLUMNS]
        if unknown:  # a misspelt column would be dropped silently
            raise MaceError(f"{name}: unknown column(s) {', '.join(map(repr, unknown))}; the columns are "
                            f"{', '.join(CSV_COLUMNS)}")
    concepts, retain = [], []
    for n, row in enumerate(rows, 1):
        if any(c.strip() for c in row[len(cols):]):
            raise MaceError(f"{name} row {n}: {len(row)} cells, the columns are {', '.join(cols)}")
        rec = {c: (row[i].strip() if i < len(row) else "") for i, c in enumerate(cols)}
        if rec.get("phrase", "").startswith("#"):
            continue
        role = rec.get("role", "").lower()
        if role not in CSV_ROLES:
            raise MaceError(f"{name} row {n}: role {rec['role']!r} is not one of "
                            f"{', '.join(r for r in CSV_ROLES if r)}")
        if role in ("retain", "keep", "preserve"):
            retain.append(rec["phrase"])
            continue
        try:
            concepts.append(make_concept(rec.get("phrase", ""), rec.get("anchor", ""), rec.get("type") or default_type))
        except MaceError as e:
            raise MaceError(f"{name} row {n}: {e}") from None
    return ErasureSpec(tuple(concepts), tuple(retain))


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
        s = spec.settings_for(c)
        if s.prior_captions and not (s.prior or s.fuse_prior):
            raise MaceError(f"the prior captions file {s.prior_captions!r} has no effect with a general prior strength of "
                            "0 (this concept type's default): set the general prior strength too (--prior), e.g. 2000")
        if s.prior_captions:
            read_captions(s.prior_captions)  # a missing or unusable file is found now, not after minutes of work
        if s.mask == "sam" and not Path(s.sam_checkpoint).is_file():  # found now, not after the images are drawn
            raise MaceError(f"the SAM checkpoint {s.sam_checkpoint!r} (mask 'sam') is not a file; give the path of a "
                            "segment-anything ViT checkpoint")
        if tokenize is not None:
            longest = max(concept_prompts(c) + [train_prompt(c)], key=lambda p: len(tokenize(p)))
            n = len(tokenize(longest))
            if n > max_tokens:
                raise MaceError(f"concept {c.phrase!r} is too long for the text encoder's context: the prompt "
                                f"{longest[:60]!r}... needs {n} tokens, the limit is {max_tokens}. Shorten the phrase.")
    return spec


def settings_hash(spec: ErasureSpec, concept: Concept) -> str:
    """Identity of a concept's LoRA: everything it is trained on changes this hash, so a changed setting
    retrains it instead of reusing a LoRA trained for something else. That is the concept, its own
    settings that shape training (every field whose `_knob` says ``lora="concept"``, the default, so a
    new setting counts unless declared otherwise) and stage 1 as it refines the weights the LoRA trains
    on: the run's lam, prior, domain, protection and balance (``lora="run"``) and what stage 1 keeps (the
    retain list, or what its type keeps for it, `ConceptType.protection_of`).

    The other concepts of the project are deliberately left out: adding concepts to a project (`mace
    add`, a tab or node run on an existing project) re-solves stage 1 with them but reuses the LoRAs
    already trained, each on the refined weights of the concepts it was trained with. Fusion keeps each
    LoRA's edit on its own concept's embeddings, so a reused LoRA still erases its concept; retraining
    every LoRA each time one concept is added would cost as much as a fresh run."""
    own, run = spec.settings_for(concept).to_dict(), spec.settings_for().to_dict()
    kinds = {f.name: f.metadata.get("lora", "concept") for f in fields(Settings)}
    trained = {k: (own if kind == "concept" else run)[k] for k, kind in sorted(kinds.items()) if kind != "no"}
    # what stage 1 keeps: the retain list, else the concept's own type's whole default list (not less
    # the erased phrases, which would make the other concepts part of the identity)
    default = get_type(concept.type).protection_of(concept) if run["protection"] == "type" else ()
    if trained["prior_captions"]:  # the file's captions, not its name, shape stage 1
        trained["prior_captions"] = captions_id(read_captions(trained["prior_captions"]))
    data = [concept.to_dict(), trained, sorted(spec.retain or default), stage1_key(concept)]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
