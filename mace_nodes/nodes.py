"""The MACE nodes (category "MACE"): thin wrappers around ``mace_core`` reached through `ComfyBackend`.

    Load Checkpoint -> Load Concepts -> Refine (CFR) -> Train LoRAs -> Fuse -> KSampler / Save Erased Checkpoint

Every run is an *erasure project* (the CLI's work folder: per-concept statistics and LoRAs, saved as
soon as each is done) under ``models/mace/<project>``; rerunning a graph resumes it, and the
Re-fuse node restores or re-fuses any subset of its concepts in seconds. Results reach the MODEL only
as ``add_patches({key: ("set", (W,))})`` on a ``clone()``: the MODEL that went in samples exactly as
before.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mace_core.concepts import (ErasureSpec, concept_types, load_config, load_preset, make_concept, merge_specs,
                                parse_lines, preset_names, validate)
from mace_core.errors import MaceError

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


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.+-]{0,99}$")


def project_path(name: str) -> Path:
    name = name.strip()
    if not _NAME.match(name) or name.endswith(".") or ".." in name:
        raise MaceError(f"project name {name!r}: use letters, digits, spaces and _ . + - (no slashes), "
                        "at most 100 characters")
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
    """The core's ``progress(label, done, total)`` as one ComfyUI ProgressBar over drawing + training."""

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
        else:
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
    from mace_core.checkpoint import file_sha256

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


def _base_identity(model, prompt, unique_id, wid: str | None = None) -> tuple[str, str, str]:
    """(project base id, base name, weights id). A MODEL straight from a checkpoint loader, unpatched,
    is identified by the file's sha256 (as the CLI does, so `mace fuse/add` work on the project);
    otherwise by the sha256 of its cross-attention weights."""
    wid = wid or weights_id(model)
    name, direct = _upstream_checkpoint(prompt, unique_id)
    if name and direct and not model.patches:
        try:
            import folder_paths

            path = folder_paths.get_full_path("checkpoints", name)
            if path:
                return _file_sha256(path), name, wid
        except OSError:
            pass
    return wid, name or "ComfyUI MODEL", wid


def _check_project_base(project, model, wid: str) -> None:
    """The project was made from this MODEL (its weights id, or the CLI's base file's weights)."""
    m = project.manifest()
    base = m.get("base", {})
    if wid in (base.get("sha256"), base.get("weights_id")):
        return
    path = _checkpoint_file(base.get("path", ""))
    if path and path.endswith(".safetensors"):
        from safetensors import safe_open

        keys = edited_keys(model)
        ours = effective_weights(model, keys)
        with safe_open(path, "pt") as f:
            names = set(f.keys())
            if all(file_key(k) in names for k in keys) and all(
                    torch.allclose(f.get_tensor(file_key(k)).float(), ours[k], rtol=1e-3, atol=1e-4) for k in keys):
                return
    raise MaceError(f"project {project.root.name!r} was made from another model ({base.get('path', '?')}); "
                    "connect that model, or pick another project")


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


def _project_for(concepts: MaceConcepts, base, family: str, spec: ErasureSpec, prompt, unique_id):
    """(Project, base id, base name, weights id) for a run on ``base``: an existing project must have been
    made from this model (then its recorded base identity is kept), a new one gets this model's."""
    from mace_core.project import Project

    wid = weights_id(base)
    project = Project(project_path(concepts.project or auto_project_name(family, wid, spec)))
    if project.exists():
        _check_project_base(project, base, wid)
        b = project.manifest()["base"]
        return project, b["sha256"], b.get("path", ""), wid
    base_sha, base_name, _ = _base_identity(base, prompt, unique_id, wid)
    return project, base_sha, base_name, wid


def _record_weights_id(project, wid: str) -> None:
    m = project.manifest()
    if m.get("base", {}).get("weights_id") != wid:
        m["base"]["weights_id"] = wid
        project.write_manifest(m)


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


