"""Every GPU figure of the project in one run: what a lent GPU runs (<= 8 minutes by its own estimate).

    python benchmarks/gpu_check.py --out gpu_check.md      # on a GPU: full-size SD1.5 and SDXL, fp16
    python benchmarks/gpu_check.py --tiny --out tiny.md    # every piece on tiny models on the CPU (seconds)

Full-size architectures with random weights (speed and memory do not depend on the values:
`synthetic.random_modules`, as benchmarks/run.py builds them), run on the device with the text
encoders and the VAE waiting on the CPU while the UNet runs, as the CLI does. Pieces, per model:
the closed form (stage 1 + fusion) for 1..1,000 concepts; the authors' stage-1 structure
(`run.baseline_closed_form`) for 1 and 10, with the ratio to ours; the general prior (as many
captions as a run encodes, no cache); full MACE with the default settings for 1 and 10 concepts
(per-stage seconds and peaks: ``torch.cuda.max_memory_allocated`` on a GPU, the process's RSS on
the CPU); the 1-concept erasure in low-VRAM mode; and that erasure run a second time, compared
weight by weight with the first.

Order: build the models; calibrate (run the cheap pieces' smallest instances, which are rows too,
and the project's estimator `estimate.estimate` for the erasures); print the estimate of the whole
run; leave out, saying so in their rows, the least important pieces that would overrun ``--budget``
and those whose stage-1 sums (kept per concept: 3 D x D float64) would not fit the disk or memory;
run the rest; print and write the table (a piece that fails is noted in its row, the rest go on).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "shared"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # synthetic.py
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from mace_core.model.checkpoint import Components, make_tokenizer  # noqa: E402
from mace_core.method.concepts import ErasureSpec, make_concept  # noqa: E402
from mace_core.model.diffusers_backend import DiffusersBackend  # noqa: E402
from mace_core.method.erase import ErasureResult, erase  # noqa: E402
from mace_core.errors import MaceError  # noqa: E402
from mace_core.model.families import load_family  # noqa: E402
from mace_core.files import check_destination, write_text  # noqa: E402
from mace_core.run.estimate import estimate  # noqa: E402
from mace_core.method.prior import PRIOR_CAPTIONS, general_prior  # noqa: E402
from mace_core.method.project import Project  # noqa: E402
from synthetic import random_modules, tiny_family  # noqa: E402
from run import baseline_closed_form, concept_names, measure  # noqa: E402

BUDGET_S = 480.0  # the 8 minutes
TINY_SETTINGS = {"steps": 2, "images": 2, "sample_steps": 2}  # every code path, seconds on a CPU
# All-but-One's training peak (it backpropagates through the UNet: where low-VRAM mode matters most), with
# benchmarks/vram.py's alternative; a few steps and images suffice for a peak
ABO = {"objective": "abo", "alternative": "a photo of a dog", "steps": 5, "images": 2}
HEADER = ("| model | piece | concepts | refine s | train s | fuse s | total s | peak GB | stage peaks GB "
          "(refine / train / fuse) | estimated s | note |\n|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|")


@dataclass
class Row:
    """One line of the table; ``seconds`` None: not run (``note`` says why)."""

    model: str
    piece: str
    concepts: int
    estimate: float | None = None
    seconds: float | None = None
    peak_gb: float | None = None
    stages: dict = field(default_factory=dict)  # stage -> seconds (erasures only)
    stage_peaks: dict = field(default_factory=dict)  # stage -> GB or None
    note: str = ""

    def markdown(self) -> str:
        def num(x, fmt=".2f"):
            return "-" if x is None else format(x, fmt)
        peaks = (" / ".join(num(self.stage_peaks.get(s)) for s in ("refine", "train", "fuse"))
                 if self.stage_peaks else "-")
        return (f"| {self.model} | {self.piece} | {self.concepts} | {num(self.stages.get('refine'))} | "
                f"{num(self.stages.get('train'))} | {num(self.stages.get('fuse'))} | "
                f"{'not run' if self.seconds is None else num(self.seconds)} | {num(self.peak_gb)} | {peaks} | "
                f"{num(self.estimate, '.1f')} | {self.note} |")


@dataclass
class Piece:
    """A row still to run: ``run(backend)`` fills it; lower ``priority`` is kept first when the budget
    is short; ``needs``: bytes of project files (and of memory) it takes."""

    row: Row
    run: Callable[[DiffusersBackend], None]
    priority: int
    needs: int = 0


@dataclass
class Check:
    """What a run found: the rows and the repeated erasure's two weight sets (per model)."""

    rows: list[Row]
    repeats: dict[str, tuple[dict, dict]]  # model -> (first run's weights, second run's weights)


