"""The model's own synonyms of a concept: the words of its vocabulary that it draws as the concept.

A user erasing "Bill Marlow" does not list the nickname the model also learnt him by, and a user
erasing "airplane" may not think of "jet"; the erasure's templates name the phrase only, so such
words keep drawing the concept (the generality gap). The model itself says which words mean the
same to it:

* candidates: the vocabulary's whole words nearest the phrase's tokens in the text encoder's own
  token-embedding table (cosine, the nearest of the phrase's tokens), ``CANDIDATES`` of them. A word
  trained on the same images as the phrase sits near it; so do other names and other objects, which
  the next step tells apart;
* the test: what each word adds to the unconditional prediction, its guidance direction
  ``eps(x_t, template(word)) - eps(x_t, "")`` on seeded noise at four timesteps (a blank image noised,
  so the direction is the prompt's alone), against the phrase's. A word the model draws as the concept
  points the same way: cosine >= ``THRESHOLD``.

``THRESHOLD`` was set on the shape world (benchmarks/RESULTS.md, "The model's own synonyms"), never on
the identity world: there, distinct shapes' directions reach at most 0.93 (heart / diamond), the world's
synonyms score 1.00, and the toy model's untrained words scoring 0.94-0.98 with a shape drew it (its
judge, ten images of ten for those checked; of all the words the search takes for square and heart, 91%
of the images). ``CANDIDATES`` and ``TIMESTEPS`` were chosen before any measurement.

The words found are erased with the phrase by stage 1 (`Concept.found_synonyms`: the same templates,
the same anchor) and named in the log and the output's metadata; the setting ``synonyms`` "none" turns
the search off. The synonyms a user lists (`Concept.synonyms`) stay what evaluation tests.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from functools import lru_cache
from typing import Callable, Collection

import torch

from ..errors import InterruptedRun
from ..model.backend import Backend
from .concepts import ErasureSpec, get_type

THRESHOLD = 0.95
CANDIDATES = 24
TIMESTEPS = (900, 700, 500, 300)
MAX_SIDE = 32  # latent pixels: the comparison needs each prompt's direction, not a full-size image
PROGRESS_LABEL = "finding the model's own synonyms"
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
            raise InterruptedRun("stopped while finding the model's own synonyms; rerun to resume")
        return backend.predict(x, t, backend.encode([prompt] * len(TIMESTEPS))).float().flatten().cpu()

    uncond = predict("")
    return torch.stack([predict(p) - uncond for p in prompts])


def find_synonyms(backend: Backend, phrase: str, template: str, exclude: Collection[str] = (),
                  seed: int = 0, stop: Callable[[], bool] | None = None) -> tuple[str, ...]:
    """The words ``backend``'s model draws as ``phrase``: candidates (`candidate_words`, less ``exclude``)
    whose guidance direction in ``template`` ("a photo of {}") has cosine >= ``THRESHOLD`` with the
    phrase's, nearest token first. Needs a backend with ``text_token_embeddings()``."""
    table = backend.text_token_embeddings()[0].weight
    ids = backend.tokenize(phrase)[1:-1]
    words = candidate_words(table, ids, backend.tokenize, exclude=exclude)
    if not words:
        return ()
    dirs = guidance_directions(backend, [template.replace("{}", w) for w in [phrase, *words]], seed, stop)
    cos = torch.nn.functional.cosine_similarity(dirs[1:], dirs[:1])
    return tuple(w for w, c in zip(words, cos.tolist()) if c >= THRESHOLD)


def with_model_synonyms(backend: Backend, spec: ErasureSpec, skip: Collection[str] = (),
                        progress: Callable[[str, int, int], None] | None = None,
                        stop: Callable[[], bool] | None = None) -> ErasureSpec:
    """``spec`` with each concept's `find_synonyms` as its ``found_synonyms`` (concepts in ``skip``, e.g. those
    a project already holds, and settings ``synonyms`` "none" are left as they are). A word that is another
    concept's phrase or on the retain list is not taken: the user's lists win. ``progress(label, done,
    total)`` hears of each concept searched; ``stop()``: see `guidance_directions`."""
    taken = [c.phrase for c in spec.concepts] + list(spec.retain)
    todo = {c.phrase for c in spec.concepts if c.phrase not in skip and spec.settings_for(c).synonyms == "model"}
    concepts = []
    for c in spec.concepts:
        if c.phrase in todo:
            if progress is not None:
                progress(PROGRESS_LABEL, len(concepts), len(spec.concepts))
            found = find_synonyms(backend, c.phrase, get_type(c.type).train_prompt, taken, stop=stop)
            c = replace(c, found_synonyms=found)
            log.info("the model's own synonyms of %r, erased with it: %s", c.phrase,
                     ", ".join(c.found_synonyms) or "none found")
        concepts.append(c)
    return replace(spec, concepts=tuple(concepts))
