"""Side venvs for tests whose packages cannot live in the dev venv, built once and cached.

Each is `.cache/<tag>-venv`, installed from the `#<tag> ` lines of requirements-dev.txt (so its pins
sit beside the dev venv's) and rebuilt only when those lines change:

- `gradio341`: A1111 1.10's gradio 3.41.2, which conflicts with the dev venv's current gradio;
- `sam`: segment-anything with torch 2.14.1 + torchvision 0.29.1 (PyPI's torchvision does not
  load beside the dev venv's CPU torch 2.13.0). It sees the dev venv's packages too (diffusers,
  transformers, mace_core ...) through a .pth file, after its own, so only what must differ is
  installed twice.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache"
SHARE_PTH = "_mace_dev_venv.pth"
# pip's last words when it could not reach a package index (no network, nothing on local disk)
_NO_INDEX = ("No matching distribution found", "Could not find a version", "NewConnectionError",
             "Temporary failure in name resolution", "Network is unreachable")
_PRINT_SITE = "import sysconfig; print(sysconfig.get_path('purelib'))"  # a venv's site-packages


class VenvUnavailable(RuntimeError):
    """pip could not fetch the pins (no network / index): the caller skips with this reason."""


def pins(tag: str) -> str:
    """The `#<tag> ` lines of requirements-dev.txt without their prefix, as a requirements file."""
    prefix = f"#{tag} "
    lines = [l[len(prefix):] for l in (REPO / "requirements-dev.txt").read_text().splitlines() if l.startswith(prefix)]
    if not lines:
        raise ValueError(f"requirements-dev.txt has no '{prefix}' lines")
    return "".join(l + "\n" for l in lines)


def cached_venv(tag: str, share_dev_site: bool = False, timeout: float = 1800) -> Path:
    """The python of `.cache/<tag>-venv`, built from ``pins(tag)`` on first use.

    ``share_dev_site``: append this (dev) venv's site-packages to the side venv's path with
    ``site.addsitedir`` in a .pth file, so its own .pth files (the editable mace install) apply too,
    and the side venv's own packages win where both have one.

    Raises ``VenvUnavailable`` when pip cannot fetch the pins; any other pip failure is an error.
    """
    venv = CACHE / f"{tag}-venv"
    python = venv / "bin" / "python"
    stamp = venv / "pins.txt"
    dev_site = sysconfig.get_path("purelib")
    # the shared path is part of the stamp: a moved checkout must not keep pointing at the old one
    requirements = pins(tag)
    want = requirements + (f"# shares {dev_site}\n" if share_dev_site else "")
    if python.exists() and stamp.exists() and stamp.read_text() == want:
        return python
    shutil.rmtree(venv, ignore_errors=True)
    # the same interpreter as the dev venv: a shared site-packages holds its compiled extensions
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    req = venv / "requirements.txt"
    req.write_text(requirements)
    # installed before the .pth exists, so pip neither sees nor tries to replace the dev venv's packages
    r = subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", str(req)], capture_output=True, text=True,
                       timeout=timeout, check=False)
    if r.returncode != 0:
        tail = (r.stdout + r.stderr)[-2000:]
        shutil.rmtree(venv, ignore_errors=True)
        if any(s in tail for s in _NO_INDEX):
            raise VenvUnavailable(f"cannot install the '#{tag}' pins of requirements-dev.txt: {tail.strip()}")
        raise RuntimeError(f"pip failed building {venv}:\n{tail}")
    if share_dev_site:
        own_site = subprocess.check_output([str(python), "-c", _PRINT_SITE], text=True).strip()
        (Path(own_site) / SHARE_PTH).write_text(f"import site; site.addsitedir({dev_site!r})\n")
    stamp.write_text(want)
    return python
