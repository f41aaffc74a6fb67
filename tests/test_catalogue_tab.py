"""Hostile input through the A1111/Forge tab's entry points (`actions.estimate_run`, `actions.run_erase`,
`actions.refuse_project`: what the tab's buttons call, in A1111, Forge and the standalone app alike):
each case must raise `MaceError` (the tab shows its one line; anything else is a traceback in the
console and "Unexpected error" on the page), with every file that existed before unchanged and no
new file. The CLI's catalogue is tests/test_catalogue.py; the nodes' is tests/test_catalogue_nodes.py."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable

import pytest

from safetensors.torch import load_file, save_file

from mace_core.errors import MaceError
from mace_core.model.checkpoint import read_metadata
from sd_webui_extension import actions
from sd_webui_extension.host import StandaloneHost
from tiny import FEW_CAPTIONS, NOT_TEXT, tiny_file

ERASE, ESTIMATE = "erase", "estimate"


@pytest.fixture(scope="module")
def host(tmp_path_factory) -> StandaloneHost:
    """A standalone host over a folder with a tiny SD1 model, another one, a project "pets" (cat erased,
    closed form), a project with a garbage manifest and a folder that only looks like a project."""
    root = tmp_path_factory.mktemp("tab")
    model = root / "base.safetensors"
    shutil.copy(tiny_file("sd1"), model)
    tensors, meta = load_file(str(model)), read_metadata(model)
    for k in tensors:  # another model: the same architecture, other cross-attention weights
        if k.endswith("attn2.to_k.weight"):
            tensors[k] = tensors[k] * 1.5
    save_file(tensors, str(root / "other.safetensors"), metadata=meta)
    (root / "garbage.safetensors").write_bytes(b"\x13\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"x" * 64)
    (root / "notes.txt").write_text("not a model")
    h = StandaloneHost(model, device="cpu")
    actions.run_erase(h, _form(concepts="cat", out_name="no-cat", project="pets"))
    broken = h.projects_folder() / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{ this is not json")
    (h.projects_folder() / "stray").mkdir()
    return h


def _form(**kw) -> actions.EraseForm:
    """A form that would run: closed form only, no previews, base.safetensors, output "out"."""
    base = dict(checkpoint="base.safetensors", concepts="dog", out_name="out", previews=False, closed_form_only=True)
    return actions.EraseForm(**{**base, **kw})


def _numbers(**kw) -> actions.EraseForm:
    return _form(numbers={k: str(v) for k, v in kw.items()})


#: name -> (the form, what its message must name)
FORMS: dict[str, tuple[actions.EraseForm, str]] = {
    # the concept list
    "no-concepts": (_form(concepts=""), "nothing to erase"),
    "only-comments": (_form(concepts="# nothing\n   \n# here"), "nothing to erase"),
    "erased-and-kept": (_form(concepts="dog", retain="dog"), "both erased and retained"),
    "listed-twice": (_form(concepts="dog\nDog"), "listed twice"),
    "too-many-fields": (_form(concepts="dog | a cat | object | extra"), "phrase | anchor | type"),
    "unknown-type-in-line": (_form(concepts="dog | | no-such-type"), "no-such-type"),
    "unknown-default-type": (_form(ctype="no-such-type"), "no-such-type"),
    "unknown-preset": (_form(concepts="", preset="no-such-preset"), "no-such-preset"),
    "phrase-too-long": (_form(concepts=" ".join(["word"] * 90)), "too long"),
    "anchor-equals-concept": (_form(concepts="dog | dog"), "itself as anchor"),
    # numbers typed in the advanced fields
    "steps-words": (_numbers(steps="many"), "many"),
    "steps-zero": (_numbers(steps=0), "steps"),
    "steps-negative": (_numbers(steps=-3), "steps"),
    "steps-fraction": (_numbers(steps=2.5), "2.5"),
    "lr-nan": (_numbers(lr="nan"), "learning rate"),
    "lr-negative": (_numbers(lr=-0.1), "learning rate"),
    "lr-inf": (_numbers(lr="inf"), "learning rate"),
    "lam-nan": (_numbers(lam="nan"), "lam"),
    "lam-negative": (_numbers(lam=-1), "lam"),
    "prior-negative": (_numbers(prior=-5), "prior"),
    "domain-words": (_numbers(domain="lots"), "lots"),
    "images-zero": (_numbers(images=0), "images"),
    "rank-zero": (_numbers(rank=0), "rank"),
    "batch-zero": (_numbers(batch_size=0), "batch"),
    "sample-steps-zero": (_numbers(sample_steps=0), "sampling steps"),
    "guidance-nan": (_numbers(guidance="nan"), "guidance"),
    "mask-threshold-above-one": (_numbers(mask_threshold=1.5), "mask threshold"),
    "seed-words": (_numbers(seed="lucky"), "seed"),
    "seed-negative": (_numbers(seed=-1), "seed"),
    "clip-skip-99": (_numbers(clip_skip=99), "clip skip 99"),
    "clip-skip-zero": (_numbers(clip_skip=0), "CLIP skip"),
    "protection-unknown": (_numbers(protection="everything"), "everything"),
    "balance-unknown": (_numbers(balance="maybe"), "maybe"),
    "timesteps-unknown": (_numbers(timesteps="random"), "random"),
    "fusion-unknown": (_numbers(fusion="average"), "average"),
    "prior-captions-missing": (_numbers(prior=2000, prior_captions="no-such-captions.txt"), "no-such-captions.txt"),
    "prior-captions-too-few": (_numbers(prior=2000, prior_captions=FEW_CAPTIONS), "at least 50"),
    "prior-captions-not-text": (_numbers(prior=2000, prior_captions=NOT_TEXT), "UTF-8"),
    "prior-captions-without-prior": (_numbers(prior_captions=FEW_CAPTIONS), "no effect"),
    "separable-words": (_numbers(separable="perhaps"), "perhaps"),
    "robust-rounds-negative": (_numbers(robust_rounds=-1), "robust"),
    "fuse-lam-nan": (_numbers(fuse_lam="nan"), "fusion ridge"),
    "unknown-field": (_numbers(no_such_setting=3), "no_such_setting"),
    # objective, mask
    "objective-unknown": (_form(objective="magic"), "magic"),
    "mask-unknown": (_form(mask="lasso"), "lasso"),
    "sam-checkpoint-missing": (_form(mask="sam", sam_checkpoint="missing-sam.pth", closed_form_only=False),
                               "missing-sam.pth"),
    # the model
    "checkpoint-empty": (_form(checkpoint=""), "pick a checkpoint"),
    "checkpoint-unknown": (_form(checkpoint="nope.safetensors"), "nope.safetensors"),
    "checkpoint-garbage": (_form(checkpoint="garbage.safetensors"), "garbage.safetensors"),
    # the output file name
    "out-empty": (_form(out_name="   "), "give an output file name"),
    "out-parent-folder": (_form(out_name="../escape"), "plain name"),
    "out-absolute": (_form(out_name="/tmp/escape"), "plain name"),
    "out-subfolder": (_form(out_name="a/b"), "plain name"),
    "out-backslash": (_form(out_name="a\\b"), "plain name"),
    "out-other-suffix": (_form(out_name="out.ckpt"), ".safetensors"),
    "out-exists": (_form(out_name="no-cat"), "already exists"),
    "out-is-the-input": (_form(out_name="base", overwrite=True), "never overwritten"),
    "out-is-the-input-with-suffix": (_form(out_name="base.safetensors", overwrite=True), "never overwritten"),
    "out-hidden": (_form(out_name=".hidden"), "dot"),
    # the project name
    "project-parent-folder": (_form(project="../escape"), "project name"),
    "project-absolute": (_form(project="/tmp/escape"), "project name"),
    "project-subfolder": (_form(project="a/b"), "project name"),
    "project-hidden": (_form(project=".estimate"), "project name"),
    "project-prior": (_form(project="prior"), "general priors"),
    "project-damaged-manifest": (_form(project="broken"), "manifest.json"),
    "project-of-another-model": (_form(checkpoint="other.safetensors", project="pets"),
                                 "not the model project 'pets' was made from"),
}

#: form cases that are refused by the Erase button only (Estimate only measures; it writes nothing)
ERASE_ONLY = {"out-exists", "out-is-the-input", "out-is-the-input-with-suffix", "out-empty", "out-parent-folder",
              "out-absolute", "out-subfolder", "out-backslash", "out-other-suffix", "out-hidden"}


def _refuse(name: str, selected=(), out_name: str = "refused", overwrite: bool = False) -> Callable:
    return lambda h: actions.refuse_project(h, name, list(selected), out_name, overwrite)


#: name -> (a re-fuse through the tab, what its message must name)
OTHER: dict[str, tuple[Callable[[StandaloneHost], object], str]] = {
    "refuse-unknown-project": (_refuse("nope"), "nope"),
    "refuse-empty-project-name": (_refuse(""), "give a project name"),
    "refuse-project-path": (_refuse("../pets"), "plain name"),
    "refuse-damaged-manifest": (_refuse("broken"), "manifest.json"),
    "refuse-folder-without-manifest": (_refuse("stray"), "not an erasure project"),
    "refuse-unknown-concept": (_refuse("pets", ["unicorn"]), "unicorn"),
    "refuse-output-exists": (_refuse("pets", ["cat"], out_name="no-cat"), "already exists"),
    "refuse-output-is-the-base": (_refuse("pets", ["cat"], out_name="base", overwrite=True), "never overwritten"),
    "refuse-output-path": (_refuse("pets", ["cat"], out_name="../x"), "plain name"),
    "refuse-output-empty": (_refuse("pets", ["cat"], out_name=""), "give an output file name"),
}

CASES = ([(f"{ESTIMATE}-{n}", n) for n in FORMS if n not in ERASE_ONLY] + [(f"{ERASE}-{n}", n) for n in FORMS]
         + [(n, n) for n in OTHER])


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case, key", CASES, ids=[c for c, _ in CASES])
def test_hostile_input_in_the_tab_is_refused_cleanly(host, case, key):
    root = host.model.parent
    before = _tree(root)
    if key in OTHER:
        action, expected = OTHER[key]
        call = lambda: action(host)  # noqa: E731
    else:
        form, expected = FORMS[key]
        entry = actions.estimate_run if case.startswith(ESTIMATE) else actions.run_erase
        call = lambda: entry(host, form)  # noqa: E731
    with pytest.raises(MaceError) as e:
        call()
    msg = str(e.value)
    assert expected in msg and "\n" not in msg, msg
    assert _tree(root) == before, f"{case} changed files"


def test_the_tab_catalogue_is_large():
    assert len(CASES) >= 100, len(CASES)


def test_the_catalogue_forms_differ_from_a_good_form_only_in_the_hostile_field(host):
    """The same form with the hostile field put back runs (so each case tests its one field): the
    good form erases dog from base.safetensors, and a number field case only differs in numbers."""
    res = actions.run_erase(host, _form(out_name="good", project="good"))
    assert json.loads(res.metadata["mace.concepts"])[0]["phrase"] == "dog"
    for name, (form, _) in FORMS.items():
        if name.startswith(("steps-", "lr-", "lam-", "prior-", "images-", "rank-", "seed-", "clip-skip-")):
            assert dataclasses.replace(form, numbers={}) == _form(), name
