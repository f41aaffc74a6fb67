"""One erasure run, for every front-end: `plan` resolves a `Request` once, `run` executes the plan.

    Request --plan(backend)--> Plan --run(backend, progress, should_stop)--> Report (+ the output file)

`plan` validates the request against the model's tokenizer, checks the output destination and the
project's base model (`request.check_base`) before any compute, merges the request into the project
(what it already holds, which LoRAs it reuses) and measures the estimate. `run` refuses a GPU too small
for that estimate, erases (`erase.erase`: the three stages, resuming from the project), records the
base's weights id, writes the output (rank 0 of a distributed run), hands the project to the host
while its training images still exist (``before_cleanup``: a preview) and deletes them when asked.
The CLI, the A1111 tab and the ComfyUI nodes call exactly these two functions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..model.backend import Backend
from ..method.concepts import ErasureSpec, Settings, validate
from ..method import erase as stages  # called through the module: hosts' tests wrap `erase.erase`
from ..method.erase import ErasureResult, Progress, _world, describe_stages, save_result
from ..method.synonyms import unknown_note
from ..errors import MaceError
from .estimate import Estimate, check_fits, estimate, gpu_memory_gb, refusal
from ..method.project import Project
from .request import BaseModel, Request, check_base


@dataclass
class Plan:
    """A request resolved against a model and its project: ``spec`` (validated), ``planned`` (what the
    project will hold: its concepts with the request's merged in), each planned concept's ``settings``,
    the concepts whose LoRA the project already holds (``reused``), the ``base`` identity the project
    records, the ``estimate`` of what is left to do, and the base model's ``checkpoint`` (a
    `checkpoint.Checkpoint`, the output's other tensors; None for a host that writes no file)."""

    request: Request
    spec: ErasureSpec
    planned: ErasureSpec
    project: Project
    base: BaseModel
    settings: dict[str, Settings]
    reused: list[str]
    estimate: Estimate
    checkpoint: Any = None

    @property
    def protection(self) -> str:
        """What stage 1 keeps, in words: the retain list, a type's default protection, or the prior only."""
        return self.planned.protected()[1] or "the general prior only"

    def refusal(self, device: torch.device) -> str | None:
        """Why this run does not fit ``device``'s memory, with advice (None: it fits)."""
        return refusal(self.estimate, gpu_memory_gb(device))


@dataclass
class Report:
    """What a run did: the edited weights (file key -> [C, D] fp32) and their ``mace.*`` metadata, the
    written ``output`` (None when the request names none, or on ranks other than 0), the erased and kept
    concepts, stage timings, reused LoRAs, and the training images deleted (files, bytes) if asked."""

    weights: dict[str, torch.Tensor]
    metadata: dict[str, str]
    project: Path
    output: Path | None
    erased: list[str]
    retained: list[str]
    estimate: str
    stages: str
    reused: list[str]
    deleted: tuple[int, int] | None = None
    details: dict = field(default_factory=dict)  # `erase.ErasureResult.report`
    protection: str = ""  # what stage 1 kept, in words (`Plan.protection`; and any list the model did not know)

    @property
    def erased_words(self) -> str:
        """The erased phrases, each with the model's own synonyms erased with it: "Bill Marlow (and the
        model's own synonyms: ace), Leo Kline"."""
        return ", ".join(c["phrase"] + (f" (and the model's own synonyms: {', '.join(c['found_synonyms'])})"
                                        if c.get("found_synonyms") else "")
                         for c in json.loads(self.metadata["mace.concepts"])) or "nothing"


def plan(request: Request, backend: Backend, checkpoint: Any = None) -> Plan:
    """Resolve ``request`` on ``backend`` (the base model; ``checkpoint``: its file, needed when the request
    names an output) before anything long starts; raises `MaceError` saying what to fix (bad concepts, an
    output or project folder that cannot or must not be written, a project made from another model)."""
    from ..method.concepts import settings_hash
    from ..files import check_destination, check_folder, tensors_bytes

    spec = validate(request.spec, backend.tokenize)
    if request.output is not None:
        out = Path(request.output)
        if checkpoint is None:
            raise ValueError("plan: a request with an output file needs the base model's checkpoint")
        if out.suffix != ".safetensors":
            raise MaceError(f"{request.what} must end in .safetensors, got {out.name!r}")
        check_destination(out, what=request.what, overwrite=request.overwrite,
                          inputs=(*request.inputs, request.project), force_hint=request.force_hint,
                          expected_bytes=tensors_bytes(checkpoint.tensors))
    check_folder(request.project, what=request.project_what)
    base = request.base
    if Project(request.project).exists():  # the project's recorded identity, once this model is its base
        known = check_base(Project(request.project), base.sha256, backend.original_weights, base.name,
                           request.find_base)
        # the file is recorded as the project's base only when it is that file (not a copy of its weights)
        base = BaseModel(known.sha256, known.name, base.weights_id or known.weights_id,
                         base.file if base.sha256 == known.sha256 else None)
    project = Project(request.project, base_file=base.file)
    planned = project.merged(spec)
    reused = [c.phrase for c in planned.concepts if project.has_lora(c, settings_hash(planned, c))]
    est = estimate(backend, spec, request.closed_form_only, project=project, prior_dir=request.prior_dir)
    return Plan(request, spec, planned, project, base, {c.phrase: planned.settings_for(c) for c in planned.concepts},
                reused, est, checkpoint)


def run(p: Plan, backend: Backend, progress: Progress | None = None, should_stop: Callable[[], bool] | None = None,
        before_cleanup: Callable[[Project], None] | None = None) -> Report:
    """Execute plan ``p`` on ``backend``: refuse a GPU too small for its estimate, erase (resuming the
    project), record the base's weights id, write the output (the plan's checkpoint with the edited
    weights), call ``before_cleanup(project)`` and delete the training images when asked.
    ``progress(label, done, total)`` and ``should_stop()`` are the host's; a stop raises
    `errors.InterruptedRun` between steps, finished concepts kept."""
    check_fits(p.estimate, backend.device)
    try:
        return _execute(p, backend, progress, should_stop, before_cleanup)
    finally:
        # `erase` locks the project against other processes; a host process lives on after the run,
        # and must not keep the CLI (or another host) out of the project once it is done or stopped
        p.project.unlock()


def _execute(p: Plan, backend: Backend, progress, should_stop, before_cleanup) -> Report:
    req = p.request
    res: ErasureResult = stages.erase(backend, p.spec, p.project, p.base.sha256, p.base.name, progress=progress,
                                      should_stop=should_stop, closed_form_only=req.closed_form_only,
                                      prior_dir=req.prior_dir)
    rank = _world()[0]
    output = deleted = None
    if rank == 0:
        _record_weights_id(p.project, p.base.weights_id)
        if req.output is not None:
            save_result(p.checkpoint, res, req.output, overwrite=req.overwrite, inputs=req.inputs)
            output = Path(req.output)
        if before_cleanup is not None:
            before_cleanup(p.project)
        if req.delete_images:
            deleted = p.project.delete_generated_images()
    return Report(res.weights, res.metadata, p.project.root, output, res.erased,
                  json.loads(res.metadata["mace.retain"]), p.estimate.describe(), describe_stages(res.report),
                  list(res.report.get("reused_loras", [])), deleted, res.report,
                  "; ".join(filter(None, (p.protection, unknown_note(res.report.get("unknown_lists", {}))))))


def refuse(project: Project, weights: dict[str, torch.Tensor], name: str, sha256: str | None = None,
           only: list[str] | None = None, exclude: tuple | list = (), closed_form_only: bool = False,
           find_base: Callable[[str], Any] | None = None) -> ErasureResult:
    """Re-fuse a subset of ``project``'s concepts (`erase.refuse`: restore = leave one out) on the model
    whose editable weights are ``weights`` (file key -> tensor), once it is shown to be the project's
    base (`request.check_base`, with the file's ``sha256`` when the host has a file). The host writes
    or patches the result."""
    check_base(project, sha256, lambda: weights, name, find_base)
    return stages.refuse(project, weights, only, exclude, closed_form_only)


def refuse_checkpoint(project: Project, ck, out: Path, only: list[str] | None = None, exclude: tuple | list = (),
                      closed_form_only: bool = False, overwrite: bool = False,
                      find_base: Callable[[str], Any] | None = None) -> ErasureResult:
    """:func:`refuse` on the loaded checkpoint file ``ck`` (`checkpoint.Checkpoint`), written to ``out``
    through the one write path (an existing file only with ``overwrite``; never the base file). What
    `mace fuse` and the tab's re-fuse do; the nodes patch a MODEL with :func:`refuse` instead."""
    res = refuse(project, stages.editable_weights(ck.tensors), ck.path.name, ck.sha256, only, exclude,
                 closed_form_only, find_base)
    stages.save_result(ck, res, out, overwrite=overwrite, inputs=(ck.path,))
    return res


def _record_weights_id(project: Project, wid: str | None) -> None:
    """Record the base's weights id in the project (when the host knows it), so that a host that holds
    the model as weights, not as a file, recognises it (`request.base_matches`)."""
    if not wid:
        return
    m = project.manifest()
    if m["base"].get("weights_id") != wid:
        m["base"]["weights_id"] = wid
        project.write_manifest(m)
