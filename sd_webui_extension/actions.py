"""What the tab's buttons do, without Gradio: turn the form into the CLI's request, run the core,
save, and draw the before/after previews. Every step goes through the functions `mace erase` and
`mace fuse` use (``mace_core.cli.spec_from_args``, ``erase``, ``refuse``, ``erase.save_result``),
so a run from the tab and the same run from the command line give the same file.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Sequence

from mace_core.errors import MaceError

from .host import Host
from .names import default_project_name, validate_output_name, validate_project_name

log = logging.getLogger("mace.webui")

Progress = Callable[[str, int, int], None]
NO_PRESET = "(none)"
TYPE_DEFAULT = "type default"
MASK_CHOICES = [TYPE_DEFAULT, "attention", "sam", "none"]
MAX_PREVIEW_PROMPTS = 4  # erased concepts shown, and as many kept ones
PREVIEW_MIN_SIDE = 256  # tiny previews (toy / test models) are enlarged, pixelated, to this size


# ---------------------------------------------------------------------------------------------
# The form


# Advanced fields typed as text: empty means "the concept type's default", exactly as an absent
# CLI flag. name -> (parser, label shown in errors)
NUMERIC_FIELDS: dict[str, tuple[type, str]] = {
    "steps": (int, "LoRA steps"), "rank": (int, "LoRA rank"), "lr": (float, "learning rate"),
    "images": (int, "images per concept"), "seed": (int, "seed"), "sample_steps": (int, "sampling steps"),
    "guidance": (float, "guidance scale"), "lam": (float, "stage-1 ridge (lam)"),
    "prior": (float, "general prior strength"), "domain": (float, "retain prior strength"),
    "fuse_prior": (float, "fusion prior strength"), "clip_skip": (int, "CLIP skip"),
    "robust_rounds": (int, "robust hardening rounds"),  # issue 12: `mace erase --robust` is 2 rounds
}


@dataclass
class EraseForm:
    """The Erase section's inputs, as the UI delivers them (text fields as strings)."""

    checkpoint: str = ""
    concepts: str = ""  # one per line: phrase | anchor | type
    ctype: str = "object"  # type of lines that name none (the CLI's --type)
    preset: str = NO_PRESET
    retain: str = ""  # one per line
    out_name: str = ""
    overwrite: bool = False
    project: str = ""  # empty: the output file's stem
    closed_form_only: bool = False
    previews: bool = True
    blur_explicit: bool = True
    mask: str = TYPE_DEFAULT
    sam_checkpoint: str = ""
    numbers: dict[str, str] = field(default_factory=dict)  # NUMERIC_FIELDS name -> text
    # Stage-2 objective (issue 9): shown by the UI only when the core's Settings has these fields.
    objective: str = ""  # "" = the core's default ("mace"); "abo" = All-but-One
    alternative: str = ""
    low_vram: bool = False  # the CLI's --low-vram
    delete_images: bool = False  # the CLI's --delete-images: the project's drawn training images, when done
    # Robust erasure (issue 12) is numbers["robust_rounds"]: adversarial hardening rounds, the CLI's
    # `--robust` / `--robust-rounds N`.


class _Args(SimpleNamespace):
    """An argparse-like namespace for ``cli.spec_from_args``: flags the form does not set are None,
    like absent CLI flags (so flags the CLI adds later need no change here)."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return None


def _parse_number(text: str, kind: type, label: str):
    text = (text or "").strip()
    if not text:
        return None
    try:
        value = kind(float(text)) if kind is int and "e" in text.lower() else kind(text)
    except ValueError:
        raise MaceError(f"{label}: {text!r} is not a{'n integer' if kind is int else ' number'}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise MaceError(f"{label}: {text!r} is not a finite number")
    return value


def split_lines(text: str) -> list[str]:
    """Non-empty lines with ``#`` comments removed."""
    return [line.split("#", 1)[0].strip() for line in (text or "").splitlines() if line.split("#", 1)[0].strip()]


def erase_namespace(form: EraseForm, host: Host | None = None) -> _Args:
    """The form as the `mace erase` arguments it stands for."""
    args = _Args(preset=None if form.preset in ("", NO_PRESET, None) else form.preset, config=None,
                 type=form.ctype or None, concept=split_lines(form.concepts), anchor=None,
                 retain=split_lines(form.retain))
    for name, (kind, label) in NUMERIC_FIELDS.items():
        setattr(args, name, _parse_number(form.numbers.get(name, ""), kind, label))
    if args.clip_skip is None and host is not None and host.default_clip_skip() != 1:
        args.clip_skip = host.default_clip_skip()  # erase on the layer the web UI samples with
    if form.mask and form.mask != TYPE_DEFAULT:
        args.mask = form.mask
    if (form.sam_checkpoint or "").strip():
        args.sam_checkpoint = form.sam_checkpoint.strip()
    if form.low_vram:
        args.low_vram = True
    if form.objective:
        args.objective = form.objective
        if form.alternative.strip():
            args.alternative = form.alternative.strip()
    return args


