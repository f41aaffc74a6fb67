"""The `mace` command line: info, generate, erase, fuse, demo."""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import sys
from pathlib import Path

from . import __version__
from .errors import InterruptedRun, MaceError

log = logging.getLogger("mace")

DTYPES = {"auto": None, "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _dtype(name: str):
    import torch

    return None if DTYPES[name] is None else getattr(torch, DTYPES[name])


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... or auto (cuda when available)")
    p.add_argument("--dtype", default="auto", choices=list(DTYPES),
                   help="precision of the frozen model (auto: fp16 on GPU, fp32 on CPU)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="mace",
        description="Erase concepts (celebrities, styles, objects, nudity) from Stable Diffusion 1.x / 2.x / SDXL "
                    "checkpoints with MACE: closed-form refinement, one LoRA per concept, closed-form fusion.",
        epilog="Examples:\n  mace demo\n  mace info model.safetensors\n"
               "  mace erase model.safetensors --concept 'Tom Cruise' --type celebrity --out no-tom.safetensors\n"
               "  mace generate no-tom.safetensors --prompt 'a photo of Tom Cruise' --seed 1 --out imgs/",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"mace {__version__}")
    ap.add_argument("-v", "--verbose", action="store_true", help="more log output")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="what a model file is, and what was erased from it")
    p.add_argument("model", help=".safetensors / .ckpt file or diffusers folder")

    p = sub.add_parser("generate", help="draw images (PNG + index.jsonl) for prompts and seeds")
    p.add_argument("model")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", type=Path, help="a text file, one prompt per line")
    p.add_argument("--seed", type=int, default=0, help="image i of a prompt uses seed N+i")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--size", type=int, help="image side in pixels (default: the model's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--clip-skip", type=int, default=1)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    _common(p)

    p = sub.add_parser("erase", help="erase concepts and write a new checkpoint")
    p.add_argument("model")
    p.add_argument("--concept", action="append", default=[],
                   help="a concept to erase (repeatable); 'phrase | anchor | type' also works")
    p.add_argument("--config", type=Path, help="YAML: preset, type, concepts, retain, settings")
    p.add_argument("--preset", help="a shipped concept preset (e.g. nudity, celebrities-100, artists-100, "
                                    "cifar10-objects)")
    p.add_argument("--type", default=None, help="type of the --concept phrases: object, celebrity, style, "
                                                 "explicit, toy (picks templates and defaults)")
    p.add_argument("--anchor", help="what the --concept phrases map to (default: the type's, e.g. 'a person')")
    p.add_argument("--retain", action="append", default=[], help="a concept to keep (repeatable)")
    p.add_argument("--out", type=Path, required=True, help="output .safetensors")
    p.add_argument("--work-dir", type=Path, help="erasure project folder (default: OUT.mace/ beside the output); "
                                                  "rerunning with it resumes")
    p.add_argument("--estimate", action="store_true", help="print the estimated time and GPU memory, then stop")
    p.add_argument("--closed-form-only", action="store_true",
                   help="stage 1 only: seconds, no training; weaker erasure of the concept word itself")
    for name, typ, hlp in [
        ("steps", int, "LoRA training steps per concept"), ("images", int, "training images per concept"),
        ("rank", int, "LoRA rank"), ("lr", float, "LoRA learning rate"), ("seed", int, "random seed"),
        ("batch-size", int, "LoRA batch size"), ("lam", float, "stage-1 ridge toward the original weights"),
        ("prior", float, "general-prior strength (per token)"), ("domain", float, "retain-prior strength (per token)"),
        ("fuse-prior", float, "general-prior strength in fusion"), ("clip-skip", int, "text-encoder layer, as in A1111"),
        ("sample-steps", int, "DDIM steps for the training images"), ("guidance", float, "CFG for training images"),
    ]:
        p.add_argument(f"--{name}", type=typ, help=hlp)
    p.add_argument("--mask", choices=["attention", "sam", "none"], help="where the concept is in training images")
    p.add_argument("--sam-checkpoint", help="segment-anything checkpoint for --mask sam")
    p.add_argument("--fusion", choices=["closed-form", "naive"], help="how LoRAs combine (naive = ablation)")
    p.add_argument("--timesteps", choices=["cfis", "uniform"], help="LoRA timestep sampling")
    p.add_argument("--separable", action="store_true", default=None,
                   help="SepME: keep each concept's increment orthogonal to the other concepts' embeddings")
    p.add_argument("--robust", action="store_const", const=2, dest="robust_rounds",
                   help="harden against attacks: 2 adversarial rounds (soft-token attack, re-solve)")
    p.add_argument("--robust-rounds", type=int, dest="robust_rounds", help="number of adversarial rounds")
    p.add_argument("--objective", choices=["mace", "abo"],
                   help="stage-2 loss: mace (attention loss, default) or abo (All-but-One: turn the concept into "
                        "--alternative while keeping the unconditional prediction)")
    p.add_argument("--alternative", help="abo: what the erased concept should become, e.g. 'a cow'")
    p.add_argument("--prediction", choices=["epsilon", "v_prediction"], help="override SD2 prediction type")
    p.add_argument("--delete-images", action="store_true",
                   help="when done, delete the training images the run drew (they may show what was erased) from "
                        "the work folder; re-fusing, restoring and adding concepts still work")
    p.add_argument("--low-vram", action="store_true", default=None,
                   help="fit a smaller GPU: draw training images one at a time and recompute UNet activations in "
                        "backward passes (gradient checkpointing); slower, the same result")
    _common(p)

    p = sub.add_parser("fuse", help="re-fuse a subset of an erasure project (restore = leave a concept out)")
    p.add_argument("project", type=Path)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--only", nargs="+", metavar="CONCEPT")
    g.add_argument("--except", dest="exclude", nargs="+", metavar="CONCEPT", default=[])
    p.add_argument("--model", help="the base model (default: the path recorded in the project)")
    p.add_argument("--out", type=Path, required=True)

    p = sub.add_parser("add", help="add concepts to an erasure project: trains only them, then re-fuses")
    p.add_argument("project", type=Path)
    p.add_argument("--concept", action="append", default=[], required=True)
    p.add_argument("--type", default=None)
    p.add_argument("--anchor")
    p.add_argument("--model", help="the base model (default: the path recorded in the project)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--delete-images", action="store_true", help="when done, delete the drawn training images")
    _common(p)

    p = sub.add_parser("export-lora", help="the erasure as a kohya-format LoRA (loads in A1111, Forge, ComfyUI)")
    p.add_argument("erased", help="the erased checkpoint")
    p.add_argument("--base", required=True, help="the model it was erased from")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--target-error", type=float, default=0.01,
                   help="max relative error of each reconstructed weight (Frobenius), default 1%%")
    p.add_argument("--max-rank", type=int)

    p = sub.add_parser("apply", help="apply an exported erasure LoRA to another checkpoint of the same family")
    p.add_argument("erasure", help="a LoRA written by `mace export-lora`")
    p.add_argument("base", help="the checkpoint to apply it to (e.g. a fine-tune)")
    p.add_argument("--out", type=Path, required=True)

    p = sub.add_parser("card", help="write a model card (README.md) for sharing an erased model on a hub")
    p.add_argument("model", type=Path)
    p.add_argument("--out", type=Path, help="default: README.md beside the model")
    p.add_argument("--eval", type=Path, help="a metrics .md to embed (`mace eval` of this model)")
    p.add_argument("--eval-before", type=Path, help="`mace eval --attacks` report of the same erasure without "
                                                    "--robust: the card's before/after attack success rates")
    p.add_argument("--grid", help="an image (path or URL) to show")
    p.add_argument("--license", default="creativeml-openrail-m")

    p = sub.add_parser("eval", help="score an erased model (object / celebrity / artist protocol, pixel drift) "
                                    "and red-team it")
    p.add_argument("model")
    p.add_argument("--base", help="the model before erasure (pixel drift, embedding attack)")
    p.add_argument("--classifier", default="toy", help="toy (the toy world's judge), clip:PATH (a local "
                                                        "transformers CLIP folder, zero-shot) or nudenet "
                                                        "(needs `pip install nudenet==3.4.2`)")
    p.add_argument("--nudenet-threshold", type=float, default=0.6, help="NudeNet detection score (paper: 0.6)")
    p.add_argument("--clip", help="a local transformers CLIP folder: CLIP score of the retained images "
                                  "(and CLIP-feature FD vs --base)")
    p.add_argument("--concept", action="append", default=[], help="erased concept (default: from the metadata)")
    p.add_argument("--synonym", action="append", default=[], help="'concept=word' (repeatable)")
    p.add_argument("--translation", action="append", default=[],
                   help="'concept=word' in another language, for the red team's other-language attack "
                        "(repeatable; common words have shipped translations)")
    p.add_argument("--retain", action="append", default=[], help="retained concept to check (repeatable)")
    p.add_argument("--preset", help="a concept preset whose retain list is checked too (e.g. celebrities-100)")
    p.add_argument("--protocol", help="object, celebrity, artist (the paper's prompt sets) or a YAML file of that "
                                      "form: its templates and seeds replace --template / --seeds")
    p.add_argument("--template", default="a photo of a {}")
    p.add_argument("--seeds", type=int, default=8, help="images per prompt (seeds 0..N-1)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--attacks", action="store_true", help="also run the red team")
    p.add_argument("--out", type=Path, required=True, help="folder for report.json and report.md")
    _common(p)

    p = sub.add_parser("demo", help="erase a shape from the shipped toy model (CPU, offline, ~1 minute)")
    p.add_argument("--concept", default="circle")
    p.add_argument("--out", type=Path, default=Path("demo_out"))
    _common(p)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # SIGTERM behaves like Ctrl-C: the run stops between steps and keeps what it finished.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return {"info": cmd_info, "generate": cmd_generate, "erase": cmd_erase, "fuse": cmd_fuse, "add": cmd_add,
                "export-lora": cmd_export_lora, "apply": cmd_apply, "card": cmd_card, "eval": cmd_eval,
                "demo": cmd_demo}[args.cmd](args) or 0
    except KeyboardInterrupt:
        print("interrupted: finished concepts are saved in the work folder; rerun the same command to resume",
              file=sys.stderr)
        return 130
    except (MaceError, InterruptedRun) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _raise_interrupt(*_) -> None:
    raise KeyboardInterrupt


