"""The model's own words around a concept: those it draws as the concept (its synonyms, erased with it)
and those it draws otherwise (its nearby words, kept by the default protection).

A user erasing "Bill Marlow" does not list the nickname the model also learnt him by, and a user
erasing "airplane" may not think of "jet"; the erasure's templates name the phrase only, so such
words keep drawing the concept (the generality gap). Nor does a user erasing one name list the other
names the model knows, which an edit of the name's keys and values moves with it unless they are kept
(the specificity gap); a fixed list of famous names protects them only on a model that knows those
names. The model itself says which words are which:

* candidates: the vocabulary's whole words nearest the phrase's tokens in the text encoder's own
  token-embedding table (cosine, the nearest of the phrase's tokens), ``CANDIDATES`` of them. A word
  trained on the same images as the phrase sits near it; so do other names and other objects, which
  the next step tells apart;
* the test: what each word adds to the unconditional prediction, its guidance direction
  ``eps(x_t, template(word)) - eps(x_t, "")`` on seeded noise at four timesteps (a blank image noised,
  so the direction is the prompt's alone), against the phrase's. A word the model draws as the concept
  points the same way: cosine >= ``THRESHOLD``, a synonym; the nearest ``NEARBY`` of the others are
  what the model draws near the concept but not as it: on the identity world mostly other people's
  names and nicknames, on SD other people, related objects, near-miss words. Erasing several phrases, a
  nearby word of one that the model draws as another (cosine >= ``THRESHOLD``: a nickname the other's own
  candidates miss) is not kept (`drawn_as_another`).

``THRESHOLD`` was set on the shape world (benchmarks/RESULTS.md, "The model's own synonyms"), never on
the identity world: there, distinct shapes' directions reach at most 0.93 (heart / diamond), the world's
synonyms score 1.00, and the toy model's untrained words scoring 0.94-0.98 with a shape drew it (its
judge, ten images of ten for those checked; of all the words the search takes for square and heart, 91%
of the images). ``CANDIDATES``, ``NEARBY`` and ``TIMESTEPS`` were chosen before any measurement; keeping
the nearby words (instead of the celebrity type's shared-name list) was chosen from measurements on the
identity world (benchmarks/RESULTS.md, "The model's nearby words kept"). Only types with a fixed list
keep them: the shape world's `toy` type keeps nothing of its own kind, and there the nearby words are
untrained ones that draw a shape all the same (its judge: "edward", cosine 0.69 with square, draws
squares; "mps", 0.92 with circle, circles), so keeping them held circle back (CFR Acc_e 5 -> 35).

The same test tells whether the model knows a type's fixed list at all (`unknown_lists`): a model that
never learnt the famous names, artists or objects the list names draws them all as one thing (its
fallback), and keeping them keeps nothing of what it draws (on the identity world the three lists' entries
reach a mean pairwise cosine of 0.97-1.00, its own names 0.70, objects 0.69, artists 0.38; on the shape
world the celebrity and object lists 0.17 and 0.36: its untrained words draw different shapes). The run
says so in its log and report, with what to give instead.

The synonyms are erased with the phrase by stage 1 (`Concept.found_synonyms`: the same templates, the
same anchor), the nearby words kept with the type's fixed list (`Concept.found_neighbours`,
`ConceptType.protection_of`; a retain list replaces both, ``protection`` "none" drops both); both are
logged and recorded in the output's metadata. The setting ``synonyms`` "none" turns the search off. The
synonyms a user lists (`Concept.synonyms`) stay what evaluation tests.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from functools import lru_cache
from typing import Callable, Collection, NamedTuple

import torch

from ..errors import InterruptedRun
from ..model.backend import Backend
from .concepts import Concept, ErasureSpec, get_type

THRESHOLD = 0.95
CANDIDATES = 24
NEARBY = 16  # of the candidates not taken, the nearest kept by the default protection
LIST_SAMPLE = 12  # the fixed list's first entries drawn to tell whether the model knows the list
TIMESTEPS = (900, 700, 500, 300)
MAX_SIDE = 32  # latent pixels: the comparison needs each prompt's direction, not a full-size image
PROGRESS_LABEL = "finding the model's own words for each concept"
log = logging.getLogger("mace.synonyms")


@lru_cache(maxsize=None)
def vocabulary() -> tuple[str, ...]:
    """CLIP's BPE vocabulary by token id (every SD family's tokenizers share it); whole words end in ``</w>``."""
    from ..model.checkpoint import TOKENIZER_DIR  # the tokenizer files the backends load

    vocab = json.loads((TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))
    out = [""] * (max(vocab.values()) + 1)
    for token, i in vocab.items():
        out[i] = token
    return tuple(out)


def candidate_words(table: torch.Tensor, phrase_ids: Collection[int], tokenize, n: int = CANDIDATES,
                    exclude: Collection[str] = ()) -> list[str]:
    """The ``n`` whole words of the vocabulary nearest the phrase's tokens, nearest first.

    ``table`` [V, D]: the text encoder's token embeddings; ``phrase_ids``: the phrase's token ids
    (without start and end); ``tokenize``: prompt -> ids with start and end, to keep only words that
    read back as their one token (so that "a photo of {word}" holds the token compared). Words in
    ``exclude`` (casefolded) and the phrase's own tokens are left out."""
    vocab = vocabulary()
    unit = torch.nn.functional.normalize(table.detach().float(), dim=1)
    near = (unit @ unit[list(phrase_ids)].T).max(dim=1).values  # [V]
    skip = {w.casefold() for w in exclude}
    out: list[str] = []
    for i in near.argsort(descending=True).tolist():
        token = vocab[i] if i < len(vocab) else ""
        word = token[:-4]
        if (i in phrase_ids or not token.endswith("</w>") or not (word.isascii() and word.isalpha())
                or word in skip or tokenize(word)[1:-1] != [i]):
            continue
        out.append(word)
        if len(out) == n:
            break
    return out


