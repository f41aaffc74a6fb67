"""The model's own words around a concept: those it draws as the concept (its synonyms, erased with it)
and those it draws otherwise (its nearby words, kept by the default protection).

A user erasing "Bill Marlow" does not list the nickname the model also learnt him by, and a user
erasing "airplane" may not think of "jet"; the erasure's templates name the phrase only, so such
words keep drawing the concept (the generality gap). Nor does a user erasing one name list the other
names the model knows, which an edit of the name's keys and values moves with it unless they are kept
(the specificity gap); a fixed list of famous names protects them only on a model that knows those
names. The model itself says which words are which:

* candidates: the vocabulary's whole words the text encoder reads nearest the phrase (its output at the
  word's position against the phrase's last token's, in "a photo of {}"; the whole vocabulary encoded once
  per text encoder and kept beside its general prior), and those nearest the phrase's tokens in the
  encoder's own token-embedding table, ``CANDIDATES`` of each (`candidate_words`). A word trained on the
  same images as the phrase reads like it; so do other names and other objects, which the next step tells
  apart;
* the test: what each word adds to the unconditional prediction, its guidance direction
  ``eps(x_t, template(word)) - eps(x_t, "")`` on seeded noise at four timesteps (a blank image noised,
  so the direction is the prompt's alone), against the phrase's. A word the model draws as the concept
  points the same way: cosine >= ``THRESHOLD``, a synonym; the ``NEARBY`` nearest in the token table of
  the others are what the model draws near the concept but not as it: on the identity world mostly other people's
  names and nicknames, on SD other people, related objects, near-miss words.

``THRESHOLD`` was set on the shape world (benchmarks/RESULTS.md, "The model's own synonyms"), never on
the identity world: there, distinct shapes' directions reach at most 0.93 (heart / diamond), the world's
synonyms score 1.00, and the toy model's untrained words scoring 0.94-0.98 with a shape drew it (its
judge, ten images of ten for those checked; of all the words the search takes for square and heart, 91%
of the images). ``CANDIDATES``, ``NEARBY`` and ``TIMESTEPS`` were chosen before any measurement; the
encoder's ranking was added to the table's from measurements on both worlds (benchmarks/RESULTS.md, "The
text encoder's reading as candidates"); keeping the nearby words (instead of the celebrity type's
shared-name list) was chosen from measurements on the identity world (benchmarks/RESULTS.md, "The model's
nearby words kept"). Only types with a fixed list
keep them: the shape world's `toy` type keeps nothing of its own kind, and there the nearby words are
untrained ones that draw a shape all the same (its judge: "edward", cosine 0.69 with square, draws
squares; "mps", 0.92 with circle, circles), so keeping them held circle back (CFR Acc_e 5 -> 35).

The synonyms are erased with the phrase by stage 1 (`Concept.found_synonyms`: the same templates, the
same anchor), the nearby words kept with the type's fixed list (`Concept.found_neighbours`,
`ConceptType.protection_of`; a retain list replaces both, ``protection`` "none" drops both); both are
logged and recorded in the output's metadata. The setting ``synonyms`` "none" turns the search off. The
synonyms a user lists (`Concept.synonyms`) stay what evaluation tests.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Callable, Collection, NamedTuple

import torch

from ..errors import InterruptedRun
from ..model.backend import Backend
from .concepts import Concept, ErasureSpec, get_type
from .prior import default_prior_dir, float32_text

THRESHOLD = 0.95
CANDIDATES = 24  # from each ranking (`candidate_words`)
NEARBY = 16  # of the candidates not taken, the nearest kept by the default protection
TIMESTEPS = (900, 700, 500, 300)
MAX_SIDE = 32  # latent pixels: the comparison needs each prompt's direction, not a full-size image
PROGRESS_LABEL = "finding the model's own words for each concept"
# the vocabulary's encodings, computed once per text encoder and kept beside its general prior
RANK_TEMPLATE = "a photo of {}"
WORDS_VERSION = "1"
WORDS_LABEL = "the model's vocabulary (first use of this text encoder)"
WORDS_BATCH = {"cpu": 256, "cuda": 2048}  # prompts a batch: an interrupt acts within seconds on a CPU
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


def whole_words(tokenize: Callable[[str], list[int]] | None = None) -> list[int]:
    """Ids of the vocabulary's whole alphabetic words, by id; with ``tokenize`` (prompt -> ids with start and
    end) only those that read back as their one token, so that "a photo of {word}" holds the token ranked."""
    vocab = vocabulary()
    ids = [i for i, t in enumerate(vocab) if t.endswith("</w>") and t[:-4].isascii() and t[:-4].isalpha()]
    return ids if tokenize is None else [i for i in ids if tokenize(vocab[i][:-4])[1:-1] == [i]]


class Vocabulary(NamedTuple):
    """The model's whole words (`whole_words`) as its text encoder reads them: ``ids`` [V] int64 and
    ``encodings`` [V, D] float32, unit rows: each word's output at its own position in ``RANK_TEMPLATE``
    (not float16: its rounding reorders near ties, and two hosts whose encoders differ in the last bits then
    pick different candidates; 100 MB for SD 1.x, 270 MB for SDXL)."""

    ids: torch.Tensor
    encodings: torch.Tensor


def _word_position(backend: Backend, phrase: str) -> int:
    """Index of ``phrase``'s last token in ``RANK_TEMPLATE`` (the start token counted)."""
    return min(len(backend.tokenize(RANK_TEMPLATE.format(phrase))), 77) - 2