def build_spec(form: EraseForm, host: Host | None = None):
    """The validated `ErasureSpec` (raises `MaceError` naming what to fix)."""
    from mace_core import cli
    from mace_core.concepts import validate

    if not split_lines(form.concepts) and form.preset in ("", NO_PRESET, None):
        raise MaceError("nothing to erase: type at least one concept (one per line) or pick a preset")
    return validate(cli.spec_from_args(erase_namespace(form, host)))


# ---------------------------------------------------------------------------------------------
# Erase


@dataclass
class Outcome:
    path: Path | None
    message: str
    gallery: list = field(default_factory=list)  # [(PIL.Image, caption)], before/after pairs
    metadata: dict = field(default_factory=dict)


def _fan_out(*callbacks: Progress | None) -> Progress:
    cbs = [c for c in callbacks if c is not None]

    def report(label: str, done: int, total: int) -> None:
        for c in cbs:
            c(label, done, total)
    return report


def run_erase(host: Host, form: EraseForm, progress: Progress | None = None) -> Outcome:
    """Erase as `mace erase` does, into the host's checkpoint folder; project in models/mace/<name>."""
    from mace_core.erase import describe_stages, erase, save_result
    from mace_core.estimate import check_fits, estimate

    t0 = time.perf_counter()
    prog = _fan_out(progress, host.progress)
    if not form.checkpoint:
        raise MaceError("pick a checkpoint to erase from")
    model = host.checkpoint_path(form.checkpoint)
    out = validate_output_name(form.out_name, host.checkpoint_folder(), form.overwrite, protect=(model,))
    spec = build_spec(form, host)
    project = _project(host, form, out)
    with host.job("MACE erase"):
        prog("loading model", 0, 1)
        with host.base_model(model) as ck:
            backend = _backend(host, ck, spec)
            run = spec.settings_for()
            prog("loading model", 1, 1)
            est = estimate(backend, spec, form.closed_form_only, project=project)
            log.info("MACE: %s", est.describe())
            check_fits(est, backend.device)  # refuses, with advice, a GPU too small for this run
            log.info("erasing %s from %s; project %s", ", ".join(c.phrase for c in spec.concepts), model.name,
                     project.root)
            res = erase(backend, spec, project, ck.sha256, ck.path.name, progress=prog,
                        should_stop=host.should_stop, closed_form_only=form.closed_form_only)
            save_result(ck, res, out)
            deleted = project.delete_generated_images() if form.delete_images else None
            host.refresh_checkpoints()
            gallery, note = [], ""
            holder = [backend]  # _previews releases the base model before building the erased one
            del backend
            if form.previews:
                if host.should_stop():
                    note = "Previews skipped (interrupted)."
                else:
                    gallery = _previews(host, holder, ck, res, run, form.blur_explicit, prog)
            holder.clear()
    erased = [c["phrase"] for c in json.loads(res.metadata["mace.concepts"])]
    timings = describe_stages(res.report)
    lines = [f"Wrote **{out.name}** in `{out.parent}`.",
             f"Erased: {', '.join(erased)}." + (f" Kept: {', '.join(spec.retain)}." if spec.retain else ""),
             f"Project `{project.root.name}` (in `{project.root.parent}`): erase again with the same project name to resume "
             f"or to add concepts; re-fuse subsets below.",
             f"Stages: {timings}; total {time.perf_counter() - t0:.0f}s." if timings else ""]
    if res.report.get("reused_loras"):
        lines.append(f"Reused finished LoRAs: {', '.join(res.report['reused_loras'])}.")
    if form.closed_form_only:
        lines.append("Closed-form only: stage 1 alone (fast); the concept word itself is erased less thoroughly than "
                     "with the LoRA stages.")
    if deleted is not None:
        lines.append(f"Deleted the project's {deleted[0]} training image files ({deleted[1] / 2 ** 20:.1f} MiB); "
                     "re-fusing and adding concepts still work.")
    if note:
        lines.append(note)
    return Outcome(out, "\n\n".join(l for l in lines if l), gallery, res.metadata)


def _backend(host: Host, ck, spec):
    """The checkpoint as a model on the host's device, reading the text encoder at the run's clip skip."""
    from mace_core.diffusers_backend import DiffusersBackend

    return DiffusersBackend.from_checkpoint(ck, device=host.device, clip_skip=spec.settings_for().clip_skip)


