"""The MACE nodes (category "MACE"): thin wrappers around ``mace_core`` reached through `ComfyBackend`.

    Load Checkpoint -> Load Concepts -> Refine (CFR) -> Train LoRAs -> Fuse -> KSampler / Save Erased Checkpoint

Every run is an *erasure project* (the CLI's work folder: per-concept statistics and LoRAs, saved as
soon as each is done) under ``models/mace/<project>``; rerunning a graph resumes it, and the
Re-fuse node restores or re-fuses any subset of its concepts in seconds. Results reach the MODEL only
as ``add_patches({key: ("set", (W,))})`` on a ``clone()``: the MODEL that went in samples exactly as
before.

Nodes are on ComfyUI's V3 schema (``comfy_api.latest``: `io.ComfyNode` classes registered through
`MaceExtension`, ComfyUI 0.3.75 or newer); their ids are the class names saved workflows name, and
each node's widgets keep the order those workflows store their values in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from comfy_api.latest import ComfyExtension, io, ui

from mace_core.method.concepts import (ErasureSpec, SettingInfo, concept_types, parse_lines, preset_names, setting_info,
                                setting_infos, validate)
from mace_core.errors import MaceError
from mace_core.method.project import Project
from mace_core.run.request import (BaseModel, Request, build_spec as core_spec, prior_folder, text_lines,
                                   validate_project_name)

from .backend import (ComfyBackend, edited_keys, effective_weights, family_name, file_key, mace_info, patched_model,
                      strip_mace, weights_id)

log = logging.getLogger("mace.comfyui")

CATEGORY = "MACE"
CONCEPTS = "MACE_CONCEPTS"
LORAS = "MACE_LORAS"
PROJECT_FOLDER = "mace"
SAM_FOLDER = "sams"
SAM_PREFIX = "sam: "  # mask choice "sam: <checkpoint file in models/sams>"
DEFAULT = "type default"
# Core settings (`mace_core.method.concepts.Settings`) by the node that offers them. Refine: stage 1;
# the training nodes: the first ones as required widgets (saved workflows store them in this order),
# every other setting the core declares as optional widgets (`_optional_inputs`), so a new setting shows up
# here without a change. The seed is 'training_seed', the mask a widget of its own (SAM checkpoints),
# the CLIP skip read from the CLIP.
# stage 1's: Refine's widgets
REFINE_SETTINGS = ("lam", "prior", "domain", "protection", "balance", "prior_captions", "synonyms")
# protection and balance came to Refine later: Train LoRAs keeps them (saved graphs store its widgets by
# position); left at "type default" there, the project's values (Refine's) hold. prior_captions and synonyms
# came later still, and only to Refine and, after delete_images (AFTER_DELETE), the one-shot Erase node,
# which refines too
NOT_ON_TRAIN = REFINE_SETTINGS[:3]
TRAIN_SETTINGS = ("steps", "rank", "lr", "images", "sample_steps", "guidance")
OWN_WIDGETS = ("seed", "mask", "sam_checkpoint", "clip_skip")
AFTER_DELETE = ("prior_captions", "synonyms")  # settings added after delete_images: saved graphs keep its position


# ---------------------------------------------------------------------------------------------
# Values passed between nodes


@dataclass(frozen=True)
class MaceConcepts:
    """What Load Concepts outputs: the request, and the project name ("" = automatic)."""

    spec: ErasureSpec
    project: str = ""

    def __str__(self) -> str:
        return ", ".join(c.phrase for c in self.spec.concepts)


@dataclass
class MaceLoras:
    """What Train LoRAs outputs: the project holding one LoRA per concept, and their fusion."""

    project: str
    base_id: str  # weights_id of the original MODEL
    phrases: list[str]
    weights: dict  # file key -> fused weight (stage 3 of all the project's concepts)
    metadata: dict
    report: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Projects in models/mace/


def projects_roots() -> list[Path]:
    """The folders holding erasure projects (``models/mace`` and any extra path registered under
    "mace", e.g. in extra_model_paths.yaml)."""
    import folder_paths

    if PROJECT_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[PROJECT_FOLDER] = ([os.path.join(folder_paths.models_dir, PROJECT_FOLDER)],
                                                               set())
    return [Path(p) for p in folder_paths.get_folder_paths(PROJECT_FOLDER)]


def _sam_folder():
    """ComfyUI's ``folder_paths`` with "sams" registered: ``models/sams``, the folder other ComfyUI node
    packs keep SAM checkpoints in (extra paths may be added under "sams")."""
    import folder_paths

    if SAM_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(SAM_FOLDER, os.path.join(folder_paths.models_dir, SAM_FOLDER))
    return folder_paths


def sam_checkpoints() -> list[str]:
    """SAM checkpoints (segment-anything ``.pth``, the model type in the name: vit_b/vit_l/vit_h)."""
    return [f for f in _sam_folder().get_filename_list(SAM_FOLDER) if f.endswith((".pth", ".pt"))]


def project_names() -> list[str]:
    names = set()
    for root in projects_roots():
        if root.is_dir():
            names.update(p.name for p in root.iterdir() if (p / "manifest.json").is_file())
    return sorted(names)


def project_path(name: str) -> Path:
    """The folder of project ``name`` (checked by the core's `validate_project_name`): where it exists
    among `projects_roots`, else in the first."""
    name = validate_project_name(name)
    roots = projects_roots()
    for root in roots:
        if (root / name / "manifest.json").is_file():
            return root / name
    return roots[0] / name


def auto_project_name(family: str, base_id: str, spec: ErasureSpec) -> str:
    what = json.dumps([sorted(c.phrase for c in spec.concepts), sorted(spec.retain)])
    return f"{family}-{base_id[:8]}-{hashlib.sha256(what.encode()).hexdigest()[:8]}"


# ---------------------------------------------------------------------------------------------
# Helpers


def _interrupt_check() -> bool:
    """The core's ``should_stop``: raises ComfyUI's own interruption when Cancel was pressed."""
    import comfy.model_management as mm

    mm.throw_exception_if_processing_interrupted()
    return False


class _Progress:
    """The core's ``progress(label, done, total)`` as one ComfyUI ProgressBar over drawing + training;
    before them, stage 1's long phases (the general prior's captions, the kept phrases) count on it."""

    def __init__(self, spec: ErasureSpec):
        import comfy.utils

        self.start, self.images, total = {}, {}, 0
        for c in spec.concepts:
            s = spec.settings_for(c)
            self.start[c.phrase], self.images[c.phrase] = total, s.images
            total += s.images + s.steps
        self.order = [c.phrase for c in spec.concepts]
        self.total = max(total, 1)
        self.bar = comfy.utils.ProgressBar(self.total)

    def __call__(self, label: str, done: int, total: int) -> None:
        if label.startswith("drawing "):
            phrase = label[len("drawing "):]
            value = self.start.get(phrase, 0) + round(done * self.images.get(phrase, total) / max(total, 1))
        elif label.startswith("training "):
            phrase = label[len("training "):]
            value = self.start.get(phrase, 0) + self.images.get(phrase, 0) + done
        elif label == "concepts":
            value = self.start[self.order[done]] if done < len(self.order) else self.total
        else:  # stage 1's own phases (the general prior, the kept phrases): that phase's count on the bar
            self.bar.update_absolute(min(done, total), max(total, 1))
            return
        self.bar.update_absolute(min(value, self.total), self.total)


def _clip_skip(clip, family: str) -> int:
    """A1111-style clip skip (1 = the family's default layer) of a ComfyUI CLIP (CLIPSetLastLayer)."""
    layer = getattr(clip, "layer_idx", None)
    if layer is None:
        return 1
    default = -2 if family in ("sd2", "sd2-v", "sdxl") else -1
    return max(1, default - int(layer) + 1)


def _with(spec: ErasureSpec, overrides: dict) -> ErasureSpec:
    return ErasureSpec(spec.concepts, spec.retain, {**dict(spec.overrides), **overrides})


_FILE_HASHES: dict[tuple, str] = {}


def _file_sha256(path: str) -> str:
    from mace_core.model.checkpoint import file_sha256

    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        _FILE_HASHES[key] = file_sha256(Path(path))
    return _FILE_HASHES[key]


def _upstream_checkpoint(prompt, unique_id, input_name: str = "model") -> tuple[str | None, bool]:
    """(checkpoint name, whether the MODEL comes straight from the loader) found by following the
    graph upstream from this node's ``input_name`` through nodes' "model" inputs."""
    if not isinstance(prompt, dict) or unique_id is None:
        return None, False
    node = prompt.get(str(unique_id), {})
    link = node.get("inputs", {}).get(input_name)
    direct = True
    for _ in range(64):
        if not (isinstance(link, list) and len(link) == 2 and str(link[0]) in prompt):
            return None, False
        src = prompt[str(link[0])]
        inputs = src.get("inputs", {})
        if "ckpt_name" in inputs and isinstance(inputs["ckpt_name"], str):
            return inputs["ckpt_name"], direct and link[1] == 0
        link, direct = inputs.get("model"), False
    return None, False


def _model_weights(model):
    """``model``'s editable weights by file key, as the core's base-identity rule reads them."""
    return {file_key(k): w for k, w in effective_weights(model, edited_keys(model)).items()}


def _request(concepts: MaceConcepts | None, base, family: str, spec: ErasureSpec, prompt, unique_id,
             project: Path | None = None, **kw) -> Request:
    """The core's `Request` for a run on the MODEL ``base``: its project (``project``, else the one
    ``concepts`` names or an automatic name) and its identity (`_base_identity`); ``kw``: the
    request's other fields."""
    wid = weights_id(base)
    root = project or project_path(concepts.project or auto_project_name(family, wid, spec))
    sha, name = _base_identity(base, prompt, unique_id, wid)
    return Request(spec, BaseModel(sha, name, wid), root, project_what="project", find_base=_checkpoint_file,
                   prior_dir=prior_folder(projects_roots()[0]), **kw)


def _base_identity(model, prompt, unique_id, wid: str) -> tuple[str, str]:
    """(base id, base name) for a new project. A MODEL straight from a checkpoint loader, unpatched, is
    identified by the file's sha256 (as the CLI does, so `mace fuse/add` work on the project);
    otherwise by ``wid``, the sha256 of its cross-attention weights."""
    name, direct = _upstream_checkpoint(prompt, unique_id)
    if name and direct and not model.patches:
        try:
            import folder_paths

            path = folder_paths.get_full_path("checkpoints", name)
            if path:
                return _file_sha256(path), name
        except OSError:
            pass
    return wid, name or "ComfyUI MODEL"


def _checkpoint_file(name: str) -> str | None:
    """A project's recorded base (a path, or a file name as the CLI and these nodes record it)."""
    if not name:
        return None
    if Path(name).is_file():
        return str(name)
    try:
        import folder_paths

        return folder_paths.get_full_path("checkpoints", name)
    except Exception:  # noqa: BLE001
        return None


def _preview(project, spec: ErasureSpec, mode: str) -> torch.Tensor:
    """IMAGE batch [N, H, 2W, 3]: each training image beside itself with the mask's outside darkened."""
    import numpy as np
    from PIL import Image

    if mode == "auto":
        mode = "blur" if any(c.type == "explicit" for c in spec.concepts) else "show"
    tiles, size = [], None
    for c in spec.concepts:
        folder = project.concept_dir(c)
        for p in sorted((folder / "images").glob("*.png")):
            img = Image.open(p).convert("RGB")
            size = size or img.size
            if img.size != size:
                img = img.resize(size)
            a = np.asarray(img, dtype=np.float32) / 255.0
            mp = folder / "masks" / p.name
            m = (np.asarray(Image.open(mp).convert("L").resize(size), dtype=np.float32) / 255.0
                 if mp.is_file() else np.ones(a.shape[:2], np.float32))
            tile = np.concatenate([a, a * (0.25 + 0.75 * m[..., None])], axis=1)
            if mode == "blur":
                small = Image.fromarray((tile * 255).astype(np.uint8)).resize((max(1, tile.shape[1] // 32),
                                                                             max(1, tile.shape[0] // 32)))
                tile = np.asarray(small.resize((tile.shape[1], tile.shape[0])), dtype=np.float32) / 255.0
            elif mode == "hide":
                tile = np.zeros_like(tile)
            tiles.append(torch.from_numpy(np.ascontiguousarray(tile)))
    if not tiles:
        return torch.zeros(1, 64, 128, 3)
    return torch.stack(tiles)


# ---------------------------------------------------------------------------------------------
# Concepts from text and files


def _resolve_file(name: str) -> Path:
    p = Path(name.strip()).expanduser()
    if p.is_absolute():
        return p
    try:
        import folder_paths

        q = Path(folder_paths.get_input_directory()) / p
        if q.exists():
            return q
    except ImportError:
        pass
    return p


def build_spec(concepts: str, default_type: str, preset: str = "none", retain: str = "",
               config_file: str = "") -> ErasureSpec:
    """The request of a Load Concepts node (preset < file < lines, as every front-end layers them)."""
    file = _resolve_file(config_file) if config_file and config_file.strip() else None
    if file is not None and not file.is_file():
        raise MaceError(f"concept file not found: {file} (give an absolute path or a file in ComfyUI's input folder)")
    spec = core_spec(preset=None if preset in ("", "none") else preset, file=file, lines=concepts or "",
                     default_type=default_type, retain=text_lines(retain))
    if not spec.concepts:  # the core's message names the CLI's flags
        raise MaceError("no concepts to erase: write one per line in 'concepts', pick a 'preset' or give a "
                        "'config_file'")
    return validate(spec)


# ---------------------------------------------------------------------------------------------
# Nodes (ComfyUI's V3 schema: `io.ComfyNode` classes registered by `MaceExtension`)


def _type_names() -> list[str]:
    return sorted(concept_types())


def _train_inputs() -> list[io.Input]:
    return [
        *_setting_inputs(TRAIN_SETTINGS),
        io.Combo.Input("mask", options=[DEFAULT, "attention", "none"] + [SAM_PREFIX + f for f in sam_checkpoints()],
                       default=DEFAULT,
                       tooltip="where the concept is in each training image: attention (cross-attention maps of "
                               "the same sampling pass), none (whole image; the default for styles and explicit "
                               "content), or 'sam: <file>': the attention mask's box and centre prompt a SAM "
                               "checkpoint from models/sams (needs the segment-anything package)"),
        io.Int.Input("training_seed", default=2024, min=0, max=2 ** 31 - 1,
                     tooltip="seed of image drawing and training; keep it fixed to resume a project"),
        io.Int.Input("resolution", default=0, min=0, max=4096, step=8,
                     tooltip="side of the training images in pixels (0 = the model family's: SD1/SD2 512, "
                             "SD2-768-v 768, SDXL 1024; the CLI always uses the family's)"),
    ]


def _setting_input(info: SettingInfo, optional: bool = False) -> io.Input:
    """A widget for a core setting, from its declaration: numbers start at their "unset" value (the
    concept type's default, `_unset`), choices at "type default", text empty, switches off."""
    tip = f"{info.help} (default: {info.type_defaults()})"
    if info.choices:
        return io.Combo.Input(info.name, options=[DEFAULT, *info.choices], default=DEFAULT, tooltip=tip,
                              optional=optional)
    if info.kind is bool:
        return io.Boolean.Input(info.name, default=False, tooltip=tip, optional=optional)
    if info.kind is str:
        return io.String.Input(info.name, default="", tooltip=tip, optional=optional)
    unset = _unset(info)
    tip += f"; {unset:g} = the concept type's default"
    if info.kind is int:
        return io.Int.Input(info.name, default=int(unset), min=int(unset), max=int(info.max or 2 ** 31 - 1),
                            tooltip=tip, optional=optional)
    step = 10.0 ** (math.floor(math.log10(abs(info.default))) - 1) if info.default else 0.01
    return io.Float.Input(info.name, default=float(unset), min=float(unset), max=float(info.max or 1e9), step=step,
                          round=False, tooltip=tip, optional=optional)


def _unset(info: SettingInfo) -> float:
    """The widget value meaning "the concept type's default": the bound of a setting that must be
    positive (0), else one below its minimum (-1 for a setting that may be 0)."""
    return info.above if info.above is not None else (info.min or 0) - 1


def _setting_inputs(names, optional: bool = False) -> list[io.Input]:
    return [_setting_input(setting_info(n), optional) for n in names]


def _overrides(values: dict) -> dict:
    """The settings the nodes' inputs ``values`` (setting name -> widget value) set: a widget left at
    its "unset" value keeps the concept type's default."""
    out = {}
    for name, v in values.items():
        info = setting_info(name)
        if info.choices:
            keep = v != DEFAULT
        elif info.kind in (int, float):
            keep = v is not None and float(v) > _unset(info)
            v = info.kind(v) if keep else v
        elif info.kind is str:
            v = (v or "").strip()
            keep = bool(v)
        else:
            keep = bool(v)
        if keep:
            out[name] = v
    return out


def _train_overrides(mask: str, training_seed: int, settings: dict) -> dict:
    """The settings the training nodes' inputs override: ``settings`` (widgets named after core
    settings, `_overrides`), the seed, and the mask (a SAM checkpoint of models/sams resolved)."""
    out = {**_overrides(settings), "seed": int(training_seed)}
    if mask and mask.startswith(SAM_PREFIX):
        path = _sam_folder().get_full_path(SAM_FOLDER, mask[len(SAM_PREFIX):])
        if path is None:
            raise MaceError(f"SAM checkpoint {mask[len(SAM_PREFIX):]!r} not found in models/{SAM_FOLDER}")
        out["mask"], out["sam_checkpoint"] = "sam", path
    elif mask and mask != DEFAULT:
        out["mask"] = mask
    return out


def _optional_inputs(*, refine: bool) -> list[io.Input]:
    """Optional inputs of the training nodes: the preview, every other core setting (`_setting_inputs`;
    with ``refine`` also stage 1's, which the one-shot node runs too) and deleting the training images."""
    others = [i.name for i in setting_infos() if i.name not in TRAIN_SETTINGS + OWN_WIDGETS + AFTER_DELETE
              and (refine or i.name not in NOT_ON_TRAIN)]
    return [io.Combo.Input("preview", options=["auto", "show", "blur", "hide"], default="auto", optional=True,
                           tooltip="the training_images output: each image beside its mask; auto blurs explicit "
                                   "concepts"),
            *_setting_inputs(others, optional=True),
            io.Boolean.Input("delete_images", default=False, optional=True,
                             tooltip="when done, delete the training images drawn into the project (they may show "
                                     "what was erased); re-fusing still works"),
            *_setting_inputs([n for n in AFTER_DELETE if refine], optional=True)]


def _run(be: ComfyBackend, req: Request, preview: str = "hide"):
    """Plan and run ``req`` through the core's run layer on ``be`` (the ORIGINAL model: it draws the
    images; the LoRAs train on its refined weights, applied by hooks), with grad enabled (ComfyUI runs
    nodes in inference mode), ComfyUI progress and cancel. Returns the `run.Report` and the training
    images' preview (taken before they may be deleted). The estimate is logged before the run starts."""
    import comfy.model_management as mm
    from mace_core.run.run import plan, run

    progress = _Progress(req.planned())
    shown = []
    try:
        with torch.inference_mode(False), torch.enable_grad():
            p = plan(req, be)
            log.info("MACE: %s (what the project already holds is reused and not counted)", p.estimate.describe())
            rep = run(p, be, progress=progress, should_stop=_interrupt_check,
                      before_cleanup=lambda proj: shown.append(_preview(proj, proj.spec(), preview)))
    finally:
        mm.soft_empty_cache()
    progress.bar.update_absolute(progress.total, progress.total)
    if rep.deleted is not None:
        log.info("MACE: deleted %d training image files (%.1f MiB) from %s", rep.deleted[0],
                 rep.deleted[1] / 2 ** 20, rep.project)
    return rep, shown[0]


def _patched(base, rep, stage: str, req: Request, be: ComfyBackend):
    """``base`` with the run's weights patched in, carrying what the next MACE node needs: the project, the
    stage reached, the base's identity and the CLIP's text encoder."""
    info = {"project": str(rep.project), "stage": stage, "base_id": req.base.weights_id,
            "base_sha256": rep.metadata["mace.base_sha256"], "base_name": rep.metadata["mace.base_name"],
            "text_key": be.text_encoder_key(), "metadata": rep.metadata}
    return patched_model(base, rep.weights, info)


Concepts = io.Custom(CONCEPTS)
Loras = io.Custom(LORAS)
# where the MODEL came from (`_upstream_checkpoint`); a tuple: ComfyUI appends to a schema's own list
HIDDEN = (io.Hidden.prompt, io.Hidden.unique_id)


class MACELoadConcepts(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MACELoadConcepts", display_name="Load Concepts (MACE)", category=CATEGORY,
            description="What to erase: one concept per line as 'phrase', 'phrase | anchor' or 'phrase | anchor | "
                        "type' (the anchor is what the phrase will draw instead; '#' starts a comment), a shipped "
                        "preset, and/or a YAML/CSV/text file; plus a retain list of concepts to protect. 'project' "
                        "names the erasure project folder in models/mace/ (empty: a name derived from the model and "
                        "concepts); re-running a graph with the same project resumes it.",
            inputs=[
                io.String.Input("concepts", multiline=True, default="",
                                tooltip="one per line: phrase | anchor | type"),
                io.Combo.Input("default_type", options=_type_names(), default="object",
                               tooltip="type of lines that name none: picks prompt templates, anchor and training "
                                       "defaults"),
                io.Combo.Input("preset", options=["none"] + preset_names(), default="none",
                               tooltip="a shipped concept list added to the lines"),
                io.String.Input("retain", multiline=True, default="",
                                tooltip="concepts to keep, one per line (they feed a protective prior)"),
                io.String.Input("config_file", default="", optional=True,
                                tooltip="a .yaml (as `mace erase --config`), .csv (phrase, anchor, type[, role]) or "
                                        ".txt file; absolute or in the input folder"),
                io.String.Input("project", default="", optional=True,
                                tooltip="erasure project name (models/mace/<name>)"),
            ],
            outputs=[Concepts.Output(display_name="concepts")],
        )

    @classmethod
    def validate_inputs(cls, concepts: str) -> bool | str:
        """Catches a malformed concept line before the graph is queued. It takes ``concepts`` alone:
        ComfyUI files a refusal under every input this method takes. A line is valid or not whichever
        known type it defaults to; an unknown 'default_type' or 'preset' (a stale saved workflow) is
        refused when the node runs."""
        try:
            parse_lines(concepts or "", "object")
        except MaceError as e:
            return f"bad concept list: {e}"
        return True

    @classmethod
    def fingerprint_inputs(cls, config_file: str = "", **_) -> str:
        """Re-read an edited concept file (ComfyUI caches this node's output otherwise)."""
        if config_file and config_file.strip():
            p = _resolve_file(config_file)
            if p.is_file():
                return hashlib.sha256(p.read_bytes()).hexdigest()
        return ""

    @classmethod
    def execute(cls, concepts: str, default_type: str, preset: str, retain: str, config_file: str = "",
                project: str = "") -> io.NodeOutput:
        if project and project.strip():
            project_path(project)  # a readable error for a bad name, now
        spec = build_spec(concepts, default_type, preset, retain, config_file)
        return io.NodeOutput(MaceConcepts(spec, (project or "").strip()))


class MACERefine(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MACERefine", display_name="Refine (CFR) (MACE)", category=CATEGORY,
            description="Stage 1 of MACE, closed-form cross-attention refinement (CFR): rewrites every "
                        "cross-attention key/value projection so that the concepts' words produce what their anchors "
                        "produce, in one linear solve (seconds, no training). Output: the refined MODEL, usable on "
                        "its own (the fast 'closed-form only' erasure: weaker on the concept word's context than "
                        "full MACE) or as the input of Train LoRAs. A MODEL already edited by MACE is taken back to "
                        "its original first. Prior strengths: -1 = the concept type's default.",
            inputs=[
                io.Model.Input("model", tooltip="the model to erase from (not modified: the output is a patched copy)"),
                io.Clip.Input("clip", tooltip="the CLIP you sample with (its clip-skip layer is the one erased)"),
                Concepts.Input("concepts", tooltip="what to erase and keep (a Load Concepts node)"),
                *_setting_inputs(REFINE_SETTINGS, optional=True),
            ],
            outputs=[io.Model.Output(display_name="refined_model")],
            hidden=[*HIDDEN],
        )

    @classmethod
    def execute(cls, model, clip, concepts: MaceConcepts, **settings) -> io.NodeOutput:
        base = strip_mace(model)
        be = ComfyBackend(base, clip)
        spec = _with(concepts.spec, {**_overrides(settings), "clip_skip": _clip_skip(clip, be.family_name)})
        req = _request(concepts, base, be.family_name, validate(spec, be.tokenize), cls.hidden.prompt,
                       cls.hidden.unique_id, closed_form_only=True)
        bar = _Bar(2)
        rep = _run(be, req)[0]
        bar.done()
        log.info("MACE refine: %s (project %s)", ", ".join(rep.erased), rep.project)
        return io.NodeOutput(_patched(base, rep, "refined", req, be))


class _Bar:
    def __init__(self, total: int):
        import comfy.utils

        self.bar = comfy.utils.ProgressBar(total)
        self.bar.update_absolute(0, total)
        self.total = total

    def done(self):
        self.bar.update_absolute(self.total, self.total)


class MACETrainLoRAs(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MACETrainLoRAs", display_name="Train LoRAs (MACE)", category=CATEGORY,
            description="Stage 2 of MACE: one small LoRA per concept on the cross-attention keys, trained so that "
                        "the concept's image regions stop attending to its words. Which model does what: the "
                        "training IMAGES are drawn by the ORIGINAL model (so they show the concept), the LoRAs are "
                        "trained ON the REFINED model (stage 1's weights). Connect the Refine node's output to "
                        "'model'; the original is recovered from it exactly (Refine's patches removed), or connect "
                        "it to 'original_model' too. Finished concepts are saved in the project at once; cancel and "
                        "re-run to resume. Settings at their lowest value (0 or -1) use the concept type's defaults. "
                        "The preview shows each training image beside its mask (explicit concepts are blurred unless "
                        "'preview' says otherwise). Before it starts, the run's time and peak GPU memory are "
                        "estimated (in the log) and a GPU too small is refused with advice; 'low_vram' draws one "
                        "image at a time, 'delete_images' removes the drawn images from the project when done.",
            inputs=[
                io.Model.Input("model", tooltip="the REFINED model (output of Refine (CFR))"),
                io.Clip.Input("clip", tooltip="the CLIP the Refine node used"),
                io.Vae.Input("vae", tooltip="decodes the training images for the preview and the project"),
                *_train_inputs(),
                io.Model.Input("original_model", optional=True,
                               tooltip="the model Refine started from (optional: recovered from 'model' when not "
                                       "connected)"),
                *_optional_inputs(refine=False),
            ],
            outputs=[Loras.Output(display_name="loras"), io.Image.Output(display_name="training_images")],
            hidden=[*HIDDEN],
        )

    @classmethod
    def execute(cls, model, clip, vae, mask: str, training_seed: int, resolution: int = 0, original_model=None,
                preview: str = "auto", delete_images: bool = False, **settings) -> io.NodeOutput:
        info = mace_info(model)
        if not info or info.get("stage") != "refined":
            raise MaceError("Train LoRAs needs the MODEL output of a 'Refine (CFR)' node in its 'model' input "
                            "(it carries the erasure project); connect the original model to 'original_model'")
        original = strip_mace(original_model if original_model is not None else model)
        wid = weights_id(original)
        if wid != info["base_id"]:
            raise MaceError("'original_model' is not the model the Refine node started from: connect the same "
                            "checkpoint's MODEL to both")
        be = ComfyBackend(original, clip, vae, resolution or None)
        if be.text_encoder_key() != info["text_key"]:
            raise MaceError("this CLIP is not the one the Refine node used; connect the same CLIP to both")
        project = Project(info["project"])
        spec = _with(project.spec(), _train_overrides(mask, training_seed, settings))
        req = _request(None, original, be.family_name, spec, cls.hidden.prompt, cls.hidden.unique_id, project.root,
                       delete_images=delete_images)
        rep, shown = _run(be, req, preview)
        loras = MaceLoras(str(rep.project), wid, rep.erased, rep.weights, rep.metadata, rep.details)
        log.info("MACE train: %s; reused LoRAs: %s", ", ".join(loras.phrases), ", ".join(rep.reused) or "none")
        return io.NodeOutput(loras, shown)


class MACEFuse(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MACEFuse", display_name="Fuse LoRAs (MACE)", category=CATEGORY,
            description="Stage 3 of MACE: fuses the per-concept LoRAs with the refined weights in closed form (no "
                        "interference between concepts). Output: the erased MODEL, ready for KSampler. 'model' is "
                        "the original (or the refined) MODEL of the same checkpoint; it is not modified.",
            inputs=[io.Model.Input("model", tooltip="the original (or refined) MODEL of the checkpoint"),
                    Loras.Input("loras", tooltip="the output of Train LoRAs")],
            outputs=[io.Model.Output(display_name="erased_model")],
        )

    @classmethod
    def execute(cls, model, loras: MaceLoras) -> io.NodeOutput:
        base = strip_mace(model)
        if weights_id(base) != loras.base_id:
            raise MaceError("this MODEL is not the one the LoRAs were trained for; connect the same checkpoint")
        info = {"project": loras.project, "stage": "erased", "base_id": loras.base_id, "metadata": loras.metadata}
        return io.NodeOutput(patched_model(base, loras.weights, info))


class MACEEraseConcepts(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MACEEraseConcepts", display_name="Erase Concepts (MACE, one-shot)", category=CATEGORY,
            description="All of MACE in one node (refine, draw + train one LoRA per concept, fuse) for the "
                        "impatient; the same result as Refine -> Train LoRAs -> Fuse. 'closed_form_only' stops after "
                        "stage 1 (seconds, no training, weaker). Images are drawn by the input MODEL, LoRAs trained "
                        "on its refined weights. Resumes the project when re-run. The report gives the run's "
                        "estimated time (and GPU memory); 'low_vram' and 'delete_images' as on Train LoRAs.",
            inputs=[
                io.Model.Input("model", tooltip="the model to erase from (not modified)"),
                io.Clip.Input("clip", tooltip="the CLIP you sample with (its clip-skip layer is erased)"),
                io.Vae.Input("vae", tooltip="decodes the training images"),
                Concepts.Input("concepts", tooltip="what to erase and keep (a Load Concepts node)"),
                *_train_inputs(),
                io.Boolean.Input("closed_form_only", default=False,
                                 tooltip="stage 1 only: seconds, no training; weaker"),
                *_optional_inputs(refine=True),
            ],
            outputs=[io.Model.Output(display_name="erased_model"), io.Image.Output(display_name="training_images"),
                     io.String.Output(display_name="report")],
            hidden=[*HIDDEN],
        )

    @classmethod
    def execute(cls, model, clip, vae, concepts: MaceConcepts, mask: str, training_seed: int, resolution: int,
                closed_form_only: bool, preview: str = "auto", delete_images: bool = False,
                **settings) -> io.NodeOutput:
        base = strip_mace(model)
        be = ComfyBackend(base, clip, vae, resolution or None)
        overrides = {**_train_overrides(mask, training_seed, settings), "clip_skip": _clip_skip(clip, be.family_name)}
        spec = validate(_with(concepts.spec, overrides), be.tokenize)
        req = _request(concepts, base, be.family_name, spec, cls.hidden.prompt, cls.hidden.unique_id,
                       closed_form_only=closed_form_only, delete_images=delete_images)
        rep, shown = _run(be, req, preview)
        report = (f"erased: {rep.erased_words}\nproject: {rep.project}\nstages: {rep.metadata['mace.stages']}\n"
                  f"estimate: {rep.estimate}\ntimings: {rep.stages}\nreused LoRAs: {', '.join(rep.reused) or 'none'}\n"
                  f"kept: {', '.join(rep.retained) if rep.retained else rep.protection}")
        if rep.deleted is not None:
            report += f"\ndeleted {rep.deleted[0]} training image files from the project"
        return io.NodeOutput(_patched(base, rep, "refined" if closed_form_only else "erased", req, be), shown, report)


RESTORE = "restore the listed concepts (erase all others)"
ONLY = "erase only the listed concepts"
ALL = "erase all concepts of the project"


class MACERefuse(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MACERefuse", display_name="Re-fuse / Restore Concepts (MACE)", category=CATEGORY,
            description="Re-fuse or restore from an erasure project (models/mace/<project>) in seconds, without "
                        "training: restoring a concept = fusing all the others (stage 1 is re-solved exactly for the "
                        "subset, then the subset's LoRAs are fused) - the same as `mace fuse PROJECT "
                        "--except/--only`. 'model' must be the original model the project was made from.",
            inputs=[
                io.Model.Input("model", tooltip="the original model the project was made from"),
                io.Combo.Input("project", options=project_names() or ["(no projects yet)"],
                               tooltip="a project in models/mace"),
                io.Combo.Input("mode", options=[RESTORE, ONLY, ALL], default=RESTORE,
                               tooltip="what the concept list means"),
                io.String.Input("concepts", multiline=True, default="",
                                tooltip="concept phrases of the project, one per line"),
                io.Boolean.Input("closed_form_only", default=False,
                                 tooltip="stage 1 only (for projects erased that way)"),
            ],
            outputs=[io.Model.Output(display_name="model"), io.String.Output(display_name="erased_concepts")],
        )

    @classmethod
    def fingerprint_inputs(cls, project: str = "", **_) -> str:
        """A project gains concepts and LoRAs between runs: re-fuse when its files change."""
        try:
            root = project_path(project)
        except MaceError:
            return ""
        files = [root / "manifest.json", root / "priors.safetensors", *sorted(root.glob("concepts/*/*.safetensors"))]
        return json.dumps([(str(f), f.stat().st_mtime_ns) for f in files if f.is_file()])

    @classmethod
    def execute(cls, model, project: str, mode: str, concepts: str, closed_form_only: bool) -> io.NodeOutput:
        from mace_core.run.run import refuse

        if mode not in (RESTORE, ONLY, ALL):  # ComfyUI passes a saved workflow's stale choice through unchecked
            raise MaceError(f"mode {mode!r} is not one of: {RESTORE}; {ONLY}; {ALL}")
        if project not in project_names():
            raise MaceError(f"no erasure project {project!r} in {', '.join(str(r) for r in projects_roots())}")
        proj = Project(project_path(project))
        base = strip_mace(model)
        original = _model_weights(base)
        picked = text_lines(concepts)
        if mode != ALL and not picked:
            raise MaceError("list the concepts to restore or to erase, one per line")
        only = picked if mode == ONLY else None
        exclude = picked if mode == RESTORE else ()
        res = refuse(proj, original, "this MODEL", None, only, exclude, closed_form_only, _checkpoint_file)
        info = {"project": str(proj.root), "stage": "erased", "base_id": weights_id(base), "metadata": res.metadata}
        return io.NodeOutput(patched_model(base, res.weights, info), ", ".join(res.erased))


class MACESaveCheckpoint(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MACESaveCheckpoint", display_name="Save Erased Checkpoint (MACE)", category=CATEGORY,
            description="Saves the (erased) MODEL with its CLIP and VAE as a .safetensors checkpoint in the output "
                        "folder, through ComfyUI's own checkpoint writer, in the dtypes of the checkpoint file the "
                        "MODEL was loaded from (an fp16 file gives an fp16 file), with modelspec.* metadata and the "
                        "mace.* record of what was erased (concepts, anchors, retain list, settings, base model).",
            inputs=[io.Model.Input("model", tooltip="the erased MODEL"),
                    io.Clip.Input("clip", tooltip="saved with the model"),
                    io.Vae.Input("vae", tooltip="saved with the model"),
                    io.String.Input("filename_prefix", default="checkpoints/mace-erased",
                                    tooltip="in the output folder; a number is added")],
            outputs=[io.String.Output(display_name="path")],
            hidden=[*HIDDEN],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, filename_prefix: str) -> bool | str:
        """A prefix leading outside the output folder is refused before the graph runs (ComfyUI's own
        writer refuses it only when saving, after the erasure's compute)."""
        import folder_paths

        out_dir = os.path.abspath(folder_paths.get_output_directory())
        folder = os.path.abspath(os.path.join(out_dir, os.path.dirname(os.path.normpath(filename_prefix or ""))))
        if os.path.commonpath((out_dir, folder)) != out_dir:
            return f"filename_prefix {filename_prefix!r} leads outside the output folder; give a name inside it"
        return True

    @classmethod
    def execute(cls, model, clip, vae, filename_prefix: str) -> io.NodeOutput:
        import comfy.model_base
        import folder_paths
        from mace_core.model.checkpoint import modelspec
        from mace_core.model.families import load_family

        fam = load_family(family_name(model))
        out_dir = folder_paths.get_output_directory()
        folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, out_dir)
        stem = f"{filename}_{counter:05}_"
        path = os.path.join(folder, stem + ".safetensors")
        info = mace_info(model) or {}
        meta = dict(info.get("metadata") or {})
        names = [c["phrase"] for c in json.loads(meta.get("mace.concepts", "[]"))]
        if not names:
            log.warning("MACE save: this MODEL was not erased by MACE nodes; saving it without mace.* metadata")
        desc = "concepts erased with mace: " + (", ".join(names) or "none")
        metadata = {**modelspec(fam, stem, desc), **meta, "mace.host": "ComfyUI"}
        extra = {}
        if model.model.model_type == comfy.model_base.ModelType.V_PREDICTION:
            extra["v_pred"] = torch.tensor([])  # what ComfyUI's CheckpointSave adds for v models
        source = _checkpoint_file(meta.get("mace.base_name", "")) or _checkpoint_file(
            _upstream_checkpoint(cls.hidden.prompt, cls.hidden.unique_id)[0] or "")
        _save_in_file_dtypes(Path(path), model, clip, vae, extra, metadata, source)
        log.info("MACE save: wrote %s (erased: %s)", path, ", ".join(names) or "nothing")
        return io.NodeOutput(path, ui=ui.PreviewText(path))


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _file_dtypes(path: str) -> tuple[dict[str, torch.dtype], torch.dtype]:
    """(dtype of each floating tensor of the .safetensors file ``path``, the most common of them),
    from its header alone."""
    from collections import Counter

    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        kinds = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    dtypes = {k: _DTYPES[v] for k, v in kinds.items() if v in _DTYPES}
    if not dtypes:
        raise MaceError(f"{Path(path).name} holds no floating-point tensors")
    return dtypes, Counter(dtypes.values()).most_common(1)[0][0]


def _save_in_file_dtypes(path: Path, model, clip, vae, extra: dict, metadata: dict, source: str | None) -> None:
    """Write ``model`` + ``clip`` + ``vae`` to ``path`` as ComfyUI's own writer lays them out, each
    floating tensor in the dtype ``source`` (the checkpoint file they were loaded from) holds it in
    (its most common dtype for a tensor it lacks): ComfyUI computes in its own dtypes (fp32 on a CPU),
    and its writer saves those, twice the size of an fp16 file. ComfyUI writes a temporary file next
    to ``path`` first (its writer's state-dict API differs between versions); the final file is
    written atomically, never over an existing one. Without a ``source`` file ComfyUI's dtypes stay."""
    import comfy.sd
    from safetensors.torch import load_file

    from mace_core.model.checkpoint import write_safetensors

    tmp = path.with_name(f".{path.name}.comfyui.tmp")
    try:
        comfy.sd.save_checkpoint(str(tmp), model, clip, vae, extra_keys=extra)
        tensors = load_file(str(tmp))
        if source is None:
            log.warning("MACE save: the checkpoint file this MODEL came from is unknown; saving ComfyUI's dtypes")
        else:
            dtypes, main = _file_dtypes(source)
            tensors = {k: t.to(dtypes.get(k, main)) if t.is_floating_point() else t for k, t in tensors.items()}
        write_safetensors(tensors, path, metadata, what="filename_prefix")
    finally:
        tmp.unlink(missing_ok=True)


class MaceExtension(ComfyExtension):
    """The node pack, as ComfyUI's `comfy_entrypoint` hands it over."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


NODES = (MACELoadConcepts, MACERefine, MACETrainLoRAs, MACEFuse, MACEEraseConcepts, MACERefuse, MACESaveCheckpoint)