def cmd_info(args) -> int:
    from .checkpoint import load_checkpoint

    ck = load_checkpoint(args.model)
    fam = ck.family
    n_attn2 = sum(1 for k in ck.tensors if k.endswith("attn2.to_k.weight") and k.startswith("model.diffusion_model."))
    print(f"file:        {ck.path}")
    print(f"family:      {fam.family} ({fam.architecture}, {fam.prediction_type})")
    print(f"dtype:       {str(ck.dtype).removeprefix('torch.')}")
    print(f"attn2:       {n_attn2} cross-attention layers ({2 * n_attn2} to_k/to_v weights)")
    print(f"text width:  {fam.context_dim} ({' + '.join(str(t.width) for t in fam.text_encoders)})")
    mace = {k: v for k, v in ck.metadata.items() if k.startswith("mace.") and k != "mace.arch"}
    if mace:
        concepts = json.loads(mace.get("mace.concepts", "[]"))
        print(f"erased:      {', '.join(c['phrase'] for c in concepts) or '-'}")
        print(f"retained:    {', '.join(json.loads(mace.get('mace.retain', '[]'))) or '-'}")
        for k in sorted(mace):
            if k not in ("mace.concepts", "mace.retain"):
                print(f"{k}: {mace[k]}")
    else:
        print("erased:      nothing (no mace.* metadata)")
    return 0


