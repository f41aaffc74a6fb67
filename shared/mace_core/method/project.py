"""The erasure project: a run's work directory, from which any subset of concepts re-fuses.

    manifest.json                 base model hash and family, retain list, overrides, concepts
    priors.safetensors            per-token general and retain-list Gram matrices [D, D]
    concepts/<slug>/stats.safetensors   stage-1 sums (cross, gram) and the fusion Gram
    concepts/<slug>/lora.safetensors    the concept's LoRA (written as soon as it is trained)
    concepts/<slug>/images/, masks/     its training data, paired by file name
    concepts/<slug>/latents.safetensors the same images as latents (robust hardening reads them)

Every file is written atomically; a concept counts as done only once its LoRA file exists and
its recorded settings hash matches, so an interrupted run resumes where it stopped. Every file is
checked when read: a damaged statistics, LoRA or priors file is named and recomputed on resume
(`Project.damaged` lists them for commands that cannot recompute, such as re-fusing); a damaged
manifest is named. A run holds ``.lock`` (an advisory lock) so two runs on one project cannot
interleave. The training
data is a cache: `Project.delete_generated_images` removes it once a project is done, and
re-fusing, restoring and adding concepts work without it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Iterable, Mapping

import torch

from .. import __version__
from .concepts import Concept, ErasureSpec, make_concept, stage1_key
from ..errors import MaceError
from ..files import save_tensors, write_text
from .refine import ConceptStats
from .train import LoRA

FORMAT = 1
log = logging.getLogger("mace.project")


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """A project file, written by the project itself (atomic, ordinary mode)."""
    save_tensors(path, tensors, metadata, checked=True, what="the erasure project")


class DamagedFile(MaceError):
    """A project file that cannot be read (truncated, empty, not safetensors, missing metadata)."""


def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a project file, or `DamagedFile` naming it."""
    from ..model.checkpoint import load_tensors

    try:
        return load_tensors(path)
    except MaceError as e:
        raise DamagedFile(f"damaged project file {path}: {e}") from None


def _metadata(path: Path) -> dict[str, str] | None:
    """A saved file's metadata without its tensors (None when there is no file): what resuming needs
    to know of a concept's LoRA and statistics, cheap for thousands of concepts."""
    from ..model.checkpoint import read_metadata

    if not path.is_file():
        return None
    try:
        return read_metadata(path)
    except MaceError as e:
        raise DamagedFile(f"damaged project file {path}: {e}") from None


def _recomputed(read):
    """``read`` of a recomputable project file, where a damaged file counts as absent (logged: the
    run recomputes it and replaces the file)."""
    def wrapper(*args, **kw):
        try:
            return read(*args, **kw)
        except DamagedFile as e:
            log.warning("%s; recomputing it", e)
            return None
    return wrapper


#: locks this process holds, by project folder (released when the process ends)
_LOCKS: dict[Path, object] = {}