def load_concept_file(path: Path, default_type: str) -> ErasureSpec:
    """A YAML config (as `mace erase --config`), a CSV (columns phrase, anchor, type[, role]; role
    "retain" puts the row in the retain list; a header row naming the columns is optional) or a text
    file (one ``phrase | anchor | type`` per line)."""
    if not path.is_file():
        raise MaceError(f"concept file not found: {path} (give an absolute path or a file in ComfyUI's input folder)")
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        return load_config(path)
    text = path.read_text(encoding="utf-8-sig")
    if suffix != ".csv":
        return ErasureSpec(tuple(parse_lines(text, default_type)))
    rows = [r for r in csv.reader(io.StringIO(text)) if any(cell.strip() for cell in r)]
    cols = ["phrase", "anchor", "type", "role"]
    if rows and rows[0] and rows[0][0].strip().lower() in ("phrase", "concept"):
        cols = [c.strip().lower().replace("concept", "phrase") for c in rows[0]]
        rows = rows[1:]
        if "phrase" not in cols:
            raise MaceError(f"{path}: the header row needs a 'phrase' column")
    concepts, retain = [], []
    for n, row in enumerate(rows, 1):
        rec = {c: (row[i].strip() if i < len(row) else "") for i, c in enumerate(cols)}
        if rec.get("phrase", "").startswith("#"):
            continue
        if rec.get("role", "").lower() in ("retain", "keep", "preserve"):
            retain.append(rec["phrase"])
            continue
        try:
            concepts.append(make_concept(rec.get("phrase", ""), rec.get("anchor", ""), rec.get("type") or default_type))
        except MaceError as e:
            raise MaceError(f"{path.name} row {n}: {e}") from None
    return ErasureSpec(tuple(concepts), tuple(retain))


def build_spec(concepts: str, default_type: str, preset: str = "none", retain: str = "",
               config_file: str = "") -> ErasureSpec:
    """The request of a Load Concepts node (preset < file < lines, as the CLI layers them)."""
    spec = ErasureSpec(())
    if preset and preset != "none":
        spec = merge_specs(spec, load_preset(preset))
    if config_file and config_file.strip():
        spec = merge_specs(spec, load_concept_file(_resolve_file(config_file), default_type))
    lines = parse_lines(concepts or "", default_type)
    keep = [r.split("#", 1)[0].strip() for r in (retain or "").splitlines()]
    spec = merge_specs(spec, ErasureSpec(tuple(lines), tuple(r for r in keep if r)))
    return validate(spec)


# ---------------------------------------------------------------------------------------------
# Nodes


def _type_names() -> list[str]:
    return sorted(concept_types())


def _train_inputs() -> dict:
    return {
        "steps": ("INT", {"default": 0, "min": 0, "max": 100000,
                          "tooltip": "LoRA training steps per concept (0 = the concept type's default, e.g. 50; "
                                     "explicit: 120)"}),
        "rank": ("INT", {"default": 0, "min": 0, "max": 256, "tooltip": "LoRA rank (0 = default, 1)"}),
        "lr": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 1e-5, "round": False,
                         "tooltip": "learning rate (0 = the type's default: object 1e-4, celebrity/style 1e-3)"}),
        "images": ("INT", {"default": 0, "min": 0, "max": 1000,
                           "tooltip": "training images per concept, drawn by the ORIGINAL model (0 = default, 8)"}),
        "sample_steps": ("INT", {"default": 0, "min": 0, "max": 1000,
                                 "tooltip": "DDIM steps to draw each training image (0 = default, 30)"}),
        "guidance": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.1,
                               "tooltip": "CFG scale for the training images (0 = default, 7.5)"}),
        "mask": ([DEFAULT, "attention", "none"] + [SAM_PREFIX + f for f in sam_checkpoints()],
                 {"tooltip": "where the concept is in each training image: attention (cross-attention maps of "
                             "the same sampling pass), none (whole image; the default for styles and explicit "
                             "content), or 'sam: <file>': the attention mask's box and centre prompt a SAM "
                             "checkpoint from models/sams (needs the segment-anything package)"}),
        "training_seed": ("INT", {"default": 2024, "min": 0, "max": 2 ** 31 - 1,
                                  "tooltip": "seed of image drawing and training; keep it fixed to resume a project"}),
        "resolution": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 8,
                               "tooltip": "side of the training images in pixels (0 = the model family's: SD1/SD2 "
                                          "512, SD2-768-v 768, SDXL 1024; the CLI always uses the family's)"}),
    }


