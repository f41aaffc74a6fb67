"""benchmarks/gpu_check.py run whole on tiny models on the CPU, and the three defects only a GPU
showed: TF32 in stage 1's Gram sums, the device of `measure_attention_loss`'s zero LoRA, and where
stage 2 reads its base keys W0 c from."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from mace_core.method import refine
from mace_core.model.checkpoint import Components, load_checkpoint, make_tokenizer
from mace_core.method.concepts import Settings, concept_prompts, make_concept
from mace_core.model.diffusers_backend import DiffusersBackend
from mace_core.method.masks import ConceptData, phrase_token_mask
from synthetic import random_modules, tiny_family
from mace_core.method.train import measure_attention_loss, train_lora
from tiny import tiny_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check  # noqa: E402

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ---------------------------------------------------------------------------------------------
# The script, every piece on tiny SD1 and SDXL


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check") / "table.md"
    # one baseline count: the authors' per-pair, per-layer loop is the slow piece on a CPU; no time
    # budget: on a loaded machine the calibration's estimates left pieces out (choose() is tested alone)
    return gpu_check.main(["--tiny", "--out", str(out), "--baseline-counts", "1", "--budget", "1e9"]), out


def test_tiny_run_has_every_row_measured_and_written(tiny_run):
    check, out = tiny_run
    pieces = [("closed form", 1), ("closed form", 2), ("closed form", 3), ("authors' stage 1 + 3", 1),
              ("full MACE, default settings", 1), ("full MACE, default settings", 2), ("full MACE, low-VRAM", 1),
              ("full MACE, the same erasure again", 1), ("All-but-One, 2 steps, 2 images", 1),
              ("All-but-One, low-VRAM, 2 steps, 2 images", 1), ("general prior, 2 captions", 0),
              ("general prior, 32 captions", 0)]
    expected = [(m, p, n) for m in ("sd1 16 px", "sdxl 16 px") for p, n in pieces]
    assert [(r.model, r.piece, r.concepts) for r in check.rows] == expected
    assert all(r.seconds is not None and r.seconds > 0 for r in check.rows)
    calibration = [r for r in check.rows if r.note.endswith("calibration")]
    assert [(r.piece, r.concepts) for r in calibration] == [pieces[i] for i in (0, 1, 3, 10)] * 2
    assert all(r.estimate is None for r in calibration)
    assert all(r.estimate is not None for r in check.rows if r not in calibration)
    full = [r for r in check.rows if r.piece.startswith(("full MACE", "All-but-One"))]
    assert all(set(r.stages) == {"refine", "train", "fuse"} and set(r.stage_peaks) == set(r.stages) for r in full)
    assert all(r.stages["train"] > 0 for r in full)
    text = out.read_text()
    assert all(r.markdown() in text for r in check.rows)
    assert text.count("\n| sd") == len(expected)
    # the baseline's note is its time over ours for the same number of concepts
    for r in (r for r in check.rows if r.piece.startswith("authors'")):
        ours = next(o for o in check.rows
                    if o.model == r.model and o.piece == "closed form" and o.concepts == r.concepts)
        assert r.note.startswith(f"{r.seconds / ours.seconds:.1f}x the time of ours")


def test_tiny_run_repeats_agree_as_the_table_says(tiny_run):
    check, _ = tiny_run
    again = [r for r in check.rows if r.piece == "full MACE, the same erasure again"]
    assert sorted(check.repeats) == sorted(r.model for r in again)
    for r in again:
        a, b = check.repeats[r.model]
        assert sorted(a) == sorted(b) and len(a) > 0
        identical = all(torch.equal(a[k], b[k]) for k in a)
        assert identical == (r.note == "bit-identical to the first run"), r.note
        assert identical  # on the CPU the same seeds give the same bits


def test_existing_output_is_refused_before_any_compute(tmp_path):
    out = tmp_path / "t.md"
    out.write_text("keep me")
    with pytest.raises(SystemExit, match="already exists"):
        gpu_check.main(["--tiny", "--out", str(out)])
    assert out.read_text() == "keep me"


def test_choose_keeps_the_budget_and_the_disk():
    def piece(name, est, prio, needs=0):
        return gpu_check.Piece(gpu_check.Row("m", name, 1, estimate=est), lambda b: None, prio, needs)

    ps = [piece("a", 100, 1), piece("b", 300, 4), piece("c", 50, 2), piece("d", 10, 3, needs=90)]
    kept = gpu_check.choose(ps, elapsed=100, budget=300, room=100)
    assert [p.row.piece for p in kept] == ["a", "c"]  # d: 90 > 80% of 100 bytes; b: least important
    assert ps[1].row.note.startswith("not run: its estimated 300 s") and "disk" not in ps[1].row.note
    assert ps[3].row.note.startswith("not run: its stage-1 sums")
    assert 100 + sum(p.row.estimate for p in kept) <= 300


# ---------------------------------------------------------------------------------------------
# TF32: stage 1's Gram sums on a GPU


class MatmulPrecision(TorchDispatchMode):
    """Records the CUDA fp32 matmul setting in force when each matrix product is dispatched."""

    def __init__(self, read):
        super().__init__()
        self.read, self.seen = read, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.matmul.default):
            self.seen.append(self.read())
        return func(*args, **(kwargs or {}))


def _gpu_branch(read) -> list:
    """outer_sum on (fake) CUDA tensors, the host's setting read at each product."""
    with FakeTensorMode():
        a = torch.empty(100, 8, device="cuda", dtype=torch.float16)
        with MatmulPrecision(read) as rec:
            out = refine.outer_sum(a, a)
    assert out.device.type == "cpu" and out.dtype == torch.float64 and out.shape == (8, 8)
    return rec.seen


