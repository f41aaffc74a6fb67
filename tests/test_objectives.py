"""Stage-2 objectives of objectives.py (mace-authors, esd, ant): each loss and its gradient against an
independent computation on the tiny SD1 UNet, training end to end, fusion of their K/V LoRAs, and
what the estimate counts for them.

The independent side runs the diffusers UNet itself with the edited weights W0 + (W' - W0) + up @ down
put in by `torch.func.functional_call` (no hooks), reads the attention probabilities from diffusers'
own `Attention.get_attention_scores`, selects masked pixels and concept tokens by indexing, and
writes each formula out from the papers.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor

from mace_core.model.backend import TextBatch
from mace_core.model.checkpoint import load_checkpoint
from mace_core.method.concepts import ErasureSpec, Settings, make_concept, setting_info
from mace_core.model.diffusers_backend import DiffusersBackend
from mace_core.errors import MaceError
from mace_core.method.fuse import fuse
from mace_core.method.masks import ConceptData, draw_concept, phrase_token_mask
from mace_core.method.objectives import LOSSES, LossContext, grad_rows, lora_down_std, trains_values, unet_passes
from mace_core.method.train import _lora_deltas, init_lora, sample_timesteps, train_lora
from tiny import tiny_file

NEW = ("mace-authors", "esd", "ant")
PROMPTS = ["a photo of a cat", "a cat in a garden"]
# fp32 on both sides, rounded differently (hooks add context @ delta^T; the independent side runs W0 + delta):
# outputs agree to ~1e-6 of their size, and the losses are squared residuals a few times smaller than them
RTOL = 1e-4


@pytest.fixture(scope="module")
def backend():
    return DiffusersBackend.from_checkpoint(load_checkpoint(tiny_file("sd1")), device="cpu")


def _random_lora(backend, seed: int, scale: float = 0.3):
    """A rank-2 K/V LoRA with nonzero factors (trainable leaves) and random stage-1 deltas W' - W0."""
    g = torch.Generator().manual_seed(seed)
    layers = backend.cross_attention()
    keys = [l.k_key for l in layers] + [l.v_key for l in layers]
    lora = init_lora(layers, keys, 2, g, "cpu")
    assert lora.alpha == lora.rank  # delta = up @ down, which the independent side writes out
    for k in keys:
        lora.up[k].data.copy_(scale * torch.randn(lora.up[k].shape, generator=g))
    base = {k: 0.05 * torch.randn(w.shape, generator=g) for k, w in backend.original_weights().items()}
    return lora, base