def _train_overrides(steps, rank, lr, images, sample_steps, guidance, mask, training_seed, low_vram: bool = False,
                     objective: str = "mace", alternative: str = "", robust_rounds: int = 0) -> dict:
    """The settings the nodes' inputs override (0 / default: the concept type's own)."""
    out = {"seed": int(training_seed)}
    if low_vram:
        out["low_vram"] = True
    if objective != "mace":
        out["objective"] = objective
        if alternative.strip():
            out["alternative"] = alternative.strip()
    if int(robust_rounds) > 0:
        out["robust_rounds"] = int(robust_rounds)
    for k, v in (("steps", steps), ("rank", rank), ("images", images), ("sample_steps", sample_steps)):
        if int(v) > 0:
            out[k] = int(v)
    for k, v in (("lr", lr), ("guidance", guidance)):
        if float(v) > 0:
            out[k] = float(v)
    if mask and mask.startswith(SAM_PREFIX):
        path = _sam_folder().get_full_path(SAM_FOLDER, mask[len(SAM_PREFIX):])
        if path is None:
            raise MaceError(f"SAM checkpoint {mask[len(SAM_PREFIX):]!r} not found in models/{SAM_FOLDER}")
        out["mask"], out["sam_checkpoint"] = "sam", path
    elif mask and mask != DEFAULT:
        out["mask"] = mask
    return out


class MACELoadConcepts:
    DESCRIPTION = ("What to erase: one concept per line as 'phrase', 'phrase | anchor' or 'phrase | anchor | type' "
                   "(the anchor is what the phrase will draw instead; '#' starts a comment), a shipped preset, "
                   "and/or a YAML/CSV/text file; plus a retain list of concepts to protect. 'project' names the "
                   "erasure project folder in models/mace/ (empty: a name derived from the model and concepts); "
                   "re-running a graph with the same project resumes it.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (CONCEPTS,)
    RETURN_NAMES = ("concepts",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "concepts": ("STRING", {"multiline": True, "default": "",
                                        "tooltip": "one per line: phrase | anchor | type"}),
                "default_type": (_type_names(), {"default": "object",
                                                 "tooltip": "type of lines that name none: picks prompt templates, "
                                                            "anchor and training defaults"}),
                "preset": (["none"] + preset_names(), {"default": "none"}),
                "retain": ("STRING", {"multiline": True, "default": "",
                                      "tooltip": "concepts to keep, one per line (they feed a protective prior)"}),
            },
            "optional": {
                "config_file": ("STRING", {"default": "",
                                           "tooltip": "a .yaml (as `mace erase --config`), .csv (phrase, anchor, "
                                                      "type[, role]) or .txt file; absolute or in the input folder"}),
                "project": ("STRING", {"default": "", "tooltip": "erasure project name (models/mace/<name>)"}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, concepts, default_type):
        """Catches a malformed concept list before the graph is queued."""
        try:
            if default_type not in concept_types():
                raise MaceError(f"unknown concept type {default_type!r}; known: {', '.join(_type_names())}")
            parse_lines(concepts or "", default_type)
        except MaceError as e:
            return f"bad concept list: {e}"
        return True

    @classmethod
    def IS_CHANGED(cls, config_file="", **_):
        """Re-read an edited concept file (ComfyUI caches this node's output otherwise)."""
        if config_file and config_file.strip():
            p = _resolve_file(config_file)
            if p.is_file():
                return hashlib.sha256(p.read_bytes()).hexdigest()
        return ""

    def load(self, concepts, default_type, preset, retain, config_file="", project=""):
        if project and project.strip():
            project_path(project)  # a readable error for a bad name, now
        return (MaceConcepts(build_spec(concepts, default_type, preset, retain, config_file), (project or "").strip()),)


class MACERefine:
    DESCRIPTION = ("Stage 1 of MACE, closed-form cross-attention refinement (CFR): rewrites every cross-attention "
                   "key/value projection so that the concepts' words produce what their anchors produce, in one "
                   "linear solve (seconds, no training). Output: the refined MODEL, usable on its own (the fast "
                   "'closed-form only' erasure: weaker on the concept word's context than full MACE) or as the "
                   "input of Train LoRAs. A MODEL already edited by MACE is taken back to its original first. "
                   "Prior strengths: -1 = the concept type's default.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("refined_model",)
    FUNCTION = "refine"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "clip": ("CLIP", {"tooltip": "the CLIP you sample with (its clip-skip layer is the one erased)"}),
                "concepts": (CONCEPTS,),
            },
            "optional": {
                "lam": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 1e6, "step": 0.1, "round": False,
                                  "tooltip": "ridge toward the original weights (-1 = type default)"}),
                "prior": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 1e7, "step": 1.0, "round": False,
                                    "tooltip": "strength of the general caption prior, per token (-1 = type default)"}),
                "domain": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 1e7, "step": 1.0, "round": False,
                                     "tooltip": "strength of the retain-list prior, per token (-1 = type default)"}),
            },
            "hidden": {"prompt": "PROMPT", "unique_id": "UNIQUE_ID"},
        }

    def refine(self, model, clip, concepts, lam=-1.0, prior=-1.0, domain=-1.0, prompt=None, unique_id=None):
        from mace_core.erase import erase

        base = strip_mace(model)
        be = ComfyBackend(base, clip)
        overrides = {k: float(v) for k, v in (("lam", lam), ("prior", prior), ("domain", domain)) if v is not None
                     and float(v) >= 0}
        overrides["clip_skip"] = _clip_skip(clip, be.family_name)
        spec = validate(_with(concepts.spec, overrides), be.tokenize)
        project, base_sha, base_name, wid = _project_for(concepts, base, be.family_name, spec, prompt, unique_id)
        bar = _Bar(2)
        res = erase(be, spec, project, base_sha, base_name, should_stop=_interrupt_check, closed_form_only=True)
        _record_weights_id(project, wid)
        bar.done()
        log.info("MACE refine: %s (project %s)", ", ".join(c.phrase for c in project.spec().concepts), project.root)
        info = {"project": str(project.root), "stage": "refined", "base_id": wid, "base_sha256": base_sha,
                "base_name": base_name, "text_key": be.text_encoder_key(), "metadata": res.metadata}
        return (patched_model(base, res.weights, info),)