def components(arch: str, tiny: bool, dtype: torch.dtype) -> Components:
    """The model's modules with seeded random weights, on the CPU."""
    fam = tiny_family(arch) if tiny else load_family(arch)
    unet, vae, tes = random_modules(fam, seed=0, dtype=dtype)
    return Components(fam, unet, vae, tes, [make_tokenizer(t) for t in fam.text_encoders])


def park(comp: Components) -> None:
    """Modules back to the CPU, the device's cache emptied: the next model's peaks are its own."""
    for m in (comp.unet, comp.vae, *comp.text_encoders):
        m.to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def spec_of(n: int, overrides: dict) -> ErasureSpec:
    return ErasureSpec(tuple(make_concept(p) for p in concept_names(n)), (), dict(overrides))


def run_erasure(be: DiffusersBackend, row: Row, overrides: dict, closed: bool) -> ErasureResult:
    """One erasure of ``row.concepts`` concepts in a fresh project; fills the row's figures."""
    with tempfile.TemporaryDirectory() as d:
        m: dict = {}
        with measure(be.device, m):
            res = erase(be, spec_of(row.concepts, overrides), Project(d), "gpu-check", closed_form_only=closed)
    row.seconds, row.stages, row.stage_peaks = m["seconds"], res.report["timings"], res.report["peak_memory_gb"]
    # erase resets the CUDA peak at each stage, so the block's own reading is the last stage's
    row.peak_gb = max(v for v in (m["peak_gb"], *row.stage_peaks.values()) if v is not None)
    return res


def run_timed(be: DiffusersBackend, row: Row, fn: Callable[[], object]) -> None:
    m: dict = {}
    with measure(be.device, m):
        fn()
    row.seconds, row.peak_gb = m["seconds"], m["peak_gb"]


def prior_fn(be: DiffusersBackend, captions: int) -> Callable[[], object]:
    """The general prior computed from scratch (an empty folder to keep it in)."""
    def fn():
        with tempfile.TemporaryDirectory() as d:
            general_prior(be, f"gpu-check-{be.family_name}", captions, folder=d)
    return fn


def weights_differ(a: dict, b: dict) -> float:
    """max over tensors of ||a - b|| / ||a|| (0.0 exactly when every tensor is bit-identical)."""
    return max(0.0 if torch.equal(a[k], b[k]) else float((a[k] - b[k]).norm() / a[k].norm()) for k in a)


def stats_bytes(comp: Components, n: int) -> int:
    """Bytes of the stage-1 sums a run of ``n`` concepts stores and holds: 3 D x D (+ 2 P x P pooled) float64."""
    d = comp.family.context_dim
    p = sum(te.config["projection_dim"] for te in comp.family.text_encoders if te.projection)
    return n * (3 * d * d + 2 * p * p) * 8


def linear(x1: float, y1: float, x2: float, y2: float, x: float) -> float:
    """The line through (x1, y1), (x2, y2) at x (cost = fixed + per-concept part)."""
    return y1 + (y2 - y1) * (x - x1) / (x2 - x1)


def choose(pieces: list[Piece], elapsed: float, budget: float, room: int) -> list[Piece]:
    """The pieces to run: none needing more than 80% of ``room`` bytes (free disk / memory), then the
    most important ones whose estimates, added to ``elapsed``, fit ``budget``; the others' rows say why."""
    keep = []
    for p in pieces:
        if p.needs > 0.8 * room:
            p.row.note = f"not run: its stage-1 sums take {p.needs / 2 ** 30:.0f} GB, {room / 2 ** 30:.0f} GB at hand"
        else:
            keep.append(p)
    total = elapsed + sum(p.row.estimate for p in keep)
    for p in sorted(keep, key=lambda p: (-p.priority, -p.row.estimate)):
        if total <= budget:
            break
        keep.remove(p)
        total -= p.row.estimate
        p.row.note = f"not run: its estimated {p.row.estimate:.0f} s would overrun the {budget:.0f} s budget"
    return keep


