"""What the tab's buttons do, without Gradio: turn the form into a `mace_core.run.request.Request` and
hand it to the core's run layer (`mace_core.run.run.plan` / `run`), exactly as `mace erase` does, then
draw the before/after previews. Re-fusing goes through `mace_core.run.run.refuse` as `mace fuse` does.
So a run from the tab and the same run from the command line give the same file.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from mace_core.method.concepts import SettingInfo, setting_infos
from mace_core.errors import MaceError
from mace_core.run.request import validate_project_name

from .host import Host
from .names import default_project_name, validate_output_name

log = logging.getLogger("mace.webui")

Progress = Callable[[str, int, int], None]
NO_PRESET = "(none)"
TYPE_DEFAULT = "type default"
MASK_CHOICES = [TYPE_DEFAULT, "attention", "sam", "none"]
MAX_PREVIEW_PROMPTS = 4  # erased concepts shown, and as many kept ones
PREVIEW_MIN_SIDE = 256  # tiny previews (toy / test models) are enlarged, pixelated, to this size
ESTIMATE_PROJECT = ".estimate"  # a project name no user can type (`plain_name` refuses a leading dot)


# ---------------------------------------------------------------------------------------------
# The form

# Settings the form has its own widgets for; every other setting of the core is a text field of the
# "Advanced settings" (`advanced_settings`), generated from its declaration in `mace_core.method.concepts`.
OWN_WIDGETS = ("mask", "sam_checkpoint", "objective", "alternative", "low_vram")


def advanced_settings() -> list[SettingInfo]:
    """The settings typed as text in the form (empty: the concept type's default, as an absent CLI
    flag), in the core's order."""
    return [i for i in setting_infos() if i.name not in OWN_WIDGETS]


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
    numbers: dict[str, str] = field(default_factory=dict)  # `advanced_settings` name -> text
    objective: str = ""  # "" = the core's default ("mace")
    alternative: str = ""
    low_vram: bool = False  # the CLI's --low-vram
    delete_images: bool = False  # the CLI's --delete-images: the project's drawn training images, when done


def form_overrides(form: EraseForm, host: Host | None = None) -> dict:
    """The settings the form sets (None: the concept type's default), checked with the setting's label."""
    from mace_core.run.request import parse_setting

    fields = advanced_settings()
    unknown = sorted(set(form.numbers) - {i.name for i in fields})
    if unknown:  # the API takes any mapping; the form's fields are generated from the same list
        raise MaceError(f"unknown setting(s) {', '.join(unknown)}")
    out = {i.name: parse_setting(i, form.numbers.get(i.name, "")) for i in fields}
    if out.get("clip_skip") is None and host is not None and host.default_clip_skip() != 1:
        out["clip_skip"] = host.default_clip_skip()  # erase on the layer the web UI samples with
    if form.mask and form.mask != TYPE_DEFAULT:
        out["mask"] = form.mask
    out["sam_checkpoint"] = (form.sam_checkpoint or "").strip() or None
    out["low_vram"] = True if form.low_vram else None
    if form.objective:
        out["objective"] = form.objective
        out["alternative"] = form.alternative.strip() or None
    return out


def build_spec(form: EraseForm, host: Host | None = None):
    """The validated `ErasureSpec` (raises `MaceError` naming what to fix)."""
    from mace_core.method.concepts import validate
    from mace_core.run.request import build_spec as core_spec, text_lines

    preset = None if form.preset in ("", NO_PRESET, None) else form.preset
    if not text_lines(form.concepts) and preset is None:
        raise MaceError("nothing to erase: type at least one concept (one per line) or pick a preset")
    return validate(core_spec(preset=preset, lines=form.concepts, default_type=form.ctype or None,
                              retain=text_lines(form.retain), overrides=form_overrides(form, host)))