def _backend(args, model=None, prediction=None):
    from .checkpoint import load_checkpoint
    from .diffusers_backend import DiffusersBackend

    ck = load_checkpoint(model or args.model, prediction_type=prediction)
    be = DiffusersBackend.from_checkpoint(ck, device=args.device, dtype=_dtype(args.dtype),
                                          clip_skip=getattr(args, "clip_skip", None) or 1)
    return ck, be


def slug(text: str, n: int = 60) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:n] or "empty"


def cmd_generate(args) -> int:
    from PIL import Image

    from .sampling import generate

    prompts = list(args.prompt)
    if args.prompts:
        if not args.prompts.is_file():
            raise MaceError(f"prompts file not found: {args.prompts}")
        prompts += [l.strip() for l in args.prompts.read_text().splitlines() if l.strip()]
    if not prompts:
        raise MaceError("give at least one --prompt or a --prompts file")
    _, be = _backend(args)
    pairs = [(p, args.seed + i) for p in prompts for i in range(args.num_images)]
    bar = _bar("generating", len(pairs))
    imgs = generate(be, [p for p, _ in pairs], [s for _, s in pairs], args.steps, args.guidance, args.negative,
                    args.size, args.batch_size, on_batch=lambda d, n: bar(d))
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "index.jsonl", "w") as idx:
        for (p, s), img in zip(pairs, imgs):
            name = f"{slug(p)}_{s}.png"
            Image.fromarray(img).save(args.out / name)
            idx.write(json.dumps({"file": name, "prompt": p, "seed": s}) + "\n")
    print(f"wrote {len(pairs)} images to {args.out}")
    return 0


