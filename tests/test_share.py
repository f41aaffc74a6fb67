"""Sharing: the erasure as a kohya LoRA, applying it to another checkpoint, model cards, and
growing a project with `mace add`."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from mace_core.model.checkpoint import load_checkpoint, read_metadata, save_edited
from mace_core.cli.main import main
from mace_core.export.share import export_lora, kohya_name
from tiny import tiny_file

FAST = ["--images", "1", "--sample-steps", "3", "--steps", "4", "--device", "cpu"]


@pytest.fixture(scope="module")
def erased(tmp_path_factory):
    d = tmp_path_factory.mktemp("erased")
    out = d / "erased.safetensors"
    assert main(["erase", str(tiny_file("sd1")), "--concept", "cat", "--concept", "dog", "--out", str(out),
                 *FAST]) == 0
    return out


def test_kohya_names():
    k = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert kohya_name(k) == "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k"


def test_export_lora_reproduces_erased_weights(tmp_path, erased, capsys):
    out = tmp_path / "erasure.safetensors"
    assert main(["export-lora", str(erased), "--base", str(tiny_file("sd1")), "--out", str(out),
                 "--target-error", "0.01"]) == 0
    printed = capsys.readouterr().out
    assert "max relative error" in printed and "MiB" in printed
    lora, meta = load_file(str(out)), read_metadata(out)
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert json.loads(meta["mace.concepts"])[0]["phrase"] == "cat"
    reported = float(meta["mace.lora_max_rel_error"])
    assert reported <= 0.01
    base, target = load_file(str(tiny_file("sd1"))), load_file(str(erased))
    n = 0
    for k in target:
        name = kohya_name(k)
        if f"{name}.lora_up.weight" not in lora:
            assert torch.equal(target[k], base[k]) or not k.startswith("model.diffusion_model."), k
            continue
        up, down = lora[f"{name}.lora_up.weight"].double(), lora[f"{name}.lora_down.weight"].double()
        alpha = float(lora[f"{name}.alpha"])
        rebuilt = base[k].double() + up @ down * (alpha / down.shape[0])
        rel = float((rebuilt - target[k].double()).norm() / target[k].double().norm())
        assert rel <= reported + 1e-6, k
        n += 1
    assert n == 32  # every to_k / to_v of the 16 attn2 layers


def test_export_rank_follows_target(erased):
    base, target = load_file(str(tiny_file("sd1"))), load_file(str(erased))
    loose = export_lora(target, base, target=0.2)
    tight = export_lora(target, base, target=1e-4)
    assert max(loose.ranks.values()) < max(tight.ranks.values())
    assert loose.max_rel_error <= 0.2 + 1e-3 and tight.max_rel_error <= 1e-3


def test_apply_erasure_to_a_finetune(tmp_path, erased, caplog):
    lora = tmp_path / "erasure.safetensors"
    assert main(["export-lora", str(erased), "--base", str(tiny_file("sd1")), "--out", str(lora)]) == 0
    # a "fine-tune": same family, slightly different UNet and text encoder
    ck = load_checkpoint(tiny_file("sd1"))
    g = torch.Generator().manual_seed(0)
    ft_edits = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in ck.tensors.items()
                if k.endswith("attn2.to_k.weight") or k.endswith("final_layer_norm.weight")}
    finetune = save_edited(ck, ft_edits, tmp_path / "finetune.safetensors", {})
    out = tmp_path / "ft-erased.safetensors"
    with caplog.at_level(logging.WARNING, logger="mace"):
        assert main(["apply", str(lora), str(finetune), "--out", str(out)]) == 0
    assert "different text encoder" in caplog.text
    ft, res, base, er = (load_file(str(p)) for p in (finetune, out, tiny_file("sd1"), erased))
    k = next(k for k in res if k.endswith("attn2.to_k.weight"))
    # the fine-tune receives the same weight change the erasure made to the base (within the LoRA error)
    change = res[k].double() - ft[k].double()
    want = er[k].double() - base[k].double()
    assert (change - want).norm() / want.norm() < 0.05
    assert torch.equal(res["model.diffusion_model.out.2.weight"], ft["model.diffusion_model.out.2.weight"])


def test_model_card(tmp_path, erased):
    md = tmp_path / "metrics.md"
    md.write_text("| model | H_o |\n|---|---:|\n| erased | 97.0 |\n")
    out = tmp_path / "README.md"
    assert main(["card", str(erased), "--out", str(out), "--eval", str(md), "--grid", "grid.png"]) == 0
    text = out.read_text()
    front = text.split("---")[1]
    assert "base_model_relation: finetune" in front and "pipeline_tag: text-to-image" in front
    assert "license: creativeml-openrail-m" in front and "tags:" in front
    assert "| cat | a scene | object |" in text and "| dog |" in text
    assert "| erased | 97.0 |" in text and "![before and after](grid.png)" in text
    robust = text.split("## Robustness")[1]
    assert "Not hardened" in robust and "No red-team figures" in robust and "Relapse" in robust


def test_model_card_reports_attack_success_before_and_after_hardening(tmp_path):
    from mace_core.export.share import model_card

    meta = {"mace.concepts": json.dumps([{"phrase": "cat", "anchor": "a scene", "type": "object"}]),
            "mace.settings": json.dumps({"robust_rounds": 2})}
    before = "| attack | ASR |\n|---|---:|\n| cat: soft-token | 90.0 |\n"
    after = "| attack | ASR |\n|---|---:|\n| cat: soft-token | 30.0 |\n"
    text = model_card(meta, "m", after, eval_before_md=before)
    robust = text.split("## Robustness")[1]
    assert "Hardened with 2 adversarial round(s)" in robust and "| cat: soft-token | 90.0 |" in robust
    assert "| cat: soft-token | 30.0 |" in text.split("## Evaluation")[1].split("## Robustness")[0]
    assert "Relapse" in robust and "No red-team figures" not in robust


def test_card_refuses_a_model_without_erasure(tmp_path, capsys):
    assert main(["card", str(tiny_file("sd1")), "--out", str(tmp_path / "R.md")]) == 2
    assert "no mace.* metadata" in capsys.readouterr().err


def test_add_trains_only_the_new_concept(tmp_path, caplog):
    src = tiny_file("sd1")
    out1, out2 = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    work = tmp_path / "proj"
    # without default protection: "dog" is in the object type's list, and a restored concept is not
    # protected again (README, "Sharing and restoring")
    assert main(["erase", str(src), "--concept", "cat", "--out", str(out1), "--work-dir", str(work), *FAST,
                 "--protection", "none"]) == 0
    lora_cat = next(work.glob("concepts/cat-*/lora.safetensors"))
    stamp = lora_cat.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="mace"):
        assert main(["add", str(work), "--concept", "dog", "--model", str(src), "--out", str(out2),
                     "--device", "cpu"]) == 0
    assert "reused LoRAs: cat" in caplog.text
    assert lora_cat.stat().st_mtime_ns == stamp  # not retrained
    assert [c["phrase"] for c in json.loads(read_metadata(out2)["mace.concepts"])] == ["cat", "dog"]
    # restoring dog from the grown project gives back the cat-only model's weights (same LoRA, same stage 1)
    out3 = tmp_path / "three.safetensors"
    assert main(["fuse", str(work), "--except", "dog", "--model", str(src), "--out", str(out3)]) == 0
    a, b = load_file(str(out1)), load_file(str(out3))
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), k
