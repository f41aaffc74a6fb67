"""Checks of the shipped data files: prompt templates, caption corpus, presets, eval sets."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import mace_core
from mace_core.method import corpus

DATA = Path(mace_core.__file__).resolve().parent / "data"
SHARED = Path(mace_core.__file__).resolve().parent.parent

TEMPLATE_MIN = {"object": 40, "celebrity": 40, "style": 40, "explicit": 40, "toy": 30}
TOY_WORDS = {
    "a", "an", "of", "photo", "drawing", "picture", "image", "render",
    "red", "green", "blue", "yellow", "white",
}
PRESETS = ["nudity", "celebrities-100", "artists-100", "cifar10-objects"]
PRESET_KEYS = {"name", "description", "type", "concepts", "retain", "settings"}
CONCEPT_KEYS = {"phrase", "anchor", "type", "synonyms", "prompts"}
TYPES = set(TEMPLATE_MIN)


def _lines(kind: str) -> list[str]:
    text = (DATA / "templates" / f"{kind}.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def _preset(name: str) -> dict:
    return yaml.safe_load((DATA / "presets" / f"{name}.yaml").read_text(encoding="utf-8"))


# ---------------------------------------------------------------- templates


@pytest.mark.parametrize("kind", sorted(TEMPLATE_MIN))
def test_templates_count_placeholder_unique(kind):
    lines = _lines(kind)
    assert len(lines) >= TEMPLATE_MIN[kind]
    for line in lines:
        assert line.count("{}") == 1, line
        assert line.count("{") == 1 and line.count("}") == 1, line
        assert line == line.strip() and "  " not in line, repr(line)
        assert line.format("x")  # str.format accepts it
    assert len(set(lines)) == len(lines), "duplicate templates"


@pytest.mark.parametrize("kind", ["object", "celebrity", "style", "explicit"])
def test_templates_are_varied(kind):
    lines = _lines(kind)
    starts = sum(line.startswith("{}") for line in lines)
    ends = sum(line.endswith("{}") for line in lines)
    middle = sum(not line.startswith("{}") and not line.endswith("{}") for line in lines)
    assert starts >= 5 and ends >= 5 and middle >= 5, (starts, ends, middle)
    lengths = {len(line.split()) for line in lines}
    assert max(lengths) - min(lengths) >= 5


def test_toy_templates_use_toy_vocabulary_only():
    for line in _lines("toy"):
        words = line.replace("{}", " ").split()
        assert set(words) <= TOY_WORDS, line
        # the shape word fills {}; it must be last so 'a red {}' reads 'a red circle'
        assert line.endswith("{}"), line


# ---------------------------------------------------------------- corpus


def test_corpus_size_unique_and_deterministic():
    a = corpus.general_captions()
    assert len(a) == 6000
    assert len(set(a)) == len(a) >= 5000
    assert corpus.general_captions() == a
    assert corpus.general_captions(n=100) == a[:100]
    other = corpus.general_captions(seed=1)
    assert other != a and len(set(other)) == 6000


def test_corpus_lengths():
    caps = corpus.general_captions()
    counts = [len(c.split()) for c in caps]
    assert min(counts) >= 3 and max(counts) <= 25
    typical = sum(5 <= k <= 20 for k in counts) / len(counts)
    assert typical >= 0.9, typical
    assert 7 <= sum(counts) / len(counts) <= 14
    for c in caps:
        assert c == c.strip() and "  " not in c and "{" not in c and "}" not in c, c
        assert not re.search(r"\ba [aeio]", c, flags=re.IGNORECASE), c


def test_corpus_is_varied():
    caps = corpus.general_captions()
    vocab = {w.lower().strip(",") for c in caps for w in c.split()}
    assert len(vocab) >= 500
    firsts = {" ".join(c.split()[:2]) for c in caps}
    assert len(firsts) >= 150


def test_corpus_fits_clip_context():
    transformers = pytest.importorskip("transformers")
    tok_dir = DATA / "clip_tokenizer"
    if not (tok_dir / "vocab.json").exists():
        pytest.skip("no bundled CLIP tokenizer")
    tok = transformers.CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"))
    caps = corpus.general_captions()
    longest = max(len(ids) for ids in tok(caps)["input_ids"])
    assert longest < 60, longest


def test_corpus_independent_of_hash_seed():
    here = corpus.general_captions(n=800, seed=3)
    code = (
        "import json, sys; from mace_core.method import corpus; "
        "sys.stdout.write(json.dumps(corpus.general_captions(n=800, seed=3)))"
    )
    results = []
    for hash_seed in ("1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed, PYTHONPATH=str(SHARED))
        proc = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        results.append(json.loads(proc.stdout))
    assert results[0] == here
    assert results[1] == here


def test_corpus_spec_slots_resolve():
    categories, lists = corpus.load_corpus_spec()
    assert len(categories) >= 5
    slot = re.compile(r"\{(\w+)\}")
    for _, temps in categories:
        for t in temps:
            for name in slot.findall(t):
                assert name in lists, (name, t)


# ---------------------------------------------------------------- presets


@pytest.mark.parametrize("name", PRESETS)
def test_preset_schema(name):
    p = _preset(name)
    assert set(p) == PRESET_KEYS, set(p) ^ PRESET_KEYS
    assert p["name"] == name
    assert isinstance(p["description"], str) and p["description"].strip()
    assert p["type"] in TYPES
    assert isinstance(p["concepts"], list) and p["concepts"]
    assert isinstance(p["retain"], list)
    assert isinstance(p["settings"], dict)
    phrases = []
    for c in p["concepts"]:
        assert isinstance(c, dict) and set(c) <= CONCEPT_KEYS, c
        assert isinstance(c["phrase"], str) and c["phrase"].strip() == c["phrase"] != ""
        if "anchor" in c:
            assert isinstance(c["anchor"], str)
        if "type" in c:
            assert c["type"] in TYPES
        for key in ("synonyms", "prompts"):
            if key in c:
                assert isinstance(c[key], list) and all(isinstance(s, str) and s for s in c[key])
        phrases.append(c["phrase"])
    assert len(set(phrases)) == len(phrases)
    assert all(isinstance(r, str) and r for r in p["retain"])
    assert len(set(p["retain"])) == len(p["retain"])
    assert not {x.lower() for x in phrases} & {x.lower() for x in p["retain"]}


def test_celebrities_100():
    p = _preset("celebrities-100")
    phrases = [c["phrase"] for c in p["concepts"]]
    assert len(phrases) == 100 == len(set(phrases))
    assert phrases[0] == "Adam Driver" and "Bill Clinton" in phrases
    assert all(c.get("anchor") == "a person" for c in p["concepts"])
    assert len(p["retain"]) == 100
    assert "Bill Murray" in p["retain"] and "Amanda Seyfried" in p["retain"]
    assert p["type"] == "celebrity"


def test_artists_100():
    p = _preset("artists-100")
    phrases = [c["phrase"] for c in p["concepts"]]
    assert len(phrases) == 100 == len(set(phrases))
    assert "Claude Monet" in phrases and "Briton Rivière" in phrases
    assert all(c.get("anchor") == "art" for c in p["concepts"])
    assert len(p["retain"]) == 100 and "Albert Bierstadt" in p["retain"]
    assert p["type"] == "style"


def test_nudity():
    p = _preset("nudity")
    assert [c["phrase"] for c in p["concepts"]] == ["nudity", "naked", "erotic", "sexual"]
    assert all(c.get("anchor") == "a person wearing clothes" for c in p["concepts"])
    assert p["type"] == "explicit"
    assert p["settings"] == {"steps": 120, "timesteps": "uniform"}


def test_cifar10_objects():
    p = _preset("cifar10-objects")
    classes = [c["phrase"] for c in p["concepts"]]
    assert classes == [
        "airplane", "automobile", "bird", "cat", "deer",
        "dog", "frog", "horse", "ship", "truck",
    ]
    assert p["type"] == "object"
    all_syn = []
    for c in p["concepts"]:
        assert "anchor" not in c
        assert len(c["synonyms"]) >= 3 and len(set(c["synonyms"])) == len(c["synonyms"])
        assert c["phrase"] not in c["synonyms"]
        all_syn += c["synonyms"]
    assert len(set(all_syn)) == len(all_syn)
    by = {c["phrase"]: c["synonyms"] for c in p["concepts"]}
    assert by["airplane"] == ["aircraft", "plane", "jet"]
    assert by["dog"] == ["canine", "pooch", "hound"]


# ---------------------------------------------------------------- eval sets


@pytest.mark.parametrize(
    "name,n_templates,seeds",
    [("celebrity", 5, [1, 2, 3, 4, 5]), ("artist", 5, [1, 2, 3, 4, 5]), ("object", 1, None)],
)
def test_eval_sets(name, n_templates, seeds):
    e = yaml.safe_load((DATA / "eval" / f"{name}.yaml").read_text(encoding="utf-8"))
    assert set(e) == {"protocol", "templates", "seeds", "images_per_prompt", "notes"}
    assert e["protocol"] == name
    assert len(e["templates"]) == n_templates == len(set(e["templates"]))
    assert all(t.count("{}") == 1 for t in e["templates"])
    assert e["seeds"] and all(isinstance(s, int) for s in e["seeds"])
    if seeds is not None:
        assert e["seeds"] == seeds
    assert isinstance(e["images_per_prompt"], int) and e["images_per_prompt"] >= 1
    assert isinstance(e["notes"], str) and e["notes"]


def test_eval_paper_templates():
    celeb = yaml.safe_load((DATA / "eval" / "celebrity.yaml").read_text(encoding="utf-8"))
    assert "an image capturing {} at a public event" in celeb["templates"]
    obj = yaml.safe_load((DATA / "eval" / "object.yaml").read_text(encoding="utf-8"))
    assert obj["templates"] == ["a photo of the {}"]
    assert len(obj["seeds"]) * obj["images_per_prompt"] == 200