def _params(backend, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers parameter names -> weights, for file keys of attn2 to_k / to_v."""
    unet = backend.components.unet
    names = {id(m): n for n, m in unet.named_modules()}
    return {names[id(mod)] + ".weight": weights[key] for l in backend.cross_attention()
            for key, mod in ((l.k_key, l.to_k), (l.v_key, l.to_v)) if key in weights}


def _unet(backend, x, t, context, weights=None):
    """The UNet output with attn2 K/V weights replaced by ``weights`` (file keys; None: the original)."""
    unet = backend.components.unet
    return torch.func.functional_call(unet, _params(backend, weights or {}), (x, t),
                                      {"encoder_hidden_states": context}).sample.float()


def _edited(backend, lora, base, leaves):
    """W0 + (W' - W0) + up @ down for every K/V key, from independent copies ``leaves`` of the factors."""
    w0 = backend.original_weights()
    return {k: w0[k] + base[k] + leaves["up"][k] @ leaves["down"][k] for k in lora.down}


def _leaves(lora):
    return {"down": {k: v.detach().clone().requires_grad_() for k, v in lora.down.items()},
            "up": {k: v.detach().clone().requires_grad_() for k, v in lora.up.items()}}


def _grads_match(lora, leaves, value, rtol=1e-4):
    """The gradient the code under test left on ``lora``'s factors equals d value / d leaves."""
    flat = [(lora.down[k], leaves["down"][k]) for k in lora.down] + [(lora.up[k], leaves["up"][k]) for k in lora.up]
    expected = torch.autograd.grad(value, [b for _, b in flat], allow_unused=True)
    norm = sum(float(e.norm() ** 2) for e in expected if e is not None) ** 0.5
    assert norm > 0
    for (a, _), e in zip(flat, expected):
        e = torch.zeros_like(a) if e is None else e
        got = torch.zeros_like(a) if a.grad is None else a.grad
        assert (got - e).norm() <= rtol * norm + 1e-12


def _ctx(backend, lora, base, data, settings, tokens=None, seed=7):
    text = backend.encode(PROMPTS)
    tokens = phrase_token_mask(backend, PROMPTS, "cat", with_end=True) if tokens is None else tokens
    return LossContext(backend, backend.predict, backend.cross_attention(), _lora_deltas(lora, base), text, tokens,
                       data, settings, torch.Generator().manual_seed(seed))


class _Recording(AttnProcessor):
    """diffusers' classic attention processor, keeping the probabilities it computes: [B*heads, N, T]."""

    def __init__(self, store: list):
        super().__init__()
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *a, **kw):
        scores = attn.get_attention_scores

        def record(q, k, mask=None):
            p = scores(q, k, mask)
            self.store.append((attn.heads, p))
            return p
        attn.get_attention_scores = record
        try:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        finally:
            del attn.get_attention_scores


def _attn2_modules(backend):
    unet = backend.components.unet
    owner = {id(m.to_k): m for m in unet.modules() if hasattr(m, "to_k") and hasattr(m, "set_processor")}
    return [owner[id(l.to_k)] for l in backend.cross_attention()]


def test_every_objective_choice_has_a_cost_and_new_settings_are_validated():
    choices = setting_info("objective").choices
    assert set(NEW) <= set(choices) and {"mace", "abo"} <= set(choices)
    for c in choices:
        s = Settings(objective=c)
        assert unet_passes(s) >= 1 and grad_rows(s) >= 0 and isinstance(trains_values(s), bool)
        assert (c in LOSSES) == (c in NEW)
    for bad in ({"objective": "esd-u"}, {"eta": 0.0}, {"ant_split": 1000}, {"ant_split": 0}, {"ant_early": -1.0},
                {"ant_uncond": -0.5}):
        with pytest.raises(MaceError):
            Settings(**bad)


def test_mace_authors_lora_starts_from_the_authors_initialisation(backend):
    """diffusers' LoRALinearLayer (the authors' LoRA): down ~ N(0, (1/rank)^2), up = 0."""
    assert lora_down_std(Settings(objective="mace-authors", rank=2)) == 0.5
    assert all(lora_down_std(Settings(objective=o, rank=2)) is None for o in ("mace", "abo", "esd", "ant"))
    layers = backend.cross_attention()
    keys = [l.k_key for l in layers] + [l.v_key for l in layers]
    lora = init_lora(layers, keys, 2, torch.Generator().manual_seed(0), "cpu", down_std=0.5)
    down = torch.cat([lora.down[k].detach().flatten() for k in keys])
    assert down.numel() > 2000
    assert abs(float(down.std()) - 0.5) < 0.05 and abs(float(down.mean())) < 0.05
    assert all(not lora.up[k].detach().any() for k in keys)


def test_mace_authors_trains_at_the_authors_learning_rate_unless_the_user_sets_one():
    """The authors' rates (MACE-method.md: 1e-5 objects and explicit content, 1e-4 celebrities and styles)
    with the type's rate left alone; a rate the user gives is kept, and the other objectives keep the type's."""
    authors = {"object": 1e-5, "explicit": 1e-5, "celebrity": 1e-4, "style": 1e-4}
    for ctype, lr in authors.items():
        c = make_concept("someone", "", ctype)
        spec = ErasureSpec((c,), (), {"objective": "mace-authors"})
        assert spec.settings_for(c).lr == pytest.approx(lr, rel=1e-9) and spec.settings_for().lr == spec.settings_for(c).lr
        assert ErasureSpec((c,), (), {"objective": "mace-authors", "lr": 3e-3}).settings_for(c).lr == 3e-3
        for other in ("mace", "esd", "ant", "abo"):
            assert ErasureSpec((c,), (), {"objective": other}).settings_for(c).lr == pytest.approx(10 * lr, rel=1e-9)


def test_mace_authors_loss_and_gradient_match_the_attention_maps_of_diffusers(backend):
    """sum_l ||A_l[:, M_l, S]||_F per sample, batch-averaged, through the whole UNet (queries too)."""
    lora, base = _random_lora(backend, 0)
    g = torch.Generator().manual_seed(1)
    side = backend.resolution // backend.vae_scale
    x = torch.randn(2, backend.latent_channels, side, side, generator=g)
    t = torch.tensor([300, 700])
    masks = torch.zeros(2, side, side, dtype=torch.bool)
    masks[0, : side // 2] = True  # the top half
    masks[1, 1, 2] = True  # one latent pixel: nothing left of it at the coarser layers (those add 0)
    data = ConceptData(torch.zeros_like(x), masks, None)
    tokens = phrase_token_mask(backend, PROMPTS, "cat", with_end=True)
    ctx = _ctx(backend, lora, base, data, Settings(objective="mace-authors"), tokens)
    idx, pidx = torch.tensor([0, 1]), torch.tensor([1, 0])
    value = LOSSES["mace-authors"](ctx)(x, t, idx, pidx)

    leaves = _leaves(lora)
    store: list = []
    mods = _attn2_modules(backend)
    old = [m.processor for m in mods]
    for m in mods:
        m.set_processor(_Recording(store))
    try:
        _unet(backend, x, t, ctx.text_all.context[pidx], _edited(backend, lora, base, leaves))
    finally:
        for m, p in zip(mods, old):
            m.set_processor(p)
    assert len(store) == len(mods)
    expected = 0.0
    for heads, probs in store:
        d = int(probs.shape[1] ** 0.5)
        for b in range(2):
            m = F.interpolate(masks[b][None, None].float(), size=(d, d), mode="nearest")[0, 0].flatten() > 0.5
            sel = probs[b * heads:(b + 1) * heads][:, m][:, :, tokens[pidx[b]]]
            expected = expected + torch.sqrt((sel.float() ** 2).sum())
    expected = expected / 2
    assert float(value) == pytest.approx(float(expected.detach()), rel=RTOL)
    _grads_match(lora, leaves, expected)
    # the queries carry gradient: to_v factors of early layers move later layers' attention maps
    first_v = backend.cross_attention()[0].v_key
    assert float(lora.down[first_v].grad.norm()) > 0


def _tiny_latents(backend, b: int, seed: int) -> torch.Tensor:
    # 2x2 latents: at larger sizes the random tiny UNet's output barely depends on the text
    return torch.randn(b, backend.latent_channels, 2, 2, generator=torch.Generator().manual_seed(seed))


def test_esd_loss_and_gradient_match_negative_guidance_written_out(backend):
    """|| eps(x, c) - [eps0(x, "") - eta (eps0(x, c) - eps0(x, ""))] ||^2, eps with W' + LoRA, eps0 the original."""
    lora, base = _random_lora(backend, 2)
    x, t = _tiny_latents(backend, 2, 3), torch.tensor([150, 600])
    eta = 0.7
    data = ConceptData(torch.zeros_like(x), torch.ones(2, 2, 2, dtype=torch.bool), None)
    ctx = _ctx(backend, lora, base, data, Settings(objective="esd", eta=eta))
    idx, pidx = torch.tensor([0, 1]), torch.tensor([1, 1])
    value = LOSSES["esd"](ctx)(x, t, idx, pidx)

    leaves = _leaves(lora)
    c = ctx.text_all.context[pidx]
    empty = backend.encode([""]).context.expand(2, -1, -1)
    with torch.no_grad():
        u0, c0 = _unet(backend, x, t, empty), _unet(backend, x, t, c)
    assert (c0 - u0).norm() > 0.05 * u0.norm()  # the test can tell eta's term apart
    pred = _unet(backend, x, t, c, _edited(backend, lora, base, leaves))
    expected = ((pred - (u0 - eta * (c0 - u0))) ** 2).mean()
    assert float(value) == pytest.approx(float(expected.detach()), rel=RTOL)
    _grads_match(lora, leaves, expected)


def test_ant_loss_and_gradient_match_the_trajectory_aware_objective_written_out(backend):
    """L = E_late + a_u U_late + a_e (E_early + a_u U_early) with guided predictions (see objectives.ant_loss);
    the early timestep and its noise are the next draws of the run's generator."""
    lora, base = _random_lora(backend, 4)
    s = Settings(objective="ant", eta=1.5, guidance=3.0, ant_split=800, ant_early=0.3, ant_uncond=2.0)
    x0 = _tiny_latents(backend, 2, 5)
    x, t = _tiny_latents(backend, 2, 6), torch.tensor([250, 700])
    data = ConceptData(x0, torch.ones(2, 2, 2, dtype=torch.bool), None)
    ctx = _ctx(backend, lora, base, data, s, seed=11)
    idx, pidx = torch.tensor([1, 0]), torch.tensor([0, 1])
    value = LOSSES["ant"](ctx)(x, t, idx, pidx)

    leaves = _leaves(lora)
    w = _edited(backend, lora, base, leaves)
    c = ctx.text_all.context[pidx]
    empty = backend.encode([""]).context.expand(2, -1, -1)
    gen = torch.Generator().manual_seed(11)
    te = torch.randint(800, 1000, (2,), generator=gen)
    ac = backend.alphas_cumprod.float()[te].view(-1, 1, 1, 1)
    xe = ac.sqrt() * x0[idx] + (1 - ac).sqrt() * torch.randn(x0[idx].shape, generator=gen)
    assert (te >= 800).all()

    def parts(xx, tt):
        with torch.no_grad():
            u0, c0 = _unet(backend, xx, tt, empty), _unet(backend, xx, tt, c)
        u, cc = _unet(backend, xx, tt, empty, w), _unet(backend, xx, tt, c, w)
        return u0, c0, u, u + 3.0 * (cc - u)

    u0, c0, u, guided = parts(x, t)
    late = ((guided - (u0 - 1.5 * 3.0 * (c0 - u0))) ** 2).mean() + 2.0 * ((u - u0) ** 2).mean()
    u0, c0, u, guided = parts(xe, te)
    early = ((guided - (u0 + 3.0 * (c0 - u0))) ** 2).mean() + 2.0 * ((u - u0) ** 2).mean()
    expected = late + 0.3 * early
    assert float(value) == pytest.approx(float(expected.detach()), rel=RTOL)
    _grads_match(lora, leaves, expected)


@pytest.mark.parametrize("timesteps", ["cfis", "uniform"])
def test_ant_erases_below_its_split_only(timesteps):
    s = Settings(objective="ant", ant_split=300, timesteps=timesteps)
    t = sample_timesteps(20_000, s, torch.Generator().manual_seed(0), 1000, below=s.ant_split)
    assert int(t.max()) < 300 and int(t.min()) >= 0
    assert len(torch.unique(t)) > 150  # spread over the range, not stuck on a few values


def _fixed_value(backend, lora, base, data, settings, prompts_idx, seed=0) -> float:
    """The objective's loss of ``lora`` on fixed samples (noise, timesteps, prompts) of ``data``."""
    lora = type(lora)({k: v.clone().requires_grad_() for k, v in lora.down.items()},
                      {k: v.clone().requires_grad_() for k, v in lora.up.items()}, lora.alpha)
    g = torch.Generator().manual_seed(seed)
    ac = backend.alphas_cumprod.float()
    vals = []
    for i in range(data.latents.shape[0]):
        for tt in (150, 300, 450):
            ctx = _ctx(backend, lora, base, data, settings, seed=seed + tt)
            a = ac[tt]
            x0 = data.latents[i:i + 1]
            x = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=g)
            vals.append(float(LOSSES[settings.objective](ctx)(x, torch.tensor([tt]), torch.tensor([i]),
                                                             torch.tensor([prompts_idx[i % len(prompts_idx)]]))))
    return sum(vals) / len(vals)


@pytest.mark.parametrize("objective", NEW)
def test_objective_trains_a_kv_lora_that_lowers_its_loss_and_fusion_keeps_it(backend, objective):
    if objective == "mace-authors":  # attention maps need room: 8x8 latents with attention masks
        data = draw_concept(backend, PROMPTS[0], "cat", [1, 2], 3, 3.0)
        s = Settings(objective=objective, steps=30, lr=2e-2)
    else:
        data = draw_concept(backend, PROMPTS[0], "cat", [1, 2], 3, 3.0, mask_mode="none", size=4)
        s = Settings(objective=objective, steps=30, lr=2e-2, ant_split=500)
    zero = {k: torch.zeros_like(v) for k, v in backend.original_weights().items()}
    tokens = phrase_token_mask(backend, PROMPTS, "cat", with_end=True)
    before_state = {k: v.clone() for k, v in backend.components.unet.state_dict().items()}
    lora, losses = train_lora(backend, data, PROMPTS, tokens, zero, s, seed=0)
    assert len(losses) == 30 and all(torch.isfinite(torch.tensor(losses)))
    assert any(k.endswith("to_v.weight") for k in lora.down) and any(k.endswith("to_k.weight") for k in lora.down)
    after_state = backend.components.unet.state_dict()
    assert all(torch.equal(before_state[k], after_state[k]) for k in before_state)  # hooks only

    untrained = type(lora)(dict(lora.down), {k: torch.zeros_like(v) for k, v in lora.up.items()}, lora.alpha)
    before = _fixed_value(backend, untrained, zero, data, s, [0, 1])
    after = _fixed_value(backend, lora, zero, data, s, [0, 1])
    assert after < 0.7 * before, (before, after)

    # closed-form fusion takes the to_v factors like the to_k ones: on the concept's embeddings the
    # fused weights act as W' + dW (one concept, a small ridge)
    original = backend.original_weights()
    context = backend.encode(PROMPTS).context.double()
    e = context.reshape(-1, context.shape[-1])  # every token position of the prompts [P*T, D]
    gram = e.T @ e
    fused = fuse(original, original, [(lora, gram)], lam=1e-6)
    for key in lora.down:
        target = e @ (original[key].double() + lora.delta(key).double()).T
        moved = (e @ lora.delta(key).double().T).norm()
        err = (e @ fused[key].double().T - target).norm()
        assert err <= 0.02 * moved + 1e-6 * target.norm(), key


def test_mace_authors_low_vram_trains_the_same_lora(backend):
    """The captured queries and keys live inside checkpointed blocks: recomputation must give the same LoRA."""
    data = draw_concept(backend, PROMPTS[0], "cat", [1], 3, 3.0)
    tokens = phrase_token_mask(backend, PROMPTS, "cat", with_end=True)
    zero = {k: torch.zeros_like(v) for k, v in backend.original_weights().items()}
    out = {}
    for low in (False, True):
        s = Settings(objective="mace-authors", steps=4, lr=1e-2, low_vram=low)
        out[low] = train_lora(backend, data, PROMPTS, tokens, zero, s, seed=0)
    (plain, pl), (low, ll) = out[False], out[True]
    # fp32 losses near 16 are 1.9e-6 apart per ulp; recomputation may round differently by an ulp or two
    assert pl == pytest.approx(ll, rel=1e-6)
    assert any(float(v.abs().max()) > 0 for v in plain.up.values())
    for k in plain.down:
        assert (plain.up[k] - low.up[k]).abs().max() <= 1e-5 and (plain.down[k] - low.down[k]).abs().max() <= 1e-5


def test_estimate_counts_each_objectives_passes_and_differentiated_rows():
    from mace_core.run.estimate import train_rows, unet_calls

    cat = make_concept("cat")
    base = {"images": 1, "sample_steps": 5, "steps": 4, "batch_size": 2, "synonyms": "none"}
    drawing = 1 * 5 * 2
    expect = {"mace": (1, 0), "abo": (3, 4), "mace-authors": (1, 2), "esd": (3, 2), "ant": (8, 4)}
    for objective, (passes, rows) in expect.items():
        spec = ErasureSpec((cat,), (), {**base, "objective": objective})
        assert unet_calls(spec) == drawing + 4 * 2 * passes, objective
        assert train_rows(spec) == rows, objective
    alt = ErasureSpec((cat,), (), {**base, "objective": "abo", "alternative": "a dog"})
    assert unet_calls(alt) == drawing + 4 * 2 * 4  # the alternative's frozen pass too
