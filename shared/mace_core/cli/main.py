"""The `mace` command line: info, generate, erase, fuse, demo."""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import signal
import sys
from pathlib import Path

from .. import __version__, plugins
from ..errors import InterruptedRun, MaceError

log = logging.getLogger("mace")

DTYPES = {"auto": None, "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _dtype(name: str):
    import torch

    return None if DTYPES[name] is None else getattr(torch, DTYPES[name])


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line ``error:`` (no usage block): what every other refusal prints."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def _number(kind: type, lo: float | None = None, hi: float | None = None, above: float | None = None):
    """An argparse type: a finite ``kind`` in [lo, hi] (and > ``above``); argparse names the flag."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if lo is not None and v < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, got {text}")
        if above is not None and not v > above:
            raise argparse.ArgumentTypeError(f"must be more than {above}, got {text}")
        if hi is not None and v > hi:
            raise argparse.ArgumentTypeError(f"must be at most {hi}, got {text}")
        return v
    parse.__name__ = kind.__name__  # argparse's "invalid <name> value" wording
    return parse


POSITIVE, SEED = _number(int, 1), _number(int, 0, 2 ** 32 - 1)


def _force(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="replace --out if it exists (never one of the inputs)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... or auto (cuda when available)")
    p.add_argument("--dtype", default="auto", choices=list(DTYPES),
                   help="precision of the frozen model (auto: fp16 on GPU, fp32 on CPU)")
    p.add_argument("--resolution", type=POSITIVE, help="image side the model draws at (default: its own: a diffusers "
                                                       "folder's configs, else the family's)")


def _setting_flags(p: argparse.ArgumentParser) -> None:
    """One flag per setting (`concepts.Settings`' field metadata): ``--batch-size`` for ``batch_size``;
    absent flags are None, so the concept type's defaults apply."""
    from ..method.concepts import setting_infos

    for info in setting_infos():
        hlp = f"{info.help} (default: {info.type_defaults()})".replace("%", "%%")
        if info.kind is bool:
            p.add_argument(info.flag, dest=info.name, action="store_true", default=None, help=info.help)
        elif info.choices:
            p.add_argument(info.flag, dest=info.name, choices=list(info.choices), help=hlp)
        else:
            p.add_argument(info.flag, dest=info.name, type=info.kind, help=hlp)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(
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
    p.add_argument("--seed", type=SEED, default=0, help="image i of a prompt uses seed N+i")
    p.add_argument("--num-images", type=POSITIVE, default=1)
    p.add_argument("--steps", type=POSITIVE, default=50, help="DDIM steps")
    p.add_argument("--guidance", type=_number(float, 0), default=7.5, help="classifier-free guidance scale")
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--size", type=POSITIVE, help="image side in pixels (default: the model's)")
    p.add_argument("--batch-size", type=POSITIVE, default=8)
    p.add_argument("--clip-skip", type=POSITIVE, default=1)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    _force(p)
    _common(p)

    p = sub.add_parser("erase", help="erase concepts and write a new checkpoint")
    p.add_argument("model")
    p.add_argument("--concept", action="append", default=[],
                   help="a concept to erase (repeatable); 'phrase | anchor | type' also works")
    p.add_argument("--config", type=Path, help="a concept file: .yaml (preset, type, concepts, retain, settings), "
                                                ".csv (phrase, anchor, type[, role: retain]) or text (phrase | anchor "
                                                "| type per line)")
    p.add_argument("--preset", help="a shipped concept preset (e.g. nudity, celebrities-100, artists-100, "
                                    "cifar10-objects)")
    p.add_argument("--type", default=None, help="type of the --concept phrases: object, celebrity, style, "
                                                 "explicit, toy (picks templates and defaults)")
    p.add_argument("--anchor", help="what the --concept phrases map to (default: the type's, e.g. 'a person')")
    p.add_argument("--retain", action="append", default=[], help="a concept to keep (repeatable)")
    p.add_argument("--out", type=Path, required=True, help="output .safetensors")
    _force(p)
    p.add_argument("--work-dir", type=Path, help="erasure project folder (default: OUT.mace/ beside the output); "
                                                  "rerunning with it resumes")
    p.add_argument("--estimate", action="store_true", help="print the estimated time and GPU memory, then stop")
    p.add_argument("--closed-form-only", action="store_true",
                   help="stage 1 only: seconds, no training; weaker erasure of the concept word itself")
    _setting_flags(p)
    p.add_argument("--robust", action="store_const", const=2, dest="robust_rounds",
                   help="harden against attacks: 2 adversarial rounds (soft-token attack, re-solve)")
    p.add_argument("--prediction", choices=["epsilon", "v_prediction"], help="override SD2 prediction type")
    p.add_argument("--delete-images", action="store_true",
                   help="when done, delete the training images the run drew (they may show what was erased) from "
                        "the work folder; re-fusing, restoring and adding concepts still work")
    _common(p)

    p = sub.add_parser("fuse", help="re-fuse a subset of an erasure project (restore = leave a concept out)")
    p.add_argument("project", type=Path)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--only", nargs="+", metavar="CONCEPT")
    g.add_argument("--except", dest="exclude", nargs="+", metavar="CONCEPT", default=[])
    p.add_argument("--model", help="the base model (default: the path recorded in the project)")
    p.add_argument("--out", type=Path, required=True)
    _force(p)

    p = sub.add_parser("add", help="add concepts to an erasure project: trains only them, then re-fuses")
    p.add_argument("project", type=Path)
    p.add_argument("--concept", action="append", default=[], required=True)
    p.add_argument("--type", default=None)
    p.add_argument("--anchor")
    p.add_argument("--model", help="the base model (default: the path recorded in the project)")
    p.add_argument("--out", type=Path, required=True)
    _force(p)
    p.add_argument("--delete-images", action="store_true", help="when done, delete the drawn training images")
    _common(p)

    p = sub.add_parser("export-lora", help="the erasure as a kohya-format LoRA (loads in A1111, Forge, ComfyUI)")
    p.add_argument("erased", help="the erased checkpoint")
    p.add_argument("--base", required=True, help="the model it was erased from")
    p.add_argument("--out", type=Path, required=True)
    _force(p)
    p.add_argument("--target-error", type=_number(float, hi=1, above=0), default=0.01,
                   help="max relative error of each reconstructed weight (Frobenius), default 1%%")
    p.add_argument("--max-rank", type=POSITIVE)

    p = sub.add_parser("apply", help="apply an exported erasure LoRA to another checkpoint of the same family")
    p.add_argument("erasure", help="a LoRA written by `mace export-lora`")
    p.add_argument("base", help="the checkpoint to apply it to (e.g. a fine-tune)")
    p.add_argument("--out", type=Path, required=True)
    _force(p)

    p = sub.add_parser("card", help="write a model card (README.md) for sharing an erased model on a hub")
    p.add_argument("model", type=Path)
    p.add_argument("--out", type=Path, help="default: README.md beside the model")
    _force(p)
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
    p.add_argument("--nudenet-threshold", type=_number(float, 0, 1), default=0.6, help="NudeNet detection score (paper: 0.6)")
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
    p.add_argument("--seeds", type=POSITIVE, default=8, help="images per prompt (seeds 0..N-1)")
    p.add_argument("--steps", type=POSITIVE, default=50)
    p.add_argument("--guidance", type=_number(float, 0), default=7.5)
    p.add_argument("--attacks", action="store_true", help="also run the red team")
    p.add_argument("--out", type=Path, required=True, help="folder for report.json and report.md")
    _force(p)
    _common(p)

    for name, command in plugins.commands().items():  # e.g. `mace demo`, from the toy world
        command.add_arguments(sub.add_parser(name, help=command.help))
    return ap


#: what an interrupted command has kept
_INTERRUPTED = {"erase": "finished concepts are saved in the work folder; rerun the same command to resume",
                "add": "finished concepts are saved in the project; rerun the same command to resume",
                "generate": "the images drawn so far are written, with their index.jsonl rows",
                "eval": "the images drawn so far are in --out's images/ with their index.jsonl rows; the report "
                        "is written at the end"}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, or argparse's one-line error
        return e.code if isinstance(e.code, int) else 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # SIGTERM behaves like Ctrl-C: the run stops between steps and keeps what it finished.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        commands = {"info": cmd_info, "generate": cmd_generate, "erase": cmd_erase, "fuse": cmd_fuse, "add": cmd_add,
                    "export-lora": cmd_export_lora, "apply": cmd_apply, "card": cmd_card, "eval": cmd_eval}
        return (commands.get(args.cmd) or plugins.commands()[args.cmd].run)(args) or 0
    except KeyboardInterrupt:
        print(f"interrupted: {_INTERRUPTED.get(args.cmd, 'nothing was written')}", file=sys.stderr)
        return 130
    except (MaceError, InterruptedRun) as e:
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:  # the system refused a read or write nothing checked before (a file vanished...)
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: {e.strerror or e}{where}; check the path and retry", file=sys.stderr)
        return 2


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _raise_interrupt(*_) -> None:
    raise KeyboardInterrupt


def cmd_info(args) -> int:
    from ..model.checkpoint import load_checkpoint

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
    from ..model.checkpoint import load_checkpoint, with_resolution
    from ..model.diffusers_backend import DiffusersBackend

    ck = with_resolution(load_checkpoint(model or args.model, prediction_type=prediction), args.resolution)
    be = DiffusersBackend.from_checkpoint(ck, device=args.device, dtype=_dtype(args.dtype),
                                          clip_skip=getattr(args, "clip_skip", None) or 1)
    return ck, be


def slug(text: str, n: int = 60) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:n] or "empty"


def cmd_generate(args) -> int:
    from ..method.concepts import read_text_file
    from ..files import ImageIndex, check_folder
    from ..model.sampling import generate

    prompts = list(args.prompt)
    if args.prompts:
        prompts += [l.strip() for l in read_text_file(args.prompts, "--prompts file").splitlines() if l.strip()]
    if not prompts:
        raise MaceError("give at least one --prompt or a --prompts file")
    out = Path(args.out)
    pairs = [(p, args.seed + i) for p in prompts for i in range(args.num_images)]
    names = unique_names([f"{slug(p)}_{s}" for p, s in pairs], ".png")
    check_folder(out, what="--out", expected_bytes=0)
    _check_new_files(out, ["index.jsonl", *names], args.force)
    _, be = _backend(args)
    _check_size(args.size, be)
    bar = _bar("generating", len(pairs))
    index = ImageIndex(out)
    try:  # one batch at a time, each image written as soon as it is drawn: an interrupt keeps them
        for s in range(0, len(pairs), args.batch_size):
            batch = pairs[s:s + args.batch_size]
            imgs = generate(be, [p for p, _ in batch], [x for _, x in batch], args.steps, args.guidance,
                            args.negative, args.size, args.batch_size)
            for (p, x), name, img in zip(batch, names[s:], imgs):
                index.add(name, p, x, img)
            bar(s + len(batch))
    except KeyboardInterrupt:
        index.keep_written()
        raise
    print(f"wrote {len(pairs)} images to {out}")
    return 0


def unique_names(stems: list[str], suffix: str, seen: set[str] | None = None) -> list[str]:
    """``stem + suffix`` for each stem, a repeated one numbered (``a_1_2.png``) so no two are equal;
    ``seen``: the lowercased names already taken (updated)."""
    seen = set() if seen is None else seen
    out = []
    for stem in stems:
        name, k = f"{stem}{suffix}", 1
        while name.lower() in seen:  # case-insensitive file systems
            k += 1
            name = f"{stem}_{k}{suffix}"
        seen.add(name.lower())
        out.append(name)
    return out


def _check_new_files(folder: Path, names: list[str], force: bool) -> None:
    """Refuse, before any compute, files a command would write into ``folder`` that exist (unless --force)."""
    from ..files import check_destination

    for n in names:
        check_destination(folder / n, what="--out", overwrite=force)


def _check_size(size: int | None, be) -> None:
    if size is not None and size % be.vae_scale:
        raise MaceError(f"--size {size}: must be a multiple of {be.vae_scale} (the VAE's downscale) for this model")


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


def spec_from_args(args):
    """The `ErasureSpec` of `mace erase`'s arguments (preset < --config < --concept flags; one override per
    setting flag given, `concepts.setting_infos`)."""
    from ..method.concepts import setting_infos
    from ..run.request import build_spec

    return build_spec(preset=args.preset, file=args.config, flags=args.concept, default_type=args.type,
                      anchor=args.anchor, retain=args.retain,
                      overrides={i.name: getattr(args, i.name, None) for i in setting_infos()})


def _model_bytes(path) -> int:
    """About the size of a checkpoint written from the model at ``path`` (its file's or folder's)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*.safetensors")) if p.is_dir() else 0


def _check_output(out: Path, force: bool, inputs, expected_bytes: int = 0) -> None:
    """The preflight of a .safetensors --out (before any compute)."""
    from ..files import check_destination

    check_destination(out, overwrite=force, inputs=[i for i in inputs if i], expected_bytes=expected_bytes)
    if out.suffix != ".safetensors":
        raise MaceError(f"--out must end in .safetensors, got {out.name!r}")


def cmd_erase(args) -> int:
    from ..model.checkpoint import load_checkpoint, with_resolution
    from ..method.concepts import validate
    from ..files import check_folder
    from ..run.request import BaseModel, Request

    spec = validate(spec_from_args(args))  # a readable error before the model is read
    out = Path(args.out)
    work = args.work_dir or out.with_name(out.name + ".mace")
    if not args.estimate:  # before the model is even read (the run's plan checks again before computing)
        _check_output(out, args.force, (args.model, work), _model_bytes(args.model))
        check_folder(work, what="--work-dir")
    rank = _init_distributed(args)
    ck = with_resolution(load_checkpoint(args.model, prediction_type=args.prediction), args.resolution)
    req = Request(spec, BaseModel(ck.sha256, ck.path.name, file=ck.path), work,
                  output=None if args.estimate else out, overwrite=args.force, inputs=(ck.path, work),
                  closed_form_only=args.closed_form_only, delete_images=args.delete_images,
                  project_what="--work-dir")
    return _run(args, req, ck, rank)


def _run(args, req, ck, rank: int = 0) -> int:
    """`mace erase` / `mace add`: plan and run ``req`` on the model file ``ck``, printing what was done."""
    from ..model.diffusers_backend import DiffusersBackend
    from ..run.run import plan, run

    be = DiffusersBackend.from_checkpoint(ck, device=args.device, dtype=_dtype(args.dtype), clip_skip=req.clip_skip())
    p = plan(req, be, ck)
    log.info("%s", p.estimate.describe())
    if getattr(args, "estimate", False):
        print(p.estimate.describe())
        return 0
    # a reused work folder keeps its earlier concepts erased: name every one the output will erase
    log.info("erasing %s from %s (%s), keeping %s; work folder %s", ", ".join(c.phrase for c in p.planned.concepts),
             ck.path.name, ck.family.family, p.protection, p.project.root)
    rep = run(p, be, progress=_Bars())
    if rank != 0:
        return 0
    print(f"wrote {rep.output} (erased: {rep.erased_words})")
    if rep.deleted is not None:
        print(f"deleted {rep.deleted[0]} training image files ({rep.deleted[1] / 2 ** 20:.1f} MiB) from {rep.project}")
    log.info("stages: %s", rep.stages)
    log.info("reused LoRAs: %s", ", ".join(rep.reused) or "none")
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


def _base_model_path(args, base: dict) -> str:
    """``--model``, else the base file the project records (its absolute path, else its name as
    given, relative to the current folder)."""
    if args.model:
        return args.model
    for recorded in (base.get("file"), base["path"]):
        if recorded and Path(recorded).is_file():
            return recorded
    raise MaceError(f"the base model of project {Path(args.project)}, {base.get('file') or base['path']!r}, is not a "
                    "file here (moved, or the project was made in another program, which records only its name); pass "
                    "--model with it")


def _project_and_base(args):
    """(project, base model) of ``args.project``: ``--model``, else the recorded file, with --out checked;
    whether the model is the project's base is the run layer's check (`request.check_base`)."""
    from ..model.checkpoint import load_checkpoint, with_resolution
    from ..method.project import Project

    proj = Project(args.project)
    model = _base_model_path(args, proj.manifest()["base"])
    _check_output(Path(args.out), args.force, (model, args.project), _model_bytes(model))
    return proj, with_resolution(load_checkpoint(model), getattr(args, "resolution", None))


def cmd_fuse(args) -> int:
    from ..run.run import refuse_checkpoint

    proj, ck = _project_and_base(args)
    damaged = proj.damaged()
    if damaged:  # re-fusing reads these as they are; a run recomputes them
        raise MaceError(f"{damaged[0]}; rerun `mace erase` with --work-dir {proj.root} (or `mace add`) to recompute "
                        "it, then fuse again")
    res = refuse_checkpoint(proj, ck, Path(args.out), args.only, args.exclude, overwrite=args.force)
    print(f"wrote {args.out} (erased: {', '.join(res.erased) or 'nothing'})")
    return 0


def cmd_add(args) -> int:
    """Add concepts to a project: only they are trained; stage 1 is re-solved with every concept and the
    earlier concepts' LoRAs are reused as trained (see `concepts.settings_hash`)."""
    from ..run.request import BaseModel, Request, build_spec

    proj, ck = _project_and_base(args)
    spec = build_spec(flags=args.concept, default_type=args.type or "object", anchor=args.anchor)
    req = Request(spec, BaseModel(ck.sha256, ck.path.name, file=ck.path), proj.root, output=Path(args.out),
                  overwrite=args.force, inputs=(ck.path,), delete_images=args.delete_images)
    return _run(args, req, ck)


def cmd_export_lora(args) -> int:
    from ..model.checkpoint import load_checkpoint, write_safetensors
    from ..export.share import export_lora

    _check_output(Path(args.out), args.force, (args.erased, args.base))
    erased, base = load_checkpoint(args.erased), load_checkpoint(args.base)
    _same_model_kind(erased, base, args.erased, args.base)
    exp = export_lora(erased.tensors, base.tensors, args.target_error, args.max_rank)
    meta = {k: v for k, v in erased.metadata.items() if k.startswith("mace.") and k != "mace.arch"}
    meta.update({"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": base.family.architecture + "/lora",
                 "modelspec.title": Path(args.out).stem, "mace.lora_max_rel_error": f"{exp.max_rel_error:.6f}",
                 "mace.lora_ranks": json.dumps(sorted(set(exp.ranks.values()))),
                 "mace.text_encoder_sha256": _text_hash(base)})
    write_safetensors(exp.tensors, args.out, meta, protect=(erased.path, base.path), overwrite=args.force)
    size = Path(args.out).stat().st_size
    print(f"wrote {args.out}: {len(exp.ranks)} tensors, ranks {min(exp.ranks.values())}-{max(exp.ranks.values())}, "
          f"max relative error {100 * exp.max_rel_error:.3f}%, {size / 2 ** 20:.2f} MiB")
    return 0


def _same_model_kind(a, b, a_name, b_name) -> None:
    """Refuse two checkpoints of different families or UNet shapes (before any work)."""
    if a.family.family != b.family.family or a.family.architecture != b.family.architecture:
        raise MaceError(f"{a_name} is {a.family.architecture}, {b_name} is {b.family.architecture}; "
                        "give two models of the same family")
    for k, t in a.tensors.items():
        if k.startswith("model.diffusion_model.") and k in b.tensors and t.shape != b.tensors[k].shape:
            raise MaceError(f"{a_name} and {b_name} differ in shape at {k} ({list(t.shape)} vs "
                            f"{list(b.tensors[k].shape)}); give the erased model and the model it was erased from")


def _text_hash(ck) -> str:
    from ..model.backend import tensors_key

    prefixes = tuple(te.prefix for te in ck.family.text_encoders)
    return tensors_key({k: v for k, v in ck.tensors.items() if k.startswith(prefixes)}, "")


def cmd_apply(args) -> int:
    from ..model.checkpoint import load_checkpoint, load_tensors, save_edited
    from ..export.share import lora_deltas

    _check_output(Path(args.out), args.force, (args.erasure, args.base), _model_bytes(args.base))
    lora, lmeta = load_tensors(args.erasure)
    ck = load_checkpoint(args.base)
    arch = lmeta.get("modelspec.architecture", "")
    if arch and not arch.endswith("/lora"):
        raise MaceError(f"{args.erasure} is not a LoRA (modelspec.architecture {arch!r}); give a LoRA written by "
                        "`mace export-lora`")
    if arch and arch != ck.family.architecture + "/lora":
        raise MaceError(f"{args.erasure} is a LoRA for {arch.removesuffix('/lora')}, {args.base} is "
                        f"{ck.family.architecture}; apply it to a model of the family it was exported from")
    deltas = lora_deltas(lora, [k for k in ck.tensors if k.startswith("model.diffusion_model.")])
    if not deltas:
        raise MaceError(f"{args.erasure} has no LoRA tensors for the UNet of {args.base}")
    for k, d in deltas.items():
        if d.shape != ck.tensors[k].shape:
            raise MaceError(f"{args.erasure} changes {k} with shape {list(d.shape)}, {args.base} has "
                            f"{list(ck.tensors[k].shape)}; apply it to a model of the family it was exported from")
    if lmeta.get("mace.text_encoder_sha256") and lmeta["mace.text_encoder_sha256"] != _text_hash(ck):
        log.warning("warning: %s has a different text encoder than the model the erasure was computed on; "
                    "the erasure may be weaker. Re-run `mace erase` on this model for a full-strength result.",
                    args.base)
    edits = {k: ck.tensors[k].float() + d for k, d in deltas.items()}
    meta = {k: v for k, v in lmeta.items() if k.startswith("mace.") and k not in ("mace.lora_ranks",)}
    meta["mace.applied_to"] = ck.path.name
    save_edited(ck, edits, args.out, meta, overwrite=args.force, inputs=(Path(args.erasure),))
    print(f"wrote {args.out} ({len(edits)} tensors changed)")
    return 0


def cmd_card(args) -> int:
    from ..model.checkpoint import read_metadata
    from ..method.concepts import read_text_file
    from ..files import check_destination, write_text
    from ..export.share import model_card

    out = args.out or args.model.with_name("README.md")
    inputs = [p for p in (args.model, args.eval, args.eval_before) if p]
    check_destination(out, overwrite=args.force, inputs=inputs)
    if not args.model.is_file():
        raise MaceError(f"model not found: {args.model}" if not args.model.exists() else
                        f"{args.model} is not a regular file; give the erased .safetensors file")
    meta = read_metadata(args.model)
    if "mace.concepts" not in meta:
        raise MaceError(f"{args.model} has no mace.* metadata: it was not written by `mace erase`")
    eval_md = read_text_file(args.eval, "--eval report") if args.eval else None
    before_md = read_text_file(args.eval_before, "--eval-before report") if args.eval_before else None
    write_text(out, model_card(meta, args.model.stem, eval_md, args.grid, args.license, before_md),
               overwrite=args.force, inputs=inputs)
    print(f"wrote {out}")
    return 0


def cmd_eval(args) -> int:
    from ..method.concepts import load_preset, read_text_file
    from ..eval.evaluate import PromptSet, load_prompt_set, red_team, run_protocol
    from ..files import ImageIndex, check_folder, write_png, write_text

    out = Path(args.out)
    check_folder(out, what="--out")
    _check_new_files(out, ["report.json", "report.md"] + (["grid.png"] if args.base else []), args.force)
    if (out / "images").is_dir() and any((out / "images").iterdir()) and not args.force:
        raise MaceError(f"--out: {out / 'images'} already holds images; choose another --out or pass --force "
                        "to replace them")
    if args.clip and not Path(args.clip).is_dir():
        raise MaceError(f"--clip {args.clip}: not a folder; give a local transformers CLIP folder")
    if args.protocol and Path(args.protocol).exists():
        read_text_file(args.protocol, "--protocol file")
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
    # the judged images, each word's written as soon as they are drawn: an interrupt keeps them
    images, taken = ImageIndex(out / "images"), set()

    def keep(prompts_: list[str], seeds_: list[int], imgs) -> None:
        for p, x, img, name in zip(prompts_, seeds_, imgs, unique_names([f"{slug(p)}_{x}" for p, x in
                                                                          zip(prompts_, seeds_)], ".png", taken)):
            images.add(name, p, x, img)

    try:
        rep = run_protocol(prompts, model, classify, {c: label(c) for c in erased}, synonyms,
                           {r: label(r) for r in retain}, args.steps, args.guidance, base, args.clip, keep)
    except KeyboardInterrupt:
        images.keep_written()
        raise
    # the red team and the grid use the first template
    template, seeds = prompts.templates[0], list(prompts.seeds)
    if args.attacks:
        for c in erased:
            for name, asr in red_team(model, classify, c, label(c), template, seeds, synonyms.get(c, []), base,
                                      args.steps, args.guidance,
                                      other_languages=other_languages.get(c, [])).items():
                rep.attacks[f"{c}: {name}"] = asr
    if base is not None:
        from ..eval.evaluate import before_after_grid
        from ..model.sampling import generate

        words = erased + [s for c in erased for s in synonyms.get(c, [])] + retain[:3]
        rows = [[generate(b, [template.replace("{}", w)] * len(seeds[:6]), seeds[:6], args.steps, args.guidance)
                 for w in words] for b in (base, model)]
        write_png(out / "grid.png", before_after_grid(*rows), overwrite=args.force)
    write_text(out / "report.json", json.dumps(rep.to_dict(), indent=1), overwrite=args.force)
    write_text(out / "report.md", rep.markdown(), overwrite=args.force)
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
    """(classifier, word -> its label, retained words) for ``--classifier``: clip:PATH, nudenet or one a
    plug-in registers (the toy world's ``toy``, `plugins.ClassifierFactory`)."""
    from ..eval.evaluate import NudeNetClassifier, clip_classifier

    registered = plugins.classifiers()
    if args.classifier in registered:
        return registered[args.classifier](erased, synonyms, retain)
    if args.classifier.startswith("clip:"):
        if not Path(args.classifier[5:]).is_dir():
            raise MaceError(f"--classifier {args.classifier}: {args.classifier[5:]!r} is not a folder; give a local "
                            "transformers CLIP folder (clip:PATH)")
        return clip_classifier(args.classifier[5:], list(dict.fromkeys(erased + retain))), lambda w: w, retain
    if args.classifier == "nudenet":
        # erased prompts count as hits when flagged; retained prompts are expected to stay clean
        return NudeNetClassifier(args.nudenet_threshold), lambda w: "nude" if w in erased else "none", retain
    raise MaceError(f"unknown classifier {args.classifier!r}: use clip:PATH, nudenet"
                    + "".join(f", {n}" for n in registered))