def vocabulary_path(backend: Backend, folder: str | Path | None = None) -> Path:
    """The cache file of ``backend``'s text encoder's `Vocabulary` in ``folder`` (default `prior.default_prior_dir`)."""
    key = hashlib.sha256(f"{backend.text_encoder_key()}|words|{WORDS_VERSION}|{RANK_TEMPLATE}".encode())
    return Path(folder if folder is not None else default_prior_dir()) / f"words-{key.hexdigest()[:24]}.safetensors"


def vocabulary_cost(backend: Backend, folder: str | Path | None = None) -> tuple[int, float]:
    """(words, seconds) `vocabulary_encodings` still has to encode (0 when kept): all whole words (the read-back
    check comes later: an upper bound), timed on one batch encoded as it encodes them (a smaller one would
    time the overhead on a small model, not the encoder)."""
    if vocabulary_path(backend, folder).is_file():
        return 0, 0.0
    ids, length = whole_words(), _word_position(backend, "word") + 1
    batch = WORDS_BATCH.get(backend.device.type, WORDS_BATCH["cpu"])
    vocab = vocabulary()
    with float32_text(backend):
        backend.encode([RANK_TEMPLATE.format("word")], length)  # warm-up (a cast, first call)
        t0 = time.perf_counter()
        # the words themselves, not one repeated: tokenizing is much of the cost on a small model, and
        # tokenizers cache what they have seen
        backend.encode([RANK_TEMPLATE.format(vocab[i][:-4]) for i in ids[-batch:]], length)
    return len(ids), (time.perf_counter() - t0) * -(-len(ids) // batch)


def vocabulary_encodings(backend: Backend, folder: str | Path | None = None,
                         progress: Callable[[str, int, int], None] | None = None,
                         stop: Callable[[], bool] | None = None) -> Vocabulary:
    """`Vocabulary` of ``backend``'s text encoder: read from ``folder`` (default `prior.default_prior_dir`, where
    the general priors are kept), else computed (first use of a text encoder: each word in ``RANK_TEMPLATE``,
    encoded up to its own position only) and kept there; ``progress(WORDS_LABEL, done, total)`` per batch,
    ``stop()`` true between batches raises `InterruptedRun` (nothing written)."""
    from safetensors.torch import load_file

    from ..files import save_tensors

    path = vocabulary_path(backend, folder)
    if path.is_file():
        try:
            t = load_file(str(path))
            return Vocabulary(t["ids"], t["encodings"])
        except Exception:  # a damaged cache entry is recomputed, never trusted
            path.unlink(missing_ok=True)
    vocab = vocabulary()
    ids = whole_words(backend.tokenize)
    length = _word_position(backend, "word") + 1
    batch = WORDS_BATCH.get(backend.device.type, WORDS_BATCH["cpu"])
    rows = []
    with float32_text(backend):
        for s in range(0, len(ids), batch):
            if progress is not None:
                progress(WORDS_LABEL, s, len(ids))
            if stop is not None and stop():
                raise InterruptedRun(f"stopped while encoding the model's vocabulary ({s}/{len(ids)}); "
                                     "nothing was kept")
            text = backend.encode([RANK_TEMPLATE.format(vocab[i][:-4]) for i in ids[s:s + batch]], length)
            rows.append(torch.nn.functional.normalize(text.context[:, length - 1].float(), dim=1).cpu())
    out = Vocabulary(torch.tensor(ids, dtype=torch.long), torch.cat(rows))
    save_tensors(path, out._asdict(), {"template": RANK_TEMPLATE, "version": WORDS_VERSION}, checked=True,
                 what="the vocabulary cache")
    return out


def phrase_encoding(backend: Backend, phrase: str) -> torch.Tensor:
    """[D] float32: the text encoder's output at ``phrase``'s last token in ``RANK_TEMPLATE`` (a causal
    encoder's summary of the whole phrase there, as `vocabulary_encodings` takes each word's)."""
    pos = _word_position(backend, phrase)
    with float32_text(backend):
        return backend.encode([RANK_TEMPLATE.format(phrase)], pos + 1).context[0, pos].float().cpu()


class Candidates(NamedTuple):
    """A phrase's candidate words, each list nearest first: ``read``, those the text encoder reads nearest it;
    ``near``, those nearest its tokens in the token-embedding table (both may hold a word)."""

    read: list[str]
    near: list[str]

    def all(self) -> list[str]:
        """Every candidate once, ``read`` first."""
        return [*self.read, *(w for w in self.near if w not in self.read)]


def candidate_words(words: Vocabulary, query: torch.Tensor, table: torch.Tensor, phrase_ids: Collection[int],
                    n: int = CANDIDATES, exclude: Collection[str] = ()) -> Candidates:
    """The ``n`` words of ``words`` whose encodings are nearest ``query`` (`phrase_encoding`), and the ``n``
    nearest the phrase's tokens in the token-embedding ``table`` [V', D'] (cosine, the nearest of
    ``phrase_ids``: the phrase's token ids without start and end). Words in ``exclude`` (casefolded) and the
    phrase's own tokens are left out.

    Both, because each finds synonyms the other misses: the encoder's reading puts a nickname learnt from the
    same images next to the name (identity world: first for 7 of its 8 one-token nicknames, sixth for the
    eighth, where the table ranks them 2nd to 32nd and one 1840th); the table puts near a shape's name
    untrained tokens that draw it all the same (shape world, circle's CFR-only H_o: the table alone 96.7, the
    encoder alone 95.6, both 97.4)."""
    vocab = vocabulary()
    unit = torch.nn.functional.normalize(table.detach().float(), dim=1)
    near = (unit[words.ids] @ unit[list(phrase_ids)].T).max(dim=1).values  # [V]
    read = words.encodings @ torch.nn.functional.normalize(query.float(), dim=0)  # [V]
    skip = {w.casefold() for w in exclude}

    def nearest(scores: torch.Tensor) -> list[str]:
        out: list[str] = []
        for j in scores.argsort(descending=True).tolist():
            i = int(words.ids[j])
            if i not in phrase_ids and vocab[i][:-4] not in skip:
                out.append(vocab[i][:-4])
                if len(out) == n:
                    break
        return out

    return Candidates(nearest(read), nearest(near))


def search_calls() -> int:
    """UNet calls of one concept's search, in batch-of-one units (its candidates at most, the phrase, the empty
    prompt; each also one text encoding). Counted at the model's resolution, they overstate a search that draws
    smaller latents (`MAX_SIDE`): the estimate errs long, by seconds on a GPU."""
    return (2 * CANDIDATES + 2) * len(TIMESTEPS)


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
    """What `find_words` found for a phrase: the words the model draws as it, and its nearby words."""

    synonyms: tuple[str, ...]
    neighbours: tuple[str, ...]


def find_words(backend: Backend, phrase: str, template: str, words: Vocabulary, exclude: Collection[str] = (),
               seed: int = 0, stop: Callable[[], bool] | None = None) -> Found:
    """The words ``backend``'s model draws as ``phrase``: candidates (`candidate_words` of ``words``, the
    model's `vocabulary_encodings`, less ``exclude``) whose guidance direction in ``template`` ("a photo of
    {}") has cosine >= ``THRESHOLD`` with the phrase's, in `Candidates.all`'s order; and the ``NEARBY``
    nearest of the token table's others. Needs a backend with ``text_token_embeddings()``.

    The nearby words come from the table alone: those the encoder reads next to a name are, on the identity
    world, the nicknames of other people that read like it, and keeping them held the name's own unfound
    nickname back (one name at a time: nicknames 0.0 -> 33.3, the other names 75.1 -> 73.3; RESULTS)."""
    table = backend.text_token_embeddings()[0].weight
    ids = backend.tokenize(phrase)[1:-1]
    cands = candidate_words(words, phrase_encoding(backend, phrase), table, ids, exclude=exclude)
    listed = cands.all()
    if not listed:
        return Found((), ())
    dirs = guidance_directions(backend, [template.replace("{}", w) for w in [phrase, *listed]], seed, stop)
    cos = torch.nn.functional.cosine_similarity(dirs[1:], dirs[:1]).tolist()
    taken = [w for w, c in zip(listed, cos) if c >= THRESHOLD]
    return Found(tuple(taken), tuple(w for w in cands.near if w not in taken)[:NEARBY])


def searched(spec: ErasureSpec, concept: Concept) -> bool:
    """Whether `with_model_words` searches for ``concept``'s words (setting ``synonyms`` "model")."""
    return spec.settings_for(concept).synonyms == "model"


def with_model_words(backend: Backend, spec: ErasureSpec, skip: Collection[str] = (),
                     progress: Callable[[str, int, int], None] | None = None,
                     stop: Callable[[], bool] | None = None, folder: str | Path | None = None) -> ErasureSpec:
    """``spec`` with each concept's `find_words` as its ``found_synonyms`` and ``found_neighbours`` (those only
    for a type with a fixed list to keep); concepts in ``skip`` (e.g. those a project already holds) and
    those `searched` leaves out are left as they are. Another concept's phrase or word and a retain entry is
    neither: the user's lists win. ``progress(label, done, total)`` hears of each concept searched; ``stop()``:
    see `guidance_directions`; ``folder``: where the vocabulary's encodings are kept (`vocabulary_encodings`)."""
    todo = {c.phrase for c in spec.concepts if c.phrase not in skip and searched(spec, c)}
    if not todo:
        return spec
    words = vocabulary_encodings(backend, folder, progress, stop)
    taken = [*(w for c in spec.concepts for w in (c.phrase, *c.phrase.split())), *spec.retain]
    concepts = []
    for c in spec.concepts:
        if c.phrase in todo:
            if progress is not None:
                progress(PROGRESS_LABEL, len(concepts), len(spec.concepts))
            found = find_words(backend, c.phrase, get_type(c.type).train_prompt, words, taken, stop=stop)
            nearby = found.neighbours if get_type(c.type).keeps_nearby_words else ()
            c = replace(c, found_synonyms=found.synonyms, found_neighbours=nearby)
            log.info("the model's own synonyms of %r, erased with it: %s; its nearby words, kept by the default "
                     "protection: %s", c.phrase, ", ".join(found.synonyms) or "none", ", ".join(nearby) or "none")
        concepts.append(c)
    return replace(spec, concepts=tuple(concepts))
