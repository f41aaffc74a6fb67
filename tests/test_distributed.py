"""Concept-parallel erasure: two processes under torchrun (gloo, CPU) train their share of the
concepts into one project and give the same output as a single process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from tiny import tiny_file

SHARED = Path(__file__).resolve().parents[1] / "shared"


def test_two_processes_match_one(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(SHARED), "OMP_NUM_THREADS": "1", "MACE_CACHE": str(tmp_path / "c")}
    args = ["erase", str(tiny_file("sd1")), "--concept", "cat", "--concept", "dog", "--concept", "house",
            "--images", "1", "--sample-steps", "3", "--steps", "5", "--device", "cpu"]
    one = tmp_path / "one.safetensors"
    two = tmp_path / "two.safetensors"
    subprocess.run([sys.executable, "-m", "mace_core", *args, "--out", str(one), "--work-dir", str(tmp_path / "w1")],
                   env=env, check=True, capture_output=True)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          "29517", "-m", "mace_core", *args, "--out", str(two), "--work-dir", str(tmp_path / "w2")],
                         env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = load_file(str(one)), load_file(str(two))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # both ranks wrote into the one project: one LoRA per concept
    assert len(list((tmp_path / "w2" / "concepts").glob("*/lora.safetensors"))) == 3
