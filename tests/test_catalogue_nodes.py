"""Hostile input through the ComfyUI nodes, in a real ComfyUI (tests/comfyui_harness.py): each graph must
be refused, by ComfyUI's validation (the field named, nothing run) or by the node with a `MaceError`
(ComfyUI shows its one line on the node; any other exception type is a traceback in the console), naming
what is wrong, with every file in ComfyUI's models and output folders unchanged and no new file. The
CLI's catalogue is tests/test_catalogue.py, the tab's tests/test_catalogue_tab.py."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import comfyui_harness as h  # noqa: E402
from tiny import FEW_CAPTIONS, NOT_TEXT  # noqa: E402

FAST = {"steps": 4, "rank": 0, "lr": 0.0, "images": 1, "sample_steps": 2, "guidance": 0.0, "mask": "type default",
        "training_seed": 7, "resolution": 64}
VALIDATION, NODE = "validation", "node"


def _concepts(text: str = "cat", project: str = "", **kw) -> dict:
    inputs = {"concepts": text, "default_type": "object", "preset": "none", "retain": "", "config_file": "",
              "project": project}
    return {"class_type": "MACELoadConcepts", "inputs": {**inputs, **kw}}


def _erase(concepts: dict, ckpt: str = "tiny64", prefix: str = "checkpoints/catalogue", **kw) -> dict:
    """Load Checkpoint -> Load Concepts -> Erase Concepts (closed form) -> Save Erased Checkpoint (``prefix``)."""
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}, "2": concepts,
            "3": {"class_type": "MACEEraseConcepts",
                  "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "concepts": ["2", 0], **FAST,
                             "closed_form_only": True, **kw}},
            "4": {"class_type": "MACESaveCheckpoint", "inputs": {"model": ["3", 0], "clip": ["1", 1], "vae": ["1", 2],
                                                                 "filename_prefix": prefix}}}


def _refuse(project: str, mode: str = "erase all concepts of the project", concepts: str = "",
            ckpt: str = "tiny64", closed: bool = False) -> dict:
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
            "5": {"class_type": "MACERefuse", "inputs": {"model": ["1", 0], "project": project, "mode": mode,
                                                        "concepts": concepts, "closed_form_only": closed}},
            "6": {"class_type": "MACESaveCheckpoint", "inputs": {"model": ["5", 0], "clip": ["1", 1], "vae": ["1", 2],
                                                                 "filename_prefix": "checkpoints/refused"}}}


def _concepts_only(**kw) -> dict:
    return {"2": _concepts(**kw)}


ONLY = "erase only the listed concepts"
RESTORE = "restore the listed concepts (erase all others)"

#: name -> (graph, where it must be refused, what the message must name). "tiny64" and "other" stand for
#: the two checkpoints' names; "{cfg:NAME}" for a config file of the world's.
CASES: dict[str, tuple[dict, str, str]] = {
    # Load Concepts alone
    "no-concepts": (_concepts_only(text=""), NODE, "no concepts to erase"),
    "only-comments": (_concepts_only(text="# nothing\n\n# here"), NODE, "no concepts to erase"),
    "listed-twice": (_concepts_only(text="cat\nCat"), NODE, "listed twice"),
    "too-many-fields": (_concepts_only(text="cat | a dog | object | extra"), VALIDATION, "phrase | anchor | type"),
    "unknown-type-in-line": (_concepts_only(text="cat | | no-such-type"), VALIDATION, "no-such-type"),
    "unknown-default-type": (_concepts_only(default_type="no-such-type"), NODE, "no-such-type"),
    "unknown-preset": (_concepts_only(preset="no-such-preset"), NODE, "no-such-preset"),
    "erased-and-kept": (_concepts_only(text="cat", retain="cat"), NODE, "both erased and retained"),
    "anchor-itself": (_concepts_only(text="cat | Cat"), VALIDATION, "itself as anchor"),
    "config-missing": (_concepts_only(text="", config_file="{cfg:missing.yaml}"), NODE, "missing.yaml"),
    "config-not-yaml": (_concepts_only(text="", config_file="{cfg:broken.yaml}"), NODE, "not valid YAML"),
    "config-unknown-key": (_concepts_only(text="", config_file="{cfg:typo.yaml}"), NODE, "setings"),
    "config-not-utf8": (_concepts_only(text="", config_file="{cfg:latin1.yaml}"), NODE, "UTF-8"),
    "config-a-folder": (_concepts_only(text="", config_file="{cfg:}"), NODE, "folder"),
    "config-wrong-types": (_concepts_only(text="", config_file="{cfg:types.yaml}"), NODE, "settings.steps"),
    "config-bad-csv": (_concepts_only(text="", config_file="{cfg:bad.csv}"), NODE, "bad.csv"),
    "project-path": (_concepts_only(project="../escape"), NODE, "plain name"),
    "project-absolute": (_concepts_only(project="/tmp/escape"), NODE, "plain name"),
    "project-subfolder": (_concepts_only(project="a/b"), NODE, "plain name"),
    "project-hidden": (_concepts_only(project=".hidden"), NODE, "dot"),
    "project-prior": (_concepts_only(project="prior"), NODE, "general priors"),
    # Erase Concepts on a model
    "phrase-too-long": (_erase(_concepts(" ".join(["word"] * 90))), NODE, "too long"),
    "steps-below-min": (_erase(_concepts(), steps=-5), VALIDATION, "steps"),
    "lr-below-min": (_erase(_concepts(), lr=-1.0), VALIDATION, "lr"),
    "images-below-min": (_erase(_concepts(), images=-2), VALIDATION, "images"),
    "resolution-not-a-number": (_erase(_concepts(), resolution="big"), VALIDATION, "resolution"),
    "mask-unknown": (_erase(_concepts(), mask="lasso"), NODE, "lasso"),
    "sam-without-checkpoint": (_erase(_concepts(), mask="sam", closed_form_only=False), NODE, "sam"),
    "prior-captions-missing": (_erase(_concepts(), prior=2000.0, prior_captions="no-such-captions.txt"), NODE,
                               "no-such-captions.txt"),
    "prior-captions-too-few": (_erase(_concepts(), prior=2000.0, prior_captions=FEW_CAPTIONS), NODE, "at least 50"),
    "prior-captions-not-text": (_erase(_concepts(), prior=2000.0, prior_captions=NOT_TEXT), NODE, "UTF-8"),
    "prior-captions-without-prior": (_erase(_concepts(), prior_captions=FEW_CAPTIONS), NODE, "no effect"),
    "unknown-checkpoint": (_erase(_concepts(), ckpt="nope.safetensors"), VALIDATION, "ckpt_name"),
    "project-of-another-model": (_erase(_concepts(project="made-from-tiny64"), ckpt="other"), NODE,
                                 "not the model project 'made-from-tiny64' was made from"),
    "project-damaged-manifest": (_erase(_concepts(project="broken")), NODE, "manifest.json"),
    "save-outside-output": (_erase(_concepts(), prefix="../../escape"), VALIDATION, "outside the output"),
    # Re-fuse / restore
    "refuse-unknown-project": (_refuse("nope"), NODE, "nope"),
    "refuse-damaged-manifest": (_refuse("broken"), NODE, "manifest.json"),
    "refuse-only-nothing-listed": (_refuse("made-from-tiny64", ONLY, "", closed=True), NODE, "list the concepts"),
    "refuse-restore-nothing-listed": (_refuse("made-from-tiny64", RESTORE, "  \n", closed=True), NODE,
                                      "list the concepts"),
    "refuse-unknown-concept": (_refuse("made-from-tiny64", ONLY, "unicorn", closed=True), NODE, "unicorn"),
    "refuse-another-model": (_refuse("made-from-tiny64", ckpt="other", closed=True), NODE,
                             "not the model project 'made-from-tiny64' was made from"),
    "refuse-unknown-mode": (_refuse("made-from-tiny64", "erase everything twice", closed=True), NODE,
                            "erase everything twice"),
    "refuse-closed-form-project-with-loras": (_refuse("made-from-tiny64"), NODE, "re-fuse closed-form only"),
}


@pytest.fixture(scope="module")
def world(comfyui, tiny64, tmp_path_factory):
    """Another checkpoint (tiny64's cross-attention weights scaled), a project made from tiny64, a
    project with a garbage manifest, and config files with one defect each."""
    from safetensors.torch import load_file, save_file

    from mace_core.model.checkpoint import read_metadata

    root = tmp_path_factory.mktemp("catalogue-nodes")
    tensors = load_file(str(tiny64.path))
    for k in tensors:
        if k.endswith("attn2.to_k.weight"):
            tensors[k] = tensors[k] * 1.5
    save_file(tensors, str(root / "other.safetensors"), metadata=read_metadata(tiny64.path))
    h.register_from_checkpoint(root / "other.safetensors")
    other = comfyui.add_model(root / "other.safetensors")
    comfyui.run(_erase(_concepts("cat", project="made-from-tiny64"), ckpt=tiny64.name))
    broken = comfyui.models_dir / "mace" / "broken"
    broken.mkdir(parents=True, exist_ok=True)
    (broken / "manifest.json").write_text("{ this is not json")
    cfg = root / "configs"
    cfg.mkdir()
    (cfg / "broken.yaml").write_text("concepts: [cat\n")
    (cfg / "typo.yaml").write_text("concepts: [cat]\nsetings: {steps: 2}\n")
    (cfg / "latin1.yaml").write_bytes("concepts: [caf\xe9]\n".encode("latin-1"))
    (cfg / "types.yaml").write_text("concepts: [cat]\nsettings: {steps: many}\n")
    (cfg / "bad.csv").write_text("phrase,anchor,type,extra,more\ncat,a dog,object,x,y\n")
    return {"tiny64": tiny64.name, "other": other, "cfg": cfg}


def _fill(graph: dict, world: dict) -> dict:
    """The case's graph with the world's checkpoint names and config paths put in."""
    out = {}
    for nid, node in graph.items():
        inputs = dict(node["inputs"])
        if inputs.get("ckpt_name") in ("tiny64", "other"):
            inputs["ckpt_name"] = world[inputs["ckpt_name"]]
        cf = inputs.get("config_file")
        if isinstance(cf, str) and cf.startswith("{cfg:"):
            inputs["config_file"] = str(world["cfg"] / cf[5:-1])
        out[nid] = {**node, "inputs": inputs}
    return out


def _tree(*roots: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for r in roots if r.exists() for p in sorted(r.rglob("*")) if "__pycache__" not in p.parts}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input_in_the_nodes_is_refused_cleanly(comfyui, world, name):
    graph, where, expected = CASES[name]
    before = _tree(comfyui.models_dir, comfyui.output_dir)
    if where == VALIDATION:
        with pytest.raises(h.ComfyUIValidationError) as e:
            comfyui.run(_fill(graph, world))
        msg = str(e.value)
    else:
        with pytest.raises(h.ComfyUIExecutionError) as e:
            comfyui.run(_fill(graph, world))
        assert e.value.exception_type.endswith("MaceError"), (e.value.exception_type, e.value.exception_message)
        msg = e.value.exception_message
        assert "\n" not in msg.strip(), msg
    assert expected in msg, msg
    assert _tree(comfyui.models_dir, comfyui.output_dir) == before, f"{name} changed files"


def test_the_good_graphs_run(comfyui, world, tmp_path):
    """The graphs the cases spoil run when left good: an erasure and a re-fuse on tiny64."""
    out = comfyui.run(_fill(_erase(_concepts("dog")), world))
    assert Path(out["4"][0]).is_file()
    out = comfyui.run(_fill(_refuse("made-from-tiny64", ONLY, "cat", closed=True), world))
    assert Path(out["6"][0]).is_file()
    shutil.rmtree(tmp_path, ignore_errors=True)
