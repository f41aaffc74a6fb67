"""`mace demo`: erase a shape from the shipped toy model on the CPU, offline, and show the result.

Writes to the output folder: the erased checkpoint, `grid.png` (rows: the erased shape's prompts,
its synonym's, other shapes'; left half before, right half after, same seeds) and
`metrics.json` / `metrics.md` from the toy classifier.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from mace_core.model.checkpoint import load_checkpoint
from mace_core.method.concepts import ErasureSpec, make_concept
from mace_core.model.diffusers_backend import DiffusersBackend
from mace_core.errors import MaceError
from mace_core.eval.evaluate import before_after_grid
from mace_core.model.sampling import generate

from . import TOY_MODEL
from .evaluate import GUIDANCE, STEPS, PROMPT, markdown, object_scores
from .judge import Judge
from .world import COLOR_NAMES, SHAPES, SYNONYMS


def run_demo(args) -> int:
    from mace_core.model.checkpoint import modelspec, save_edited
    from mace_core.method.erase import erase
    from mace_core.files import write_png, write_text
    from mace_core.method.project import Project

    shape = args.concept
    if shape not in SHAPES:
        raise MaceError(f"the toy world knows the shapes {', '.join(SHAPES)}; got {shape!r}")
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not TOY_MODEL.is_file():
        raise MaceError(f"the toy model {TOY_MODEL} is missing: restore it from the repository "
                        f"(git checkout -- {TOY_MODEL.name}) or retrain it with shared/toyworld/train_model.py")
    ck = load_checkpoint(TOY_MODEL)
    base = DiffusersBackend.from_checkpoint(ck, device="cpu")
    spec = ErasureSpec((make_concept(shape, "", "toy"),))
    print(f"erasing {shape!r} from {ck.path.name}")
    # one project per (shape, model): a project accumulates concepts and belongs to one base model, and
    # each demo erases one shape from the shipped model (a rerun resumes; an updated model starts afresh)
    project = Project(out / f"project-{shape}-{ck.sha256[:12]}")
    res = erase(base, spec, project, ck.sha256, ck.path.name,
                progress=lambda label, d, n: print(f"\r  {label}: {d}/{n}   ", end="", flush=True))
    print()
    erased_path = out / f"toy-without-{shape}.safetensors"
    save_edited(ck, res.weights, erased_path, {**modelspec(ck.family, erased_path.stem, f"toy model without {shape}"),
                                               **res.metadata}, overwrite=True)  # the demo's own folder
    after = DiffusersBackend.from_checkpoint(load_checkpoint(erased_path), device="cpu")

    others = [s for s in SHAPES if s != shape][:3]
    words = [shape, SYNONYMS[shape], *others]
    seeds = list(range(6))
    before_rows, after_rows = [], []
    for w in words:
        prompts = [PROMPT.format(color=COLOR_NAMES[i % len(COLOR_NAMES)], shape=w) for i in seeds]
        before_rows.append(generate(base, prompts, seeds, STEPS, GUIDANCE))
        after_rows.append(generate(after, prompts, seeds, STEPS, GUIDANCE))
    write_png(out / "grid.png", before_after_grid(before_rows, after_rows), checked=True)
    judge = Judge.load()
    scores = {"base": object_scores(base, judge, [shape], seeds_per_color=2),
              "erased": object_scores(after, judge, [shape], seeds_per_color=2)}
    write_text(out / "metrics.json", json.dumps({k: v.to_dict() for k, v in scores.items()}, indent=1), checked=True)
    md = (f"# Toy-world demo: erase {shape!r}\n\nRows of grid.png: {', '.join(words)}; left before, right after.\n\n"
          + markdown(scores) + "\n")
    write_text(out / "metrics.md", md, checked=True)
    print(markdown(scores))
    print(f"wrote {erased_path}, {out / 'grid.png'}, {out / 'metrics.md'} in {time.perf_counter() - t0:.0f}s")
    return 0
