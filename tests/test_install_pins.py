"""install.py in a host's environment: it installs what is missing and moves no pinned package.

Each case builds a virtual environment holding a host's pins (A1111 1.10, Forge), snapshots
`pip freeze`, runs install.py as ComfyUI-Manager / A1111 would, and checks that every package
that was there keeps its version and that the core imports and loads a model there.
Environments are cached under .cache/pin-venvs/ between runs on the same machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("MACE_PIN_VENVS", ROOT / ".cache" / "pin-venvs"))
HOSTS = {
    "a1111-1.10": ["gradio==3.41.2", "transformers==4.30.2", "safetensors==0.4.2", "numpy==1.26.2"],
    "forge": ["gradio==4.40.0", "diffusers==0.31.0", "peft==0.13.2", "transformers==4.46.1", "numpy==1.26.2"],
}


def _run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def _venv(name: str, pins: list[str]) -> Path:
    """The host's environment, back to exactly its pinned state (what earlier runs added is removed)."""
    venv = CACHE / name
    py = venv / "bin" / "python"
    stamp, base = venv / ".pins", venv / ".freeze"
    if stamp.exists() and stamp.read_text() == "\n".join(pins) and base.exists():
        extra = sorted(set(_freeze(py)) - set(base.read_text().split()))
        if extra:
            _run([str(py), "-m", "pip", "uninstall", "-y", "-q", *extra])
        return py
    _run([sys.executable, "-m", "venv", "--clear", str(venv)])
    try:
        _run([str(py), "-m", "pip", "install", "-q", "torch==2.13.0", *pins], timeout=1500)
    except subprocess.CalledProcessError as e:
        if "Could not find a version" in e.stderr or "No matching distribution" in e.stderr:
            pytest.skip(f"the package index cannot provide {name}'s pins here: {e.stderr[-300:]}")
        raise
    stamp.write_text("\n".join(pins))
    base.write_text("\n".join(_freeze(py)))
    return py


def _freeze(py: Path) -> dict[str, str]:
    out = _run([str(py), "-m", "pip", "freeze", "--all"]).stdout
    return dict(line.split("==", 1) for line in out.splitlines() if "==" in line)


@pytest.mark.parametrize("host", sorted(HOSTS))
def test_install_keeps_host_pins(host, tmp_path):
    py = _venv(host, HOSTS[host])
    before = _freeze(py)
    res = subprocess.run([str(py), str(ROOT / "install.py")], capture_output=True, text=True, cwd=tmp_path)
    after = _freeze(py)
    moved = {k: (v, after.get(k)) for k, v in before.items() if after.get(k) != v}
    assert not moved, f"install.py moved {moved}\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    for pin in HOSTS[host]:
        name, version = pin.split("==")
        assert after[name] == version
    assert "torch" in after and after["torch"].startswith("2.13.0")
    # the core imports there and builds a model from a file (tiny SD1 written in this venv)
    code = ("import sys; sys.path.insert(0, %r); sys.path.insert(0, %r)\n"
            "from tiny import tiny_file\n"
            "from mace_core.model.diffusers_backend import DiffusersBackend\n"
            "be = DiffusersBackend.from_file(tiny_file('sd1'), device='cpu')\n"
            "print(len(be.cross_attention()))\n") % (str(ROOT / "shared"), str(ROOT / "tests"))
    out = subprocess.run([str(py), "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("16")
    # a second run has nothing to do
    again = subprocess.run([str(py), str(ROOT / "install.py")], capture_output=True, text=True)
    assert "all requirements are installed" in again.stdout


def test_a1111_command_line_survives_the_shell(tmp_path):
    """A1111's `launch.run_pip` runs `"python" -m pip {command}` through the shell: requirements
    with `<`/`>` and paths with spaces must reach pip as they are, and no file may appear (the
    unquoted `diffusers>=0.27` redirected into a file named `=0.27`)."""
    sys.path.insert(0, str(ROOT))
    try:
        from install import shell_command
    finally:
        sys.path.remove(str(ROOT))
    args = ["install", "diffusers>=0.27", "diffusers<=0.31.0", "x!=1;python_version<'4'",
            "-c", str(tmp_path / "a dir" / "pins.txt")]
    out = subprocess.run(f"printf '%s\\n' {shell_command(args)}", shell=True, cwd=tmp_path,
                         capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == args
    assert list(tmp_path.iterdir()) == []