def test_outer_sum_on_a_gpu_turns_tf32_off_and_restores_the_hosts_setting():
    mm = torch.backends.cuda.matmul
    before = mm.fp32_precision
    try:
        mm.fp32_precision = "tf32"  # what a host enabling TF32 through torch >= 2.9's API leaves
        assert _gpu_branch(lambda: mm.fp32_precision) == ["ieee"]
        assert mm.fp32_precision == "tf32"
    finally:
        mm.fp32_precision = before


def test_outer_sum_uses_allow_tf32_where_torch_predates_fp32_precision(monkeypatch):
    legacy = SimpleNamespace(allow_tf32=True)  # torch < 2.9: no fp32_precision; A1111 sets allow_tf32
    monkeypatch.setattr(torch.backends.cuda, "matmul", legacy)
    assert _gpu_branch(lambda: legacy.allow_tf32) == [False]
    assert legacy.allow_tf32 is True


def _tf32(x: torch.Tensor) -> torch.Tensor:
    """x rounded to TF32 (10 explicit mantissa bits, to nearest, ties away), as tensor cores read fp32."""
    i = x.float().contiguous().view(torch.int32)
    return ((i + 0x1000) & ~0x1FFF).view(torch.float32)


def test_tf32_rounding_errs_more_than_fp32_in_the_ridge_solution(monkeypatch):
    """fp32 encodings (a host running its text encoder in fp32) through the three arithmetics:
    float64 (the reference), fp32 products (a GPU with TF32 off: the fix) and fp32 products of
    inputs rounded to TF32 (a GPU with TF32 on). The error that matters is that of the edit M - I."""
    be = DiffusersBackend.from_checkpoint(load_checkpoint(tiny_file("sd1")), device="cpu")
    concepts = [make_concept(p, "a scene") for p in ("cat", "red car", "tall tower")]
    lam = Settings().lam  # the object type's ridge
    arithmetics = {"float64": lambda a, b: a.double().T @ b.double(),
                   "fp32": lambda a, b: (a.float().T @ b.float()).double(),
                   "tf32": lambda a, b: (_tf32(a).T @ _tf32(b)).double()}
    maps = {}
    for name, outer in arithmetics.items():
        monkeypatch.setattr(refine, "outer_sum", outer)
        stats = [refine.concept_stats(be, concept_prompts(c), concept_prompts(c, c.anchor)) for c in concepts]
        maps[name] = refine.context_map(stats, lam)
    ref = maps["float64"]
    edit = (ref - torch.eye(ref.shape[0], dtype=ref.dtype)).norm()
    err = {k: float((maps[k] - ref).norm() / edit) for k in ("fp32", "tf32")}
    print(f"relative error of the edit: fp32 {err['fp32']:.1e}, TF32-rounded inputs {err['tf32']:.1e}")
    assert err["tf32"] > 4 * err["fp32"], err
    assert err["fp32"] < 2e-4, err