def _bar(label: str, total: int):
    from tqdm import tqdm

    t = tqdm(total=total, desc=label, leave=False, file=sys.stderr)

    def update(done: int) -> None:
        t.update(done - t.n)
        if done >= total:
            t.close()
    return update


class _Bars:
    """tqdm bars keyed by stage label, as an `erase.Progress` callback."""

    def __init__(self):
        self.bars = {}

    def __call__(self, label: str, done: int, total: int) -> None:
        if label not in self.bars:
            self.bars[label] = _bar(label, total)
        self.bars[label](done)


def _cli_concepts(values: list[str], ctype: str, anchor: str | None) -> list:
    """--concept values ('phrase', 'phrase | anchor', 'phrase | anchor | type'); --anchor fills in
    the anchor of those that give none."""
    from .concepts import make_concept, parse_lines

    out = []
    for c in values:
        parsed = parse_lines(c, ctype)
        if len(parsed) != 1:
            raise MaceError(f"--concept {c!r}: give one concept per flag")
        one = parsed[0]
        out.append(make_concept(one.phrase, anchor, one.type) if anchor and "|" not in c else one)
    return out


def spec_from_args(args):
    from .concepts import ErasureSpec, load_config, load_preset, merge_specs

    spec = ErasureSpec(())
    if args.preset:
        spec = merge_specs(spec, load_preset(args.preset))
    if args.config:
        spec = merge_specs(spec, load_config(args.config))
    ctype = args.type or (spec.concepts[0].type if spec.concepts else "object")
    extra = _cli_concepts(args.concept, ctype, args.anchor)
    keys = ["steps", "images", "rank", "lr", "seed", "batch_size", "lam", "prior", "domain", "fuse_prior",
            "clip_skip", "sample_steps", "guidance", "mask", "sam_checkpoint", "fusion", "timesteps", "objective",
            "alternative", "robust_rounds", "separable", "low_vram"]
    overrides = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    return merge_specs(spec, ErasureSpec(tuple(extra), tuple(args.retain), overrides))


