"""Model files in and out: key maps against real checkpoints, round trips, bit-identity, metadata,
every bad input with a clear message and no file changed, and a host's in-memory state dict
giving the file's checkpoint (and saved from the file)."""

from __future__ import annotations

import dataclasses

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mace_core.model.checkpoint import (Checkpoint, build_components, data_sha256, load_checkpoint, modelspec,
                                  save_edited)
from mace_core.errors import MaceError, UnsupportedModelError
from mace_core.model.families import detect_family, load_family
from synthetic import tiny_family
from tiny import FAMILIES, file_digest, tiny_file, tiny_folder, tiny_modules

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "keys"


def _reference(files):
    out = {}
    for f, prefix in files:
        for line in (REFERENCE / f).read_text().split("\n"):
            key, shape = line.rsplit(" ", 1)
            out[prefix + key] = tuple(int(x) for x in shape.strip("[]").split(",") if x)
    return out


REF_FILES = {
    "sd1": [("UNET-v1-SD.txt", "model.diffusion_model."), ("CLIP-v1-SD.txt", "cond_stage_model.transformer.text_model."),
            ("VAE-v1-SD.txt", "first_stage_model.")],
    "sd2": [("UNET-v2-SD.txt", "model.diffusion_model."), ("CLIP-v2-SD.txt", "cond_stage_model.model."),
            ("VAE-v1-SD.txt", "first_stage_model.")],
    "sdxl": [("UNET-XL-SD.txt", "model.diffusion_model."),
             ("CLIP-v1-SD.txt", "conditioner.embedders.0.transformer.text_model."),
             ("CLIP-XL-SD.txt", "conditioner.embedders.1.model."), ("VAE-v1-SD.txt", "first_stage_model.")],
}


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="../shared/reference/keys not present")
@pytest.mark.parametrize("name", FAMILIES)
def test_key_maps_match_real_checkpoints(name):
    """Every tensor our full-size modules need maps to a real checkpoint key of the same shape."""
    from mace_core.model.checkpoint import _component_entries, _meta_modules

    fam = load_family(name)
    ours = {}
    for module, entries in _component_entries(fam, _meta_modules(fam)):
        sd = module.state_dict()
        for e in entries:
            ours[e.file_key] = tuple(e.to_file([sd[k] for k in e.module_keys]).shape)
    ref = _reference(REF_FILES[name])
    assert set(ours) <= set(ref), sorted(set(ours) - set(ref))[:5]
    assert {k: v for k, v in ref.items() if k in ours} == ours
    # what real files have and we do not need is only text-encoder extras
    extra = set(ref) - set(ours)
    assert all(k.endswith(("position_ids", "logit_scale", "text_projection")) for k in extra), extra
    n_attn2 = sum(k.endswith("attn2.to_k.weight") for k in ours)
    assert n_attn2 == {"sd1": 16, "sd2": 16, "sdxl": 70}[name]


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("layout", ["single", "diffusers"])
def test_round_trip_modules_exact(name, layout):
    """file -> modules reproduces the modules that were written, tensor for tensor."""
    path = tiny_file(name) if layout == "single" else tiny_folder(name)
    ck = load_checkpoint(path)
    assert ck.family.family == name
    comp = build_components(ck)
    unet, vae, tes = tiny_modules(name)
    for a, b in zip([unet, vae, *tes], [comp.unet, comp.vae, *comp.text_encoders]):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k


def test_modules_build_while_a1111_has_replaced_load_state_dict(monkeypatch):
    """A1111 replaces ``torch.nn.Module.load_state_dict`` process-wide while it loads a model
    (``LoadStateDictOnMeta``: ``load_state_dict(module, state_dict, strict=True)``, no ``assign``); a tab
    job started meanwhile failed with "unexpected keyword argument 'assign'". The build must not go
    through it, and still refuse a tensor of the wrong shape."""
    original = torch.nn.Module.load_state_dict
    monkeypatch.setattr(torch.nn.Module, "load_state_dict",
                        lambda module, state_dict, strict=True: original(module, state_dict, strict=strict))
    ck = load_checkpoint(tiny_file("sd1"))
    comp = build_components(ck)
    unet = tiny_modules("sd1")[0]
    assert all(torch.equal(v, comp.unet.state_dict()[k]) for k, v in unet.state_dict().items())
    key = next(k for k in ck.tensors if k.endswith("attn2.to_k.weight"))
    bad = dataclasses.replace(ck, tensors={**ck.tensors, key: ck.tensors[key][:, :-1]})
    with pytest.raises(RuntimeError, match="size mismatch"):
        build_components(bad)