def _request(host: Host, form: EraseForm, ck, out: Path | None, project: Path):
    """The form as the core's `Request` on the loaded base model ``ck`` (``out`` None: estimate only)."""
    from mace_core.run.request import BaseModel, Request, prior_folder

    return Request(build_spec(form, host), BaseModel(ck.sha256, ck.path.name, file=ck.path), project, output=out,
                   overwrite=form.overwrite, inputs=(ck.path,), closed_form_only=form.closed_form_only,
                   delete_images=form.delete_images, what="output file", force_hint="tick 'overwrite'",
                   project_what="project folder", find_base=lambda name: _checkpoint_named(host, name),
                   prior_dir=prior_folder(host.projects_folder()))


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
    from mace_core.run.run import plan, run

    t0 = time.perf_counter()
    prog = _fan_out(progress, host.progress)
    if not form.checkpoint:
        raise MaceError("pick a checkpoint to erase from")
    model = host.checkpoint_path(form.checkpoint)
    out = validate_output_name(form.out_name, host.checkpoint_folder(), form.overwrite, protect=(model,))
    build_spec(form, host)  # a readable error before the model is loaded
    project = _project_folder(host, form, out)
    with host.job("MACE erase"):
        prog("loading model", 0, 1)
        with host.base_model(model) as ck:
            req = _request(host, form, ck, out, project)
            backend = _backend(host, ck, req)
            prog("loading model", 1, 1)
            p = plan(req, backend, ck)
            log.info("MACE: %s", p.estimate.describe())
            log.info("erasing %s from %s; project %s", ", ".join(c.phrase for c in p.planned.concepts), model.name,
                     project)
            rep = run(p, backend, progress=prog, should_stop=host.should_stop)
            host.refresh_checkpoints()
            gallery, note = [], ""
            holder = [backend]  # _previews releases the base model before building the erased one
            del backend
            if form.previews:
                if host.should_stop():
                    note = "Previews skipped (interrupted)."
                else:
                    gallery = _previews(host, holder, ck, rep, p.planned.settings_for(), form.blur_explicit, prog)
            holder.clear()
    lines = [f"Wrote **{out.name}** in `{out.parent}`.",
             f"Erased: {rep.erased_words}. Kept: {', '.join(rep.retained) if rep.retained else rep.protection}.",
             f"Project `{project.name}` (in `{project.parent}`): erase again with the same project name to resume "
             f"or to add concepts; re-fuse subsets below.",
             f"Stages: {rep.stages}; total {time.perf_counter() - t0:.0f}s." if rep.stages else ""]
    if rep.reused:
        lines.append(f"Reused finished LoRAs: {', '.join(rep.reused)}.")
    if form.closed_form_only:
        lines.append("Closed-form only: stage 1 alone (fast); the concept word itself is erased less thoroughly than "
                     "with the LoRA stages.")
    if rep.deleted is not None:
        lines.append(f"Deleted the project's {rep.deleted[0]} training image files ({rep.deleted[1] / 2 ** 20:.1f} "
                     "MiB); re-fusing and adding concepts still work.")
    if note:
        lines.append(note)
    return Outcome(out, "\n\n".join(l for l in lines if l), gallery, rep.metadata)


def _backend(host: Host, ck, req):
    """The checkpoint as a model on the host's device, reading the text encoder at the run's clip skip."""
    from mace_core.model.diffusers_backend import DiffusersBackend

    return DiffusersBackend.from_checkpoint(ck, device=host.device, clip_skip=req.clip_skip())


def _project_folder(host: Host, form: EraseForm, out: Path) -> Path:
    """The run's project folder: the one the form names, else one named after the output file."""
    name = validate_project_name(form.project) if (form.project or "").strip() else default_project_name(out)
    return host.projects_folder() / name


def estimate_run(host: Host, form: EraseForm) -> str:
    """Markdown: what Erase would cost with this form (time, peak GPU memory), measured on the chosen
    model as `mace erase --estimate` does, and why the GPU is too small when it is."""
    from mace_core.run.run import plan

    if not form.checkpoint:
        raise MaceError("pick a checkpoint to erase from")
    model = host.checkpoint_path(form.checkpoint)
    spec = build_spec(form, host)
    name = (form.out_name or "").strip()  # the estimate does not need a valid output name yet
    named = bool(name or (form.project or "").strip())
    project = (_project_folder(host, form, host.checkpoint_folder() / f"{name}.safetensors") if named
               else host.projects_folder() / ESTIMATE_PROJECT)  # none yet: nothing to reuse
    with host.job("MACE estimate"), host.base_model(model) as ck:
        req = _request(host, form, ck, None, project)
        backend = _backend(host, ck, req)
        p = plan(req, backend)
        why = p.refusal(backend.device)
        del backend
    n = len(spec.concepts)
    lines = [f"**Estimate** ({n} concept{'s' * (n != 1)}, {model.name}): {p.estimate.describe()}."]
    if why:
        lines.append(f"**Too large for this GPU:** {why}")
    if named:
        held = f" (trained LoRAs: {', '.join(p.reused)})" if p.reused else ""
        lines.append(f"What project {project.name!r} already holds{held} is reused and not counted.")
    return "\n\n".join(lines)


