"""Per-stage wall time and peak memory of an erasure, for growing numbers of concepts.

    python benchmarks/run.py                          # tiny SD1 architecture on CPU (seconds)
    python benchmarks/run.py --arch sd1 --device cuda # full-size SD1.5 architecture, random weights
    python benchmarks/run.py --arch sdxl --device cuda --counts 1 10 100 1000 --full-counts 1 10

Speed and memory do not depend on weight values, so full-size architectures are built from their
configs with random weights. "closed form" = stage-1 statistics + solve + stage-3 fusion (no
training); "full" adds drawing images, attention masks and LoRA training per concept. The authors'
structure is timed in the same run for stage 1 (per-embedding lists, an inverse per layer) and for
the training images (batch 1, 30 DPM steps, fp32). Peak memory is the process RSS (sampled) on CPU
and torch.cuda.max_memory_allocated on GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "shared"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # synthetic.py

import torch  # noqa: E402

from mace_core.model.checkpoint import Components, make_tokenizer  # noqa: E402
from mace_core.method.concepts import ErasureSpec, make_concept  # noqa: E402
from mace_core.model.diffusers_backend import DiffusersBackend  # noqa: E402
from mace_core.method.erase import POOLED_SUFFIX, erase  # noqa: E402
from mace_core.model.families import load_family  # noqa: E402
from mace_core.method.project import Project  # noqa: E402
from synthetic import random_modules, tiny_family  # noqa: E402

WORDS = ("amber basil cedar delta ember fjord garnet harbor indigo juniper kestrel lagoon meadow nimbus "
         "orchid pepper quartz raven saffron tundra umber velvet willow xenon yarrow zephyr").split()


def concept_names(n: int) -> list[str]:
    """n distinct two-word phrases (deterministic)."""
    return [f"{WORDS[i % len(WORDS)]} {WORDS[(i // len(WORDS)) % len(WORDS)]} {i}" for i in range(n)]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def measure(device: torch.device, out: dict):
    """Wall time and peak memory (GPU allocated, or sampled CPU RSS) of the block."""
    peak = [_rss()]
    stop = threading.Event()

    def sample():
        while not stop.wait(0.01):
            peak[0] = max(peak[0], _rss())
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize()
        out["seconds"] = time.perf_counter() - t0
        stop.set()
        th.join()
        out["peak_gb"] = (torch.cuda.max_memory_allocated() if device.type == "cuda" else peak[0]) / 2 ** 30


@contextmanager
def encoder_seconds(be: DiffusersBackend, out: dict):
    """Time spent inside the text encoders' forward passes during the block (``out["seconds"]``)."""
    out["seconds"], start, handles = 0.0, {}, []
    for te in be.components.text_encoders:
        handles.append(te.register_forward_pre_hook(lambda m, a: start.__setitem__(id(m), time.perf_counter())))
        handles.append(te.register_forward_hook(
            lambda m, a, o: out.__setitem__("seconds", out["seconds"] + time.perf_counter() - start[id(m)])))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def build(arch: str, device: torch.device, dtype: torch.dtype) -> DiffusersBackend:
    fam = tiny_family("sd1") if arch == "tiny" else load_family(arch)
    if arch == "toy":
        from toyworld import TOY_MODEL
        return DiffusersBackend.from_file(TOY_MODEL, device=str(device), dtype=dtype)
    unet, vae, tes = random_modules(fam, seed=0, dtype=dtype)
    comp = Components(fam, unet, vae, tes, [make_tokenizer(t) for t in fam.text_encoders])
    return DiffusersBackend(comp, device, dtype)


def baseline_closed_form(be: DiffusersBackend, spec: ErasureSpec) -> float:
    """The authors' stage 1 + 3 structure, timed: embeddings kept as per-concept lists on the device,
    outer products summed embedding by embedding for every layer, an explicit inverse per layer.
    (Same math as ours; ours solves one D x D system shared by all layers from Gram sums.)"""
    from mace_core.method.concepts import concept_prompts
    from mace_core.method.refine import align

    t0 = time.perf_counter()
    w0 = {k: v.to(be.device) for k, v in be.original_weights().items() if not k.endswith(POOLED_SUFFIX)}
    pairs = []  # list of (e, e*) vectors, as the authors' code keeps them
    for c in spec.concepts:
        ps, anchors = concept_prompts(c), concept_prompts(c, c.anchor)
        ct, at = be.encode(ps).context.float(), be.encode(anchors).context.float()
        for k, (p, a) in enumerate(zip(ps, anchors)):
            for i, j in align(be.tokenize(p), be.tokenize(a), ct.shape[1]):
                pairs.append((ct[k, i], at[k, j]))
    d = pairs[0][0].shape[0]
    for key, w in w0.items():
        mat1 = 1.0 * w.clone()
        mat2 = torch.eye(d, device=be.device)
        for e, es in pairs:
            mat1 += (w @ es)[:, None] @ e[None]
            mat2 += e[:, None] @ e[None]
        _ = mat1 @ torch.inverse(mat2)
    if be.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