class _Bar:
    def __init__(self, total: int):
        import comfy.utils

        self.bar = comfy.utils.ProgressBar(total)
        self.bar.update_absolute(0, total)
        self.total = total

    def done(self):
        self.bar.update_absolute(self.total, self.total)


def _train(be: ComfyBackend, project, spec, base_sha, base_name, closed_form_only=False):
    """Run the core's pipeline on ``be`` (the ORIGINAL model: it draws the images; the LoRAs train on
    its refined weights, applied by hooks), resuming finished concepts, with grad enabled (ComfyUI runs
    nodes in inference mode), ComfyUI progress and cancel. A GPU too small for the run is refused
    before anything starts; the estimate is logged and kept in the result's report."""
    import comfy.model_management as mm
    from mace_core.erase import erase
    from mace_core.estimate import check_fits, estimate

    progress = _Progress(project.merged(spec))
    try:
        with torch.inference_mode(False), torch.enable_grad():
            est = estimate(be, spec, closed_form_only, project=project)
            log.info("MACE: %s (what the project already holds is reused and not counted)", est.describe())
            check_fits(est, be.device)
            res = erase(be, spec, project, base_sha, base_name, progress=progress, should_stop=_interrupt_check,
                        closed_form_only=closed_form_only)
    finally:
        mm.soft_empty_cache()
    progress.bar.update_absolute(progress.total, progress.total)
    res.report["estimate"] = est.describe()
    return res


def _objective_options() -> dict:
    """Optional inputs of the training nodes: the stage-2 objective and robust hardening."""
    return {
        "objective": (["mace", "abo"], {"default": "mace",
                                        "tooltip": "mace: the attention loss of the paper; abo (All-but-One): the "
                                                   "concept's guidance is turned toward 'alternative' while the "
                                                   "unconditional prediction is held (slower: it backpropagates "
                                                   "through the UNet)"}),
        "alternative": ("STRING", {"default": "", "tooltip": "abo: what the concept should turn into (e.g. 'a cow' "
                                                             "for 'a pig'); empty: nothing in particular"}),
        "robust_rounds": ("INT", {"default": 0, "min": 0, "max": 10,
                                  "tooltip": "adversarial hardening rounds after the erasure (0: off; the CLI's "
                                             "--robust is 2): each round finds soft tokens that still draw the "
                                             "concept and erases them too (single-text-encoder models: SD1, SD2)"}),
    }


