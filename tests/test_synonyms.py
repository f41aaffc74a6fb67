"""The model's own words (method/synonyms.py): candidates against a brute-force ranking, guidance
directions against the diffusers UNet run by hand, what the toy world's model draws for the synonyms
found (its judge), the nearby words as the candidates not taken, stage 1's sums with found synonyms
against the sums of each word's pairs, and a run's metadata, protection and setting."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from mace_core.model.checkpoint import load_checkpoint
from mace_core.model.diffusers_backend import DiffusersBackend
from mace_core.method import synonyms as syn
from mace_core.method.concepts import ErasureSpec, concept_prompts, concept_types, get_type, make_concept, stage1_key
from mace_core.method.erase import _stats, erase
from mace_core.method.project import Project
from mace_core.method.refine import concept_stats
from toyworld import TOY_MODEL
from toyworld.evaluate import judge_word
from toyworld.judge import Judge
from toyworld.world import SHAPES, SYNONYMS

TEMPLATE = "a photo of a {}"  # the toy type's training prompt


@pytest.fixture(scope="module")
def toy():
    ck = load_checkpoint(TOY_MODEL)
    return ck, DiffusersBackend.from_checkpoint(ck, device="cpu")


def test_candidates_are_the_nearest_whole_words_that_read_back_as_their_token(toy):
    _, be = toy
    table = be.text_token_embeddings()[0].weight.detach().float()
    ids = be.tokenize("square")[1:-1]
    got = syn.candidate_words(table, ids, be.tokenize, n=10, exclude=["Box"])
    # brute force: every vocabulary entry by its cosine with the phrase's token, best first
    vocab = be.components.tokenizers[0].get_vocab()  # the loaded tokenizer's own map, token -> id
    unit = table / table.norm(dim=1, keepdim=True)
    ranked = sorted(vocab.items(), key=lambda kv: -float(unit[kv[1]] @ unit[ids[0]]))
    want = [t[:-4] for t, i in ranked if i not in ids and t.endswith("</w>") and t[:-4].isascii()
            and t[:-4].isalpha() and t[:-4] != "box" and be.tokenize(t[:-4])[1:-1] == [i]][:10]
    assert got == want
    assert "box" not in got and "square" not in got


def test_guidance_directions_match_the_unet_run_by_hand(toy):
    _, be = toy
    got = syn.guidance_directions(be, ["a photo of a box", "a photo of a star"], seed=3)
    unet = be.components.unet
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2  # SD's schedule
    abar = torch.cumprod(1 - betas, 0)
    side = be.resolution // be.vae_scale  # 8: under the search's MAX_SIDE
    assert side <= syn.MAX_SIDE
    noise = torch.randn(4, be.latent_channels, side, side, generator=torch.Generator().manual_seed(3))
    t = torch.tensor(syn.TIMESTEPS)
    x = ((1 - abar[t]).sqrt().view(-1, 1, 1, 1) * noise).float()  # a blank latent at t

    def eps(prompt):
        ids = be.components.tokenizers[0]([prompt] * 4, padding="max_length", max_length=77,
                                          return_tensors="pt").input_ids
        with torch.no_grad():
            ctx = be.components.text_encoders[0](ids).last_hidden_state
            return unet(x, t, encoder_hidden_states=ctx).sample.flatten()

    want = torch.stack([eps(p) - eps("") for p in ["a photo of a box", "a photo of a star"]])
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_the_words_found_are_the_world_synonym_and_draw_the_shape(toy):
    """On the toy world: each shape's synonym is found for it ("box" for square), no other shape's name is,
    and the judge sees the shape in most images of the words found (measured: 236 of 260 images, 91%; its
    untrained words draw some shape, and those the search takes mostly draw this one)."""
    _, be = toy
    judge = Judge.load()
    hits = []
    for shape in ("square", "heart"):
        found = syn.find_words(be, shape, TEMPLATE).synonyms
        assert SYNONYMS[shape] in found
        assert not set(found) & (set(SHAPES) | set(SYNONYMS.values())) - {SYNONYMS[shape]}
        for word in found:
            pred, _ = judge_word(be, judge, word, 1)  # five images, one a color
            hits += [p == shape for p in pred]
            if word == SYNONYMS[shape]:
                assert all(p == shape for p in pred), (word, pred)
    assert sum(hits) >= 0.8 * len(hits), f"{sum(hits)} of {len(hits)}"


def test_stage1_maps_each_found_synonym_onto_the_anchor_like_the_phrase(toy, tmp_path):
    """The sums are the mean of each word's pairing with the anchor (the phrase's weight shared by its words)."""
    _, be = toy
    c = make_concept("square", "a thing", "toy", found_synonyms=["box", "clowns"])
    got = _stats(be, Project(tmp_path / "p"), c, {})
    anchor = concept_prompts(c, "a thing")
    parts = [concept_stats(be, concept_prompts(c, w), anchor) for w in ("square", "box", "clowns")]
    assert concept_prompts(c, "box") == [p.replace("square", "box") for p in concept_prompts(c)]
    torch.testing.assert_close(got.cross, sum(p.cross for p in parts) / 3)
    torch.testing.assert_close(got.gram, sum(p.gram for p in parts) / 3)
    torch.testing.assert_close(got.fusion_gram, sum(p.fusion_gram for p in parts) / 3)
    assert stage1_key(c) != stage1_key(make_concept("square", "a thing", "toy"))


def test_the_nearby_words_are_the_nearest_candidates_not_taken(toy):
    """Every candidate is either taken (cosine >= THRESHOLD with the phrase's direction, checked here from the
    directions) or, among the NEARBY nearest of the rest, kept; the two never share a word."""
    _, be = toy
    found = syn.find_words(be, "heart", TEMPLATE, exclude=["valentine"])
    words = syn.candidate_words(be.text_token_embeddings()[0].weight, be.tokenize("heart")[1:-1], be.tokenize,
                                exclude=["valentine"])
    dirs = syn.guidance_directions(be, [TEMPLATE.format(w) for w in ["heart", *words]])
    cos = dict(zip(words, torch.nn.functional.cosine_similarity(dirs[1:], dirs[:1]).tolist()))
    assert "valentine" not in found.synonyms + found.neighbours
    assert found.synonyms == tuple(w for w in words if cos[w] >= syn.THRESHOLD)
    assert found.neighbours == tuple(w for w in words if cos[w] < syn.THRESHOLD)[:syn.NEARBY]
    assert len(found.neighbours) == syn.NEARBY  # this phrase has enough of both
    assert found.synonyms and not set(found.synonyms) & set(found.neighbours)


@pytest.mark.parametrize("setting", ["model", "none"])
def test_a_run_records_the_words_it_found_and_keeps_the_nearby_ones(toy, tmp_path, setting):
    """The synonyms erased and the nearby words are in the output's metadata and the project; with no retain
    list the nearby words join the type's fixed list in what stage 1 keeps (a type without one, `toy`,
    keeps neither); a retain list replaces both; with the search off neither is found."""
    ck, be = toy
    for ctype, retain in (("toy", ("star",)), ("toy", ()), ("object", ())):
        spec = ErasureSpec((make_concept("square", "", ctype),), retain, {"synonyms": setting})
        proj = Project(tmp_path / f"{ctype}{len(retain)}")
        res = erase(be, spec, proj, ck.sha256, closed_form_only=True)
        meta = json.loads(res.metadata["mace.concepts"])[0]
        kept = json.loads(res.metadata["mace.protected"])
        if setting == "none":
            assert meta["found_synonyms"] == meta["found_neighbours"] == []
        else:
            assert "box" in meta["found_synonyms"] and "star" not in meta["found_synonyms"]
            assert (0 < len(meta["found_neighbours"]) <= syn.NEARBY) == (ctype == "object")
            assert not set(meta["found_synonyms"]) & set(meta["found_neighbours"])
        fixed = [p for p in get_type(ctype).protect if p not in meta["found_synonyms"] + ["square"]]
        assert kept.get("phrases", []) == (list(retain) or fixed + meta["found_neighbours"])
        stored = proj.spec().concepts[0]
        assert stored.found_synonyms == tuple(meta["found_synonyms"])
        assert stored.found_neighbours == tuple(meta["found_neighbours"])


def test_a_nearby_word_drawn_as_another_name_erased_is_not_kept():
    """On the identity world, Bill Kessler's nickname "flash" is none of his candidates but one of Leo Moreau's
    nearby words, drawn as Bill Kessler (cosine 0.98): erasing both, it is not kept. "Brad Pitt", a name that
    world never learnt, draws its fallback (the subjectless prompt's direction), as do many words it never
    learnt ("close", one of Bill Kessler's nearby words): he witnesses nothing, and they stay kept. Checked
    against the rule computed here from `find_words` and the directions."""
    from idworld import ID_MODEL

    be = DiffusersBackend.from_checkpoint(load_checkpoint(ID_MODEL), device="cpu")
    names = ["Bill Kessler", "Leo Moreau", "Brad Pitt"]
    template = get_type("celebrity").train_prompt
    found = {n: syn.find_words(be, n, template, [w for m in names for w in (m, *m.split())]) for n in names}
    fallback = torch.nn.functional.normalize(syn.guidance_directions(be, [template.replace(" {}", "")]), dim=1)[0]
    known = [n for n in names if float(found[n].directions[0] @ fallback) < syn.THRESHOLD]
    assert known == ["Bill Kessler", "Leo Moreau"]
    got = syn.with_model_words(be, ErasureSpec(tuple(make_concept(n, "", "celebrity") for n in names)))
    for c in got.concepts:
        f = found[c.phrase]
        assert c.found_synonyms == f.synonyms
        want = [w for w, d in zip(f.neighbours, f.directions[1:])
                if all(float(d @ found[m].directions[0]) < syn.THRESHOLD for m in known if m != c.phrase)]
        assert list(c.found_neighbours) == want
    nearby = {c.phrase: c.found_neighbours for c in got.concepts}
    assert "flash" in found["Leo Moreau"].neighbours and "flash" not in nearby["Leo Moreau"]
    assert "close" in nearby["Bill Kessler"]
    assert float(found["Bill Kessler"].directions[1 + found["Bill Kessler"].neighbours.index("close")]
                 @ found["Brad Pitt"].directions[0]) >= syn.THRESHOLD
    # one name alone, or with a retain list: nothing compared, every nearby word recorded
    alone = syn.with_model_words(be, ErasureSpec((make_concept("Leo Moreau", "", "celebrity"),)))
    assert "flash" in alone.concepts[0].found_neighbours
    kept = syn.with_model_words(be, ErasureSpec(tuple(make_concept(n, "", "celebrity") for n in names), ("Tom Holt",)))
    assert "flash" in kept.concepts[1].found_neighbours


def test_the_search_draws_latents_no_wider_than_its_cap():
    """A model drawn at 1024 px (a 128-wide latent) is compared on a MAX_SIDE-wide one: a full-size
    SDXL latent would cost 16 times more, and quadratic self-attention at 128 x 128 on small models."""
    from tiny import tiny_file

    be = DiffusersBackend.from_checkpoint(load_checkpoint(tiny_file("sd1")), device="cpu")
    be.resolution = 128 * be.vae_scale
    d = syn.guidance_directions(be, ["a photo of a cat"])
    assert d.shape == (1, len(syn.TIMESTEPS) * be.latent_channels * syn.MAX_SIDE ** 2)


def test_the_fixed_list_check_says_whether_the_model_tells_its_entries_apart(toy, caplog):
    """`drawn_alike` is the mean cosine over every two prompts' directions (computed here from the directions).
    The shape world's model draws the object type's list as different shapes (its untrained words draw
    different shapes: mean 0.36 when measured), so an object run is warned of nothing; it draws the style
    type's artists, names it never saw in a prompt of a kind it never saw, as one thing (0.998): a style run
    with no retain list names that list in its log; a retain list, or the search off, checks nothing."""
    _, be = toy
    obj, style = get_type("object"), get_type("style")
    prompts = [obj.train_prompt.replace("{}", w) for w in obj.protect[:syn.LIST_SAMPLE]]
    d = torch.nn.functional.normalize(syn.guidance_directions(be, prompts), dim=1)
    n = len(prompts)
    pairs = [float(d[i] @ d[j]) for i in range(n) for j in range(n) if i != j]
    assert syn.drawn_alike(be, prompts) == pytest.approx(sum(pairs) / len(pairs), abs=1e-5)
    assert syn.drawn_alike(be, prompts) < syn.THRESHOLD

    cat, artist = make_concept("cat", "", "object"), make_concept("Claude Monet", "", "style")
    assert syn.unknown_lists(be, ErasureSpec((cat,)), [cat]) == {}
    with caplog.at_level("WARNING", logger="mace.synonyms"):
        got = syn.unknown_lists(be, ErasureSpec((cat, artist)), [cat, artist])
    assert list(got) == ["style"] and got["style"] >= syn.THRESHOLD
    assert [r.getMessage() for r in caplog.records if "default list of style (" in r.getMessage()]
    assert syn.unknown_lists(be, ErasureSpec((artist,), ("Van Gogh",)), [artist]) == {}
    assert syn.unknown_lists(be, ErasureSpec((artist,), (), {"synonyms": "none"}), [artist]) == {}
    assert syn.unknown_lists(be, ErasureSpec((artist,), (), {"protection": "none"}), [artist]) == {}


def test_the_unknown_list_note_counts_the_entries_drawn(monkeypatch):
    """The note names, per type, how many of its list's entries were drawn: the sample for a long list, the
    whole list for one shorter than the sample (a type whose list was edited down to 5 names)."""
    types = concept_types()
    monkeypatch.setitem(types, "style", dataclasses.replace(types["style"], protect=types["style"].protect[:5]))
    assert len(types["celebrity"].protect) > syn.LIST_SAMPLE
    note = syn.unknown_note({"celebrity": 0.991, "style": 0.998})
    assert f"celebrity (0.991 between its first {syn.LIST_SAMPLE} entries)" in note
    assert "style (0.998 between its first 5 entries)" in note
    assert syn.unknown_note({}) == ""
