"""Stage 2 (CFIS, LoRA with the attention loss) and stage 3 (closed-form fusion vs naive sum)."""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from mace_core.model.checkpoint import load_checkpoint
from mace_core.method.concepts import Settings
from mace_core.model.diffusers_backend import DiffusersBackend
from mace_core.method.fuse import fuse, naive_sum
from mace_core.method.masks import draw_concept, phrase_token_mask
from mace_core.method.train import LoRA, cfis_pmf, measure_attention_loss, sample_timesteps, train_lora
from tiny import one_thread, tiny_file


def test_cfis_samples_follow_the_pdf():
    s = Settings()
    t = sample_timesteps(200_000, s, torch.Generator().manual_seed(0))
    pmf = cfis_pmf(*s.cfis)
    counts = torch.bincount(t, minlength=1000).double()
    # chi-square on 20 bins of 50 timesteps
    obs = counts.reshape(20, 50).sum(1)
    exp = pmf.reshape(20, 50).sum(1) * len(t)
    keep = exp > 5
    p = stats.chisquare(obs[keep].numpy(), exp[keep].numpy() * obs[keep].sum().item() / exp[keep].sum().item()).pvalue
    assert p > 1e-3
    frac = ((t >= 200) & (t <= 400)).double().mean().item()
    assert abs(frac - 0.86) < 0.01
    # and the pdf itself: 86% of the mass in [200, 400], symmetric bump, nothing near t = 999
    assert abs(pmf[200:401].sum().item() - 0.864) < 0.002
    assert pmf[999] < 1e-6


def test_uniform_timesteps_when_asked():
    t = sample_timesteps(100_000, Settings(timesteps="uniform"), torch.Generator().manual_seed(0))
    counts = torch.bincount(t, minlength=1000).reshape(20, 50).sum(1).double()
    assert stats.chisquare(counts.numpy()).pvalue > 1e-3
    assert ((t >= 200) & (t <= 400)).double().mean().item() < 0.25


@pytest.fixture(scope="module")
def backend():
    return DiffusersBackend.from_checkpoint(load_checkpoint(tiny_file("sd1")), device="cpu")


def test_lora_training_lowers_attention_loss_substantially(backend):
    s = Settings(steps=40, lr=2e-2, images=2, sample_steps=4, guidance=3.0)
    prompt = "a photo of a cat"
    data = draw_concept(backend, prompt, "cat", [1, 2], s.sample_steps, s.guidance)
    assert data.masks.any() and data.masks.shape == data.latents.shape[:1] + data.latents.shape[2:]
    prompts = [prompt, "a cat in a garden"]
    tokens = phrase_token_mask(backend, prompts, "cat", with_end=True)
    zero = {k: torch.zeros_like(v) for k, v in backend.original_weights().items()}
    before_state = {k: v.clone() for k, v in backend.components.unet.state_dict().items()}
    lora, losses = train_lora(backend, data, prompts, tokens, zero, s, seed=0)
    ts = [250, 350]
    before = measure_attention_loss(backend, data, prompts, tokens, zero, ts)
    trained = {k: lora.delta(k) for k in lora.down}
    after = measure_attention_loss(backend, data, prompts, tokens, trained, ts)
    assert after < 0.7 * before, (before, after)  # >= 30% lower, not merely lower
    # only to_k LoRA factors exist; the model's own weights are untouched
    assert all(k.endswith("attn2.to_k.weight") for k in lora.down)
    after_state = backend.components.unet.state_dict()
    assert all(torch.equal(before_state[k], after_state[k]) for k in before_state)


def _lora(keys_shapes, rank, g, scale=1.0):
    down = {k: torch.randn(rank, d, generator=g) for k, (c, d) in keys_shapes.items()}
    up = {k: torch.randn(c, rank, generator=g) * scale for k, (c, d) in keys_shapes.items()}
    return LoRA(down, up, float(rank))


def test_fusion_single_concept_reproduces_its_lora():
    g = torch.Generator().manual_seed(0)
    d, c = 16, 8
    w0 = {"a.to_k.weight": torch.randn(c, d, generator=g), "a.to_v.weight": torch.randn(c, d, generator=g)}
    w1 = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in w0.items()}
    lora = _lora({"a.to_k.weight": (c, d)}, 1, g)
    e = torch.randn(10, d, generator=g, dtype=torch.float64)  # fewer than d: the fit is exact on their span
    G = e.T @ e
    fused = fuse(w0, w1, [(lora, G)], lam=1e-8)
    target = w1["a.to_k.weight"].double() + lora.delta("a.to_k.weight").double()
    err = (e @ fused["a.to_k.weight"].double().T - e @ target.T).norm() / (e @ target.T).norm()
    assert err < 1e-5
    # no LoRA on to_v and no prior: fusion leaves the refined weight as it is
    assert torch.allclose(fused["a.to_v.weight"], w1["a.to_v.weight"], atol=1e-5)