class Project:
    """An erasure project folder (see module docstring)."""

    def __init__(self, root: str | Path, base_file: str | Path | None = None):
        """``base_file``: the base model's file, recorded (absolute) by `open` so that re-fusing and
        adding work from any folder."""
        self.root = Path(root)
        self.base_file = Path(base_file).resolve() if base_file else None

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def manifest(self) -> dict:
        if not self.exists():
            raise MaceError(f"{self.root} is not an erasure project (no manifest.json)")
        try:
            m = json.loads(self.manifest_path.read_bytes().decode("utf-8"))
            _check_manifest(m)
        except (ValueError, TypeError, KeyError) as e:
            raise MaceError(f"damaged project file {self.manifest_path} ({type(e).__name__}: {e}); it records the "
                            "project's concepts and cannot be recomputed: restore it from a backup, or erase again "
                            "with a new --work-dir") from None
        return m

    def write_manifest(self, data: dict) -> None:
        write_text(self.manifest_path, json.dumps(data, indent=1, sort_keys=True), checked=True,
                   what="the erasure project")

    def check_base(self, base_sha256: str, base_path: str) -> None:
        """Refuse (`MaceError`) a project made from another model than ``base_sha256``."""
        if self.exists():
            m = self.manifest()
            if m["base"]["sha256"] != base_sha256:
                raise MaceError(f"{self.root} was made from another model (sha256 {m['base']['sha256'][:12]}...), "
                                f"not {base_path}; use another --work-dir")

    def open(self, base_sha256: str, base_path: str, family: str, spec: ErasureSpec) -> dict:
        """Create the project, or check it belongs to this base model and merge ``spec`` into it."""
        self.lock()
        self.check_base(base_sha256, base_path)
        if self.exists():
            m = self.manifest()
        else:
            m = {"format": FORMAT, "tool": f"mace {__version__}",
                 "base": {"sha256": base_sha256, "path": str(base_path), "family": family},
                 "concepts": [], "retain": [], "overrides": {}}
        if self.base_file is not None:
            m = {**m, "base": {**m["base"], "file": str(self.base_file)}}
        m = _merge(m, spec)
        self.write_manifest(m)
        return m

    def lock(self) -> None:
        """Hold the project's ``.lock`` until this process ends, or refuse when another process holds
        it (two runs on one project would train the same concepts and interleave their files)."""
        root = self.root.resolve()
        if root in _LOCKS:
            return
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks here
            return
        self.root.mkdir(parents=True, exist_ok=True)
        f = open(root / ".lock", "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise MaceError(f"another run is using the erasure project {self.root} (it holds {root / '.lock'}); wait "
                            "for it to finish, or use another --work-dir") from None
        _LOCKS[root] = f

    def unlock(self) -> None:
        """Release the lock `lock` took (a long-lived host process, once its run is done)."""
        f = _LOCKS.pop(self.root.resolve(), None)
        if f is not None:
            f.close()

    def damaged(self) -> list[str]:
        """'path: why' of every project file that cannot be read (what re-fusing would need)."""
        files = [self.root / "priors.safetensors"]
        for c in _spec_of(self.manifest()).concepts:
            files += [self.concept_dir(c) / "stats.safetensors", self.concept_dir(c) / "lora.safetensors"]
        out = []
        for f in files:
            try:
                if f.is_file():
                    _load(f)
            except DamagedFile as e:
                out.append(str(e))
        return out

    def merged(self, spec: ErasureSpec) -> ErasureSpec:
        """What `erase` runs for ``spec`` on this project, without writing anything: the project's
        concepts (earlier ones stay erased) with ``spec``'s new ones, retain lists and overrides merged."""
        if not self.exists():
            return spec
        return _spec_of(_merge(self.manifest(), spec))

    def spec(self, only: Iterable[str] | None = None, exclude: Iterable[str] = ()) -> ErasureSpec:
        """The project's request restricted to a subset of its concepts."""
        full = _spec_of(self.manifest())
        concepts = list(full.concepts)
        names = {c.phrase for c in concepts}
        for n in list(only or []) + list(exclude):
            if n not in names:
                raise MaceError(f"{n!r} is not a concept of this project; it has: {', '.join(sorted(names))}")
        if only is not None:
            only = set(only)
            concepts = [c for c in concepts if c.phrase in only]
        concepts = [c for c in concepts if c.phrase not in set(exclude)]
        return ErasureSpec(tuple(concepts), full.retain, full.overrides)

    # --- per-concept artifacts ------------------------------------------------------------

    def concept_dir(self, c: Concept) -> Path:
        return self.root / "concepts" / c.slug

    def save_stats(self, c: Concept, st: ConceptStats) -> None:
        _save(st.tensors(), self.concept_dir(c) / "stats.safetensors",
              {"pairs": str(st.pairs), "phrase": c.phrase, "hardened": str(st.hardened),
               "stage1": stage1_key(c)})

    @_recomputed
    def load_stats(self, c: Concept) -> ConceptStats | None:
        """The concept's stage-1 sums, or None where absent or made from other templates or anchors (an
        older mace)."""
        p = self.concept_dir(c) / "stats.safetensors"
        if not p.is_file():
            return None
        t, meta = _load(p)
        if meta.get("stage1") != stage1_key(c):
            log.info("%s was made with other templates or anchors; recomputing it", p)
            return None
        try:
            return ConceptStats(pairs=int(meta["pairs"]), hardened=int(meta.get("hardened", 0)), **t)
        except (KeyError, TypeError, ValueError) as e:
            raise DamagedFile(f"damaged project file {p}: not stage-1 statistics ({e!r})") from None

    def save_attack(self, c: Concept, round_: int, soft: torch.Tensor, template: str) -> None:
        """The soft tokens hardening round ``round_`` found against the model erased so far (for
        auditing and red-teaming: `attacks.with_soft_tokens` on ``soft_prompt(template, n)``)."""
        _save({"soft": soft.float().cpu()}, self.concept_dir(c) / "attacks" / f"round{round_}.safetensors",
              {"template": template, "round": str(round_)})

    def load_attacks(self, c: Concept) -> list[tuple[torch.Tensor, str]]:
        """(soft tokens, template) of every hardening round so far, in round order."""
        folder = self.concept_dir(c) / "attacks"
        files = sorted(folder.glob("round*.safetensors"), key=lambda f: int(f.stem[5:])) if folder.is_dir() else []
        return [(t["soft"], m["template"]) for t, m in map(_load, files)]

    def save_latents(self, c: Concept, latents: torch.Tensor) -> None:
        _save({"latents": latents.float()}, self.concept_dir(c) / "latents.safetensors")

    def load_latents(self, c: Concept) -> torch.Tensor:
        p = self.concept_dir(c) / "latents.safetensors"
        if not p.is_file():
            raise MaceError(f"the training images of {c.phrase!r} were deleted from {self.root}; hardening more "
                            "rounds needs them: erase the concept again in a new project")
        return _load(p)[0]["latents"]

    def delete_generated_images(self) -> tuple[int, int]:
        """Remove every concept's drawn training data (images/, masks/, latents), which may show what
        was erased; keeps what re-fusing, restoring and adding need (manifest, priors, per-concept
        stats and LoRAs). Returns (files removed, bytes freed)."""
        files = size = 0
        for d in sorted((self.root / "concepts").glob("*")):
            for p in (d / "images", d / "masks", d / "latents.safetensors"):
                if p.is_dir():
                    found = [f for f in p.rglob("*") if f.is_file()]
                elif p.is_file():
                    found = [p]
                else:
                    continue
                files += len(found)
                size += sum(f.stat().st_size for f in found)
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        return files, size

    def save_lora(self, c: Concept, lora: LoRA, settings_hash: str, losses: list[float]) -> None:
        _save(lora.state_dict(), self.concept_dir(c) / "lora.safetensors",
              {"alpha": str(lora.alpha), "settings_hash": settings_hash, "phrase": c.phrase,
               "losses": json.dumps([round(x, 6) for x in losses])})

    def has_lora(self, c: Concept, settings_hash: str) -> bool:
        """Whether the concept's LoRA was trained with these stage-2 settings (read from its metadata;
        a damaged file has none: it is retrained)."""
        meta = _recomputed(_metadata)(self.concept_dir(c) / "lora.safetensors")
        return meta is not None and meta.get("settings_hash") == settings_hash

    def hardened(self, c: Concept) -> int | None:
        """Adversarial rounds already in the concept's statistics; None when it has none yet (or its
        file is damaged: it is recomputed)."""
        meta = _recomputed(_metadata)(self.concept_dir(c) / "stats.safetensors")
        return None if meta is None else int(meta.get("hardened", 0))

    @_recomputed
    def load_lora(self, c: Concept, settings_hash: str | None = None) -> LoRA | None:
        p = self.concept_dir(c) / "lora.safetensors"
        if not p.is_file():
            return None
        t, meta = _load(p)
        if settings_hash is not None and meta.get("settings_hash") != settings_hash:
            return None
        try:
            return LoRA.from_state_dict(t, float(meta["alpha"]))
        except (KeyError, TypeError, ValueError) as e:
            raise DamagedFile(f"damaged project file {p}: not a LoRA ({e!r})") from None

    def lora_losses(self, c: Concept) -> list[float]:
        p = self.concept_dir(c) / "lora.safetensors"
        return json.loads(_load(p)[1].get("losses", "[]")) if p.is_file() else []

    def save_priors(self, priors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        _save(priors, self.root / "priors.safetensors", metadata)

    def load_priors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The stored priors (none when absent or damaged: a run recomputes them)."""
        p = self.root / "priors.safetensors"
        return (_recomputed(_load)(p) if p.is_file() else None) or ({}, {})


def weights_id(weights: Mapping[str, torch.Tensor]) -> str:
    """Identity of a model's editable weights (`mace_core.method.erase.editable_weights`, by file key): the
    sha256 of their names, shapes and fp32 values. A project made from a model that is not a file as it
    is (in ComfyUI: a MODEL patched before the MACE nodes, e.g. by a LoRA) records it as its base
    (``base.weights_id``, then also ``base.sha256``); `mace fuse / add --model FILE` accept a file whose
    editable weights have this id. Names are hashed without the file's ``model.`` prefix (as ComfyUI
    names them), so the ids projects already record stay valid."""
    h = hashlib.sha256(b"mace-comfy-weights-v1")
    for k in sorted(weights, key=lambda k: k.removeprefix("model.")):
        w = weights[k].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{k.removeprefix('model.')}|{tuple(w.shape)}".encode())
        h.update(w.numpy().tobytes())
    return h.hexdigest()


def _merge(m: dict, spec: ErasureSpec) -> dict:
    """Manifest ``m`` with ``spec`` merged in: new concepts appended, retain lists united, overrides updated."""
    m = {**m, "concepts": list(m["concepts"])}
    known = {c["phrase"] for c in m["concepts"]}
    m["concepts"] += [c.to_dict() for c in spec.concepts if c.phrase not in known]
    m["retain"] = sorted(set(m["retain"]) | set(spec.retain))
    m["overrides"] = {**m["overrides"], **dict(spec.overrides)}
    return m


def _check_manifest(m) -> None:
    """Raise TypeError/KeyError when ``m`` is not a manifest's structure."""
    if not isinstance(m, dict):
        raise TypeError("not a JSON object")
    base = m["base"]
    if not (isinstance(base, dict) and isinstance(base["sha256"], str) and isinstance(base["path"], str)):
        raise TypeError("'base' must record the model's sha256 and path")
    if not (isinstance(m["concepts"], list) and all(isinstance(c, dict) and all(isinstance(c[k], str) for k in
                                                                                ("phrase", "anchor", "type"))
                                                    for c in m["concepts"])):
        raise TypeError("'concepts' must be a list of concepts with phrase, anchor and type")
    if not isinstance(m["retain"], list) or not isinstance(m["overrides"], dict):
        raise TypeError("'retain' must be a list and 'overrides' a mapping")


def _spec_of(m: dict) -> ErasureSpec:
    concepts = tuple(make_concept(c["phrase"], c["anchor"], c["type"], c.get("prompts", ()), c.get("synonyms", ()),
                                  c.get("found_synonyms", ()), c.get("found_neighbours", ())) for c in m["concepts"])
    return ErasureSpec(concepts, tuple(m["retain"]), m["overrides"])