@pytest.mark.parametrize("name", FAMILIES)
def test_single_file_and_folder_agree(name):
    a, b = load_checkpoint(tiny_file(name)), load_checkpoint(tiny_folder(name))
    assert a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def _kv_edits(ck: Checkpoint, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = [k for k in ck.tensors if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))]
    return {k: torch.randn(ck.tensors[k].shape, generator=g) for k in keys}


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_edit_save_load_bit_identity(tmp_path, name, dtype):
    src = tiny_file(name, dtype)
    before = file_digest(src)
    ck = load_checkpoint(src)
    edits = _kv_edits(ck)
    out = save_edited(ck, edits, tmp_path / "out.safetensors", {"mace.test": "1"})
    assert file_digest(src) == before  # the input is never modified
    got = load_file(str(out))
    orig = load_file(str(src))
    assert got.keys() == orig.keys()
    for k, t in orig.items():
        assert got[k].dtype == t.dtype, k
        if k in edits:
            assert torch.equal(got[k], edits[k].to(t.dtype)), k
            assert not torch.equal(got[k], t)
        else:
            assert torch.equal(got[k], t), k  # bit-identical, same dtype
    # and the written file is a loadable model again, with the edits in its modules
    again = build_components(load_checkpoint(out))
    layer_k = [k for k in edits if "to_k" in k][0]
    assert any(torch.equal(m.weight.float(), edits[layer_k].to(getattr(torch, dtype)).float())
               for n, m in again.unet.named_modules() if n.endswith("attn2.to_k"))


def test_metadata_modelspec_and_hash(tmp_path):
    ck = load_checkpoint(tiny_file("sd1"))
    meta = {**modelspec(ck.family, "erased", "erased things"), "mace.concepts": json.dumps([{"phrase": "cat"}])}
    out = save_edited(ck, _kv_edits(ck), tmp_path / "o.safetensors", meta)
    m = load_checkpoint(out).metadata
    assert m["modelspec.sai_model_spec"] == "1.0.0"
    assert m["modelspec.architecture"] == "stable-diffusion-v1"
    assert m["modelspec.title"] == "erased"
    assert m["modelspec.hash_sha256"] == data_sha256(out)
    assert m["modelspec.hash_sha256"] != "0x" + "0" * 64
    assert json.loads(m["mace.concepts"]) == [{"phrase": "cat"}]
    # the tiny model's architecture travels with it, so it reloads without guessing
    assert load_checkpoint(out).family == ck.family


def test_refuses_to_overwrite_input(tmp_path):
    src = tmp_path / "model.safetensors"
    shutil.copy(tiny_file("sd1"), src)
    before = file_digest(src)
    ck = load_checkpoint(src)
    with pytest.raises(MaceError, match="is one of this command's inputs"):
        save_edited(ck, _kv_edits(ck), src, {}, overwrite=True)  # not even when overwriting is asked for
    assert file_digest(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # no temp files left


def test_ckpt_loads_weights_only(tmp_path):
    sd = load_file(str(tiny_file("sd1")))
    good = tmp_path / "m.ckpt"
    torch.save({"state_dict": sd}, good)
    ck = load_checkpoint(good, family=tiny_family("sd1"))  # a .ckpt has no metadata to name a tiny arch
    assert ck.family.family == "sd1" and ck.source_format == "ckpt"
    assert torch.equal(ck.tensors[next(iter(sd))], sd[next(iter(sd))])

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    bad = tmp_path / "evil.ckpt"
    torch.save({"state_dict": sd, "x": Evil()}, bad)
    with pytest.raises(UnsupportedModelError, match="weights-only"):
        load_checkpoint(bad)


def _write(path, tensors, metadata=None):
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("keys,match", [
    ({"double_blocks.0.img_attn.qkv.weight": [4, 4]}, "FLUX"),
    ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": [4, 4]}, "SD3"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": [4, 4]}, "LoRA"),
    ({"encoder.down.0.block.0.conv1.weight": [4, 4]}, "VAE-only"),
    ({"something.else": [4]}, "unknown model layout"),
    ({"model.diffusion_model.input_blocks.0.0.weight": [4, 4]}, "no text encoder"),
])
def test_unsupported_files_are_named(tmp_path, keys, match):
    p = _write(tmp_path / "x.safetensors", {k: torch.zeros(s) for k, s in keys.items()})
    before = file_digest(p)
    with pytest.raises(UnsupportedModelError, match=match):
        load_checkpoint(p)
    assert file_digest(p) == before