def test_fusion_preserves_each_concept_far_better_than_naive_sum():
    g = torch.Generator().manual_seed(3)
    d, c, k = 48, 16, 5
    key = "x.to_k.weight"
    w0 = {key: torch.randn(c, d, generator=g)}
    w1 = {key: w0[key].clone()}
    concepts = []
    for _ in range(k):
        e = torch.randn(8, d, generator=g, dtype=torch.float64)  # each concept's own embeddings
        concepts.append((_lora({key: (c, d)}, 1, g), e))
    fused = fuse(w0, w1, [(lo, e.T @ e) for lo, e in concepts], lam=1e-3)[key].double()
    naive = naive_sum(w1, [lo for lo, _ in concepts])[key].double()

    def err(w):
        return sum(((e @ w.T) - e @ (w1[key].double() + lo.delta(key).double()).T).norm() ** 2
                   for lo, e in concepts) ** 0.5

    assert err(fused) < 0.05 * err(naive), (err(fused), err(naive))



def _abo_setup(backend, prompt):
    # 4 px images (2x2 latents): the random tiny UNet's output ignores the text at larger sizes
    data = draw_concept(backend, prompt, "cat", [1, 2], 3, 3.0, mask_mode="none", size=4)
    zero = {k: torch.zeros_like(v) for k, v in backend.original_weights().items()}
    return data, zero


def test_abo_loss_is_zero_for_the_frozen_model_when_alternative_is_the_concept(backend):
    prompt = "a photo of a cat"
    data, zero = _abo_setup(backend, prompt)
    s = Settings(objective="abo", alternative=prompt, abo_scale=1.0, steps=1, lr=1e-2)
    tokens = phrase_token_mask(backend, [prompt], "cat")
    _, losses = train_lora(backend, data, [prompt], tokens, zero, s, seed=0)
    assert losses[0] == 0.0