def cmd_erase(args) -> int:
    from .concepts import validate
    from .erase import describe_stages, erase
    from .project import Project

    spec = validate(spec_from_args(args))
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise MaceError(f"--out must end in .safetensors, got {out.name!r}")
    if Path(args.model).exists() and out.exists() and out.resolve() == Path(args.model).resolve():
        raise MaceError("refusing to overwrite the input model; choose another --out")
    rank = _init_distributed(args)
    ck, be = _backend(args, prediction=args.prediction)
    work = args.work_dir or out.with_name(out.name + ".mace")
    from .estimate import check_fits, estimate

    est = estimate(be, spec, args.closed_form_only, project=Project(work))
    log.info("%s", est.describe())
    if args.estimate:
        print(est.describe())
        return 0
    check_fits(est, be.device)
    log.info("erasing %s from %s (%s); work folder %s", ", ".join(c.phrase for c in spec.concepts),
             ck.path.name, ck.family.family, work)
    res = erase(be, spec, Project(work), ck.sha256, ck.path.name, progress=_Bars(),
                closed_form_only=args.closed_form_only)
    if rank != 0:
        return 0
    _save_result(ck, res, out)
    if args.delete_images:
        _delete_images(Project(work))
    log.info("stages: %s", describe_stages(res.report))
    if res.report["reused_loras"]:
        log.info("reused finished LoRAs: %s", ", ".join(res.report["reused_loras"]))
    return 0