def test_truncated_and_corrupt_files(tmp_path):
    data = Path(tiny_file("sd1")).read_bytes()
    t = tmp_path / "trunc.safetensors"
    t.write_bytes(data[: len(data) // 2])
    with pytest.raises(UnsupportedModelError, match="truncated"):
        load_checkpoint(t)
    c = tmp_path / "corrupt.safetensors"
    c.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!!!!!}")
    with pytest.raises(UnsupportedModelError, match="corrupt"):
        load_checkpoint(c)
    assert t.read_bytes() == data[: len(data) // 2] and c.read_bytes().endswith(b"{not json!!!!!!}")
    with pytest.raises(MaceError, match="not found"):
        load_checkpoint(tmp_path / "missing.safetensors")
    with pytest.raises(UnsupportedModelError, match="unsupported file type"):
        load_checkpoint(shutil.copy(c, tmp_path / "model.bin2"))


def test_wrong_shape_is_unknown_layout(tmp_path):
    sd = load_file(str(tiny_file("sd1")))
    meta = load_checkpoint(tiny_file("sd1")).metadata
    key = next(k for k in sd if k.endswith("attn2.to_k.weight"))
    sd[key] = torch.zeros(3, 3)
    p = _write(tmp_path / "x.safetensors", sd, meta)
    with pytest.raises(UnsupportedModelError, match="unknown layout"):
        load_checkpoint(p)


def test_missing_tensor_is_reported(tmp_path):
    sd = load_file(str(tiny_file("sd2")))
    meta = load_checkpoint(tiny_file("sd2")).metadata
    key = next(k for k in sd if k.startswith("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"))
    del sd[key]
    p = _write(tmp_path / "x.safetensors", sd, meta)
    with pytest.raises(UnsupportedModelError, match="is missing"):
        load_checkpoint(p)


def test_family_detection_of_real_key_names():
    sd1 = ["model.diffusion_model.x", "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"]
    assert detect_family(sd1).family == "sd1"
    old = ["model.diffusion_model.x", "cond_stage_model.transformer.embeddings.token_embedding.weight"]
    assert detect_family(old).text_encoders[0].prefix == "cond_stage_model.transformer."
    sd2 = ["model.diffusion_model.x", "cond_stage_model.model.transformer.resblocks.0.ln_1.weight"]
    assert detect_family(sd2).family == "sd2"
    assert detect_family(sd2, name_hint="v2-1_768-v-ema.safetensors").prediction_type == "v_prediction"
    assert detect_family(sd2, {"modelspec.architecture": "stable-diffusion-v2-768-v"}).family == "sd2-v"
    xl = ["model.diffusion_model.x", "conditioner.embedders.0.transformer.text_model.a",
          "conditioner.embedders.1.model.transformer.resblocks.0.ln_1.weight"]
    assert detect_family(xl).family == "sdxl"
    with pytest.raises(UnsupportedModelError, match="refiner"):
        detect_family(["model.diffusion_model.x", "conditioner.embedders.0.model.ln_final.weight"])


def test_text_encoder_prefix_independent_of_transformers_version():
    """transformers >= 5.6 drops `text_model.` in CLIPTextModel; the file keys must not change."""
    from mace_core.model.keymap import clip_entries

    with_prefix = clip_entries(["text_model.embeddings.token_embedding.weight"], "hf", "cond.")
    without = clip_entries(["embeddings.token_embedding.weight"], "hf", "cond.")
    assert with_prefix[0].file_key == without[0].file_key == "cond.embeddings.token_embedding.weight"


def test_tokenizer_is_clip_bpe():
    from mace_core.model.checkpoint import make_tokenizer

    tok = make_tokenizer(load_family("sd1").text_encoders[0])
    assert tok.model_max_length == 77
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == 49408


def test_sd2_768_v_round_trip_and_prediction(tmp_path):
    from mace_core.model.checkpoint import save_new_checkpoint
    from mace_core.model.diffusers_backend import DiffusersBackend
    from mace_core.model.sampling import to_x0_eps

    fam = tiny_family("sd2")
    unet, vae, tes = tiny_modules("sd2")
    p = save_new_checkpoint(tmp_path / "v.safetensors", "sd2-v", unet=unet, vae=vae, text_encoder=tes[0],
                            prediction_type="v_prediction")
    ck = load_checkpoint(p)
    assert ck.family.family == "sd2-v" and ck.family.prediction_type == "v_prediction"
    assert ck.metadata["modelspec.architecture"] == "stable-diffusion-v2-768-v"
    assert all(ck.family.unet[k] == v for k, v in fam.unet.items())
    be = DiffusersBackend.from_checkpoint(ck, device="cpu")
    # v = sqrt(a) eps - sqrt(1-a) x0 must give back x0 and eps exactly
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    a = torch.tensor(0.3)
    x = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    rx0, reps = to_x0_eps(be, x, v, a)
    assert torch.allclose(rx0, x0, atol=1e-6) and torch.allclose(reps, eps, atol=1e-6)


@pytest.mark.parametrize("name", FAMILIES)
def test_fast_padding_matches_the_tokenizer(name):
    from mace_core.model.checkpoint import make_tokenizer
    from mace_core.model.diffusers_backend import padded_ids

    prompts = ["a photo of a cat", "word " * 100, "", "Leonardo DiCaprio, oil painting"]
    for spec in load_family(name).text_encoders:
        tok = make_tokenizer(spec)
        want = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        assert torch.equal(padded_ids(tok, prompts), want)


# ---------------------------------------------------------------------------------------------
# A model a host already holds in memory (A1111's sd_model.state_dict(), ldm layout)


def _host_copy(path: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """What a host holding ``path`` has: its own tensors (not the loader's), maybe cast, plus
    buffers of its own that no file has (ldm's noise schedule)."""
    sd = {k: v.clone() if dtype is None else v.to(dtype) for k, v in load_file(str(path)).items()}
    return {**sd, "alphas_cumprod": torch.linspace(1, 0, 1000), "not_a_tensor": 3}


@pytest.mark.parametrize("name", FAMILIES)
def test_in_memory_state_dict_builds_what_the_file_builds(name):
    """The same tensors held in memory give the file's checkpoint and bit-identical modules, which
    share the host's storage instead of copying it."""
    from mace_core.model.checkpoint import MEMORY, checkpoint_from_state_dict, read_metadata

    path = tiny_file(name)
    from_file = load_checkpoint(path)
    held = _host_copy(path)
    mem = checkpoint_from_state_dict(held, path, read_metadata(path), sha256="ab" * 32)
    assert mem.family == from_file.family and mem.source_format == MEMORY and mem.path == path
    assert mem.sha256 == "ab" * 32 and "not_a_tensor" not in mem.tensors
    a, b = build_components(from_file), build_components(mem)
    for ma, mb in zip([a.unet, a.vae, *a.text_encoders], [b.unet, b.vae, *b.text_encoders]):
        sa, sb = ma.state_dict(), mb.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    to_k = next(k for k in held if k.endswith("attn2.to_k.weight"))
    built = next(m for n, m in b.unet.named_modules() if n.endswith("attn2.to_k"))
    assert built.weight.data_ptr() == held[to_k].data_ptr()  # the host's tensor, not a copy


def test_in_memory_inference_tensors_are_copied_so_training_can_backpropagate():
    from mace_core.model.checkpoint import checkpoint_from_state_dict, read_metadata

    path = tiny_file("sd1")
    with torch.inference_mode():  # how Forge (and ComfyUI) create their weights
        held = {k: v.clone() for k, v in load_file(str(path)).items()}
    ck = checkpoint_from_state_dict(held, path, read_metadata(path))
    assert not any(t.is_inference() for t in ck.tensors.values())
    layer = next(m for n, m in build_components(ck).unet.named_modules() if n.endswith("attn2.to_k"))
    x = torch.randn(2, layer.weight.shape[1], requires_grad=True)
    layer(x).sum().backward()  # would raise for an inference-tensor weight
    assert x.grad is not None


@pytest.mark.parametrize("name", FAMILIES)
def test_a_checkpoint_from_memory_is_saved_from_its_file(tmp_path, name):
    """A host holding fp16 copies of an fp32 file: the output is the file with the edits, what saving
    the file's own checkpoint writes, tensor for tensor (the host's casts and buffers stay out)."""
    from mace_core.model.checkpoint import checkpoint_from_state_dict, read_metadata

    path = tiny_file(name)
    mem = checkpoint_from_state_dict(_host_copy(path, torch.float16), path, read_metadata(path))
    edits = _kv_edits(mem)
    a = save_edited(mem, edits, tmp_path / "from-memory.safetensors", {"mace.test": "1"})
    b = save_edited(load_checkpoint(path), edits, tmp_path / "from-file.safetensors", {"mace.test": "1"})
    ta, tb = load_file(str(a)), load_file(str(b))  # (bytes may differ: safetensors orders metadata freely)
    assert ta.keys() == tb.keys() and read_metadata(a) == read_metadata(b)
    assert all(ta[k].dtype == tb[k].dtype == torch.float32 and torch.equal(ta[k], tb[k]) for k in ta)