def _project(host: Host, form: EraseForm, out: Path):
    """The run's `Project`: the one the form names, else one named after the output file."""
    from mace_core.project import Project

    name = validate_project_name(form.project) if (form.project or "").strip() else default_project_name(out)
    return Project(host.projects_folder() / name)


def estimate_run(host: Host, form: EraseForm) -> str:
    """Markdown: what Erase would cost with this form (time, peak GPU memory), measured on the chosen
    model as `mace erase --estimate` does, and why the GPU is too small when it is."""
    from mace_core.estimate import estimate, gpu_memory_gb, refusal

    if not form.checkpoint:
        raise MaceError("pick a checkpoint to erase from")
    model = host.checkpoint_path(form.checkpoint)
    spec = build_spec(form, host)
    name = (form.out_name or "").strip()  # the estimate does not need a valid output name yet
    project = (_project(host, form, host.checkpoint_folder() / f"{name}.safetensors")
               if name or (form.project or "").strip() else None)
    with host.job("MACE estimate"), host.base_model(model) as ck:
        backend = _backend(host, ck, spec)
        est = estimate(backend, spec, form.closed_form_only, project=project)
        gpu = gpu_memory_gb(backend.device)
        del backend
    n = len(spec.concepts)
    lines = [f"**Estimate** ({n} concept{'s' * (n != 1)}, {model.name}): {est.describe()}."]
    why = refusal(est, gpu)
    if why:
        lines.append(f"**Too large for this GPU:** {why}")
    if project is not None:
        lines.append(f"What project {project.root.name!r} already holds is reused and not counted.")
    return "\n\n".join(lines)


def preview_prompts(concepts: Sequence[dict], retain: Sequence[str]) -> list[tuple[str, str, bool]]:
    """(label, prompt, sensitive) rows: the erased concepts' training prompts, then kept ones (the
    retain list, or the first concept's anchor when the list is empty)."""
    from mace_core.concepts import get_type, make_concept, train_prompt

    rows = []
    for c in list(concepts)[:MAX_PREVIEW_PROMPTS]:
        con = make_concept(c["phrase"], c.get("anchor", ""), c.get("type", "object"))
        rows.append(("erased", train_prompt(con), con.type == "explicit"))
    first = concepts[0] if concepts else None
    kept = list(retain)[:MAX_PREVIEW_PROMPTS]
    if kept and first is not None:
        template = get_type(first.get("type", "object")).train_prompt
        rows += [("kept", template.replace("{}", r), False) for r in kept]
    elif first is not None:
        rows.append(("kept", first.get("anchor") or get_type(first.get("type", "object")).anchor, False))
    return rows


