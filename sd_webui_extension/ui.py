"""The MACE tab as a Gradio Blocks, for A1111/Forge (``scripts/mace_tab.py``) and the standalone
app (``python -m sd_webui_extension``). Host calls are injected through `host.Host`; the buttons
call `actions`. Written for gradio 3.41 (A1111 1.10), 4.x (Forge) and 5/6: keyword arguments only,
``gr.update(...)`` (never ``Component.update``), no keyword that one of them lacks.
"""

from __future__ import annotations

import logging
from pathlib import Path

import gradio as gr

from mace_core.errors import MaceError

from . import actions
from .actions import EraseForm, NO_PRESET, MASK_CHOICES, TYPE_DEFAULT
from .host import Host

log = logging.getLogger("mace.webui")

TITLE = "MACE"
ELEM_ID = "mace_tab"

INTRO = ("Erase concepts (a name, a style, an object, nudity) from a Stable Diffusion 1.x / 2.x / SDXL checkpoint "
         "with MACE: closed-form refinement of the cross-attention, one LoRA per concept, closed-form fusion. "
         "The result is a new checkpoint; the input file is never modified.")

# Advanced fields, in the core's order: (form key, label), one per setting the core declares
# (`actions.advanced_settings`). An empty field takes the concept type's default, which is its
# placeholder (`_placeholders`).
_ADVANCED = [(i.name, i.label[:1].upper() + i.label[1:]) for i in actions.advanced_settings()]
_KEYS = [k for k, _ in _ADVANCED]


def _placeholders(ctype: str, host: Host) -> dict[str, str]:
    """What each empty advanced field means for concept type ``ctype``: the type's default value
    (CLIP skip: the web UI's own setting), so a placeholder never shows another number."""
    from mace_core.method.concepts import Settings, get_type

    try:
        settings = Settings().overlay(get_type(ctype).settings)
    except MaceError:
        return {k: "" for k in _KEYS}
    out = {k: f"default: {getattr(settings, k)}" for k in _KEYS if k != "clip_skip"}
    out["clip_skip"] = f"default: the web UI's ({host.default_clip_skip()})"
    return out


def _message(e: BaseException) -> str:
    from mace_core.errors import InterruptedRun

    if isinstance(e, InterruptedRun):
        return (f"**Interrupted:** {e}. Press **Erase** again with the same settings and project name to "
                f"resume.")
    if isinstance(e, MaceError):
        return f"**Error:** {e}"
    log.exception("MACE tab: unexpected error")
    return f"**Unexpected error** ({type(e).__name__}: {e}); the console has the details."


def _progress_callback(progress):
    def report(label: str, done: int, total: int) -> None:
        try:
            progress(min(done / max(total, 1), 1.0), desc=f"{label} ({done}/{total})")
        except Exception:  # a progress bar must never break a run
            pass
    return report