def preview_prompts(concepts: Sequence[dict], retain: Sequence[str]) -> list[tuple[str, str, bool]]:
    """(label, prompt, sensitive) rows: the erased concepts' training prompts, then kept ones (the
    retain list, or the first concept's anchor when the list is empty)."""
    from mace_core.method.concepts import get_type, make_concept, train_prompt

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
    from mace_core.model.checkpoint import with_edits
    from mace_core.model.diffusers_backend import DiffusersBackend
    from mace_core.model.sampling import generate

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
    from mace_core.method.project import Project

    if not name:
        return []
    return [c["phrase"] for c in Project(Path(folder) / validate_project_name(name)).manifest()["concepts"]]


def project_summary(folder: Path, name: str) -> str:
    """Markdown: base model, concepts with their state, retain list."""
    from mace_core.method.project import Project

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


def _checkpoint_named(host: Host, recorded: str) -> Path | None:
    """A project's recorded base (a path, or a file name as ComfyUI records it) among the host's
    checkpoints; None when it is not there."""
    want = Path(recorded)
    if want.is_absolute() and want.is_file():
        return want
    for title in host.list_checkpoints():
        p = host.checkpoint_path(title)
        if p.name == want.name:
            return p
    return None


def _find_base(host: Host, manifest: dict) -> Path:
    base = manifest["base"]
    for recorded in (base.get("file"), base["path"]):
        found = _checkpoint_named(host, recorded) if recorded else None
        if found is not None:
            return found
    raise MaceError(f"the project's base model {Path(base['path']).name} is not among the checkpoints; put it in the "
                    f"checkpoint folder (and press refresh)")


def refuse_project(host: Host, name: str, selected: Sequence[str], out_name: str, overwrite: bool,
                   closed_form_only: bool = False, progress: Progress | None = None) -> Outcome:
    """`mace fuse PROJECT --only <selected>`: the base model with exactly the ticked concepts erased
    (none ticked = the base model restored), in closed form from the project's files."""
    from mace_core.model.checkpoint import load_checkpoint
    from mace_core.method.project import Project
    from mace_core.run.run import refuse_checkpoint

    prog = _fan_out(progress, host.progress)
    proj = Project(host.projects_folder() / validate_project_name(name or ""))
    m = proj.manifest()
    base = _find_base(host, m)
    out = validate_output_name(out_name, host.checkpoint_folder(), overwrite, protect=(base,))
    with host.job("MACE re-fuse"):
        prog("re-fusing", 0, 1)
        res = refuse_checkpoint(proj, load_checkpoint(base), out, list(selected), closed_form_only=closed_form_only,
                                overwrite=overwrite, find_base=lambda recorded: _checkpoint_named(host, recorded))
        host.refresh_checkpoints()
        prog("re-fusing", 1, 1)
    erased = res.erased
    msg = (f"Wrote **{out.name}** in `{out.parent}` from project `{name}`: erased "
           f"{', '.join(erased) if erased else 'nothing (the base model restored)'}.")
    return Outcome(out, msg, [], res.metadata)


# ---------------------------------------------------------------------------------------------
# Small helpers for the UI


def type_defaults(ctype: str) -> str:
    """One line of Markdown: the defaults that empty advanced fields take for a concept type."""
    from mace_core.method.concepts import Settings, get_type

    try:
        t = get_type(ctype)
    except MaceError as e:
        return str(e)
    s = Settings().overlay(t.settings)
    return (f"Empty fields use the defaults of type **{t.name}** (anchor \"{t.anchor}\"): "
            + ", ".join(f"{i.name} {getattr(s, i.name)}" for i in advanced_settings()) + f", mask {s.mask}.")
