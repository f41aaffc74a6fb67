"""Hostile input, as a new user gives it, to every command: each case must end in exit code 2 and one
`error:` line naming the input and what to do, with no traceback, every file that existed before
unchanged (sha256) and no new file (no stray temporary file). Plus the files commands do write: ordinary
modes (0644 under umask 022), `--force`, and failures in the middle of a write.

The CLI runs in this process (`mace_core.cli.main.main`) on tiny models of the real architectures, so the
whole catalogue takes seconds after one short erasure that every case shares."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from mace_core.model.checkpoint import read_metadata
from mace_core.cli.main import main
from mace_core.method.concepts import make_concept
from tiny import FEW_CAPTIONS, NOT_TEXT, tiny_file

FAST = ["--images", "2", "--sample-steps", "3", "--steps", "4", "--device", "cpu"]


@dataclass
class World:
    """Shared, read-only inputs: models, an erasure, its project and its exported LoRA, damaged files."""

    root: Path
    model: Path  # tiny SD1
    sd2: Path
    sdxl: Path
    erased: Path  # cat and dog erased from `model`
    project: Path
    lora: Path  # `mace export-lora erased --base model`

    def p(self, name: str) -> Path:
        return self.root / name


def _write_model_variant(src: Path, out: Path, edit: Callable[[dict, dict], None]) -> Path:
    tensors, meta = load_file(str(src)), read_metadata(src)
    edit(tensors, meta)
    save_file(tensors, str(out), metadata=meta)
    return out


def _first_kv(tensors: dict) -> str:
    return next(k for k in sorted(tensors) if k.endswith("attn2.to_k.weight"))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("world")
    model, sd2, sdxl = root / "model.safetensors", root / "sd2.safetensors", root / "sdxl.safetensors"
    for name, dst in (("sd1", model), ("sd2", sd2), ("sdxl", sdxl)):
        shutil.copy(tiny_file(name), dst)
    erased, project, lora = root / "erased.safetensors", root / "project", root / "erasure-lora.safetensors"
    assert main(["erase", str(model), "--concept", "cat", "--concept", "dog", "--out", str(erased),
                 "--work-dir", str(project), *FAST]) == 0
    assert main(["export-lora", str(erased), "--base", str(model), "--out", str(lora)]) == 0
    # damaged and hostile model files
    (root / "garbage.safetensors").write_bytes(b"\x13\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"x" * 64)
    (root / "empty.safetensors").write_bytes(b"")
    data = model.read_bytes()
    (root / "truncated.safetensors").write_bytes(data[:len(data) // 2])
    os.mkfifo(root / "fifo.safetensors")
    (root / "notes.txt").write_text("not a model")
    (root / "folder-model").mkdir()
    (root / "bad-utf8.md").write_bytes(b"# report\n\xff\xfe broken \xc3\x28\n")
    (root / "evil.ckpt").write_bytes(b"\x80\x04\x95" + b"cos\nsystem\n(S'echo pwned'\ntR." + b"\x00" * 8)
    _write_model_variant(model, root / "bad-arch.safetensors", lambda t, m: m.update({"mace.arch": "{\"unet\": 3"}))
    _write_model_variant(model, root / "arch-not-family.safetensors",
                         lambda t, m: m.update({"mace.arch": json.dumps({"family": "sd1"})}))

    def to_int8(t, m):
        k = _first_kv(t)
        t[k] = (t[k] * 100).to(torch.int8)
    _write_model_variant(model, root / "int8.safetensors", to_int8)

    def to_nan(t, m):
        k = _first_kv(t)
        t[k] = t[k].clone()
        t[k][0, 0] = float("nan")
    _write_model_variant(model, root / "nan.safetensors", to_nan)

    def to_inf(t, m):
        k = sorted(x for x in t if x.endswith("attn2.to_v.weight"))[-1]
        t[k] = t[k].clone()
        t[k][-1, -1] = float("inf")
    _write_model_variant(model, root / "inf.safetensors", to_inf)
    (root / "existing.safetensors").write_bytes(b"precious")
    (root / "README.md").write_text("someone's own readme\n")
    (root / "a-file").write_text("a file, not a folder\n")
    (root / "out-folder").mkdir()
    (root / "prompts-bad.txt").write_bytes(b"a photo of a \xff cat\n")
    (root / "protocol-bad.yaml").write_bytes(b"protocol: object\ntemplates: ['\xff {}']\nseeds: [0]\n")
    return World(root, model, sd2, sdxl, erased, project, lora)


_DIGESTS: dict[str, tuple[tuple, str]] = {}


def _digest(p: Path) -> str:
    """sha256 of a file; rehashed only when its stat changes (any write changes its ctime), which keeps
    the shared models from being read twice per case."""
    st = p.stat()
    key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if _DIGESTS.get(str(p), (None,))[0] != key:
        _DIGESTS[str(p)] = (key, hashlib.sha256(p.read_bytes()).hexdigest())
    return _DIGESTS[str(p)][1]


def _tree(*folders: Path) -> dict[str, str]:
    """sha256 (or the kind) of every entry under ``folders``."""
    out = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            if p.is_fifo():
                out[str(p)] = "fifo"
            elif p.is_file():
                out[str(p)] = _digest(p)
            elif p.is_dir():
                out[str(p)] = "dir"
    return out


def _copy_project(w: World, where: Path) -> Path:
    dst = where / "proj"
    shutil.copytree(w.project, dst)
    return dst


def _concept_file(project: Path, phrase: str, name: str) -> Path:
    return project / "concepts" / make_concept(phrase).slug / name


def _yaml(where: Path, text: str | bytes, name: str = "config.yaml") -> str:
    p = where / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(p)


def _erase(w: World, *extra: str, out: str | None = None) -> list[str]:
    return ["erase", str(w.model), *extra, "--out", out or str(w.root / "never.safetensors"), "--device", "cpu"]


def _damage(how: str):
    def apply(p: Path) -> None:
        data = p.read_bytes()
        p.write_bytes({"truncate": data[:len(data) // 2], "empty": b"", "garbage": b"garbage" * 20}[how])
    return apply


# ---------------------------------------------------------------------------------------------
# The catalogue: id -> (w, case folder) -> (argv, words the error line must contain)

Case = Callable[[World, Path], tuple[list[str], list[str]]]
CASES: dict[str, Case] = {}


def case(name: str, build: Case) -> None:
    assert name not in CASES, name
    CASES[name] = build


# --- erase: outputs ---------------------------------------------------------------------------
case("erase-out-is-the-input-model", lambda w, d: (_erase(w, "--concept", "cat", out=str(w.model)),
                                                   ["--out", "input"]))
case("erase-out-exists", lambda w, d: (_erase(w, "--concept", "cat", out=str(w.p("existing.safetensors"))),
                                       ["already exists", "--force"]))
case("erase-out-is-a-folder", lambda w, d: (_erase(w, "--concept", "cat", out=str(w.p("out-folder"))),
                                            ["out-folder", "folder"]))
case("erase-out-folder-named-safetensors", lambda w, d: (
    (d / "x.safetensors").mkdir() or _erase(w, "--concept", "cat", out=str(d / "x.safetensors")), ["is a folder"]))
case("erase-out-not-safetensors", lambda w, d: (_erase(w, "--concept", "cat", out=str(d / "o.ckpt")),
                                                [".safetensors"]))
case("erase-out-under-a-file", lambda w, d: (_erase(w, "--concept", "cat", out=str(w.p("a-file") / "o.safetensors")),
                                             ["a-file", "is a file"]))
case("erase-out-inside-a-project", lambda w, d: (
    _erase(w, "--concept", "cat", out=str(w.project / "concepts" / "x.safetensors")), ["erasure project"]))
case("erase-out-is-a-project-lora", lambda w, d: (
    _erase(w, "--concept", "cat", out=str(_concept_file(w.project, "cat", "lora.safetensors"))),
    ["erasure project"]))
case("erase-work-dir-is-a-file", lambda w, d: (_erase(w, "--concept", "cat", "--work-dir", str(w.p("a-file")),
                                                      out=str(d / "o.safetensors")), ["--work-dir", "a-file"]))
case("erase-out-is-the-work-dir-file", lambda w, d: (
    _erase(w, "--concept", "cat", "--work-dir", str(d / "wd"), out=str(d / "wd" / "o.safetensors")), ["--out"]))
case("erase-out-on-a-full-disk", lambda w, d: (_erase(w, "--concept", "cat", out=str(d / "o.safetensors")),
                                               ["free space"]))
case("erase-out-is-a-fifo", lambda w, d: (_erase(w, "--concept", "cat", out=str(w.p("fifo.safetensors"))),
                                          ["not a regular file"]))

# --- erase: concepts --------------------------------------------------------------------------
case("erase-no-concept", lambda w, d: (_erase(w), ["no concepts"]))
case("erase-empty-concept", lambda w, d: (_erase(w, "--concept", "  "), ["empty"]))
case("erase-concept-twice", lambda w, d: (_erase(w, "--concept", "cat", "--concept", "Cat"), ["listed twice"]))
case("erase-concept-also-retained", lambda w, d: (_erase(w, "--concept", "cat", "--retain", "cat"),
                                                  ["both erased and retained"]))
case("erase-concept-too-long", lambda w, d: (_erase(w, "--concept", "cat " * 80), ["too long"]))
case("erase-concept-four-fields", lambda w, d: (_erase(w, "--concept", "a | b | object | d"),
                                                ["phrase | anchor | type"]))
case("erase-concept-unknown-type-field", lambda w, d: (_erase(w, "--concept", "cat | | sculpture"),
                                                       ["unknown concept type", "sculpture"]))
case("erase-unknown-type", lambda w, d: (_erase(w, "--concept", "cat", "--type", "sculpture"),
                                         ["unknown concept type"]))
case("erase-unknown-preset", lambda w, d: (_erase(w, "--preset", "nope"), ["unknown preset", "nope"]))
case("erase-mask-sam-without-checkpoint", lambda w, d: (_erase(w, "--concept", "cat", "--mask", "sam"),
                                                        ["--sam-checkpoint"]))
case("erase-prior-captions-missing", lambda w, d: (_erase(w, "--concept", "cat", "--prior", "1", "--prior-captions",
                                                           str(d / "captions.txt")), ["captions.txt", "not a file"]))
case("erase-prior-captions-too-few", lambda w, d: (_erase(w, "--concept", "cat", "--prior", "1", "--prior-captions",
                                                           FEW_CAPTIONS), ["requirements.txt", "at least 50"]))
case("erase-prior-captions-not-text", lambda w, d: (_erase(w, "--concept", "cat", "--prior", "1", "--prior-captions",
                                                            NOT_TEXT), ["toy-sd1.safetensors", "UTF-8"]))
case("erase-prior-captions-without-prior", lambda w, d: (_erase(w, "--concept", "cat", "--prior-captions", FEW_CAPTIONS),
                                                         ["no effect", "--prior"]))
case("erase-unknown-mask", lambda w, d: (_erase(w, "--concept", "cat", "--mask", "blur"), ["--mask", "blur"]))
case("erase-unknown-flag", lambda w, d: (_erase(w, "--concept", "cat", "--stepz", "3"), ["--stepz"]))

# --- erase: numbers ---------------------------------------------------------------------------
for flag, value, words in [
    ("--lam", "nan", ["lam", "finite"]), ("--lam", "inf", ["lam", "finite"]), ("--lam", "-1", ["lam", "at least"]),
    ("--lr", "nan", ["lr", "finite"]), ("--lr", "0", ["lr", "more than"]), ("--lr", "-1e-4", ["lr"]),
    ("--lr", "fast", ["--lr", "fast"]), ("--steps", "0", ["steps", "at least"]), ("--steps", "-3", ["steps"]),
    ("--steps", "2.5", ["--steps", "2.5"]), ("--images", "0", ["images"]), ("--rank", "0", ["rank"]),
    ("--batch-size", "0", ["batch_size"]), ("--seed", "-1", ["seed"]), ("--clip-skip", "0", ["clip_skip"]),
    ("--guidance", "nan", ["guidance", "finite"]), ("--guidance", "-inf", ["guidance"]),
    ("--sample-steps", "0", ["sample_steps"]), ("--robust-rounds", "-1", ["robust_rounds"]),
    ("--prior", "-0.5", ["prior"]), ("--domain", "nan", ["domain"]), ("--fuse-prior", "inf", ["fuse_prior"]),
    ("--mask-threshold", "2", ["mask_threshold"]), ("--attack-steps", "0", ["attack_steps"]),
]:
    case(f"erase{flag}={value}", lambda w, d, flag=flag, value=value, words=words: (
        _erase(w, "--concept", "cat", flag, value), words))
case("erase--clip-skip=99", lambda w, d: (_erase(w, "--concept", "cat", "--clip-skip", "99"), ["clip skip 99"]))

# --- erase: config files ----------------------------------------------------------------------
for name, text, words in [
    ("concepts-a-string", "concepts: dog\n", ["concepts", "expected a list"]),
    ("concepts-circle", "type: toy\nconcepts: circle\n", ["concepts", "expected a list"]),
    ("retain-a-string", "concepts: [cat]\nretain: dog\n", ["retain", "expected a list"]),
    ("typo-top-level-key", "concepts: [cat]\nsetings: {steps: 2}\n", ["unknown key", "setings"]),
    ("steps-many", "concepts: [cat]\nsettings: {steps: many}\n", ["settings.steps", "whole number"]),
    ("steps-true", "concepts: [cat]\nsettings: {steps: true}\n", ["settings.steps"]),
    ("lam-nan", "concepts: [cat]\nsettings: {lam: .nan}\n", ["settings.lam", "finite"]),
    ("unknown-setting", "concepts: [cat]\nsettings: {stepz: 3}\n", ["stepz"]),
    ("settings-a-list", "concepts: [cat]\nsettings: [1, 2]\n", ["settings", "expected a mapping"]),
    ("type-a-list", "type: [toy]\nconcepts: [cat]\n", ["type", "expected a string"]),
    ("concept-a-number", "concepts: [42]\n", ["concepts[0]", "42"]),
    ("concept-without-phrase", "concepts: [{anchor: a dog}]\n", ["concepts[0]", "phrase"]),
    ("concept-unknown-key", "concepts: [{phrase: cat, anchr: a dog}]\n", ["concepts[0]", "anchr"]),
    ("concept-prompts-a-string", "concepts: [{phrase: cat, prompts: a cat}]\n", ["concepts[0].prompts"]),
    ("concept-anchor-a-list", "concepts: [{phrase: cat, anchor: [a, b]}]\n", ["concepts[0].anchor"]),
    ("concept-anchor-itself", "concepts: [{phrase: cat, anchor: Cat}]\n", ["cat", "itself as anchor"]),
    ("unknown-preset", "preset: nope\n", ["unknown preset"]),
    ("preset-a-list", "preset: [nudity]\n", ["preset", "expected a string"]),
    ("not-yaml", "concepts: [cat\n", ["not valid YAML"]),
    ("a-list", "- cat\n- dog\n", ["expected a mapping"]),
    ("a-python-object", "concepts: !!python/object/apply:os.system ['echo pwned']\n", ["not valid YAML"]),
    ("not-utf8", b"concepts: [\xff\xfe]\n", ["not UTF-8"]),
]:
    case(f"erase-config-{name}", lambda w, d, text=text, words=words: (
        _erase(w, "--config", _yaml(d, text)), ["config.yaml", *words]))
case("erase-config-missing", lambda w, d: (_erase(w, "--config", str(d / "nope.yaml")), ["nope.yaml", "not found"]))
case("erase-config-a-folder", lambda w, d: (_erase(w, "--config", str(d)), ["not a regular file"]))

# --- models (erase and info read them the same way) ------------------------------------------
for name, words in [
    ("garbage.safetensors", ["garbage.safetensors", "corrupt"]), ("empty.safetensors", ["empty.safetensors"]),
    ("truncated.safetensors", ["truncated.safetensors", "truncated"]),
    ("fifo.safetensors", ["fifo.safetensors", "not a regular file"]),
    ("notes.txt", ["notes.txt", "unsupported file type"]), ("folder-model", ["folder-model", "model_index.json"]),
    ("evil.ckpt", ["evil.ckpt", "refused for safety"]), ("bad-arch.safetensors", ["mace.arch", "malformed"]),
    ("arch-not-family.safetensors", ["mace.arch", "malformed"]), ("int8.safetensors", ["int8", "integer"]),
    ("nan.safetensors", ["NaN"]), ("inf.safetensors", ["NaN or infinite"]),
    ("erasure-lora.safetensors", ["LoRA adapter"]), ("missing.safetensors", ["model not found"]),
]:
    case(f"erase-model-{name}", lambda w, d, name=name, words=words: (
        ["erase", str(w.p(name)), "--concept", "cat", "--out", str(d / "o.safetensors"), "--device", "cpu"], words))
    case(f"info-model-{name}", lambda w, d, name=name, words=words: (["info", str(w.p(name))], words))

# --- fuse -------------------------------------------------------------------------------------
def _fuse(w: World, project: Path | None = None, *extra: str, out: str | None = None, model: bool = True):
    return ["fuse", str(project or w.project), *extra, *(["--model", str(w.model)] if model else []),
            "--out", out or str(w.root / "never.safetensors")]


def _damaged_fuse(phrase: str | None, file: str, how: str) -> Case:
    def build(w: World, d: Path):
        proj = _copy_project(w, d)
        target = _concept_file(proj, phrase, file) if phrase else proj / file
        if not target.exists():  # the priors file exists only in runs with priors: make one to damage
            save_file({"general": torch.eye(4)}, str(target))
        _damage(how)(target)
        return _fuse(w, proj, out=str(d / "o.safetensors")), ["damaged project file", file]
    return build


case("fuse-out-inside-the-project", lambda w, d: (
    _fuse(w, out=str(_concept_file(w.project, "cat", "lora.safetensors"))), ["--out"]))
case("fuse-out-new-file-in-project", lambda w, d: (_fuse(w, out=str(w.project / "restored.safetensors")), ["--out"]))
case("fuse-out-is-the-base", lambda w, d: (_fuse(w, out=str(w.model)), ["--out", "input"]))
case("fuse-out-exists", lambda w, d: (_fuse(w, out=str(w.p("existing.safetensors"))), ["already exists"]))
case("fuse-out-is-a-folder", lambda w, d: (_fuse(w, out=str(w.p("out-folder"))), ["is a folder"]))
case("fuse-out-not-safetensors", lambda w, d: (_fuse(w, out=str(d / "o.ckpt")), [".safetensors"]))
case("fuse-not-a-project", lambda w, d: (_fuse(w, d, out=str(d / "o.safetensors")), ["not an erasure project"]))
case("fuse-unknown-concept", lambda w, d: (_fuse(w, None, "--except", "horse", out=str(d / "o.safetensors")),
                                           ["horse", "not a concept"]))
case("fuse-another-model", lambda w, d: (
    ["fuse", str(w.project), "--model", str(w.sd2), "--out", str(d / "o.safetensors")], ["not the model"]))
case("fuse-model-missing", lambda w, d: (
    ["fuse", str(w.project), "--model", str(d / "gone.safetensors"), "--out", str(d / "o.safetensors")],
    ["model not found"]))
for how in ("truncate", "empty", "garbage"):
    case(f"fuse-lora-{how}", _damaged_fuse("cat", "lora.safetensors", how))
    case(f"fuse-stats-{how}", _damaged_fuse("dog", "stats.safetensors", how))
    case(f"fuse-priors-{how}", _damaged_fuse(None, "priors.safetensors", how))


def _damaged_manifest(text: bytes) -> Case:
    def build(w: World, d: Path):
        proj = _copy_project(w, d)
        (proj / "manifest.json").write_bytes(text)
        return _fuse(w, proj, out=str(d / "o.safetensors")), ["manifest.json", "damaged"]
    return build


for name, text in [("empty", b""), ("garbage", b"{{{"), ("a-list", b"[1, 2]"), ("no-base", b'{"concepts": []}'),
                   ("bad-concepts", b'{"base": {"sha256": "x", "path": "m"}, "concepts": "cat", "retain": [], '
                                    b'"overrides": {}}'), ("not-utf8", b'{"base": "\xff"}')]:
    case(f"fuse-manifest-{name}", _damaged_manifest(text))


def _moved_base(w: World, d: Path):
    proj = _copy_project(w, d)
    m = json.loads((proj / "manifest.json").read_text())
    m["base"].update(path="gone.safetensors", file=str(d / "moved-away.safetensors"))
    (proj / "manifest.json").write_text(json.dumps(m))
    return _fuse(w, proj, out=str(d / "o.safetensors"), model=False), ["moved-away.safetensors", "--model"]


case("fuse-base-moved", _moved_base)

# --- add ----------------------------------------------------------------------------------------
def _add(w: World, project: Path | None = None, *extra: str, out: str | None = None):
    return ["add", str(project or w.project), "--concept", "bird", *extra, "--model", str(w.model),
            "--out", out or str(w.root / "never.safetensors"), "--device", "cpu"]


def _locked(w: World, d: Path):
    proj = _copy_project(w, d)
    holder = open(proj / ".lock", "a+")  # another run holds the project
    fcntl.flock(holder.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    _HELD.append(holder)
    return _add(w, proj, out=str(d / "o.safetensors")), ["another run", "proj"]


_HELD: list = []
case("add-out-is-the-base", lambda w, d: (_add(w, out=str(w.model)), ["--out", "input"]))
case("add-out-exists", lambda w, d: (_add(w, out=str(w.p("existing.safetensors"))), ["already exists"]))
case("add-out-inside-the-project", lambda w, d: (_add(w, out=str(w.project / "x.safetensors")), ["--out"]))
case("add-empty-concept", lambda w, d: (["add", str(w.project), "--concept", " ", "--model", str(w.model), "--out",
                                         str(d / "o.safetensors")], ["empty"]))
case("add-not-a-project", lambda w, d: (_add(w, d, out=str(d / "o.safetensors")), ["not an erasure project"]))
case("add-while-another-run-holds-the-project", _locked)

# --- export-lora ------------------------------------------------------------------------------
def _export(w: World, erased: Path, base: Path, *extra: str, out: str | None = None):
    return ["export-lora", str(erased), "--base", str(base), *extra, "--out",
            out or str(w.root / "never.safetensors")]


case("export-out-is-the-erased", lambda w, d: (_export(w, w.erased, w.model, out=str(w.erased)), ["input"]))
case("export-out-is-the-base", lambda w, d: (_export(w, w.erased, w.model, out=str(w.model)), ["input"]))
case("export-out-exists", lambda w, d: (_export(w, w.erased, w.model, out=str(w.lora)), ["already exists"]))
case("export-other-family", lambda w, d: (_export(w, w.erased, w.sd2, out=str(d / "l.safetensors")),
                                          ["sd2.safetensors", "same family"]))
case("export-sdxl", lambda w, d: (_export(w, w.erased, w.sdxl, out=str(d / "l.safetensors")), ["same family"]))
case("export-same-weights", lambda w, d: (_export(w, w.model, w.model, out=str(d / "l.safetensors")),
                                          ["same UNet weights"]))
case("export-erased-missing", lambda w, d: (_export(w, d / "gone.safetensors", w.model, out=str(d / "l.safetensors")),
                                            ["gone.safetensors"]))
for flag, value in [("--target-error", "0"), ("--target-error", "2"), ("--target-error", "nan"), ("--max-rank", "0")]:
    case(f"export{flag}={value}", lambda w, d, flag=flag, value=value: (
        _export(w, w.erased, w.model, flag, value, out=str(d / "l.safetensors")), [flag]))

# --- apply --------------------------------------------------------------------------------------
def _apply(w: World, lora: Path, base: Path, out: str | None = None):
    return ["apply", str(lora), str(base), "--out", out or str(w.root / "never.safetensors")]


case("apply-out-is-the-lora", lambda w, d: (_apply(w, w.lora, w.model, out=str(w.lora)), ["--out", "input"]))
case("apply-out-is-the-base", lambda w, d: (_apply(w, w.lora, w.model, out=str(w.model)), ["--out", "input"]))
case("apply-out-exists", lambda w, d: (_apply(w, w.lora, w.model, out=str(w.p("existing.safetensors"))),
                                       ["already exists"]))
case("apply-sd1-lora-on-sd2", lambda w, d: (_apply(w, w.lora, w.sd2, out=str(d / "o.safetensors")),
                                            ["LoRA for", "sd2.safetensors"]))
case("apply-sd1-lora-on-sdxl", lambda w, d: (_apply(w, w.lora, w.sdxl, out=str(d / "o.safetensors")), ["LoRA for"]))
case("apply-a-checkpoint-as-lora", lambda w, d: (_apply(w, w.erased, w.model, out=str(d / "o.safetensors")),
                                                 ["erased.safetensors", "not a LoRA"]))
case("apply-a-lora-without-unet-keys", lambda w, d: (
    save_file({"lora_te_x.lora_up.weight": torch.zeros(2, 1)}, str(d / "te.safetensors")) or
    _apply(w, d / "te.safetensors", w.model, out=str(d / "o.safetensors")), ["no LoRA tensors"]))
case("apply-lora-garbage", lambda w, d: (_apply(w, w.p("garbage.safetensors"), w.model, out=str(d / "o.safetensors")),
                                         ["garbage.safetensors"]))
case("apply-lora-missing", lambda w, d: (_apply(w, d / "gone.safetensors", w.model, out=str(d / "o.safetensors")),
                                         ["gone.safetensors", "not found"]))
case("apply-lora-fifo", lambda w, d: (_apply(w, w.p("fifo.safetensors"), w.model, out=str(d / "o.safetensors")),
                                      ["not a regular file"]))


def _lora_without_arch_on_sd2(w: World, d: Path):
    """A LoRA without modelspec metadata whose shapes do not fit: refused by shape, before any work."""
    t = load_file(str(w.lora))
    k = next(k for k in t if k.endswith("lora_up.weight"))
    t[k] = torch.zeros(t[k].shape[0] + 3, t[k].shape[1], dtype=t[k].dtype)
    save_file(t, str(d / "foreign.safetensors"))
    return _apply(w, d / "foreign.safetensors", w.model, out=str(d / "o.safetensors")), ["shape"]


case("apply-lora-of-other-shapes", _lora_without_arch_on_sd2)

# --- card ---------------------------------------------------------------------------------------
case("card-out-is-the-model", lambda w, d: (["card", str(w.erased), "--out", str(w.erased)], ["--out", "input"]))
case("card-default-readme-exists", lambda w, d: (["card", str(w.erased)], ["README.md", "already exists", "--force"]))
case("card-out-is-the-eval", lambda w, d: (["card", str(w.erased), "--eval", str(w.p("README.md")), "--out",
                                            str(w.p("README.md"))], ["input"]))
case("card-eval-missing", lambda w, d: (["card", str(w.erased), "--eval", str(d / "gone.md"), "--out",
                                         str(d / "card.md")], ["--eval", "gone.md", "not found"]))
case("card-eval-not-utf8", lambda w, d: (["card", str(w.erased), "--eval", str(w.p("bad-utf8.md")), "--out",
                                          str(d / "card.md")], ["bad-utf8.md", "UTF-8"]))
case("card-model-not-erased", lambda w, d: (["card", str(w.model), "--out", str(d / "card.md")], ["no mace.*"]))
case("card-model-missing", lambda w, d: (["card", str(d / "gone.safetensors"), "--out", str(d / "card.md")],
                                         ["gone.safetensors"]))
case("card-model-fifo", lambda w, d: (["card", str(w.p("fifo.safetensors")), "--out", str(d / "card.md")],
                                      ["not a regular file"]))
case("card-out-is-a-folder", lambda w, d: (["card", str(w.erased), "--out", str(w.p("out-folder"))], ["is a folder"]))
case("card-out-inside-the-project", lambda w, d: (["card", str(w.erased), "--out", str(w.project / "README.md")],
                                                  ["erasure project"]))

# --- generate -----------------------------------------------------------------------------------
def _generate(w: World, d: Path, *extra: str, out: Path | None = None):
    return ["generate", str(w.model), "--prompt", "a cat", *extra, "--steps", "2", "--device", "cpu",
            "--out", str(out or d / "imgs")]


for flag, value in [("--num-images", "0"), ("--steps", "0"), ("--seed", "-1"), ("--batch-size", "0"),
                    ("--size", "0"), ("--guidance", "nan"), ("--clip-skip", "0"), ("--num-images", "many")]:
    case(f"generate{flag}={value}", lambda w, d, flag=flag, value=value: (_generate(w, d, flag, value), [flag]))
case("generate--size=13", lambda w, d: (_generate(w, d, "--size", "13"), ["--size", "multiple"]))
case("generate--clip-skip=99", lambda w, d: (_generate(w, d, "--clip-skip", "99"), ["clip skip 99"]))
case("generate-prompts-missing", lambda w, d: (_generate(w, d, "--prompts", str(d / "gone.txt")), ["gone.txt"]))
case("generate-prompts-not-utf8", lambda w, d: (_generate(w, d, "--prompts", str(w.p("prompts-bad.txt"))),
                                                ["prompts-bad.txt", "UTF-8"]))
case("generate-no-prompt", lambda w, d: (["generate", str(w.model), "--out", str(d / "imgs")], ["--prompt"]))
case("generate-out-is-a-file", lambda w, d: (_generate(w, d, out=w.p("a-file")), ["a-file", "not a folder"]))
case("generate-out-holds-an-index", lambda w, d: (
    (d / "imgs").mkdir() or (d / "imgs" / "index.jsonl").write_text("{}\n") and _generate(w, d),
    ["index.jsonl", "already exists"]))
case("generate-model-fifo", lambda w, d: (["generate", str(w.p("fifo.safetensors")), "--prompt", "x", "--out",
                                           str(d / "imgs")], ["not a regular file"]))

# --- eval ---------------------------------------------------------------------------------------
def _eval(w: World, d: Path, *extra: str, out: Path | None = None):
    return ["eval", str(w.erased), *extra, "--steps", "2", "--seeds", "1", "--device", "cpu",
            "--out", str(out or d / "ev")]


for flag, value in [("--seeds", "0"), ("--steps", "0"), ("--guidance", "inf"), ("--nudenet-threshold", "2")]:
    case(f"eval{flag}={value}", lambda w, d, flag=flag, value=value: (_eval(w, d, flag, value), [flag]))
case("eval-clip-classifier-missing", lambda w, d: (_eval(w, d, "--classifier", f"clip:{d / 'nope'}"),
                                                   ["--classifier", "not a folder"]))
case("eval-clip-missing", lambda w, d: (_eval(w, d, "--clip", str(d / "nope")), ["--clip", "not a folder"]))
case("eval-unknown-classifier", lambda w, d: (_eval(w, d, "--classifier", "magic"), ["unknown classifier"]))
case("eval-out-is-a-file", lambda w, d: (_eval(w, d, out=w.p("a-file")), ["a-file", "not a folder"]))
case("eval-protocol-not-utf8", lambda w, d: (_eval(w, d, "--protocol", str(w.p("protocol-bad.yaml"))), ["UTF-8"]))
case("eval-protocol-unknown", lambda w, d: (_eval(w, d, "--protocol", "sculpture"), ["unknown protocol"]))
case("eval-synonym-malformed", lambda w, d: (_eval(w, d, "--synonym", "cat"), ["concept=word"]))
case("eval-nothing-erased", lambda w, d: (["eval", str(w.model), "--out", str(d / "ev"), "--device", "cpu"],
                                          ["no --concept"]))
case("eval-report-exists", lambda w, d: (
    (d / "ev").mkdir() or (d / "ev" / "report.md").write_text("mine\n") and _eval(w, d),
    ["report.md", "already exists"]))


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_input_is_refused_cleanly(world, tmp_path, capsys, monkeypatch, name):
    case_dir = tmp_path / "case"
    case_dir.mkdir()
    argv, words = CASES[name](world, case_dir)
    if name == "erase-out-on-a-full-disk":
        import mace_core.files as files

        monkeypatch.setattr(files.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 ** 9, 10 ** 9, 1000))
    before = _tree(world.root, case_dir)
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    for word in words:
        assert word in errors[0], (word, errors[0])
    assert _tree(world.root, case_dir) == before  # nothing changed, nothing new (no temporary file)


def test_the_catalogue_is_large():
    assert len(CASES) >= 100


def test_read_only_folder_is_refused_before_any_work(world, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root can write into read-only folders")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main(_erase(world, "--concept", "cat", out=str(ro / "o.safetensors"))) == 2
        assert "not writable" in capsys.readouterr().err
    finally:
        ro.chmod(0o755)


# ---------------------------------------------------------------------------------------------
# What commands do write


def _mode(p: Path) -> int:
    return p.stat().st_mode & 0o777


def test_written_files_are_readable_by_others_under_umask_022(world, tmp_path):
    old = os.umask(0o022)
    try:
        out, work = tmp_path / "e.safetensors", tmp_path / "work"
        assert main(["erase", str(world.model), "--concept", "cat", "--out", str(out), "--work-dir", str(work),
                     *FAST]) == 0
        assert main(["export-lora", str(out), "--base", str(world.model), "--out", str(tmp_path / "l.safetensors")]) == 0
        assert main(["apply", str(tmp_path / "l.safetensors"), str(world.model), "--out",
                     str(tmp_path / "a.safetensors")]) == 0
        assert main(["fuse", str(work), "--model", str(world.model), "--out", str(tmp_path / "f.safetensors")]) == 0
        assert main(["card", str(out)]) == 0
        assert main(["generate", str(world.model), "--prompt", "a cat", "--steps", "2", "--device", "cpu",
                     "--out", str(tmp_path / "imgs")]) == 0
        written = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock"]
        assert {p.suffix for p in written} >= {".safetensors", ".json", ".png", ".md", ".jsonl"}
        assert all(_mode(p) == 0o644 for p in written), {str(p): oct(_mode(p)) for p in written}
    finally:
        os.umask(old)


def test_force_replaces_an_existing_output_and_keeps_an_ordinary_mode(world, tmp_path):
    out = tmp_path / "f.safetensors"
    out.write_bytes(b"old")
    out.chmod(0o600)
    assert main(["fuse", str(world.project), "--model", str(world.model), "--out", str(out), "--force"]) == 0
    assert read_metadata(out)["mace.concepts"] and _mode(out) == 0o666 & ~_umask()
    card = tmp_path / "card.md"
    card.write_text("old")
    assert main(["card", str(world.erased), "--out", str(card), "--force"]) == 0
    assert card.read_text().startswith("---")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_write_that_fails_midway_leaves_no_temporary_file(world, tmp_path, capsys, monkeypatch):
    import safetensors.torch

    def full_disk(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    assert main(["fuse", str(world.project), "--model", str(world.model), "--out", str(tmp_path / "f.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "free some space" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_hash_in_flags_is_text_and_comment_lines_in_files(world, tmp_path):
    out = tmp_path / "e.safetensors"
    assert main(["erase", str(world.model), "--concept", "C# logo", "--concept", "#hashtag", "--closed-form-only",
                 "--out", str(out), "--device", "cpu"]) == 0
    assert [c["phrase"] for c in json.loads(read_metadata(out)["mace.concepts"])] == ["C# logo", "#hashtag"]
    from mace_core.method.concepts import parse_lines

    assert [c.phrase for c in parse_lines("# a comment\n  # another\nC# logo\nrock #1 | a stone\n")] == \
        ["C# logo", "rock #1"]


def test_generate_names_every_image_and_index_row_uniquely(world, tmp_path):
    out = tmp_path / "imgs"
    assert main(["generate", str(world.model), "--prompt", "a red circle", "--prompt", "a red circle",
                 "--prompt", "a red circle!", "--steps", "2", "--device", "cpu", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and len({r["file"] for r in rows}) == 3
    assert sorted(p.name for p in out.glob("*.png")) == sorted(r["file"] for r in rows)


def test_fuse_works_from_another_folder_with_the_recorded_base(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    manifest = json.loads((world.project / "manifest.json").read_text())
    assert manifest["base"]["file"] == str(world.model.resolve())
    assert main(["fuse", str(world.project), "--except", "cat", "--out", "restored.safetensors"]) == 0
    assert [c["phrase"] for c in json.loads(read_metadata(tmp_path / "restored.safetensors")["mace.concepts"])] == \
        ["dog"]


def test_a_damaged_lora_is_named_and_retrained_on_resume(world, tmp_path, caplog):
    proj = _copy_project(world, tmp_path)
    lora, other = _concept_file(proj, "cat", "lora.safetensors"), _concept_file(proj, "dog", "lora.safetensors")
    first, kept = load_file(str(lora)), other.read_bytes()
    _damage("truncate")(lora)
    out = tmp_path / "e.safetensors"
    with caplog.at_level("WARNING", logger="mace.project"):
        assert main(["erase", str(world.model), "--concept", "cat", "--concept", "dog", "--out", str(out),
                     "--work-dir", str(proj), *FAST]) == 0
    assert any("damaged project file" in r.getMessage() and "lora.safetensors" in r.getMessage()
               for r in caplog.records)
    again = load_file(str(lora))  # retrained: a complete LoRA again; the intact one was reused as it was
    assert {k: v.shape for k, v in again.items()} == {k: v.shape for k, v in first.items()}
    assert other.read_bytes() == kept
    assert read_metadata(out)["mace.concepts"]