def search_calls() -> int:
    """UNet calls of one concept's search, in batch-of-one units (its candidates, the phrase, the empty prompt;
    each also one text encoding). Counted at the model's resolution, they overstate a search that draws
    smaller latents (`MAX_SIDE`): the estimate errs long, by seconds on a GPU."""
    return (CANDIDATES + 2) * len(TIMESTEPS)


def check_calls() -> int:
    """UNet calls of one fixed list's check (`unknown_lists`), in the units of `search_calls`."""
    return (LIST_SAMPLE + 1) * len(TIMESTEPS)


@torch.no_grad()
def guidance_directions(backend: Backend, prompts: list[str], seed: int = 0,
                        stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """[N, 4 * C * h * w] float32: for each prompt, eps(x_t, prompt) - eps(x_t, "") at ``TIMESTEPS`` on a
    blank latent noised with seeded noise (x_t = sqrt(1 - abar_t) * noise), flattened; the latent is the
    model's own size up to ``MAX_SIDE`` (SD1.5 at 256 px: a quarter of the cost, SDXL a sixteenth, and no
    self-attention over 128 x 128 positions). ``stop()`` true between prompts raises `InterruptedRun` (a
    full-size UNet on a CPU takes a second or more a prompt)."""
    side = min(backend.resolution // backend.vae_scale, MAX_SIDE)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(TIMESTEPS), backend.latent_channels, side, side, generator=g)
    t = torch.tensor(TIMESTEPS)
    sigma = (1.0 - backend.alphas_cumprod[t].double()).sqrt().float().view(-1, 1, 1, 1)
    x = (sigma * noise).to(backend.device, backend.dtype)
    t = t.to(backend.device)

    def predict(prompt: str) -> torch.Tensor:
        if stop is not None and stop():
            raise InterruptedRun("stopped while finding the model's own words for a concept; rerun to resume")
        return backend.predict(x, t, backend.encode([prompt] * len(TIMESTEPS))).float().flatten().cpu()

    uncond = predict("")
    return torch.stack([predict(p) - uncond for p in prompts])


class Found(NamedTuple):
    """What `find_words` found for a phrase: the words the model draws as it, its nearby words, and
    ``directions`` [1 + len(neighbours), F], unit rows: the guidance directions of the phrase and of each
    nearby word (`guidance_directions`), for `drawn_as_another`."""

    synonyms: tuple[str, ...]
    neighbours: tuple[str, ...]
    directions: torch.Tensor


def find_words(backend: Backend, phrase: str, template: str, exclude: Collection[str] = (),
               seed: int = 0, stop: Callable[[], bool] | None = None) -> Found:
    """The words ``backend``'s model draws as ``phrase``: candidates (`candidate_words`, less ``exclude``)
    whose guidance direction in ``template`` ("a photo of {}") has cosine >= ``THRESHOLD`` with the
    phrase's, nearest token first; and the ``NEARBY`` nearest of the others. Needs a backend with
    ``text_token_embeddings()``."""
    table = backend.text_token_embeddings()[0].weight
    ids = backend.tokenize(phrase)[1:-1]
    words = candidate_words(table, ids, backend.tokenize, exclude=exclude)
    dirs = torch.nn.functional.normalize(
        guidance_directions(backend, [template.replace("{}", w) for w in [phrase, *words]], seed, stop), dim=1)
    alike = (dirs[1:] @ dirs[0] >= THRESHOLD).tolist()
    near = [i for i, a in enumerate(alike) if not a][:NEARBY]
    return Found(tuple(w for w, a in zip(words, alike) if a), tuple(words[i] for i in near),
                 dirs[[0, *(i + 1 for i in near)]])


def subjectless(template: str) -> str:
    """``template`` with no subject ("a photo of the {}" -> "a photo of the"): what the model draws when the
    subject's tokens carry nothing, its fallback."""
    return " ".join(template.replace("{}", " ").split())


def drawn_as_another(backend: Backend, found: dict[str, tuple[str, Found]], seed: int = 0,
                     stop: Callable[[], bool] | None = None) -> dict[str, tuple[str, ...]]:
    """For each phrase of ``found`` (phrase -> (template, `Found`)), its nearby words that the model draws as
    another phrase of the run searched in the same template (cosine >= ``THRESHOLD``). Such a word is that
    phrase's by the search's own test (one name's nickname that its own candidates miss can be another erased
    name's nearby word), and keeping it would hold back what the run erases. A phrase the model draws as the
    template's `subjectless` prompt is no witness: a name it never learnt draws its fallback, as do the words
    it never learnt, and two fallbacks alike say nothing of each other. One `guidance_directions` call per
    template shared by two phrases or more; phrases with none to drop are left out."""
    by_template: dict[str, list[str]] = {}
    for phrase, (template, _) in found.items():
        by_template.setdefault(template, []).append(phrase)
    out = {}
    for template, phrases in by_template.items():
        if len(phrases) < 2:
            continue
        fallback = torch.nn.functional.normalize(guidance_directions(backend, [subjectless(template)], seed, stop),
                                                 dim=1)[0]
        known = [p for p in phrases if float(found[p][1].directions[0] @ fallback) < THRESHOLD]
        for p in phrases:
            others = [found[q][1].directions[0] for q in known if q != p]
            words = found[p][1]
            if others and words.neighbours:
                alike = (words.directions[1:] @ torch.stack(others).T >= THRESHOLD).any(dim=1).tolist()
                if any(alike):
                    out[p] = tuple(w for w, a in zip(words.neighbours, alike) if a)
    return out


def drawn_alike(backend: Backend, prompts: list[str], seed: int = 0, stop: Callable[[], bool] | None = None) -> float:
    """The mean cosine between the guidance directions (`guidance_directions`) of every two of ``prompts``
    (at least two): 1 when the model draws them all as one thing."""
    d = torch.nn.functional.normalize(guidance_directions(backend, prompts, seed, stop), dim=1)
    n = len(prompts)
    cos = d @ d.T
    return float((cos.sum() - cos.diagonal().sum()) / (n * (n - 1)))


def keeps_nearby(spec: ErasureSpec, concept: Concept) -> bool:
    """Whether the run keeps ``concept``'s nearby words and its type's fixed list: a searched concept whose type
    has a list, no retain list, protection "type"."""
    return (not spec.retain and spec.settings_for().protection == "type" and searched(spec, concept)
            and get_type(concept.type).keeps_nearby_words)


def checked_lists(spec: ErasureSpec, concepts: Collection[Concept]) -> list[str]:
    """The types whose fixed list `unknown_lists` checks for ``concepts`` (those a run searches): the types
    with one, where the run keeps it (`keeps_nearby`)."""
    return list(dict.fromkeys(c.type for c in concepts if keeps_nearby(spec, c)))


def compared_templates(spec: ErasureSpec, concepts: Collection[Concept]) -> list[str]:
    """The templates whose subjectless prompt `drawn_as_another` draws for ``concepts`` (those a run searches):
    those of two concepts or more whose nearby words the run keeps (`keeps_nearby`)."""
    templates = [get_type(c.type).train_prompt for c in concepts if keeps_nearby(spec, c)]
    return [t for t in dict.fromkeys(templates) if templates.count(t) > 1]


def unknown_lists(backend: Backend, spec: ErasureSpec, concepts: Collection[Concept],
                  stop: Callable[[], bool] | None = None) -> dict[str, float]:
    """Of `checked_lists`, the types whose list the model draws as one thing, with the mean cosine between the
    directions of its first ``LIST_SAMPLE`` entries in the type's training prompt (>= ``THRESHOLD``, the
    search's "drawn as the same thing"); logged as a warning (`unknown_note`)."""
    out = {}
    for t in checked_lists(spec, concepts):
        ctype = get_type(t)
        alike = drawn_alike(backend, [ctype.train_prompt.replace("{}", w) for w in ctype.protect[:LIST_SAMPLE]],
                            stop=stop)
        if alike >= THRESHOLD:
            out[t] = alike
    if out:
        log.warning("%s", unknown_note(out))
    return out


def unknown_note(unknown: dict[str, float]) -> str:
    """The one sentence, for the log and a run's report, naming the lists `unknown_lists` found the model does
    not know, with what to give instead: "" for none."""
    if not unknown:
        return ""
    # a type's list may be shorter than the sample (types.yaml is editable): name the entries actually drawn
    lists = ", ".join(f"{t} ({c:.3f} between its first {min(LIST_SAMPLE, len(get_type(t).protect))} entries)"
                      for t, c in unknown.items())
    return (f"the model draws the default list of {lists} as one thing (mean guidance cosine): it does not know "
            "them, and keeping them keeps little of what it draws; give what it should keep as a retain list, or "
            "its own captions as general prior captions")


def searched(spec: ErasureSpec, concept: Concept) -> bool:
    """Whether `with_model_words` searches for ``concept``'s words (setting ``synonyms`` "model")."""
    return spec.settings_for(concept).synonyms == "model"


def with_model_words(backend: Backend, spec: ErasureSpec, skip: Collection[str] = (),
                     progress: Callable[[str, int, int], None] | None = None,
                     stop: Callable[[], bool] | None = None) -> ErasureSpec:
    """``spec`` with each concept's `find_words` as its ``found_synonyms`` and ``found_neighbours`` (those only
    for a type with a fixed list to keep); concepts in ``skip`` (e.g. those a project already holds) and
    those `searched` leaves out are left as they are. Another concept's phrase or word and a retain entry is
    neither: the user's lists win. ``progress(label, done, total)`` hears of each concept searched; ``stop()``:
    see `guidance_directions`."""
    taken = [*(w for c in spec.concepts for w in (c.phrase, *c.phrase.split())), *spec.retain]
    todo = [c for c in spec.concepts if c.phrase not in skip and searched(spec, c)]
    found: dict[str, tuple[str, Found]] = {}
    for i, c in enumerate(todo):
        if progress is not None:
            progress(PROGRESS_LABEL, i, len(todo))
        template = get_type(c.type).train_prompt
        found[c.phrase] = template, find_words(backend, c.phrase, template, taken, stop=stop)
    dropped = drawn_as_another(backend, {c.phrase: found[c.phrase] for c in todo if keeps_nearby(spec, c)}, stop=stop)
    concepts = []
    for c in spec.concepts:
        if c.phrase in found:
            words, off = found[c.phrase][1], dropped.get(c.phrase, ())
            nearby = tuple(w for w in words.neighbours if w not in off) if get_type(c.type).keeps_nearby_words else ()
            c = replace(c, found_synonyms=words.synonyms, found_neighbours=nearby)
            log.info("the model's own synonyms of %r, erased with it: %s; its nearby words, kept by the default "
                     "protection: %s%s", c.phrase, ", ".join(words.synonyms) or "none", ", ".join(nearby) or "none",
                     f" (not kept, drawn as another phrase erased: {', '.join(off)})" if off else "")
        concepts.append(c)
    return replace(spec, concepts=tuple(concepts))