def _init_distributed(args) -> int:
    """Join a torchrun / accelerate launch group (gloo on CPU, nccl on GPU); returns this rank."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    import torch
    import torch.distributed as dist

    cuda = args.device != "cpu" and torch.cuda.is_available()
    if cuda:
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank()


def _save_result(ck, res, out: Path) -> None:
    from .erase import save_result

    names = save_result(ck, res, out)
    print(f"wrote {out} (erased: {', '.join(names) or 'nothing'})")


def _delete_images(project) -> None:
    files, size = project.delete_generated_images()
    print(f"deleted {files} training image files ({size / 2 ** 20:.1f} MiB) from {project.root}")


def _project_and_base(args):
    """(project, base model, the base's sha256 as the project records it) of ``args.project``.

    The model (``--model``, else the recorded path) must be the project's base file (same sha256), or
    hold the cross-attention weights the project was made from (same `weights_id`): a project made in
    ComfyUI records that id, and only that id when its MODEL was patched before the MACE nodes (e.g. by
    a LoRA), since such a MODEL is no file."""
    from .checkpoint import load_checkpoint
    from .erase import editable_weights
    from .project import Project, weights_id

    proj = Project(args.project)
    base = proj.manifest()["base"]
    if not args.model and not Path(base["path"]).exists():
        raise MaceError(f"the base model this project records, {base['path']!r}, is not a file here (a project made "
                        "in ComfyUI records the checkpoint's name); pass --model with it")
    ck = load_checkpoint(args.model or base["path"])
    wid = weights_id(editable_weights(ck.tensors))
    if wid in (base["sha256"], base.get("weights_id")) or ck.sha256 == base["sha256"]:
        return proj, ck, base["sha256"]
    if base.get("weights_id") == base["sha256"]:
        advice = ("the project was made in ComfyUI from a MODEL patched before the MACE nodes (e.g. by a LoRA): pass "
                  "a checkpoint holding exactly those patched weights (e.g. that MODEL saved by ComfyUI's Save "
                  "Checkpoint)")
    else:
        advice = f"pass --model with the original ({base['path']})"
    raise MaceError(f"{ck.path.name} is not the model project {proj.root.name!r} was made from: neither the file "
                    f"(sha256 {ck.sha256[:12]}...) nor its cross-attention weights (weights id {wid[:12]}...) are "
                    f"the project's base ({base['sha256'][:12]}...); {advice}")


def cmd_fuse(args) -> int:
    from .erase import editable_weights, refuse

    proj, ck, _ = _project_and_base(args)
    res = refuse(proj, editable_weights(ck.tensors), args.only, args.exclude)
    _save_result(ck, res, Path(args.out))
    return 0


def cmd_add(args) -> int:
    from .concepts import ErasureSpec
    from .diffusers_backend import DiffusersBackend
    from .erase import erase

    proj, ck, base_sha256 = _project_and_base(args)
    new = _cli_concepts(args.concept, args.type or "object", args.anchor)
    be = DiffusersBackend.from_checkpoint(ck, device=args.device, dtype=_dtype(args.dtype))
    res = erase(be, ErasureSpec(tuple(new)), proj, base_sha256, ck.path.name, progress=_Bars())
    # stage 1 is re-solved with every concept; LoRAs of earlier concepts are reused as trained
    log.info("re-solved stage 1 for all concepts; reused LoRAs: %s", ", ".join(res.report["reused_loras"]) or "none")
    _save_result(ck, res, Path(args.out))
    if args.delete_images:
        _delete_images(proj)
    return 0


def cmd_export_lora(args) -> int:
    from .checkpoint import load_checkpoint, write_safetensors
    from .share import export_lora

    erased, base = load_checkpoint(args.erased), load_checkpoint(args.base)
    if erased.family.family != base.family.family:
        raise MaceError(f"{args.erased} is {erased.family.family}, {args.base} is {base.family.family}")
    exp = export_lora(erased.tensors, base.tensors, args.target_error, args.max_rank)
    meta = {k: v for k, v in erased.metadata.items() if k.startswith("mace.") and k != "mace.arch"}
    meta.update({"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": base.family.architecture + "/lora",
                 "modelspec.title": Path(args.out).stem, "mace.lora_max_rel_error": f"{exp.max_rel_error:.6f}",
                 "mace.lora_ranks": json.dumps(sorted(set(exp.ranks.values()))),
                 "mace.text_encoder_sha256": _text_hash(base)})
    write_safetensors(exp.tensors, args.out, meta, protect=(erased.path, base.path))
    size = Path(args.out).stat().st_size
    print(f"wrote {args.out}: {len(exp.ranks)} tensors, ranks {min(exp.ranks.values())}-{max(exp.ranks.values())}, "
          f"max relative error {100 * exp.max_rel_error:.3f}%, {size / 2 ** 20:.2f} MiB")
    return 0


def _text_hash(ck) -> str:
    from .prior import tensors_key

    prefixes = tuple(te.prefix for te in ck.family.text_encoders)
    return tensors_key({k: v for k, v in ck.tensors.items() if k.startswith(prefixes)}, "")


def cmd_apply(args) -> int:
    from safetensors.torch import load_file

    from .checkpoint import load_checkpoint, read_metadata, save_edited
    from .share import lora_deltas

    lora, lmeta = load_file(args.erasure), read_metadata(args.erasure)
    ck = load_checkpoint(args.base)
    deltas = lora_deltas(lora, [k for k in ck.tensors if k.startswith("model.diffusion_model.")])
    if not deltas:
        raise MaceError(f"{args.erasure} has no LoRA tensors for the UNet of {args.base}")
    if lmeta.get("mace.text_encoder_sha256") and lmeta["mace.text_encoder_sha256"] != _text_hash(ck):
        log.warning("warning: %s has a different text encoder than the model the erasure was computed on; "
                    "the erasure may be weaker. Re-run `mace erase` on this model for a full-strength result.",
                    args.base)
    edits = {k: ck.tensors[k].float() + d for k, d in deltas.items()}
    meta = {k: v for k, v in lmeta.items() if k.startswith("mace.") and k not in ("mace.lora_ranks",)}
    meta["mace.applied_to"] = ck.path.name
    save_edited(ck, edits, args.out, meta)
    print(f"wrote {args.out} ({len(edits)} tensors changed)")
    return 0


def cmd_card(args) -> int:
    from .checkpoint import read_metadata
    from .share import model_card

    meta = read_metadata(args.model)
    if "mace.concepts" not in meta:
        raise MaceError(f"{args.model} has no mace.* metadata: it was not written by `mace erase`")
    eval_md = args.eval.read_text() if args.eval else None
    before_md = args.eval_before.read_text() if args.eval_before else None
    out = args.out or args.model.with_name("README.md")
    out.write_text(model_card(meta, args.model.stem, eval_md, args.grid, args.license, before_md))
    print(f"wrote {out}")
    return 0


def cmd_eval(args) -> int:
    from .concepts import load_preset
    from .evaluate import PromptSet, load_prompt_set, red_team, run_protocol

    ck, model = _backend(args)
    erased = args.concept or [c["phrase"] for c in json.loads(ck.metadata.get("mace.concepts", "[]"))]
    if not erased:
        raise MaceError("no --concept given and the model has no mace.* metadata naming erased concepts")
    synonyms, other_languages = _word_lists(args.synonym), _word_lists(args.translation)
    prompts = (load_prompt_set(args.protocol) if args.protocol
               else PromptSet("object", (args.template,), tuple(range(args.seeds))))
    retain = args.retain + (list(load_preset(args.preset).retain) if args.preset else [])
    if prompts.protocol == "artist" and not args.attacks:  # CLIP scores the images: no classifier, no labels
        classify, label = None, lambda w: w
    else:
        classify, label, retain = _eval_classifier(args, erased, synonyms, retain)
    base = _backend(args, model=args.base)[1] if args.base else None
    rep = run_protocol(prompts, model, classify, {c: label(c) for c in erased}, synonyms,
                       {r: label(r) for r in retain}, args.steps, args.guidance, base, args.clip)
    # the red team and the grid use the first template
    template, seeds = prompts.templates[0], list(prompts.seeds)
    if args.attacks:
        for c in erased:
            for name, asr in red_team(model, classify, c, label(c), template, seeds, synonyms.get(c, []), base,
                                      args.steps, args.guidance,
                                      other_languages=other_languages.get(c, [])).items():
                rep.attacks[f"{c}: {name}"] = asr
    args.out.mkdir(parents=True, exist_ok=True)
    if base is not None:
        from PIL import Image

        from .evaluate import before_after_grid
        from .sampling import generate

        words = erased + [s for c in erased for s in synonyms.get(c, [])] + retain[:3]
        rows = [[generate(b, [template.replace("{}", w)] * len(seeds[:6]), seeds[:6], args.steps, args.guidance)
                 for w in words] for b in (base, model)]
        Image.fromarray(before_after_grid(*rows)).save(args.out / "grid.png")
    (args.out / "report.json").write_text(json.dumps(rep.to_dict(), indent=1))
    (args.out / "report.md").write_text(rep.markdown())
    print(rep.markdown())
    return 0


def _word_lists(items: list[str]) -> dict[str, list[str]]:
    """'concept=word' arguments -> {concept: [words]}."""
    out: dict[str, list[str]] = {}
    for item in items:
        concept, sep, word = item.partition("=")
        if not sep or not word.strip():
            raise MaceError(f"expected 'concept=word', got {item!r}")
        out.setdefault(concept.strip(), []).append(word.strip())
    return out


def _eval_classifier(args, erased: list[str], synonyms: dict[str, list[str]], retain: list[str]):
    """(classifier, word -> its label, retained words) for ``--classifier``; the toy world's judge
    also adds each shape's synonym and, without retained words, keeps the other shapes."""
    from .evaluate import NudeNetClassifier, clip_classifier, toy_classifier

    if args.classifier == "toy":
        from toyworld.world import SHAPES, SYNONYMS, WORD_TO_SHAPE

        for c in erased:
            synonyms.setdefault(c, [SYNONYMS[c]] if c in SYNONYMS else [])
        return toy_classifier(), lambda w: WORD_TO_SHAPE.get(w, w), retain or [s for s in SHAPES if s not in erased]
    if args.classifier.startswith("clip:"):
        return clip_classifier(args.classifier[5:], list(dict.fromkeys(erased + retain))), lambda w: w, retain
    if args.classifier == "nudenet":
        # erased prompts count as hits when flagged; retained prompts are expected to stay clean
        return NudeNetClassifier(args.nudenet_threshold), lambda w: "nude" if w in erased else "none", retain
    raise MaceError(f"unknown classifier {args.classifier!r}: use toy, clip:PATH or nudenet")


def cmd_demo(args) -> int:
    try:
        from toyworld.demo import run_demo
    except ImportError as e:
        raise MaceError(f"the toy world is not installed ({e})") from None
    return run_demo(args)
