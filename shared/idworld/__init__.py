"""Identity world (issue 23): the second ground-truth world, built unlike the shape world.

64 named identities ("First Last", every first and last name shared by 5-6 of them, each with a
nickname), 8 rendering styles named like artists, the shape world's 8 objects as props, colored frames,
all in 32x32 RGB; captions built from ``mace_core``'s real ``celebrity``/``object``/``style`` templates.
What it is and why: :mod:`idworld.world`. The identity table (names, nicknames, attributes) is
``world.IDENTITIES``; styles and artists ``world.STYLES`` / ``world.ARTISTS``; objects ``world.OBJECTS``.

Commands (from the repository root; OMP_NUM_THREADS=1 keeps them reproducible and polite on a shared CPU)::

    python shared/idworld/train_model.py            # the model -> data/id-sd1.safetensors
    python shared/idworld/train_judge.py            # the judge -> data/judge.safetensors
    python shared/idworld/quality.py                # base quality of the model, by the judge
    python -m pytest -q tests/test_idworld.py       # renderer, captions, judge (fast)

The model is a tiny SD 1.x (text width 256: 4 dims per identity, SD's ratio for the MACE paper's
200 celebrities is 3.84), one fp16 single file in the SD1 layout, so every ``mace`` front end loads it.
"""

from pathlib import Path as _Path

#: the shipped identity-world model: a single-file SD1-layout checkpoint
ID_MODEL = _Path(__file__).resolve().parent / "data" / "id-sd1.safetensors"
