"""Stage 1: token alignment and the closed form, against an independent least-squares solve."""

from __future__ import annotations

import pytest
import torch

from mace_core.model.checkpoint import load_checkpoint
from mace_core.model.diffusers_backend import DiffusersBackend
from mace_core.method.refine import ConceptStats, align, apply_map, concept_stats, context_map, refinement_map
from tiny import tiny_file


def test_align_same_length_single_token():
    c = [49406, 320, 1125, 539, 320, 2368, 49407]  # a photo of a cat
    a = [49406, 320, 1125, 539, 320, 1929, 49407]  # a photo of a dog
    pairs = align(c, a)
    assert pairs[:5] == [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4)]
    assert pairs[5] == (6, 6)  # end token
    assert pairs[6:] == [(7 + j, 7 + j) for j in range(70)]  # padding
    assert (5, 5) not in pairs  # the differing word is left out


def test_align_multi_token_concept_and_shorter_anchor():
    # "<s> leonardo dicaprio in a park </s>" vs "<s> art in a park </s>"
    c = [1, 50, 51, 60, 61, 62, 2]
    a = [1, 70, 60, 61, 62, 2]
    pairs = align(c, a)
    assert pairs[:5] == [(0, 0), (3, 2), (4, 3), (5, 4), (6, 5)]
    pads = pairs[5:]
    assert pads[0] == (7, 6) and pads[-1] == (76, 75) and len(pads) == 70
    assert all(i not in (1, 2) for i, _ in pairs)


def test_align_longer_anchor_and_phrase_at_end():
    c = [1, 10, 11, 50, 2]  # template "... {}" with a one-token phrase
    a = [1, 10, 11, 70, 71, 72, 2]  # three-token anchor
    pairs = align(c, a)
    assert pairs[:3] == [(0, 0), (1, 1), (2, 2)]
    assert pairs[3] == (4, 6)
    assert pairs[4] == (5, 7) and pairs[-1] == (5 + 69, 7 + 69)  # pads up to the anchor's last position


def _random_stats(d, n, g):
    e = torch.randn(n, d, generator=g, dtype=torch.float64)
    es = torch.randn(n, d, generator=g, dtype=torch.float64)
    return e, es, ConceptStats(es.T @ e, e.T @ e, e.T @ e, n)


@pytest.mark.parametrize("lam,s,s2", [(0.0, 0.0, 0.0), (0.5, 0.0, 0.0), (0.1, 30.0, 0.0), (0.0, 20.0, 7.0)])
def test_closed_form_equals_least_squares(lam, s, s2):
    g = torch.Generator().manual_seed(1)
    d, c = 12, 9
    w0 = torch.randn(c, d, generator=g, dtype=torch.float64)
    e1, es1, st1 = _random_stats(d, 15, g)
    e2, es2, st2 = _random_stats(d, 10, g)
    p = torch.randn(40, d, generator=g, dtype=torch.float64)
    q = torch.randn(25, d, generator=g, dtype=torch.float64)
    P, Q = p.T @ p / len(p), q.T @ q / len(q)  # per-token Grams
    m = refinement_map([st1.cross, st2.cross], [st1.gram, st2.gram], lam, P, s, Q, s2)
    w = w0 @ m
    # independent: stack every term as rows of one least-squares problem in W^T
    rows_x = [e1, e2, (lam ** 0.5) * torch.eye(d, dtype=torch.float64),
              (s / len(p)) ** 0.5 * p, (s2 / len(q)) ** 0.5 * q]
    rows_y = [es1 @ w0.T, es2 @ w0.T, (lam ** 0.5) * w0.T, (s / len(p)) ** 0.5 * p @ w0.T,
              (s2 / len(q)) ** 0.5 * q @ w0.T]
    x = torch.linalg.lstsq(torch.cat(rows_x), torch.cat(rows_y)).solution
    assert torch.allclose(w, x.T, rtol=1e-6, atol=1e-9 * w.abs().max())
    rel = (w - x.T).norm() / x.norm()
    assert rel < 1e-6


def test_singular_system_is_a_clear_error():
    st = ConceptStats(torch.zeros(4, 4, dtype=torch.float64), torch.zeros(4, 4, dtype=torch.float64),
                      torch.zeros(4, 4, dtype=torch.float64), 0)
    with pytest.raises(ValueError, match="singular"):
        refinement_map([st.cross], [st.gram], 0.0)


@pytest.fixture(scope="module")
def backend():
    return DiffusersBackend.from_checkpoint(load_checkpoint(tiny_file("sd1")), device="cpu")


def test_concept_stats_gather_aligned_embeddings(backend):
    prompts, anchors = ["a photo of a cat", "a cat in a park"], ["a photo of a dog", "a dog in a park"]
    st = concept_stats(backend, prompts, anchors)
    ct, at = backend.encode(prompts), backend.encode(anchors)
    cross = torch.zeros_like(st.cross)
    n = 0
    for k in range(2):
        pos = backend.tokenize(prompts[k]).index(2368)  # "cat"
        for i in range(77):
            if i != pos:  # same-length prompts: every other position aligns with itself
                cross += at.context[k, i].double()[:, None] @ ct.context[k, i].double()[None]
                n += 1
    assert st.pairs == n
    assert torch.allclose(st.cross, cross, rtol=1e-9, atol=1e-9)


def test_refinement_moves_concept_context_to_anchor_and_keeps_prior(backend):
    from mace_core.method.prior import mean_grams

    prompts = [f"a photo of a {w}" for w in ("cat",)] + ["a cat on a sofa", "the cat sleeps", "my cat"]
    anchors = [p.replace("cat", "dog") for p in prompts]
    st = concept_stats(backend, prompts, anchors)
    others = ["a red car", "a house by the sea", "a bowl of fruit", "a man walking", "a mountain lake"]
    P = mean_grams(backend, others)["context"]
    w0 = backend.original_weights()
    m = context_map([st], lam=0.01, prior=P, s=50.0)
    w = apply_map(w0, m)
    ct, at = backend.encode(prompts), backend.encode(anchors)
    pos = backend.tokenize(prompts[0]).index(2368)
    e = torch.cat([ct.context[0, pos + 1:], ct.context[1:, 4:].reshape(-1, ct.context.shape[-1])]).double()
    es = torch.cat([at.context[0, pos + 1:], at.context[1:, 4:].reshape(-1, at.context.shape[-1])]).double()
    pe = backend.encode(others).context.reshape(-1, ct.context.shape[-1]).double()
    for key in list(w0)[:6]:
        W0, W = w0[key].double(), w[key].double()
        before = (e @ W0.T - es @ W0.T).norm()
        after = (e @ W.T - es @ W0.T).norm()
        assert after < 0.5 * before, key  # co-existing words now say "dog"
        drift = (pe @ (W - W0).T).norm() / (pe @ W0.T).norm()
        assert drift < 0.1, key  # other captions barely move