def _show(img, sensitive: bool, blur: bool):
    from PIL import Image, ImageFilter

    im = Image.fromarray(img)
    if sensitive and blur:
        im = im.filter(ImageFilter.GaussianBlur(radius=max(4, im.width // 12)))
    if im.width < PREVIEW_MIN_SIDE:
        k = math.ceil(PREVIEW_MIN_SIDE / im.width)
        im = im.resize((im.width * k, im.height * k), Image.NEAREST)
    return im


def _previews(host: Host, holder: list, ck, res, run, blur: bool, prog: Progress) -> list:
    """Before (the loaded base model, ``holder[0]``) and after (the base checkpoint ``ck`` with the
    erasure's edited weights, i.e. what was written), same prompts and seeds. The base model is
    released (popped from ``holder``) before the erased one is built, so at most one is in memory;
    the erased one shares every unedited tensor with ``ck`` (with a web UI's in-memory model, the
    web UI's own)."""
    from mace_core.checkpoint import with_edits
    from mace_core.diffusers_backend import DiffusersBackend
    from mace_core.sampling import generate

    meta = res.metadata
    rows = preview_prompts(json.loads(meta["mace.concepts"]), json.loads(meta.get("mace.retain", "[]")))
    prompts = [p for _, p, _ in rows]
    seeds = [run.seed] * len(prompts)
    backend = holder.pop()
    before = generate(backend, prompts, seeds, run.sample_steps, run.guidance,
                      on_batch=lambda d, n: prog("previews before", d, n))
    del backend
    host.free_memory()
    after_backend = DiffusersBackend.from_checkpoint(with_edits(ck, res.weights), device=host.device,
                                                     clip_skip=run.clip_skip)
    after = generate(after_backend, prompts, seeds, run.sample_steps, run.guidance,
                     on_batch=lambda d, n: prog("previews after", d, n))
    del after_backend
    gallery = []
    for (label, prompt, sensitive), b, a in zip(rows, before, after):
        gallery.append((_show(b, sensitive, blur), f"before | {label}: {prompt}"))
        gallery.append((_show(a, sensitive, blur), f"after | {label}: {prompt}"))
    return gallery


# ---------------------------------------------------------------------------------------------
# Projects (models/mace/<name>)


def list_projects(folder: Path) -> list[str]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if (p / "manifest.json").is_file())


def project_concepts(folder: Path, name: str) -> list[str]:
    from mace_core.project import Project

    if not name:
        return []
    return [c["phrase"] for c in Project(Path(folder) / validate_project_name(name)).manifest()["concepts"]]


def project_summary(folder: Path, name: str) -> str:
    """Markdown: base model, concepts with their state, retain list."""
    from mace_core.project import Project

    if not name:
        return "No project selected. Projects are created by **Erase** (one per project name)."
    proj = Project(Path(folder) / validate_project_name(name))
    m = proj.manifest()
    spec = proj.spec()
    rows = []
    for c in spec.concepts:
        d = proj.concept_dir(c)
        state = ("LoRA trained" if (d / "lora.safetensors").is_file() else
                 "stage 1 only" if (d / "stats.safetensors").is_file() else "not started")
        rows.append(f"- {c.phrase} ({c.type}, to \"{c.anchor}\"): {state}")
    base = m["base"]
    return "\n".join([f"**{name}**: base `{Path(base['path']).name}` ({base.get('family', '?')}, "
                      f"sha256 {base['sha256'][:14]}...)", "", *rows, "",
                      f"Kept: {', '.join(m.get('retain', [])) or '-'}"])


def _find_base(host: Host, manifest: dict) -> Path:
    want = Path(manifest["base"]["path"])
    if want.is_absolute() and want.is_file():
        return want
    for title in host.list_checkpoints():
        p = host.checkpoint_path(title)
        if p.name == want.name:
            return p
    raise MaceError(f"the project's base model {want.name} is not among the checkpoints; put it in the checkpoint "
                    f"folder (and press refresh)")


def refuse_project(host: Host, name: str, selected: Sequence[str], out_name: str, overwrite: bool,
                   closed_form_only: bool = False, progress: Progress | None = None) -> Outcome:
    """`mace fuse PROJECT --only <selected>`: the base model with exactly the ticked concepts erased
    (none ticked = the base model restored), in closed form from the project's files."""
    from mace_core.checkpoint import load_checkpoint
    from mace_core.erase import editable_weights, refuse, save_result
    from mace_core.project import Project

    prog = _fan_out(progress, host.progress)
    proj = Project(host.projects_folder() / validate_project_name(name or ""))
    m = proj.manifest()
    base = _find_base(host, m)
    out = validate_output_name(out_name, host.checkpoint_folder(), overwrite, protect=(base,))
    with host.job("MACE re-fuse"):
        prog("re-fusing", 0, 1)
        ck = load_checkpoint(base)
        if ck.sha256 != m["base"]["sha256"]:
            raise MaceError(f"{base.name} is not the model project {name!r} was made from (its sha256 differs)")
        res = refuse(proj, editable_weights(ck.tensors), only=list(selected), closed_form_only=closed_form_only)
        save_result(ck, res, out)
        host.refresh_checkpoints()
        prog("re-fusing", 1, 1)
    erased = [c["phrase"] for c in json.loads(res.metadata["mace.concepts"])]
    msg = (f"Wrote **{out.name}** in `{out.parent}` from project `{name}`: erased "
           f"{', '.join(erased) if erased else 'nothing (the base model restored)'}.")
    return Outcome(out, msg, [], res.metadata)


# ---------------------------------------------------------------------------------------------
# Small helpers for the UI


def type_defaults(ctype: str) -> str:
    """One line of Markdown: the defaults that empty advanced fields take for a concept type."""
    from mace_core.concepts import Settings, get_type

    try:
        t = get_type(ctype)
    except MaceError as e:
        return str(e)
    s = Settings().overlay(t.settings)
    keys = ["steps", "images", "rank", "lr", "seed", "sample_steps", "guidance", "mask", "lam", "prior", "domain",
            "fuse_prior", "clip_skip"]
    return (f"Empty fields use the defaults of type **{t.name}** (anchor \"{t.anchor}\"): "
            + ", ".join(f"{k} {getattr(s, k)}" for k in keys) + ".")


def core_has_setting(name: str) -> bool:
    from dataclasses import fields

    from mace_core.concepts import Settings

    return any(f.name == name for f in fields(Settings))
