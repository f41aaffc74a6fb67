"""Files people share: the erasure as a LoRA every host loads, applying it to a fine-tune, and a
model card for a hub.

The LoRA is the weight change (erased minus base) of every edited tensor, factored by a
truncated SVD to the smallest rank per tensor whose relative error on the erased weight stays
under a target, in kohya's format (`lora_unet_<ldm name with _>.lora_down.weight / .lora_up.weight
/ .alpha`) that A1111, Forge and ComfyUI load with their stock LoRA loaders.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Mapping

import torch

from ..errors import MaceError

UNET = "model.diffusion_model."


def kohya_name(file_key: str) -> str:
    """``model.diffusion_model.input_blocks.1.1....attn2.to_k.weight`` -> ``lora_unet_input_blocks_1_1_..._to_k``."""
    return "lora_unet_" + file_key.removeprefix(UNET).removesuffix(".weight").replace(".", "_")


@dataclass
class LoraExport:
    tensors: dict[str, torch.Tensor]
    ranks: dict[str, int]
    max_rel_error: float  # max over tensors of ||W_erased - (W0 + up down)|| / ||W_erased||


def edited_keys(erased: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> list[str]:
    """UNet tensors whose values differ between the erased model and its base."""
    keys = [k for k in erased if k.startswith(UNET) and k in base]
    return sorted(k for k in keys if erased[k].shape == base[k].shape and not torch.equal(erased[k], base[k]))


def export_lora(erased: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor], target: float = 0.01,
                max_rank: int | None = None, dtype: torch.dtype = torch.float16) -> LoraExport:
    """Low-rank factors of (erased - base) for every edited tensor, each at the smallest rank whose
    relative error on the erased weight is <= ``target`` (or ``max_rank``)."""
    keys = edited_keys(erased, base)
    if not keys:
        raise MaceError("the two models have the same UNet weights: nothing to export")
    out, ranks, worst = {}, {}, 0.0
    for k in keys:
        w = erased[k].double()
        delta = w - base[k].double()
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        # residual of rank r = sqrt(sum of the remaining squared singular values)
        tail = torch.cat([(s.flip(0) ** 2).cumsum(0).flip(0), torch.zeros(1, dtype=s.dtype)]).sqrt()
        rel = tail / w.norm()
        ok = (rel <= target).nonzero()
        r = int(ok[0]) if len(ok) else len(s)
        r = max(1, min(r, max_rank or len(s)))
        up, down = u[:, :r] * s[:r], vh[:r]
        name = kohya_name(k)
        out[f"{name}.lora_up.weight"] = up.to(dtype).contiguous()
        out[f"{name}.lora_down.weight"] = down.to(dtype).contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(r), dtype=dtype)
        ranks[k] = r
        approx = base[k].double() + up.to(dtype).double() @ down.to(dtype).double()
        worst = max(worst, float((w - approx).norm() / w.norm()))
    return LoraExport(out, ranks, worst)


def lora_deltas(lora: Mapping[str, torch.Tensor], keys: list[str]) -> dict[str, torch.Tensor]:
    """Weight changes (float32) of a kohya LoRA for the given file keys it covers."""
    out = {}
    for k in keys:
        name = kohya_name(k)
        if f"{name}.lora_up.weight" not in lora:
            continue
        up, down = lora[f"{name}.lora_up.weight"].float(), lora[f"{name}.lora_down.weight"].float()
        alpha = float(lora.get(f"{name}.alpha", torch.tensor(float(down.shape[0]))))
        out[k] = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:]) * (alpha / down.shape[0])
    return out


def model_card(metadata: Mapping[str, str], name: str, eval_md: str | None = None,
               grid: str | None = None, license: str = "creativeml-openrail-m",
               eval_before_md: str | None = None) -> str:
    """README.md for a hub, from an erased checkpoint's metadata and optional `mace eval` reports of
    this model (``eval_md``) and of the same erasure without hardening (``eval_before_md``: its red
    team is the "before" of the robustness section)."""
    concepts = json.loads(metadata.get("mace.concepts", "[]"))
    retain = json.loads(metadata.get("mace.retain", "[]"))
    settings = json.loads(metadata.get("mace.settings", "{}"))
    base = metadata.get("mace.base_name", "") or "unknown"
    arch = metadata.get("modelspec.architecture", "")
    front = ["---", f"base_model: {base}", "base_model_relation: finetune", f"license: {license}",
             "pipeline_tag: text-to-image", "tags:", "- stable-diffusion", "- concept-erasure", "- mace"]
    if arch:
        front.append(f"- {arch}")
    front.append("---")
    body = [f"# {name}", "",
            f"This checkpoint is `{base}` with concepts erased by [mace](https://github.com/) (MACE, CVPR 2024: "
            "closed-form cross-attention refinement, one LoRA per concept, closed-form fusion). Only the "
            "cross-attention key/value weights were changed; every other tensor is identical to the base.",
            "", "## Erased concepts", "", "| concept | mapped to | type |", "|---|---|---|"]
    body += [f"| {c['phrase']} | {c.get('anchor', '')} | {c.get('type', '')} |" for c in concepts]
    body += ["", "## Retained (protected) concepts", "", ", ".join(retain) if retain else "none listed", "",
             "## Settings", "", "```json", json.dumps(settings, indent=1, sort_keys=True), "```", "",
             f"Base model sha256: `{metadata.get('mace.base_sha256', '')}`  ",
             f"Text-encoder layer (clip skip): {metadata.get('mace.clip_skip', '1')}", "",
             "An erased word also stops working in negative prompts."]
    if eval_md:
        body += ["", "## Evaluation", "", eval_md.strip()]
    body += ["", "## Robustness", ""] + _robustness(int(settings.get("robust_rounds", 0) or 0), eval_md,
                                                    eval_before_md)
    if grid:
        body += ["", f"![before and after]({grid})"]
    return "\n".join(front + [""] + body) + "\n"


def _robustness(rounds: int, after_md: str | None, before_md: str | None) -> list[str]:
    """What a publisher must say about attacks and relapse: the hardening done, the red team's attack
    success rates before and after it (when both reports are given), and that fine-tuning undoes it."""
    lines = [f"Hardened with {rounds} adversarial round(s) (`mace erase --robust`): each round's soft-token "
             "attack was found and mapped onto the anchor too." if rounds else
             "Not hardened (`mace erase --robust` adds adversarial rounds)."]
    if before_md and after_md:
        lines += ["", "Red team, attack success rate (% of images showing the concept), before hardening "
                      "(the same erasure without `--robust`):", "", before_md.strip(), "",
                  "and after: the Evaluation section above."]
    elif not after_md or "attack" not in after_md.lower():
        lines += ["", "No red-team figures were given (`mace eval --attacks`)."]
    lines += ["", "Relapse: the erasure is a small edit of the cross-attention key/value weights; further "
                  "fine-tuning of the model (even on unrelated images) can bring the concept back. On the "
                  "project's toy world, 100 unrelated fine-tuning steps restored the erased shape to its "
                  "original rate (benchmarks/RESULTS.md). Re-check after fine-tuning or merging."]
    return lines
