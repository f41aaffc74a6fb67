"""Install what mace needs into a host's Python without breaking the host.

Run by A1111/Forge (with their `launch` module) and by ComfyUI-Manager (without it), or by hand:
`python install.py`. It installs only packages from requirements.txt that are missing or too
old, never torch, and pins every package already installed to its current version (a pip
constraints file made from the environment), so a host's pins (gradio, transformers, numpy,
safetensors ...) never move. When something cannot be had without moving a pin it says so and
leaves the environment as it was; the core then runs without it where it can.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
NEVER = {"torch", "torchvision", "torchaudio", "xformers"}
# Newer releases that import names an older installed package lacks, although their metadata
# allows it: (installed package, below this version, cap for the package we install).
COMPAT = [("transformers", "4.46", "diffusers<=0.31.0")]


def requirements(path: Path = HERE / "requirements.txt") -> list[str]:
    out = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and _name(line) not in NEVER:
            out.append(line)
    return out


def _name(req: str) -> str:
    return re.split(r"[<>=!~;\[ ]", req, 1)[0].strip().lower().replace("_", "-")


def _version_tuple(v: str) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def satisfied(req: str) -> bool:
    """Installed, and at least the lower bound a requirement names (we only use >= bounds)."""
    try:
        have = metadata.version(_name(req))
    except metadata.PackageNotFoundError:
        return False
    m = re.search(r">=\s*([\w.]+)", req)
    return not m or _version_tuple(have) >= _version_tuple(m.group(1))


def _installed_below(pkg: str, version: str) -> bool:
    try:
        return _version_tuple(metadata.version(pkg)) < _version_tuple(version)
    except metadata.PackageNotFoundError:
        return False


def constraints() -> str:
    """`name==version` for every installed distribution: what pip must not move."""
    lines = set()
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name:
            lines.add(f"{name}=={dist.version}")
    return "\n".join(sorted(lines)) + "\n"


def shell_command(args: list[str]) -> str:
    """`args` as one command line for A1111's `launch.run_pip`, which runs it through the shell
    (sh or cmd.exe): every argument in double quotes, the quoting both shells share, so `<`, `>`
    and spaces in requirements and paths reach pip instead of becoming redirections."""
    bad = [a for a in args if '"' in a]
    if bad:
        raise ValueError(f"cannot quote {bad[0]!r} for the shell")
    return " ".join(f'"{a}"' for a in args)


def main() -> int:
    missing = [r for r in requirements() if not satisfied(r)]
    if not missing:
        print("[mace] all requirements are installed")
        return 0
    # a package that is installed but too old is not constrained to its version: that is the one
    # allowed to move; everything else stays
    names = {_name(r) for r in missing}
    caps = [cap for pkg, below, cap in COMPAT if _name(cap) in names and _installed_below(pkg, below)]
    pinned = "".join(l + "\n" for l in constraints().splitlines() if l.split("==")[0] not in names)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(pinned)
        cfile = f.name
    args = ["install", *missing, *caps, "-c", cfile]
    print(f"[mace] installing {', '.join(missing)} (every installed package kept at its version)")
    try:
        import launch  # A1111 / Forge

        launch.run_pip(shell_command(args), "mace requirements")
        ok = True
    except ImportError:
        ok = subprocess.run([sys.executable, "-m", "pip", *args]).returncode == 0
    except Exception as e:  # launch.run_pip raises RuntimeError with pip's output
        print(e)
        ok = False
    if not ok:
        print("[mace] could not install " + ", ".join(missing) + " without changing packages your UI pins. "
              "Nothing was changed. mace's core runs without optional packages; for the missing required ones, "
              "install a version compatible with your UI by hand (see requirements.txt).")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
