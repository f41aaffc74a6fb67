"""The erasure project: a run's work directory, from which any subset of concepts re-fuses.

    manifest.json                 base model hash and family, retain list, overrides, concepts
    priors.safetensors            per-token general and retain-list Gram matrices [D, D]
    concepts/<slug>/stats.safetensors   stage-1 sums (cross, gram) and the fusion Gram
    concepts/<slug>/lora.safetensors    the concept's LoRA (written as soon as it is trained)
    concepts/<slug>/images/, masks/     its training data, paired by file name
    concepts/<slug>/latents.safetensors the same images as latents (robust hardening reads them)

Every file is written atomically; a concept counts as done only once its LoRA file exists and
its recorded settings hash matches, so an interrupted run resumes where it stopped. The training
data is a cache: `Project.delete_generated_images` removes it once a project is done, and
re-fusing, restoring and adding concepts work without it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Mapping

import torch

from . import __version__
from .concepts import Concept, ErasureSpec, make_concept
from .errors import MaceError
from .refine import ConceptStats
from .train import LoRA

FORMAT = 1


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def _metadata(path: Path) -> dict[str, str] | None:
    """A saved file's metadata without its tensors (None when there is no file): what resuming needs
    to know of a concept's LoRA and statistics, cheap for thousands of concepts."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


class Project:
    """An erasure project folder (see module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def manifest(self) -> dict:
        if not self.exists():
            raise MaceError(f"{self.root} is not an erasure project (no manifest.json)")
        return json.loads(self.manifest_path.read_text())

    def write_manifest(self, data: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.manifest_path.with_name(f".manifest.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, self.manifest_path)

    def open(self, base_sha256: str, base_path: str, family: str, spec: ErasureSpec) -> dict:
        """Create the project, or check it belongs to this base model and merge ``spec`` into it."""
        if self.exists():
            m = self.manifest()
            if m["base"]["sha256"] != base_sha256:
                raise MaceError(f"{self.root} was made from another model (sha256 {m['base']['sha256'][:12]}...), "
                                f"not {base_path}; use another --work-dir")
        else:
            m = {"format": FORMAT, "tool": f"mace {__version__}",
                 "base": {"sha256": base_sha256, "path": str(base_path), "family": family},
                 "concepts": [], "retain": [], "overrides": {}}
        m = _merge(m, spec)
        self.write_manifest(m)
        return m

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
              {"pairs": str(st.pairs), "phrase": c.phrase, "hardened": str(st.hardened)})

    def load_stats(self, c: Concept) -> ConceptStats | None:
        p = self.concept_dir(c) / "stats.safetensors"
        if not p.is_file():
            return None
        t, meta = _load(p)
        return ConceptStats(pairs=int(meta["pairs"]), hardened=int(meta.get("hardened", 0)), **t)

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
        """Whether the concept's LoRA was trained with these stage-2 settings (read from its metadata)."""
        meta = _metadata(self.concept_dir(c) / "lora.safetensors")
        return meta is not None and meta.get("settings_hash") == settings_hash

    def hardened(self, c: Concept) -> int | None:
        """Adversarial rounds already in the concept's statistics; None when it has none yet."""
        meta = _metadata(self.concept_dir(c) / "stats.safetensors")
        return None if meta is None else int(meta.get("hardened", 0))

    def load_lora(self, c: Concept, settings_hash: str | None = None) -> LoRA | None:
        p = self.concept_dir(c) / "lora.safetensors"
        if not p.is_file():
            return None
        t, meta = _load(p)
        if settings_hash is not None and meta.get("settings_hash") != settings_hash:
            return None
        return LoRA.from_state_dict(t, float(meta["alpha"]))

    def lora_losses(self, c: Concept) -> list[float]:
        p = self.concept_dir(c) / "lora.safetensors"
        return json.loads(_load(p)[1].get("losses", "[]")) if p.is_file() else []

    def save_priors(self, priors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        _save(priors, self.root / "priors.safetensors", metadata)

    def load_priors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        p = self.root / "priors.safetensors"
        return _load(p) if p.is_file() else ({}, {})


def weights_id(weights: Mapping[str, torch.Tensor]) -> str:
    """Identity of a model's editable weights (`mace_core.erase.editable_weights`, by file key): the
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


def _spec_of(m: dict) -> ErasureSpec:
    concepts = tuple(make_concept(c["phrase"], c["anchor"], c["type"], c.get("prompts", ()), c.get("synonyms", ()))
                     for c in m["concepts"])
    return ErasureSpec(concepts, tuple(m["retain"]), m["overrides"])
