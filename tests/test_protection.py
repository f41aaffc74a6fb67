"""What stage 1 keeps: the per-concept retain weighting, the default protection of each type, and the
mass balance (overlap) that keeps many concepts from outweighing it."""

from __future__ import annotations

import tempfile

import pytest
import torch

from mace_core.checkpoint import load_checkpoint
from mace_core.concepts import ErasureSpec, concept_prompts, get_type, make_concept
from mace_core.diffusers_backend import DiffusersBackend
from mace_core.erase import _priors, refine_weights
from mace_core.prior import mean_grams
from mace_core.project import Project
from mace_core.refine import ConceptStats, overlap
from tiny import tiny_file


@pytest.fixture(scope="module")
def backend():
    return DiffusersBackend.from_checkpoint(load_checkpoint(tiny_file("sd1")), device="cpu")


def _stats(cross: torch.Tensor, gram: torch.Tensor) -> ConceptStats:
    return ConceptStats(cross, gram, gram.clone(), 1)


def test_overlap_is_one_for_one_or_orthogonal_concepts_and_n_for_n_alike():
    g = torch.Generator().manual_seed(0)
    d = 6
    eye = torch.eye(d, dtype=torch.float64)
    # a pull D = cross - gram on disjoint coordinate blocks: orthogonal in the Frobenius sense
    pulls = []
    for k in range(3):
        p = torch.zeros(d, d, dtype=torch.float64)
        p[2 * k:2 * k + 2, 2 * k:2 * k + 2] = torch.randn(2, 2, generator=g, dtype=torch.float64)
        pulls.append(p)
    assert overlap([_stats(eye + pulls[0], eye)]) == pytest.approx(1.0)
    assert overlap([_stats(eye + p, eye) for p in pulls]) == pytest.approx(1.0)
    assert overlap([_stats(eye + pulls[0], eye)] * 5) == pytest.approx(5.0)
    # two concepts at 60 degrees: ||a + b||^2 / (||a||^2 + ||b||^2) = 1 + cos
    a = torch.zeros(d, d, dtype=torch.float64)
    b = torch.zeros(d, d, dtype=torch.float64)
    a[0, 0], b[0, 0], b[1, 1] = 1.0, 0.5, 3 ** 0.5 / 2
    assert overlap([_stats(eye + a, eye), _stats(eye + b, eye)]) == pytest.approx(1.5)


def test_n_identical_concepts_refine_like_one_with_the_balance_and_not_without():
    """With the overlap balance, n copies of one concept's sums give exactly the one-concept map (the
    protection scales with them); without it, they outweigh the ridge and the prior n-fold."""
    g = torch.Generator().manual_seed(1)
    d = 8
    e = torch.randn(40, d, generator=g, dtype=torch.float64)
    es = e + 0.5 * torch.randn(40, d, generator=g, dtype=torch.float64)
    st = ConceptStats(es.T @ e, e.T @ e, e.T @ e, 40)
    p = torch.randn(200, d, generator=g, dtype=torch.float64)
    priors = {"general": p.T @ p / 200}
    w0 = {"k": torch.randn(5, d, generator=g)}

    class Run:
        lam, prior, domain, balance = 30.0, 70.0, 0.0, "overlap"

    one = refine_weights(w0, [st], Run, priors)["k"]
    many = refine_weights(w0, [st] * 10, Run, priors)["k"]
    torch.testing.assert_close(many, one, rtol=1e-5, atol=1e-6)
    Run.balance = "none"
    unbalanced = refine_weights(w0, [st] * 10, Run, priors)["k"]
    assert (unbalanced - one).norm() > 0.05 * one.norm()


def test_retain_prior_weighs_per_kept_concept(backend):
    """The domain prior is the sum over kept phrases of each one's mean Gram (computed here phrase by
    phrase), so adding kept phrases adds protection instead of diluting it."""
    kept = ("a dog", "a red car", "a tall tree")
    spec = ErasureSpec((make_concept("a cat", "", "object"),), kept, {"domain": 1.0})
    with tempfile.TemporaryDirectory() as d:
        pri = _priors(backend, Project(d), spec)
    c = spec.concepts[0]
    want = sum(mean_grams(backend, concept_prompts(c, r))["context"] for r in kept)
    torch.testing.assert_close(pri["domain"], want, rtol=1e-9, atol=1e-12)


def test_default_protection_of_each_type_named_and_without_the_erased():
    for t in ("object", "celebrity", "style", "explicit"):
        assert len(get_type(t).protect) >= 10, t
    keep = get_type("celebrity").protect[0]
    spec = ErasureSpec((make_concept(keep, "", "celebrity"), make_concept("Someone Else", "", "celebrity")))
    kept, source = spec.protected()
    assert keep not in kept and len(kept) == len(get_type("celebrity").protect) - 1
    assert source.startswith("default protection of celebrity")
    # the user's retain list replaces it; protection 'none' turns it off
    assert ErasureSpec(spec.concepts, ("Bill Murray",)).protected() == (("Bill Murray",), "retain list")
    assert ErasureSpec(spec.concepts, (), {"protection": "none"}).protected() == ((), "")
    # two types: both defaults, each phrase once
    mixed = ErasureSpec((make_concept("x", "", "object"), make_concept("y", "", "explicit")))
    kept, source = mixed.protected()
    assert len(kept) == len(set(kept)) == len(get_type("object").protect) + len(get_type("explicit").protect)
    assert "object, explicit" in source


def test_the_output_records_what_stage_1_kept():
    import json

    from mace_core.erase import erasure_metadata

    spec = ErasureSpec((make_concept("Someone Else", "", "celebrity"),))
    rec = json.loads(erasure_metadata(spec, "0" * 64, "base.safetensors")["mace.protected"])
    assert rec["source"].startswith("default protection of celebrity")
    assert rec["phrases"] == list(get_type("celebrity").protect)
    off = ErasureSpec(spec.concepts, (), {"protection": "none"})
    assert json.loads(erasure_metadata(off, "0" * 64, "b")["mace.protected"]) == {"phrases": [], "source": ""}
