"""The erasure itself is the acceptance criterion: on the shipped toy model, erasing a shape with
the default toy preset must remove it (and its synonym) and keep the other shapes.

An erasure that erases nothing fails here. Images are sampled with fixed seeds and judged by the
toy classifier, which has a "none" class, so a broken image never counts as a shape.
"""

from __future__ import annotations

import pytest

from mace_core.model.checkpoint import load_checkpoint, with_edits
from mace_core.method.concepts import ErasureSpec, make_concept
from mace_core.model.diffusers_backend import DiffusersBackend
from mace_core.method.erase import erase
from mace_core.method.project import Project
from toyworld import TOY_MODEL
from toyworld.evaluate import object_scores
from toyworld.judge import Judge


@pytest.fixture(scope="module")
def erased_circle(tmp_path_factory):
    if not TOY_MODEL.is_file():
        # The gate turns on by itself when the trained toy model is committed (issue 10).
        pytest.skip(f"the trained toy model {TOY_MODEL.name} is not in this checkout yet")
    ck = load_checkpoint(TOY_MODEL)
    base = DiffusersBackend.from_checkpoint(ck, device="cpu")
    res = erase(base, ErasureSpec((make_concept("circle", "", "toy"),)), Project(tmp_path_factory.mktemp("p")),
                ck.sha256)
    return base, DiffusersBackend.from_checkpoint(with_edits(ck, res.weights), device="cpu"), res


def test_erasure_regression_gate(erased_circle):
    base, erased, _ = erased_circle
    s = object_scores(erased, Judge.load(), ["circle"], seeds_per_color=4)
    assert s.acc_e <= 10.0, s.to_dict()
    assert s.acc_g <= 15.0, s.to_dict()
    assert s.acc_s >= 90.0, s.to_dict()


def test_stage_two_lowers_the_attention_loss_substantially(tmp_path):
    """Stage 2 must matter (the authors' LoRA loss moved 9.75 -> 9.73): at the strength of the
    general presets (lr 1e-2 here) it lowers its loss >= 30% by its end, and the shape stays erased.

    The toy preset itself keeps stage 2 weak: on this model a LoRA that strong sends "circle"
    prompts back to the model's fallback shape, which is a circle (benchmarks/RESULTS.md)."""
    ck = load_checkpoint(TOY_MODEL)
    base = DiffusersBackend.from_checkpoint(ck, device="cpu")
    res = erase(base, ErasureSpec((make_concept("square", "", "toy"),), (), {"lr": 1e-2}), Project(tmp_path), ck.sha256)
    losses = res.report["losses"]["square"]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last <= 0.7 * first, (first, last)
    erased = DiffusersBackend.from_checkpoint(with_edits(ck, res.weights), device="cpu")
    s = object_scores(erased, Judge.load(), ["square"], seeds_per_color=2, others=[])
    assert s.acc_e <= 10.0 and s.acc_g <= 15.0, s.to_dict()


def test_restoring_a_concept_brings_it_back_and_keeps_the_other_erased(tmp_path):
    """SepME's promise on the toy world: erase {circle, square}, then re-fuse all but circle
    (`mace fuse --except circle`): circle prompts draw circles again as often as the base model
    does, on the same seeds, and square stays erased."""
    from mace_core.method.erase import refuse

    ck = load_checkpoint(TOY_MODEL)
    base = DiffusersBackend.from_checkpoint(ck, device="cpu")
    judge = Judge.load()
    spec = ErasureSpec((make_concept("circle", "", "toy"), make_concept("square", "", "toy")))
    both = erase(base, spec, Project(tmp_path), ck.sha256)
    erased = object_scores(DiffusersBackend.from_checkpoint(with_edits(ck, both.weights), device="cpu"), judge,
                           ["circle", "square"], seeds_per_color=2, others=[])
    before = object_scores(base, judge, ["circle"], seeds_per_color=2, others=[])
    # restoring means something only if circle was markedly erased first
    assert erased.per_shape["circle"] <= before.acc_e - 30.0, (before.to_dict(), erased.to_dict())
    assert erased.per_shape["square"] <= 10.0, erased.to_dict()

    restored = refuse(Project(tmp_path), base.original_weights(), exclude=["circle"])
    after = DiffusersBackend.from_checkpoint(with_edits(ck, restored.weights), device="cpu")
    back = object_scores(after, judge, ["circle"], seeds_per_color=2, others=[])
    assert back.acc_e >= before.acc_e - 10.0, (before.to_dict(), back.to_dict())
    assert back.acc_g >= before.acc_g - 10.0, (before.to_dict(), back.to_dict())
    still = object_scores(after, judge, ["square"], seeds_per_color=2, others=[])
    assert still.acc_e <= 10.0 and still.acc_g <= 15.0, still.to_dict()