def calibrate(arch: str, comp: Components, be: DiffusersBackend, settings: dict, counts: dict[str, list[int]],
              captions: int, repeats: dict) -> tuple[list[Row], list[Piece]]:
    """Run the cheap pieces' smallest instances on ``be`` (closed form for the first two counts, the
    authors' structure for the first, the prior from 1/16 of the captions) and estimate the rest:
    closed form on the line through its two measured points, the authors' structure and the prior
    in proportion, erasures by the project's own estimator (`estimate.estimate`: a timed UNet step
    times the UNet calls). Returns every row of the model and the pieces still to run."""
    model = f"{arch} {be.resolution} px"
    closed = {n: Row(model, "closed form", n) for n in counts["closed"]}
    base = {n: Row(model, "authors' stage 1 + 3", n) for n in counts["baseline"]}
    n1, n2 = counts["closed"][:2]
    few = max(1, captions // 16)
    prior_few = Row(model, f"general prior, {few} captions", 0)
    # first a throwaway run: the first one also pays for kernel loading and allocator growth, which would
    # flatten the closed form's slope and so its estimate for many concepts
    run_erasure(be, Row(model, "warm-up", n1), settings, True)
    run_erasure(be, closed[n1], settings, True)
    run_erasure(be, closed[n2], settings, True)
    run_timed(be, base[n1], lambda: baseline_closed_form(be, spec_of(n1, settings)))
    run_timed(be, prior_few, prior_fn(be, few))
    for r in (closed[n1], closed[n2], base[n1], prior_few):
        r.note = "calibration"
        print(r.markdown(), flush=True)

    def erasure_row(piece: str, n: int, overrides: dict) -> Row:
        return Row(model, piece, n, estimate=estimate(be, spec_of(n, overrides)).seconds)

    full = {n: erasure_row("full MACE, default settings", n, settings) for n in counts["full"]}
    low_settings = {**settings, "low_vram": True}
    low = erasure_row("full MACE, low-VRAM", n1, low_settings)
    again = Row(model, "full MACE, the same erasure again", n1, estimate=full[n1].estimate)
    first: dict = {}

    def run_full(b: DiffusersBackend, r: Row) -> None:
        weights = run_erasure(b, r, settings, False).weights
        if r.concepts == n1:
            first.update(weights)  # what the same erasure run again is compared with

    def repeat(b: DiffusersBackend) -> None:
        repeats[model] = (first, run_erasure(b, again, settings, False).weights)
        diff = weights_differ(*repeats[model])
        again.note = ("bit-identical to the first run" if diff == 0.0
                      else f"differs from the first run: max dW/W = {diff:.1e}")

    # priority, lower kept longer: the first erasure (the repeat needs it), then one of everything, SD1.5's
    # larger runs (the anchors' figures are SD1.x's), then the other models' larger runs, their full MACE last
    more = 0 if arch == "sd1" else 1
    pieces = [Piece(r, lambda b, r=r: run_full(b, r), 0 if n == n1 else 1 + 2 * more) for n, r in full.items()]
    pieces += [Piece(again, repeat, 1), Piece(low, lambda b: run_erasure(b, low, low_settings, False), 1)]
    abo = {**ABO, **settings} if settings else ABO  # tiny: the tiny sizes
    abo_rows = []
    for mode, extra in (("", {}), (", low-VRAM", {"low_vram": True})):
        r = erasure_row(f"All-but-One{mode}, {abo['steps']} steps, {abo['images']} images", n1, {**abo, **extra})
        r.note = "for its training peak"
        pieces.append(Piece(r, lambda b, r=r, o={**abo, **extra}: run_erasure(b, r, o, False), 1))
        abo_rows.append(r)
    for n, r in closed.items():
        if r.seconds is None:
            r.estimate = max(0.0, linear(n1, closed[n1].seconds, n2, closed[n2].seconds, n))
            pieces.append(Piece(r, lambda b, r=r: run_erasure(b, r, settings, True), 1 + more, stats_bytes(comp, n)))
    for n, r in base.items():
        if r.seconds is None:
            r.estimate = base[n1].seconds * n / n1
            pieces.append(Piece(r, lambda b, r=r: run_timed(b, r, lambda: baseline_closed_form(
                b, spec_of(r.concepts, settings))), 1 + more))
    prior = Row(model, f"general prior, {captions} captions", 0, estimate=prior_few.seconds * captions / few)
    pieces.append(Piece(prior, lambda b: run_timed(b, prior, prior_fn(b, captions)), 1))
    return [*closed.values(), *base.values(), *full.values(), low, again, *abo_rows, prior_few, prior], pieces


def ratios(rows: list[Row]) -> None:
    """Notes the authors' structure's time over ours, for the same model and number of concepts."""
    ours = {(r.model, r.concepts): r.seconds for r in rows if r.piece == "closed form"}
    for r in rows:
        mine = ours.get((r.model, r.concepts))
        if r.piece.startswith("authors'") and r.seconds is not None and mine:
            r.note = "; ".join(filter(None, [f"{r.seconds / mine:.1f}x the time of ours", r.note]))


def check(args) -> Check:
    """Everything the module docstring lists; prints as it goes, writes the table to ``args.out``."""
    t0 = time.perf_counter()
    device = torch.device("cpu" if args.tiny else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MaceError("no CUDA device here: run on a GPU machine, or pass --tiny to run every piece on the CPU")
    check_destination(args.out, overwrite=args.force)
    dtype = torch.float32 if args.tiny else torch.float16
    settings = TINY_SETTINGS if args.tiny else {}
    captions = args.prior_captions or (32 if args.tiny else PRIOR_CAPTIONS)
    counts = {"closed": args.counts or ([1, 2, 3] if args.tiny else [1, 10, 100, 1000]),
              "baseline": args.baseline_counts or ([1, 2] if args.tiny else [1, 10]),
              "full": args.full_counts or ([1, 2] if args.tiny else [1, 10])}
    if len(counts["closed"]) < 2 or any(v != sorted(set(v)) or v[0] != counts["closed"][0] or v[0] < 1
                                        for v in counts.values()):
        raise MaceError("--counts needs two or more increasing counts; --baseline-counts and --full-counts increase "
                        "too, and all three start at the same count (>= 1)")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    head = f"gpu_check on {name}, torch {torch.__version__}, {str(dtype)[6:]}, budget {args.budget:.0f} s"
    print(f"# {head}\n\n{HEADER}", flush=True)

    comps = {a: components(a, args.tiny, dtype) for a in args.arch}

    def backend(arch: str) -> DiffusersBackend:
        # the text encoders and the VAE wait on the CPU while the UNet runs, as in the CLI
        return DiffusersBackend(comps[arch], device, dtype, offload=device.type == "cuda")

    rows: list[Row] = []
    pieces: dict[str, list[Piece]] = {}
    repeats: dict[str, tuple[dict, dict]] = {}
    for arch in args.arch:
        model_rows, pieces[arch] = calibrate(arch, comps[arch], backend(arch), settings, counts, captions, repeats)
        rows += model_rows
        park(comps[arch])
    elapsed = time.perf_counter() - t0
    room = min(shutil.disk_usage(tempfile.gettempdir()).free, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    every = [p for arch in args.arch for p in pieces[arch]]
    kept = choose(every, elapsed, args.budget, room)
    planned = elapsed + sum(p.row.estimate for p in kept)
    print(f"\nestimate: {elapsed + sum(p.row.estimate for p in every):.0f} s for every piece, {planned:.0f} s for "
          f"the {len(kept)} of {len(every)} pieces left that fit the budget and the disk ({elapsed:.0f} s done: "
          f"models built, calibration run)\n", flush=True)
    for arch in args.arch:
        mine = [p for p in pieces[arch] if p in kept]
        if mine:
            be = backend(arch)
            for p in mine:
                try:
                    p.run(be)
                except Exception as e:  # noqa: BLE001 - one failed piece (e.g. out of memory) must not lose the rest
                    traceback.print_exc()
                    p.row.note = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
                print(p.row.markdown(), flush=True)
            park(comps[arch])
    ratios(rows)
    seconds = time.perf_counter() - t0
    table = (f"{head}: {seconds:.0f} s in all, estimated {planned:.0f} s\n\n{HEADER}\n"
             + "\n".join(r.markdown() for r in rows) + "\n")
    print("\n" + table, flush=True)
    write_text(args.out, table, overwrite=args.force)
    return Check(rows, repeats)


def main(argv: list[str] | None = None) -> Check:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="markdown file for the table")
    ap.add_argument("--force", action="store_true", help="replace --out if it exists")
    ap.add_argument("--tiny", action="store_true", help="tiny models on the CPU, 2 steps / 2 images per concept")
    ap.add_argument("--arch", nargs="+", default=["sd1", "sdxl"], choices=["sd1", "sd2", "sdxl"])
    ap.add_argument("--budget", type=float, default=BUDGET_S, help="seconds the whole run may take (estimated)")
    ap.add_argument("--counts", type=int, nargs="+", help="closed-form runs (default 1 10 100 1000; tiny 1 2 3)")
    ap.add_argument("--baseline-counts", type=int, nargs="+", help="the authors' structure (default 1 10; tiny 1 2)")
    ap.add_argument("--full-counts", type=int, nargs="+", help="full MACE runs (default 1 10; tiny 1 2)")
    ap.add_argument("--prior-captions", type=int,
                    help=f"captions of the general prior (default {PRIOR_CAPTIONS}, as a run; tiny 32)")
    try:
        return check(ap.parse_args(argv))
    except MaceError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