def test_abo_training_lowers_its_loss_and_keeps_the_unconditional_prediction(backend):
    from mace_core.method.attention import weight_deltas
    from mace_core.model.backend import TextBatch

    prompt = "a photo of a cat"
    data, zero = _abo_setup(backend, prompt)
    s = Settings(objective="abo", alternative="a photo of a dog", steps=40, lr=1e-2, abo_lambda=10.0)
    tokens = phrase_token_mask(backend, [prompt], "cat")
    lora, losses = train_lora(backend, data, [prompt], tokens, zero, s, seed=0)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert any(k.endswith("to_v.weight") for k in lora.down)  # abo trains values too
    x = data.latents + 0.5 * torch.randn(data.latents.shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([300, 300])
    unc = TextBatch.cat([backend.encode([""])] * 2)
    with torch.no_grad():
        u0 = backend.predict(x, t, unc)
        with weight_deltas(backend.cross_attention(), {k: lora.delta(k) for k in lora.down}):
            u1 = backend.predict(x, t, unc)
    assert (u1 - u0).norm() / u0.norm() < 0.05


def test_separable_increments_lower_cross_talk():
    """SepME constraint: concept i's increment barely moves concept j's outputs (j != i)."""
    from mace_core.method.fuse import separate

    g = torch.Generator().manual_seed(5)
    d, c, key = 40, 8, "x.to_k.weight"
    embs = []
    for _ in range(3):  # each concept lives mostly in its own 6-dim subspace, plus a shared direction
        basis = torch.randn(6, d, generator=g, dtype=torch.float64)
        embs.append(torch.randn(20, 6, generator=g, dtype=torch.float64) @ basis)
    loras = [_lora({key: (c, d)}, 2, g) for _ in embs]
    grams = [e.T @ e for e in embs]

    def cross_talk(ls):
        return sum((embs[j] @ ls[i].delta(key).double().T).norm() / (embs[i] @ ls[i].delta(key).double().T).norm()
                   for i in range(3) for j in range(3) if i != j)

    sep = separate(loras, grams)
    assert cross_talk(sep) < 0.1 * cross_talk(loras)
    # each increment still acts on its own concept
    for i in range(3):
        own = (embs[i] @ sep[i].delta(key).double().T).norm() / (embs[i] @ loras[i].delta(key).double().T).norm()
        assert own > 0.3


class _NoBlockSwitch:
    """The same backend without ``gradient_checkpointing``, as a host's backend may be: low-VRAM mode
    then checkpoints whole UNet calls."""

    def __init__(self, backend):
        self._backend = backend

    def __getattr__(self, name):
        if name == "gradient_checkpointing":
            raise AttributeError(name)
        return getattr(self._backend, name)


@pytest.mark.parametrize("block_switch", [True, False], ids=["diffusers-blocks", "whole-unet"])
def test_low_vram_recomputes_activations_and_trains_the_same_lora(backend, block_switch):
    """abo backpropagates through the UNet: in low-VRAM mode its activations are recomputed in the
    backward pass (one more forward of each grad pass) and the LoRA comes out the same."""
    prompt = "a photo of a cat"
    data, zero = _abo_setup(backend, prompt)
    tokens = phrase_token_mask(backend, [prompt], "cat")
    be = backend if block_switch else _NoBlockSwitch(backend)
    # a layer after attn2 layers (on the gradient's path) inside a checkpointed block; not the block itself:
    # torch stops a recomputation once it has what the backward needs, before the block's own hooks run
    conv = backend.components.unet.up_blocks[-1].resnets[-1].conv1
    results = {}
    # The recomputed forward is the same computation, so the LoRA is the same bit for bit on one thread
    # (`tiny.one_thread`; Adam would turn last-bit differences in near-zero gradient entries into
    # visible weight differences).
    with one_thread():
        for low in (False, True):
            s = Settings(objective="abo", alternative="a photo of a dog", steps=5, lr=1e-2, low_vram=low)
            calls = []
            hook = conv.register_forward_hook(lambda *_: calls.append(1))
            try:
                lora, losses = train_lora(be, data, [prompt], tokens, zero, s, seed=0)
            finally:
                hook.remove()
            results[low] = (lora, losses, len(calls))
    (plain, plain_losses, plain_calls), (low, low_losses, low_calls) = results[False], results[True]
    # per step: 2 no-grad passes (frozen targets) + 2 grad passes (ec, eu); low-VRAM reruns the 2 grad ones
    assert plain_calls == 4 * 5 and low_calls == 6 * 5
    assert not backend.components.unet.is_gradient_checkpointing  # switched off again after training
    assert plain_losses == low_losses
    for k in plain.down:
        assert torch.equal(plain.down[k], low.down[k]), k
        assert torch.equal(plain.up[k], low.up[k]), k
    assert any(float(v.abs().max()) > 0 for v in plain.up.values())  # it did train


def test_low_vram_draws_one_image_at_a_time_and_the_same_images(backend):
    from mace_core.method.masks import DRAW_BATCH, draw_batch

    assert draw_batch(Settings(low_vram=True)) == 1 and draw_batch(Settings()) == DRAW_BATCH
    # a fixed pixel budget: 2 SDXL images (1024 px) at once, 3 of SD2-768; low-VRAM stays at one
    assert draw_batch(Settings(), 1024) == 2 and draw_batch(Settings(), 768) == 3
    assert draw_batch(Settings(low_vram=True), 1024) == 1
    seeds = [1, 2, 3]
    batched = draw_concept(backend, "a photo of a cat", "cat", seeds, 3, 3.0)
    single = draw_concept(backend, "a photo of a cat", "cat", seeds, 3, 3.0, batch_size=1)
    assert (batched.latents - single.latents).abs().max() <= 1e-5
    assert (batched.masks == single.masks).float().mean() >= 0.99
    assert abs(batched.images.astype(int) - single.images.astype(int)).max() <= 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_batched_training_on_a_half_precision_model_keeps_fp32_lora_factors(dtype):
    """Batch size > 1 and a frozen model in half precision (the GPU default): the LoRA factors, their
    gradients and the optimiser stay fp32, and the loss still falls."""
    from toyworld import TOY_MODEL  # trained: a random tiny UNet overflows half precision

    half = DiffusersBackend.from_file(TOY_MODEL, device="cpu", dtype=dtype)
    assert next(half.components.unet.parameters()).dtype == dtype
    s = Settings(steps=20, lr=2e-2, images=2, sample_steps=5, guidance=5.0, batch_size=2)
    prompts = ["a photo of a red square", "a blue square"]
    data = draw_concept(half, prompts[0], "square", [1, 2], s.sample_steps, s.guidance)
    tokens = phrase_token_mask(half, prompts, "square", with_end=True)
    zero = {k: torch.zeros_like(v) for k, v in half.original_weights().items()}
    lora, losses = train_lora(half, data, prompts, tokens, zero, s, seed=0)
    assert all(t.dtype == torch.float32 for t in [*lora.down.values(), *lora.up.values()])
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5]), losses
