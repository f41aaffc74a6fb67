"""What a front-end asks for: one `Request`, built the same way by the CLI, the A1111 tab and the nodes.

A front-end only translates its host's inputs into a `Request` (`build_spec` for the concepts and
settings, `project_folder` / `validate_project_name` for the project, `BaseModel` for the model's
identity) and `run.plan` resolves it once; nothing here touches a model.

Settings come from `concepts.Settings`' field metadata (`concepts.setting_infos`), so a front-end's
fields for them are generated, never listed: `parse_setting` reads a typed-in value (the tab's text
fields) with the setting's own range and label.

The base-identity rule (`base_matches`) decides whether a model is the one a project was made from,
for every front-end alike: the same file (sha256), the same editable weights (`project.weights_id`,
what a project made from a ComfyUI MODEL records), or, for a recorded base file the host can find,
weights equal to that file's up to the rounding of a lower-precision copy (a host holding the file in
fp16).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from ..method.concepts import (ErasureSpec, SettingInfo, check_setting, load_concept_file, load_preset,
                               make_concept, merge_specs, parse_lines)
from ..errors import MaceError

#: where a host finds a project's recorded base file by its recorded name (None: not found)
FindFile = Callable[[str], "Path | None"]


@dataclass(frozen=True)
class BaseModel:
    """A base model's identity as a project records it: ``sha256`` of the file (or, for a model that is
    no file, its weights id), the ``name`` recorded (a path or a host's checkpoint name), when the host
    knows them the ``weights_id`` of its editable weights and its ``file`` (recorded absolute, so that
    re-fusing works from any folder)."""

    sha256: str
    name: str
    weights_id: str | None = None
    file: Path | None = None


@dataclass(frozen=True)
class Request:
    """One erasure as a front-end asks for it.

    ``spec``: what to erase and keep and the settings overrides (`build_spec`); ``base``: the model's
    identity; ``project``: the erasure project folder; ``output``: the .safetensors file to write (None:
    the host keeps the weights itself, as ComfyUI's MODEL patches); ``overwrite``: replace an existing
    output; ``inputs``: files the output must never replace; ``closed_form_only``: stage 1 alone;
    ``delete_images``: delete the project's drawn training images when done; ``what``/``force_hint``:
    how the host names the output and the way to overwrite in messages, ``project_what`` the project
    folder; ``find_base``: how the host finds a recorded base file by name (for `base_matches`);
    ``prior_dir``: where general priors are kept (hosts: `prior_folder` of their projects folder; None:
    the CLI's cache, `prior.default_prior_dir`)."""

    spec: ErasureSpec
    base: BaseModel
    project: Path
    output: Path | None = None
    overwrite: bool = False
    inputs: tuple[Path, ...] = ()
    closed_form_only: bool = False
    delete_images: bool = False
    what: str = "--out"
    force_hint: str = "pass --force to replace it"
    project_what: str = "the project folder"
    find_base: FindFile | None = None
    prior_dir: Path | None = None

    def planned(self) -> ErasureSpec:
        """What the run will erase: the project's concepts with this request's merged in."""
        from ..method.project import Project

        return Project(self.project).merged(self.spec)

    def clip_skip(self) -> int:
        """The text-encoder layer of the run (the project's, updated by this request): what a backend must
        be built with before `run.plan`."""
        return self.planned().settings_for().clip_skip


# ---------------------------------------------------------------------------------------------
# Concepts and settings


def build_spec(*, preset: str | None = None, file: str | Path | None = None, lines: str = "",
               flags: Iterable[str] = (), default_type: str | None = None, anchor: str | None = None,
               retain: Iterable[str] = (), overrides: Mapping[str, Any] | None = None) -> ErasureSpec:
    """The request's concepts and settings, layered as every front-end layers them: a preset < a concept
    file (YAML / CSV / text, `concepts.load_concept_file`) < concept lines typed in a text box < one
    concept per command-line flag; retain lists concatenate, ``overrides`` (None values dropped) win.

    ``default_type`` is the type of lines and flags that name none (default: the preset's or file's
    first concept's, else object); ``anchor`` fills in the anchor of flags that give none."""
    spec = ErasureSpec(())
    if preset:
        spec = merge_specs(spec, load_preset(preset))
    if file:
        spec = merge_specs(spec, load_concept_file(Path(file), default_type or "object"))
    ctype = default_type or (spec.concepts[0].type if spec.concepts else "object")
    typed = parse_lines(lines or "", ctype)
    own = {k: v for k, v in (overrides or {}).items() if v is not None}
    return merge_specs(spec, ErasureSpec(tuple(typed) + tuple(_flag_concepts(flags, ctype, anchor)),
                                         tuple(r.strip() for r in retain if r and r.strip()), own))


def _flag_concepts(values: Iterable[str], ctype: str, anchor: str | None) -> list:
    """One concept per flag value ('phrase', 'phrase | anchor', 'phrase | anchor | type'); ``anchor``
    fills in the anchor of those that give none."""
    out = []
    for c in values:
        parsed = parse_lines(c, ctype, comments=False)  # '#' is text in a flag: 'C# logo', '#hashtag'
        if not parsed:
            raise MaceError(f"--concept {c!r}: a concept phrase is empty; give the phrase to erase")
        if len(parsed) != 1:
            raise MaceError(f"--concept {c!r}: give one concept per flag")
        one = parsed[0]
        out.append(make_concept(one.phrase, anchor, one.type) if anchor and "|" not in c else one)
    return out


def text_lines(text: str) -> list[str]:
    """The non-empty lines of a text box (a retain list, concept names) but ``#`` comment lines (a ``#``
    inside a line is text: 'C# logo')."""
    return [line.strip() for line in (text or "").splitlines() if line.strip() and not line.strip().startswith("#")]


def parse_setting(info: SettingInfo, text: str | None) -> Any:
    """A setting typed as text (empty: None, the concept type's default), checked against its range;
    errors name the setting by its label."""
    text = (text or "").strip()
    if not text:
        return None
    kind = info.kind
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            value: Any = text.lower() in ("true", "1", "yes")
        elif kind is int and "e" in text.lower():
            value = int(float(text))
        else:
            value = kind(text)
    except ValueError:
        raise MaceError(f"{info.label}: {text!r} is not a"
                        f"{'n integer' if kind is int else ' number' if kind is float else ' ' + kind.__name__}"
                        ) from None
    if isinstance(value, float) and not math.isfinite(value):
        raise MaceError(f"{info.label}: {text!r} is not a finite number")
    check_setting(info, value)
    return value


# ---------------------------------------------------------------------------------------------
# Names and the base model


_BAD_CHARS = re.compile(r'[\x00-\x1f<>:"|?*\\/]')
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}
MAX_NAME = 200


def plain_name(name: str, what: str) -> str:
    """``name`` stripped, checked to be a plain file name (no path, no characters a file system refuses,
    no leading dot, not a Windows device name), for a file or folder a host places in its own folder."""
    name = (name or "").strip()
    if not name:
        raise MaceError(f"give {'an' if what[:1] in 'aeiou' else 'a'} {what}")
    if "/" in name or "\\" in name or Path(name).is_absolute() or re.match(r"^[A-Za-z]:", name):
        raise MaceError(f"{what} {name!r} must be a plain name, not a path: it is saved in a fixed folder")
    if _BAD_CHARS.search(name):
        raise MaceError(f"{what} {name!r} contains a character that is not allowed in file names "
                        f"(control characters or any of <>:\"|?*)")
    if name.startswith("."):
        raise MaceError(f"{what} {name!r} cannot start with a dot")
    if name.rstrip(". ") != name:
        raise MaceError(f"{what} {name!r} cannot end with a dot or a space")
    if name.split(".")[0].lower() in _WINDOWS_RESERVED:
        raise MaceError(f"{what} {name!r} is a reserved device name on Windows; choose another")
    if len(name) > MAX_NAME:
        raise MaceError(f"{what} is too long ({len(name)} characters, at most {MAX_NAME})")
    return name


#: the folder beside a host's projects that keeps the general priors (``models/mace/prior``): no project's name
PRIOR_FOLDER = "prior"


def prior_folder(projects: Path) -> Path:
    """Where a host keeps general priors: ``prior`` in its projects folder (``models/mace/prior``), with the
    model files the user manages, not in a hidden cache."""
    return Path(projects) / PRIOR_FOLDER


def validate_project_name(name: str) -> str:
    """A project folder name under a host's projects folder (``models/mace/<name>``); ``prior`` is taken
    (`prior_folder`)."""
    name = plain_name(name, "project name")
    if name.lower() == PRIOR_FOLDER:
        raise MaceError(f"the project name {name!r} is taken by the folder of general priors; choose another name")
    return name


def base_matches(record: Mapping[str, Any], sha256: str | None, weights: Callable[[], Mapping[str, Any]],
                 find_file: FindFile | None = None) -> bool:
    """Whether a model is the base a project records (``manifest["base"]``): the same file (``sha256``),
    the same editable weights (``weights()``: file key -> tensor, by `project.weights_id`), or weights
    equal to the recorded base file's (found by ``find_file``) up to fp16 rounding."""
    from ..method.project import weights_id

    if sha256 is not None and sha256 == record.get("sha256"):
        return True
    ours = weights()
    if weights_id(ours) in (record.get("sha256"), record.get("weights_id")):
        return True
    path = (find_file or _existing)(str(record.get("path", "")))
    return path is not None and _same_weights(Path(path), ours)


def _existing(name: str) -> Path | None:
    return Path(name) if name and Path(name).is_file() else None


def _same_weights(path: Path, ours: Mapping[str, Any]) -> bool:
    """``ours`` (file key -> tensor) equal to ``path``'s tensors of the same names within fp16 rounding
    (a host may hold the file's fp32 weights in half precision)."""
    import torch
    from safetensors import safe_open

    if path.suffix != ".safetensors" or not ours:
        return False
    with safe_open(str(path), "pt") as f:
        names = set(f.keys())
        return all(k in names for k in ours) and all(
            torch.allclose(f.get_tensor(k).float(), ours[k].float().cpu(), rtol=1e-3, atol=1e-4) for k in ours)


def check_base(project, sha256: str | None, weights: Callable[[], Mapping[str, Any]], name: str,
               find_file: FindFile | None = None) -> BaseModel:
    """The identity ``project`` records for its base when the model (``sha256``, ``weights()``) is that base
    (`base_matches`); otherwise a `MaceError` saying what to connect or pass instead."""
    from ..method.project import weights_id

    base = project.manifest()["base"]
    if base_matches(base, sha256, weights, find_file):
        return BaseModel(base["sha256"], base.get("path", ""), base.get("weights_id"))
    if base.get("weights_id") == base["sha256"]:
        advice = ("the project was made in ComfyUI from a MODEL patched before the MACE nodes (e.g. by a LoRA): use "
                  "a checkpoint holding exactly those patched weights (e.g. that MODEL saved by ComfyUI's Save "
                  "Checkpoint)")
    else:
        advice = f"use the original ({base.get('path', '?')}) or another project"
    file = f"the file (sha256 {sha256[:12]}...) nor " if sha256 else ""
    raise MaceError(f"{name} is not the model project {project.root.name!r} was made from: neither {file}its "
                    f"cross-attention weights (weights id {weights_id(weights())[:12]}...) are the project's base "
                    f"({base['sha256'][:12]}...); {advice}")