# ---------------------------------------------------------------------------------------------
# measure_attention_loss on a device other than the CPU


def _fresh_components() -> Components:
    """Tiny SD1 modules of this test alone (the tests' shared ones must not be moved or changed)."""
    fam = tiny_family("sd1")
    unet, vae, tes = random_modules(fam, seed=0)
    return Components(fam, unet, vae, tes, [make_tokenizer(t) for t in fam.text_encoders])


def _one_sample(be) -> tuple[ConceptData, list[str], torch.Tensor]:
    side = be.resolution // be.vae_scale
    g = torch.Generator().manual_seed(0)
    data = ConceptData(torch.randn(2, be.latent_channels, side, side, generator=g),
                       torch.rand(2, side, side, generator=g) > 0.5, None)
    prompts = ["a photo of a cat", "a cat in a garden"]
    return data, prompts, phrase_token_mask(be, prompts, "cat", with_end=True)


def test_measure_attention_loss_runs_on_the_backends_device():
    """Traced on the meta device (tensors with shapes, no data): a tensor left on the CPU meets the
    device's tensors as it would meet CUDA's; the trace may only end at the read-back of the loss."""
    be = DiffusersBackend(_fresh_components(), "meta")
    data, prompts, tokens = _one_sample(be)
    deltas = {l.k_key: torch.zeros(l.to_k.weight.shape) for l in be.cross_attention()}
    with pytest.raises(RuntimeError, match="item.. cannot be called on meta tensors"):
        measure_attention_loss(be, data, prompts, tokens, deltas, [300])


@CUDA
def test_measure_attention_loss_and_outer_sum_on_cuda():
    be = DiffusersBackend(_fresh_components(), "cuda")
    data, prompts, tokens = _one_sample(be)
    zero = {l.k_key: torch.zeros(l.to_k.weight.shape) for l in be.cross_attention()}
    assert 0 < measure_attention_loss(be, data, prompts, tokens, zero, [300]) < 1
    a = torch.randn(4000, 64, generator=torch.Generator().manual_seed(0))
    mm = torch.backends.cuda.matmul
    before = mm.fp32_precision
    try:
        mm.fp32_precision = "tf32"
        got = refine.outer_sum(a.cuda(), a.cuda())
    finally:
        mm.fp32_precision = before
    ref = a.double().T @ a.double()
    assert float((got - ref).norm() / ref.norm()) < 1e-5  # fp32: ~1e-7; TF32 (simulated on the CPU): 3.8e-5


# ---------------------------------------------------------------------------------------------
# Stage 2's base keys W0 c


class LoadsOnPredict(DiffusersBackend):
    """A host that loads and patches its UNet only when it runs it (ComfyUI in low-VRAM mode, whose
    encode() may offload the UNet): after an encoding, until the next predict, the to_k modules hold
    other weights; ``original_weights`` is the host's W0 throughout."""

    def __init__(self, comp: Components):
        super().__init__(comp, "cpu")
        self._w0 = {k: v.clone() for k, v in super().original_weights().items()}  # on the CPU they alias the modules

    def original_weights(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self._w0.items()}

    def encode(self, prompts):
        with torch.no_grad():
            for l in self.cross_attention():
                l.to_k.weight.mul_(0.5)  # offloaded and not yet patched: not W0
        return super().encode(prompts)

    def predict(self, latents, t, text):
        with torch.no_grad():
            for l in self.cross_attention():
                l.to_k.weight.copy_(self._w0[l.k_key])
        return super().predict(latents, t, text)


def test_stage2_base_keys_come_from_w0_not_from_the_live_modules():
    s = Settings(steps=3, lr=1e-2)
    runs = []
    for be in (DiffusersBackend(_fresh_components(), "cpu"), LoadsOnPredict(_fresh_components())):
        data, prompts, tokens = _one_sample(be)
        zero = {k: torch.zeros_like(v) for k, v in be.original_weights().items()}
        runs.append(train_lora(be, data, prompts, tokens, zero, s, seed=0))
    (plain, plain_losses), (lazy, lazy_losses) = runs
    assert lazy_losses == plain_losses
    assert all(torch.equal(plain.up[k], lazy.up[k]) and torch.equal(plain.down[k], lazy.down[k]) for k in plain.up)
    assert any(plain.up[k].abs().sum() > 0 for k in plain.up)  # it trained: the comparison means something