@torch.no_grad()
def baseline_data(be: DiffusersBackend, prompt: str, images: int, steps: int = 30, guidance: float = 7.5) -> None:
    """The authors' data generation: one image at a time, 30 DPM-Solver steps, CFG 7.5, decoded to
    pixels (their masks then need GroundingDINO + SAM on top, not timed here)."""
    from diffusers import DPMSolverMultistepScheduler

    from mace_core.model.backend import TextBatch

    sched = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                        beta_schedule="scaled_linear", prediction_type=be.prediction_type)
    text = TextBatch.cat([be.encode([""]), be.encode([prompt])])
    side = be.resolution // be.vae_scale
    for i in range(images):
        sched.set_timesteps(steps)
        x = torch.randn(1, be.latent_channels, side, side, generator=torch.Generator().manual_seed(i)).to(be.device)
        x = x * sched.init_noise_sigma
        for t in sched.timesteps:
            eu, ec = be.predict(torch.cat([x, x]), t.expand(2).to(be.device), text).float().chunk(2)
            x = sched.step(eu + guidance * (ec - eu), t, x).prev_sample.to(be.dtype)
        be.decode_latents(x)


def data_generation(args, device: torch.device, be: DiffusersBackend) -> None:
    """Drawing one concept's training images: ours (batched, DDIM, fp16 on GPU, attention masks
    captured in the same pass) against the authors' way (batch 1, 30 DPM steps, fp32, no masks)."""
    from mace_core.method.masks import draw_concept

    prompt, n = "a photo of the amber basil", args.images
    ours: dict = {}
    with measure(device, ours):
        draw_concept(be, prompt, "amber basil", list(range(n)), args.sample_steps, 7.5)
    fp32 = be if be.dtype == torch.float32 else build(args.arch, device, torch.float32)
    theirs: dict = {}
    with measure(device, theirs):
        baseline_data(fp32, prompt, n)
    print(f"\n| data for 1 concept ({n} images) | seconds | peak GB |\n|---|---:|---:|\n"
          f"| ours: batched, {args.sample_steps} DDIM steps, {str(be.dtype)[6:]}, attention masks included | "
          f"{ours['seconds']:.2f} | {ours['peak_gb']:.2f} |\n"
          f"| authors': batch 1, 30 DPM steps, fp32, masks not included | {theirs['seconds']:.2f} | "
          f"{theirs['peak_gb']:.2f} |\n\nspeed-up x{theirs['seconds'] / max(ours['seconds'], 1e-9):.1f}", flush=True)


def run(args) -> None:
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    be = build(args.arch, device, dtype)
    print(f"# {args.arch} on {device} ({torch.get_num_threads()} threads), dtype {str(dtype)[6:]}")
    flops = None
    if args.project_arch:
        from vram import stage1_flops

        flops = stage1_flops(args.project_arch)
        print(f"# projection: {args.project_arch} stage 1 = {flops / 1e12:.2f} TFLOP per concept (traced), at "
              f"{args.gpu_tflops:g} TFLOP/s sustained; projected s = total s - text-encoder s + concepts x TFLOP / rate")
    print("| concepts | mode | refine s | train s | fuse s | total s | peak GB |" + (" projected GPU s |" if flops else ""))
    print("|---:|---|---:|---:|---:|---:|---:|" + ("---:|" if flops else ""))
    plans = [(n, True) for n in args.counts] + [(n, False) for n in args.full_counts]
    for n, closed in plans:
        over = {"steps": args.steps, "images": args.images, "sample_steps": args.sample_steps, "lam": 1.0}
        spec = ErasureSpec(tuple(make_concept(p, "a thing") for p in concept_names(n)), (), over)
        with tempfile.TemporaryDirectory() as d:
            m: dict = {}
            enc: dict = {}
            with measure(device, m), encoder_seconds(be, enc):
                res = erase(be, spec, Project(d), "bench", closed_form_only=closed)
            t = res.report["timings"]
            if device.type == "cuda":  # erase resets the device's peak at each stage: the run's is the largest
                m["peak_gb"] = max(v for v in res.report["peak_memory_gb"].values() if v is not None)
            projected = ""
            if flops and closed:
                projected = f" {m['seconds'] - enc['seconds'] + n * flops / (args.gpu_tflops * 1e12):.2f} |"
            print(f"| {n} | {'closed form' if closed else 'full'} | {t['refine']:.2f} | {t.get('train', 0):.2f} | "
                  f"{t['fuse']:.2f} | {m['seconds']:.2f} | {m['peak_gb']:.2f} |{projected}", flush=True)
        if closed and n <= args.baseline_max:
            mb: dict = {}
            with measure(device, mb):
                baseline_closed_form(be, spec)
            print(f"| {n} | baseline stage 1 (authors' structure) | {mb['seconds']:.2f} | - | - | {mb['seconds']:.2f} | "
                  f"{mb['peak_gb']:.2f} |  speed-up x{mb['seconds'] / max(m['seconds'], 1e-9):.1f}", flush=True)
    if args.data_baseline:
        data_generation(args, device, be)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="tiny", choices=["tiny", "toy", "sd1", "sd2", "sdxl"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--counts", type=int, nargs="*", default=[1, 10, 100], help="closed-form runs")
    ap.add_argument("--full-counts", type=int, nargs="*", default=[1, 10], help="full MACE runs")
    ap.add_argument("--baseline-max", type=int, default=10, help="largest count also run the authors' way")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--sample-steps", type=int, default=30)
    ap.add_argument("--project-arch", choices=["sd1", "sd2", "sdxl"],
                    help="also project closed-form times onto a GPU for this full-size model: the run's time outside "
                         "the text encoders (tokenising, alignment, solves: host work a GPU does not speed up) plus "
                         "the full-size encoders' traced FLOPs at --gpu-tflops")
    ap.add_argument("--gpu-tflops", type=float, default=100.0,
                    help="sustained fp16 throughput assumed for the projection (an H100 peaks near 990 dense)")
    ap.add_argument("--no-data-baseline", dest="data_baseline", action="store_false",
                    help="skip timing the training images' generation against the authors' way")
    run(ap.parse_args())


if __name__ == "__main__":
    main()