def _memory_options() -> dict:
    """Optional inputs of the training nodes: low-VRAM mode and deleting the drawn training images."""
    return {
        "low_vram": ("BOOLEAN", {"default": False,
                                 "tooltip": "draw the training images one at a time (the same images, slower): "
                                            "for GPUs the estimate says are too small"}),
        "delete_images": ("BOOLEAN", {"default": False,
                                      "tooltip": "when done, delete the training images drawn into the project "
                                                 "(they may show what was erased); re-fusing still works"}),
    }


def _delete_images(project, delete: bool) -> str:
    """Deletes the project's drawn training images when asked; a line for the report ("" otherwise)."""
    if not delete:
        return ""
    files, size = project.delete_generated_images()
    log.info("MACE: deleted %d training image files (%.1f MiB) from %s", files, size / 2 ** 20, project.root)
    return f"deleted {files} training image files from the project"


class MACETrainLoRAs:
    DESCRIPTION = ("Stage 2 of MACE: one small LoRA per concept on the cross-attention keys, trained so that the "
                   "concept's image regions stop attending to its words. Which model does what: the training "
                   "IMAGES are drawn by the ORIGINAL model (so they show the concept), the LoRAs are trained ON "
                   "the REFINED model (stage 1's weights). Connect the Refine node's output to 'model'; the "
                   "original is recovered from it exactly (Refine's patches removed), or connect it to "
                   "'original_model' too. Finished concepts are saved in the project at once; cancel and re-run "
                   "to resume. Settings at 0 use the concept type's defaults. The preview shows each training "
                   "image beside its mask (explicit concepts are blurred unless 'preview' says otherwise). Before "
                   "it starts, the run's time and peak GPU memory are estimated (in the log) and a GPU too small "
                   "is refused with advice; 'low_vram' draws one image at a time, 'delete_images' removes the "
                   "drawn images from the project when done.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (LORAS, "IMAGE")
    RETURN_NAMES = ("loras", "training_images")
    FUNCTION = "train"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "the REFINED model (output of Refine (CFR))"}),
                "clip": ("CLIP",),
                "vae": ("VAE", {"tooltip": "decodes the training images for the preview and the project"}),
                **_train_inputs(),
            },
            "optional": {
                "original_model": ("MODEL", {"tooltip": "the model Refine started from (optional: recovered "
                                                        "from 'model' when not connected)"}),
                "preview": (["auto", "show", "blur", "hide"], {"default": "auto"}),
                **_objective_options(),
                **_memory_options(),
            },
            "hidden": {"prompt": "PROMPT", "unique_id": "UNIQUE_ID"},
        }

    def train(self, model, clip, vae, steps, rank, lr, images, sample_steps, guidance, mask, training_seed,
              resolution=0, original_model=None, preview="auto", objective="mace", alternative="", robust_rounds=0,
              low_vram=False, delete_images=False, prompt=None, unique_id=None):
        from mace_core.project import Project

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
        ps = project.spec()
        spec = _with(ps, _train_overrides(steps, rank, lr, images, sample_steps, guidance, mask, training_seed,
                                          low_vram, objective, alternative, robust_rounds))
        res = _train(be, project, spec, info["base_sha256"], info["base_name"])
        loras = MaceLoras(str(project.root), wid, [c.phrase for c in project.spec().concepts], res.weights,
                          res.metadata, res.report)
        log.info("MACE train: %s; reused LoRAs: %s", ", ".join(loras.phrases),
                 ", ".join(res.report.get("reused_loras", [])) or "none")
        shown = _preview(project, project.spec(), preview)  # before the images may be deleted
        _delete_images(project, delete_images)
        return (loras, shown)