def build_ui(host: Host) -> gr.Blocks:
    """The tab's Blocks (not launched)."""
    from mace_core.method.concepts import concept_types, preset_names, setting_info

    types = sorted(concept_types())
    initial_type = "object" if "object" in types else types[0]
    presets = [NO_PRESET] + list(preset_names())
    checkpoints = host.list_checkpoints()
    current = host.current_checkpoint()

    with gr.Blocks(analytics_enabled=False, title=TITLE) as demo:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column():
                with gr.Row():
                    checkpoint = gr.Dropdown(choices=checkpoints, value=current if current in checkpoints else None,
                                             label="Checkpoint", elem_id="mace_checkpoint")
                    refresh = gr.Button(value="Refresh list", elem_id="mace_refresh")
                concepts = gr.Textbox(lines=4, label="Concepts to erase: one per line, phrase | anchor | type "
                                                     "(anchor and type optional)",
                                      placeholder="Tom Cruise\nVan Gogh | art | style\nairplane | a sky",
                                      elem_id="mace_concepts")
                with gr.Row():
                    ctype = gr.Dropdown(choices=types, value=initial_type,
                                        label="Type of lines that name none", elem_id="mace_type")
                    preset = gr.Dropdown(choices=presets, value=NO_PRESET, label="Preset (added to the concepts)",
                                         elem_id="mace_preset")
                preset_info = gr.Markdown("", elem_id="mace_preset_info")
                retain = gr.Textbox(lines=2, label="Keep (retain list): one per line",
                                    placeholder="Tom Hanks\nTom Hardy", elem_id="mace_retain")
                with gr.Row():
                    out_name = gr.Textbox(label="Output file name (saved in the checkpoint folder)",
                                          placeholder="model-without-x.safetensors", elem_id="mace_out_name")
                    overwrite = gr.Checkbox(value=False, label="Overwrite if it exists", elem_id="mace_overwrite")
                project = gr.Textbox(label="Project name (work folder in models/mace/; empty: the output name). "
                                           "Reuse a name to resume an interrupted run or to add concepts",
                                     elem_id="mace_project")
                with gr.Row():
                    closed_form_only = gr.Checkbox(value=False, label="Closed-form only (seconds, no training; "
                                                                      "weaker on the concept word itself)",
                                                   elem_id="mace_closed_form")
                    previews = gr.Checkbox(value=True, label="Before/after previews", elem_id="mace_previews")
                    blur = gr.Checkbox(value=True, label="Blur previews of explicit concepts", elem_id="mace_blur")
                with gr.Row():
                    low_vram = gr.Checkbox(value=False, label="Low VRAM (slower, same result: one training image at a "
                                                              "time, gradient checkpointing)", elem_id="mace_low_vram")
                    delete_images = gr.Checkbox(value=False, label="Delete the generated training images when done "
                                                                   "(re-fuse still works)",
                                                elem_id="mace_delete_images")
                with gr.Accordion(label="Advanced settings", open=False, elem_id="mace_advanced"):
                    defaults = gr.Markdown(actions.type_defaults(initial_type),
                                           elem_id="mace_defaults")
                    numbers = {}
                    hints = _placeholders(initial_type, host)
                    for i in range(0, len(_ADVANCED), 3):
                        with gr.Row():
                            for key, label in _ADVANCED[i:i + 3]:
                                numbers[key] = gr.Textbox(label=label, placeholder=hints[key], elem_id=f"mace_{key}")
                    with gr.Row():
                        mask = gr.Dropdown(choices=MASK_CHOICES, value=TYPE_DEFAULT, label="Mask source",
                                           elem_id="mace_mask")
                        sam = gr.Textbox(label="Segment-anything checkpoint (mask source 'sam')",
                                         elem_id="mace_sam_checkpoint")
                    # stage-2 objective (the core's choices) and abo's alternative the concept turns into
                    with gr.Row():
                        objective = gr.Radio(choices=list(setting_info("objective").choices), value="mace",
                                             label="Stage-2 objective",
                                             elem_id="mace_objective")
                        alternative = gr.Textbox(label="Alternative (abo): what the concept becomes",
                                                 elem_id="mace_alternative")
            with gr.Column():
                with gr.Row():
                    erase_btn = gr.Button(value="Erase", variant="primary", elem_id="mace_erase")
                    interrupt_btn = gr.Button(value="Interrupt", elem_id="mace_interrupt")
                    estimate_btn = gr.Button(value="Estimate time and GPU memory", elem_id="mace_estimate")
                estimate_info = gr.Markdown("", elem_id="mace_estimate_info")
                status = gr.Markdown("", elem_id="mace_status")
                gallery = gr.Gallery(label="Before | after (same prompts and seeds)", columns=2,
                                     elem_id="mace_gallery")
                out_path = gr.Textbox(label="Output file", interactive=False, elem_id="mace_output_path")
                load_btn = gr.Button(value="Load the new checkpoint in the web UI", visible=False,
                                     elem_id="mace_load")

        with gr.Accordion(label="Projects: restore and re-fuse", open=False, elem_id="mace_projects_section"):
            gr.Markdown("Each Erase run keeps its work in a project (statistics and one LoRA per concept). "
                        "Tick the concepts that should stay erased and press **Re-fuse**: seconds, no training. "
                        "Untick one to restore it; untick all to get the base model back.")
            projects = actions.list_projects(host.projects_folder())
            with gr.Row():
                project_dd = gr.Dropdown(choices=projects, value=None, label="Project", elem_id="mace_project_list")
                projects_refresh = gr.Button(value="Refresh projects", elem_id="mace_projects_refresh")
            project_info = gr.Markdown("", elem_id="mace_project_info")
            project_concepts = gr.CheckboxGroup(choices=[], value=[], label="Concepts to keep erased",
                                                elem_id="mace_project_concepts")
            with gr.Row():
                refuse_name = gr.Textbox(label="Output file name", elem_id="mace_refuse_out_name")
                refuse_overwrite = gr.Checkbox(value=False, label="Overwrite if it exists",
                                               elem_id="mace_refuse_overwrite")
                refuse_closed = gr.Checkbox(value=False, label="Closed-form only (projects erased that way)",
                                            elem_id="mace_refuse_closed_form")
            refuse_btn = gr.Button(value="Re-fuse", variant="primary", elem_id="mace_refuse")
            refuse_status = gr.Markdown("", elem_id="mace_refuse_status")
            refuse_path = gr.Textbox(label="Output file", interactive=False, elem_id="mace_refuse_output_path")

        # --- events -------------------------------------------------------------------------
        def on_refresh(selected):
            host.refresh_checkpoints()
            choices = host.list_checkpoints()
            value = selected if selected in choices else host.current_checkpoint()
            return gr.update(choices=choices, value=value if value in choices else None)

        refresh.click(fn=on_refresh, inputs=[checkpoint], outputs=[checkpoint], queue=False)

        def on_page_load():
            # the web UI loads its model after building the tabs (and names it with its hash then):
            # the dropdown shows the model loaded when the page opens
            choices = host.list_checkpoints()
            current = host.current_checkpoint()
            return gr.update(choices=choices, value=current if current in choices else None)

        demo.load(fn=on_page_load, inputs=[], outputs=[checkpoint], queue=False)

        def on_type(ctype_v):
            hints = _placeholders(ctype_v, host)
            return [actions.type_defaults(ctype_v)] + [gr.update(placeholder=hints[k]) for k in _KEYS]

        ctype.change(fn=on_type, inputs=[ctype], outputs=[defaults] + [numbers[k] for k in _KEYS], queue=False)

        def on_preset(name):
            if not name or name == NO_PRESET:
                return ""
            from mace_core.method.concepts import load_preset

            try:
                spec = load_preset(name)
            except MaceError as e:
                return f"**Error:** {e}"
            shown = ", ".join(c.phrase for c in spec.concepts[:8])
            more = f" and {len(spec.concepts) - 8} more" if len(spec.concepts) > 8 else ""
            return f"Preset **{name}**: {len(spec.concepts)} concepts ({shown}{more})."

        preset.change(fn=on_preset, inputs=[preset], outputs=[preset_info], queue=False)

        num_keys = _KEYS

        def form_of(checkpoint_v, concepts_v, ctype_v, preset_v, retain_v, out_name_v, overwrite_v, project_v,
                    closed_v, previews_v, blur_v, mask_v, sam_v, objective_v, alternative_v, low_vram_v, delete_v,
                    *numbers_v) -> EraseForm:
            return EraseForm(checkpoint=checkpoint_v or "", concepts=concepts_v or "", ctype=ctype_v or "object",
                             preset=preset_v or NO_PRESET, retain=retain_v or "", out_name=out_name_v or "",
                             overwrite=bool(overwrite_v), project=project_v or "", closed_form_only=bool(closed_v),
                             previews=bool(previews_v), blur_explicit=bool(blur_v), mask=mask_v or TYPE_DEFAULT,
                             sam_checkpoint=sam_v or "",
                             objective=objective_v or "",
                             alternative=alternative_v or "", low_vram=bool(low_vram_v), delete_images=bool(delete_v),
                             numbers=dict(zip(num_keys, numbers_v)))

        # progress first: gradio looks for a gr.Progress among positional parameters only, and one after
        # the *values was never handed over (the tab showed no progress in A1111 or the standalone app)
        def on_erase(progress=gr.Progress(), *values):
            form = form_of(*values)
            try:
                res = actions.run_erase(host, form, progress=_progress_callback(progress))
            except Exception as e:  # noqa: BLE001 - shown to the user
                return gr.update(), _message(e), gr.update(), gr.update(), gr.update()
            plist = actions.list_projects(host.projects_folder())
            return (res.gallery, res.message, str(res.path), gr.update(visible=host.can_load_checkpoint),
                    gr.update(choices=plist))

        erase_inputs = ([checkpoint, concepts, ctype, preset, retain, out_name, overwrite, project, closed_form_only,
                         previews, blur, mask, sam, objective, alternative, low_vram, delete_images]
                        + [numbers[k] for k in num_keys])
        erase_btn.click(fn=on_erase, inputs=erase_inputs,
                        outputs=[gallery, status, out_path, load_btn, project_dd])

        def on_estimate(*values):
            try:
                return actions.estimate_run(host, form_of(*values))
            except Exception as e:  # noqa: BLE001 - shown to the user
                return _message(e)

        estimate_btn.click(fn=on_estimate, inputs=erase_inputs, outputs=[estimate_info])

        def on_interrupt():
            host.interrupt()

        interrupt_btn.click(fn=on_interrupt, inputs=[], outputs=[], queue=False)

        def on_load(path):
            try:
                if not path:
                    raise MaceError("nothing to load yet: erase first")
                return host.load_checkpoint(Path(path))
            except Exception as e:  # noqa: BLE001
                return _message(e)

        load_btn.click(fn=on_load, inputs=[out_path], outputs=[status])

        def on_projects_refresh(selected):
            plist = actions.list_projects(host.projects_folder())
            return gr.update(choices=plist, value=selected if selected in plist else None)

        projects_refresh.click(fn=on_projects_refresh, inputs=[project_dd], outputs=[project_dd], queue=False)

        def on_project(name):
            try:
                names = actions.project_concepts(host.projects_folder(), name)
                info = actions.project_summary(host.projects_folder(), name)
            except Exception as e:  # noqa: BLE001
                return _message(e), gr.update(choices=[], value=[]), gr.update()
            suggestion = f"{name}-refused" if name else ""
            return info, gr.update(choices=names, value=names), gr.update(value=suggestion)

        project_dd.change(fn=on_project, inputs=[project_dd], outputs=[project_info, project_concepts, refuse_name],
                          queue=False)

        def on_refuse(name, selected, out_name_v, overwrite_v, closed_v, progress=gr.Progress()):
            try:
                res = actions.refuse_project(host, name, selected or [], out_name_v or "", bool(overwrite_v),
                                             bool(closed_v), progress=_progress_callback(progress))
            except Exception as e:  # noqa: BLE001
                return _message(e), gr.update()
            return res.message, str(res.path)

        refuse_btn.click(fn=on_refuse, inputs=[project_dd, project_concepts, refuse_name, refuse_overwrite,
                                               refuse_closed], outputs=[refuse_status, refuse_path])
    return demo