class MACEFuse:
    DESCRIPTION = ("Stage 3 of MACE: fuses the per-concept LoRAs with the refined weights in closed form (no "
                   "interference between concepts). Output: the erased MODEL, ready for KSampler. 'model' is the "
                   "original (or the refined) MODEL of the same checkpoint; it is not modified.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("erased_model",)
    FUNCTION = "fuse"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "loras": (LORAS,)}}

    def fuse(self, model, loras):
        base = strip_mace(model)
        if weights_id(base) != loras.base_id:
            raise MaceError("this MODEL is not the one the LoRAs were trained for; connect the same checkpoint")
        info = {"project": loras.project, "stage": "erased", "base_id": loras.base_id, "metadata": loras.metadata}
        return (patched_model(base, loras.weights, info),)


class MACEEraseConcepts:
    DESCRIPTION = ("All of MACE in one node (refine, draw + train one LoRA per concept, fuse) for the impatient; "
                   "the same result as Refine -> Train LoRAs -> Fuse. 'closed_form_only' stops after stage 1 "
                   "(seconds, no training, weaker). Images are drawn by the input MODEL, LoRAs trained on its "
                   "refined weights. Resumes the project when re-run. The report gives the run's estimated time "
                   "(and GPU memory); 'low_vram' and 'delete_images' as on Train LoRAs.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "IMAGE", "STRING")
    RETURN_NAMES = ("erased_model", "training_images", "report")
    FUNCTION = "erase"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"model": ("MODEL",), "clip": ("CLIP",), "vae": ("VAE",), "concepts": (CONCEPTS,),
                         **_train_inputs(),
                         "closed_form_only": ("BOOLEAN", {"default": False})},
            "optional": {"preview": (["auto", "show", "blur", "hide"], {"default": "auto"}), **_objective_options(),
                         **_memory_options()},
            "hidden": {"prompt": "PROMPT", "unique_id": "UNIQUE_ID"},
        }

    def erase(self, model, clip, vae, concepts, steps, rank, lr, images, sample_steps, guidance, mask,
              training_seed, resolution, closed_form_only, preview="auto", objective="mace", alternative="",
              robust_rounds=0, low_vram=False, delete_images=False, prompt=None, unique_id=None):
        from mace_core.erase import describe_stages

        base = strip_mace(model)
        be = ComfyBackend(base, clip, vae, resolution or None)
        overrides = _train_overrides(steps, rank, lr, images, sample_steps, guidance, mask, training_seed, low_vram,
                                     objective, alternative, robust_rounds)
        overrides["clip_skip"] = _clip_skip(clip, be.family_name)
        spec = validate(_with(concepts.spec, overrides), be.tokenize)
        project, base_sha, base_name, wid = _project_for(concepts, base, be.family_name, spec, prompt, unique_id)
        res = _train(be, project, spec, base_sha, base_name, closed_form_only)
        _record_weights_id(project, wid)
        info = {"project": str(project.root), "stage": "refined" if closed_form_only else "erased", "base_id": wid,
                "base_sha256": base_sha, "base_name": base_name, "text_key": be.text_encoder_key(),
                "metadata": res.metadata}
        names = [c.phrase for c in project.spec().concepts]
        report = (f"erased: {', '.join(names)}\nproject: {project.root}\nstages: {res.metadata['mace.stages']}\n"
                  f"estimate: {res.report['estimate']}\n"
                  f"timings: {describe_stages(res.report)}\n"
                  f"reused LoRAs: {', '.join(res.report.get('reused_loras', [])) or 'none'}")
        shown = _preview(project, project.spec(), preview)  # before the images may be deleted
        deleted = _delete_images(project, delete_images)
        return (patched_model(base, res.weights, info), shown, report + (f"\n{deleted}" if deleted else ""))


RESTORE = "restore the listed concepts (erase all others)"
ONLY = "erase only the listed concepts"
ALL = "erase all concepts of the project"


class MACERefuse:
    DESCRIPTION = ("Re-fuse or restore from an erasure project (models/mace/<project>) in seconds, without "
                   "training: restoring a concept = fusing all the others (stage 1 is re-solved exactly for the "
                   "subset, then the subset's LoRAs are fused) - the same as `mace fuse PROJECT --except/--only`. "
                   "'model' must be the original model the project was made from.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "erased_concepts")
    FUNCTION = "refuse"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "project": (project_names() or ["(no projects yet)"],),
                "mode": ([RESTORE, ONLY, ALL], {"default": RESTORE}),
                "concepts": ("STRING", {"multiline": True, "default": "",
                                        "tooltip": "concept phrases of the project, one per line"}),
                "closed_form_only": ("BOOLEAN", {"default": False}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, project="", **_):
        """A project gains concepts and LoRAs between runs: re-fuse when its files change."""
        try:
            root = project_path(project)
        except MaceError:
            return ""
        files = [root / "manifest.json", root / "priors.safetensors", *sorted(root.glob("concepts/*/*.safetensors"))]
        return json.dumps([(str(f), f.stat().st_mtime_ns) for f in files if f.is_file()])

    def refuse(self, model, project, mode, concepts, closed_form_only):
        from mace_core.erase import refuse
        from mace_core.project import Project

        if project not in project_names():
            raise MaceError(f"no erasure project {project!r} in {', '.join(str(r) for r in projects_roots())}")
        proj = Project(project_path(project))
        base = strip_mace(model)
        wid = weights_id(base)
        _check_project_base(proj, base, wid)
        picked = [s.split("#", 1)[0].strip() for s in (concepts or "").splitlines()]
        picked = [s for s in picked if s]
        if mode != ALL and not picked:
            raise MaceError("list the concepts to restore or to erase, one per line")
        only = picked if mode == ONLY else None
        exclude = picked if mode == RESTORE else ()
        original = {file_key(k): v for k, v in effective_weights(base, edited_keys(base)).items()}
        res = refuse(proj, original, only, exclude, closed_form_only=closed_form_only)
        names = [c["phrase"] for c in json.loads(res.metadata["mace.concepts"])]
        info = {"project": str(proj.root), "stage": "erased", "base_id": wid, "metadata": res.metadata}
        return (patched_model(base, res.weights, info), ", ".join(names))


class MACESaveCheckpoint:
    DESCRIPTION = ("Saves the (erased) MODEL with its CLIP and VAE as a .safetensors checkpoint in the output "
                   "folder, through ComfyUI's own checkpoint writer, with modelspec.* metadata and the mace.* "
                   "record of what was erased (concepts, anchors, retain list, settings, base model).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "clip": ("CLIP",), "vae": ("VAE",),
                             "filename_prefix": ("STRING", {"default": "checkpoints/mace-erased"})}}

    def save(self, model, clip, vae, filename_prefix):
        import comfy.model_base
        import comfy.sd
        import folder_paths
        from mace_core.checkpoint import modelspec
        from mace_core.families import load_family

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
        comfy.sd.save_checkpoint(path, model, clip, vae, metadata=metadata, extra_keys=extra)
        try:
            from mace_core.checkpoint import fill_modelspec_hash

            fill_modelspec_hash(Path(path))
        except Exception as e:  # noqa: BLE001 - the hash is a recommended field only
            log.warning("MACE save: could not fill modelspec.hash_sha256 (%s)", e)
        log.info("MACE save: wrote %s (erased: %s)", path, ", ".join(names) or "nothing")
        return {"ui": {"text": [path]}, "result": (path,)}


NODE_CLASS_MAPPINGS = {
    "MACELoadConcepts": MACELoadConcepts,
    "MACERefine": MACERefine,
    "MACETrainLoRAs": MACETrainLoRAs,
    "MACEFuse": MACEFuse,
    "MACEEraseConcepts": MACEEraseConcepts,
    "MACERefuse": MACERefuse,
    "MACESaveCheckpoint": MACESaveCheckpoint,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "MACELoadConcepts": "Load Concepts (MACE)",
    "MACERefine": "Refine (CFR) (MACE)",
    "MACETrainLoRAs": "Train LoRAs (MACE)",
    "MACEFuse": "Fuse LoRAs (MACE)",
    "MACEEraseConcepts": "Erase Concepts (MACE, one-shot)",
    "MACERefuse": "Re-fuse / Restore Concepts (MACE)",
    "MACESaveCheckpoint": "Save Erased Checkpoint (MACE)",
}
