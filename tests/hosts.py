"""The real host applications (AUTOMATIC1111 1.10.1, Forge f2.0.1, ComfyUI 0.33.0), run offline for tests.

Their pristine sources are tarballs in ``../shared/hosts`` (``$MACE_HOSTS_DIR``; see its README for
what it took to run them here). They are never part of this repository: :func:`host_root` unpacks
one into ``.cache/hosts/<name>/`` (git-ignored) once, and :func:`host_venv` builds its own venv
beside it, cached between runs (rebuilt only when the recipe below changes, like tests/venvs.py):

- torch 2.13.0 CPU (the wheel this workplace keeps on disk), then the host's own requirements
  file pinned against it. A1111/Forge pin ``setuptools==69.5.1``, which conflicts with torch 2.13:
  that line is dropped (the edited copy is what ``REQS_FILE`` points the web UI at) and
  ``setuptools>=77.0.3,<81`` installed instead (A1111 and CLIP still import ``pkg_resources``).
- torchvision from the index, whose CUDA build does not load beside the CPU torch 2.13.0
  (``operator torchvision::nms does not exist``, raised while registering its meta kernels): the
  one ``_meta_registrations`` import in its ``__init__.py`` is guarded (nothing on the SD1 paths
  uses those kernels).
- A1111/Forge: OpenAI CLIP from the tarball's ``clip/`` (``--no-deps``, as A1111 would fetch it).

Playwright is never installed into a host venv: the tests drive Chromium from the dev venv.
Run ``python tests/hosts.py`` to build every available host's venv ahead of the tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "hosts"
HOSTS_DIR = Path(os.environ.get("MACE_HOSTS_DIR", REPO.parent / "shared" / "hosts"))
TORCH = "torch==2.13.0"
# the torchvision release built against torch 2.13 (its CUDA wheel; guarded at import, see above)
TORCHVISION = "torchvision==0.28.0"
SETUPTOOLS = "setuptools>=77.0.3,<81"
RECIPE = "2"  # bumped when host_venv's steps change, so cached venvs are rebuilt
_GUARDED = "try:  # mace tests: CUDA torchvision beside CPU torch (tests/hosts.py)\n"


@dataclass(frozen=True)
class Host:
    """One host application: its tarball, the folder the app runs from, and its venv recipe."""

    name: str
    app: str  # the application's folder inside the unpacked tarball
    requirements: str  # its requirements file, relative to ``app``
    drop: tuple[str, ...] = ()  # requirement names left out (installed otherwise or not at all)
    extra: tuple[str, ...] = ()  # installed after the requirements
    clip: bool = False  # OpenAI CLIP from the tarball's clip/
    repositories: tuple[tuple[str, str], ...] = field(default=())  # (folder, env var of its commit)
    stand_ins: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (package, its submodules): see `stand_in`

    @property
    def tarball(self) -> Path:
        return HOSTS_DIR / f"{self.name}.tar.gz"


HOSTS = {
    "a1111": Host("a1111", "stable-diffusion-webui", "requirements_versions.txt",
                  drop=("setuptools", "torch"), extra=(SETUPTOOLS,), clip=True,
                  repositories=(("stable-diffusion-stability-ai", "STABLE_DIFFUSION_COMMIT_HASH"),
                                ("generative-models", "STABLE_DIFFUSION_XL_COMMIT_HASH"),
                                ("k-diffusion", "K_DIFFUSION_COMMIT_HASH"),
                                ("BLIP", "BLIP_COMMIT_HASH"),
                                ("stable-diffusion-webui-assets", "ASSETS_COMMIT_HASH"))),
    "forge": Host("forge", "stable-diffusion-webui-forge", "requirements_versions.txt",
                  drop=("setuptools", "torch"), extra=(SETUPTOOLS,), clip=True,
                  repositories=(("huggingface_guess", "HUGGINGFACE_GUESS_HASH"),
                                ("BLIP", "BLIP_COMMIT_HASH"),
                                ("stable-diffusion-webui-assets", "ASSETS_COMMIT_HASH"))),
    # torchvision: guarded (above); torchaudio: a stand-in (`stand_in`), audio nodes only
    "comfyui": Host("comfyui", "ComfyUI", "requirements.txt", drop=("torch", "torchvision", "torchaudio"),
                    stand_ins=(("torchaudio", ("functional", "transforms")),)),
}


class HostUnavailable(RuntimeError):
    """The host's tarball is absent: the caller skips with this message."""


def _run(cmd: list[str], log: Path, **kw) -> None:
    """Run ``cmd``, appending its output to ``log``; a failure raises with the log's tail."""
    with log.open("a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed ({r.returncode}); log {log}:\n{log.read_text()[-3000:]}")


def host_root(name: str) -> Path:
    """``.cache/hosts/<name>/``, the tarball unpacked there on first use (its top folder is ``name``)."""
    host = HOSTS[name]
    if not host.tarball.exists():
        raise HostUnavailable(f"{host.tarball} is absent: the real {name} tests need it (see tests/hosts.py)")
    root = CACHE / name
    marker = root / ".mace-unpacked"
    if marker.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    with tarfile.open(host.tarball) as tar:
        tar.extractall(CACHE, filter="data")
    for folder, _ in host.repositories:
        _commit_once(root / host.app / "repositories" / folder)
    marker.write_text(host.tarball.name)
    return root


def _commit_once(folder: Path) -> None:
    """Make ``folder`` a one-commit git repository: the web UI's launcher insists each of its
    ``repositories/`` is a checkout at a pinned commit (that commit is exported by :func:`launch_env`)."""
    env = {**os.environ, "GIT_AUTHOR_NAME": "mace", "GIT_AUTHOR_EMAIL": "mace@localhost",
           "GIT_COMMITTER_NAME": "mace", "GIT_COMMITTER_EMAIL": "mace@localhost",
           "GIT_AUTHOR_DATE": "2026-01-01T00:00:00Z", "GIT_COMMITTER_DATE": "2026-01-01T00:00:00Z"}
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "--no-gpg-sign", "-m", "as unpacked"]):
        subprocess.run(["git", *args], cwd=folder, env=env, check=True, capture_output=True)


def repository_commits(name: str) -> dict[str, str]:
    """The environment variables naming the commit of each unpacked ``repositories/`` folder."""
    host = HOSTS[name]
    app = host_root(name) / host.app
    return {var: subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=app / "repositories" / folder,
                                         text=True).strip()
            for folder, var in host.repositories}


def requirements_file(name: str) -> Path:
    """The host's requirements file minus ``drop``, written beside its venv (A1111's ``REQS_FILE``)."""
    host = HOSTS[name]
    src = (host_root(name) / host.app / host.requirements).read_text().splitlines()

    def keep(line: str) -> bool:
        req = re.split(r"[=<>~!;\[ #]", line.strip(), maxsplit=1)[0].lower()
        return req not in host.drop

    out = CACHE / f"{name}-requirements.txt"
    out.write_text("".join(l + "\n" for l in src if keep(l)))
    return out


def _recipe(name: str) -> str:
    host = HOSTS[name]
    text = requirements_file(name).read_text()
    parts = [RECIPE, TORCH, TORCHVISION, text, *host.extra, f"clip={host.clip}", sys.version.split()[0]]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def host_venv(name: str, timeout: float = 3600) -> Path:
    """The python of ``.cache/hosts/<name>-venv``, built on first use (log: ``<name>-venv.log``)."""
    host = HOSTS[name]
    root = host_root(name)
    venv = CACHE / f"{name}-venv"
    python = venv / "bin" / "python"
    stamp = venv / "recipe.sha256"
    want = _recipe(name)
    if python.exists() and stamp.exists() and stamp.read_text() == want:
        return python
    shutil.rmtree(venv, ignore_errors=True)
    log = CACHE / f"{name}-venv.log"
    log.write_text("")
    _run([sys.executable, "-m", "venv", str(venv)], log)
    pip = [str(python), "-m", "pip", "install", "--progress-bar", "off"]
    constraint = venv / "torch-constraint.txt"
    constraint.write_text(TORCH + "\n")  # nothing below may move torch
    _run(pip + [TORCH], log, timeout=timeout)
    _run(pip + ["-c", str(constraint), "-r", str(requirements_file(name)), *host.extra], log, timeout=timeout)
    _run(pip + ["--no-deps", TORCHVISION], log, timeout=timeout)
    guard_torchvision(python)
    for package, submodules in host.stand_ins:
        stand_in(python, package, submodules)
    if host.clip:
        # its setup.py imports pkg_resources, which an isolated build's newest setuptools lacks
        _run(pip + ["--no-deps", "--no-build-isolation", str(root / "clip")], log, timeout=timeout)
    _run([str(python), "-c", "import torch, torchvision; print(torch.__version__, torchvision.__version__)"], log)
    stamp.write_text(want)
    return python


def guard_torchvision(python: Path) -> None:
    """Take the two kernel-registration modules out of torchvision's package import and import them
    in a try/except RuntimeError instead (they fail when its CUDA ``_C`` did not load)."""
    site = subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                   text=True).strip()
    init = Path(site) / "torchvision" / "__init__.py"
    text = init.read_text()
    if _GUARDED in text:
        return
    listed = "    _autograd_registrations,\n    _meta_registrations,\n"
    anchor = "from torchvision import (\n" + listed
    if text.count(anchor) != 1:
        raise RuntimeError(f"{init}: the registrations import is not where torchvision 0.28 has it")
    guarded = (_GUARDED + "    from torchvision import _autograd_registrations, _meta_registrations\n"
               "except RuntimeError:\n    pass\nfrom torchvision import (\n")
    init.write_text(text.replace(anchor, guarded))


# --- the model every host loads ---------------------------------------------------------------

def sd15_checkpoint() -> Path:
    """A full-size SD1.5-layout single file with seeded random weights, fp16 (2.1 GB), made once.

    The stock loaders refuse the project's toy sizes; weight values do not matter to them, but they
    must sample finite images (the tiny training run trains on them): every convolution kernel is
    drawn at 1/sqrt(its fan-in), not `random_modules`' 1/sqrt(kernel width), which overflows to NaN
    within a few of the UNet's blocks. Built with the project's own model-building functions
    (`random_modules`, `save_new_checkpoint`)."""
    out = CACHE / "models" / "sd15-random-finite.safetensors"
    if out.is_file():
        return out
    import torch

    from mace_core.model.checkpoint import save_new_checkpoint
    from mace_core.model.families import load_family
    from synthetic import random_modules

    out.parent.mkdir(parents=True, exist_ok=True)
    fam = load_family("sd1")
    unet, vae, tes = random_modules(fam, seed=0)
    with torch.no_grad():
        for m in (unet, vae):
            for p in m.parameters():
                if p.ndim == 4:  # [out, in, k, k], drawn with std 1/sqrt(k)
                    p.mul_((p.shape[-1] / p[0].numel()) ** 0.5)
    tmp = out.with_name(".partial-" + out.name)
    tmp.unlink(missing_ok=True)
    save_new_checkpoint(tmp, fam, unet=unet, vae=vae, text_encoder=tes[0], dtype=torch.float16)
    os.replace(tmp, out)
    return out


def link_model(src: Path, folder: Path) -> Path:
    """``src`` hard-linked (or copied) into a host's model folder, as a user would place it."""
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / src.name
    if not dst.exists():
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
    return dst


def hf_home() -> Path:
    """An offline Hugging Face cache holding what A1111 1.10 asks for when it loads an SD1 model:
    ``openai/clip-vit-large-patch14``'s tokenizer (the project's shipped CLIP BPE files) and a config
    whose text part is SD1's (A1111 builds the text encoder from it, then loads the file's weights)."""
    from mace_core.model.families import load_family

    home = CACHE / "hf-home"
    repo = home / "hub" / "models--openai--clip-vit-large-patch14"
    snap = repo / "snapshots" / ("0" * 40)
    if (repo / "refs" / "main").is_file():
        return home
    snap.mkdir(parents=True, exist_ok=True)
    tok = REPO / "shared" / "mace_core" / "data" / "clip_tokenizer"
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(tok / name, snap / name)
    text = dict(load_family("sd1").text_encoders[0].config)
    (snap / "config.json").write_text(json.dumps({
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 768,
        "text_config": {**text, "model_type": "clip_text_model", "bos_token_id": 0, "eos_token_id": 2,
                        "pad_token_id": 1},
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                          "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14, "image_size": 224,
                          "projection_dim": 768, "hidden_act": "quick_gelu"}}, indent=1))
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    (snap / "special_tokens_map.json").write_text(json.dumps(special))
    (snap / "tokenizer_config.json").write_text(json.dumps({**special, "model_max_length": 77,
                                                            "do_lower_case": True,
                                                            "tokenizer_class": "CLIPTokenizer"}))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(snap.name)
    return home


# --- running a host ---------------------------------------------------------------------------

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, payload: dict | None = None, timeout: float = 600, method: str | None = None):
    """GET (or POST ``payload`` as JSON) and decode the JSON answer."""
    import urllib.request

    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        body = r.read()
    return json.loads(body) if body else None


class Server:
    """A host application running as its own process (its own venv, its folder as the cwd)."""

    def __init__(self, name: str, cmd: list[str], cwd: Path, env: dict, log: Path, url: str, ready: str,
                 started: str = ""):
        self.name, self.url, self.log, self.started = name, url, log, started
        log.parent.mkdir(parents=True, exist_ok=True)
        self._out = log.open("w")
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=self._out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.ready_path = ready

    def wait_ready(self, timeout: float) -> float:
        """Seconds until ``ready_path`` answers 200; raises with the log's tail when it does not. With
        ``started``, nothing is asked before that line is in the log: A1111 and Forge add their API's
        middleware after the server is up, and a request in between makes starlette refuse it
        ("Cannot add middleware after an application has started": the web UI exits)."""
        import time
        import urllib.request

        t0 = time.time()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.tail()}")
            if time.time() - t0 > timeout:
                raise RuntimeError(f"{self.name} did not answer on {self.url} in {timeout:.0f} s:\n{self.tail()}")
            if self.started and self.started not in self.tail(10 ** 7):
                time.sleep(1)
                continue
            try:
                with urllib.request.urlopen(self.url + self.ready_path, timeout=10) as r:
                    if r.status == 200:
                        return time.time() - t0
            except OSError:
                pass
            time.sleep(1)

    def tail(self, n: int = 4000) -> str:
        self._out.flush()
        return self.log.read_text(errors="replace")[-n:]

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._out.close()


def base_env(threads: int) -> dict:
    """The environment every host runs with: offline, ``threads`` torch threads, no telemetry."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    n = str(threads)
    return {**keep, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "GRADIO_ANALYTICS_ENABLED": "False", "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1"}


def webui_app(name: str) -> Path:
    return host_root(name) / HOSTS[name].app


def install_extension(app: Path, folder: str) -> Path:
    """This repository as ``<app>/<folder>/mace`` (a symlink, as a ``git clone`` there would be)."""
    dst = app / folder / "mace"
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        if dst.resolve() == REPO:
            return dst
        dst.unlink()
    dst.symlink_to(REPO, target_is_directory=True)
    return dst


def start_webui(name: str, port: int, threads: int, log: Path, extra_args: tuple[str, ...] = ()) -> Server:
    """A1111 or Forge as a user launches it (``launch.py``), with the repository as an extension.

    A1111 runs its full environment preparation (so the extension's ``install.py`` runs through its
    ``launch.run_pip``); Forge runs with ``--skip-install`` (its built-in preprocessor installer moves
    numpy to 2.x, after which Forge cannot start: see ../shared/hosts/README.md)."""
    python = host_venv(name)
    app = webui_app(name)
    install_extension(app, "extensions")
    env = {**base_env(threads), **repository_commits(name), "REQS_FILE": str(requirements_file(name)),
           "HF_HOME": str(hf_home()), "VIRTUAL_ENV": str(python.parent.parent),
           "PATH": f"{python.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    common = ["--skip-torch-cuda-test", "--skip-version-check", "--port", str(port), "--api",
              "--disable-nan-check"]
    if name == "a1111":
        args = ["--use-cpu", "all", "--no-half", "--precision", "full", "--no-download-sd-model"]
    else:
        args = ["--always-cpu", "--all-in-fp32", "--skip-install"]
    cmd = [str(python), "launch.py", *common, *args, *extra_args]
    return Server(name, cmd, app, env, log, f"http://127.0.0.1:{port}", "/sdapi/v1/sd-models", "Startup time:")


def start_comfyui(port: int, threads: int, log: Path) -> Server:
    """ComfyUI's server (``main.py``) with the repository in ``custom_nodes/``."""
    python = host_venv("comfyui")
    app = webui_app("comfyui")
    install_extension(app, "custom_nodes")
    env = {**base_env(threads), "VIRTUAL_ENV": str(python.parent.parent)}
    cmd = [str(python), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch"]
    return Server("comfyui", cmd, app, env, log, f"http://127.0.0.1:{port}", "/object_info")


_STAND_IN = '''"""Test stand-in (tests/hosts.py): the real package has no build for this CPU torch."""


def __getattr__(name):
    raise RuntimeError(f"{__name__}.{name}: a test stand-in (tests/hosts.py); the real package is not installed")
'''


def stand_in(python: Path, package: str, submodules: tuple[str, ...]) -> None:
    """An importable ``package`` (and ``package.<sub>``) whose every attribute raises: ComfyUI imports
    torchaudio at module level for its audio models, and no torchaudio build loads beside the CPU
    torch 2.13.0 (PyPI's newest, 2.11.1, fails on its ``_torchaudio.so``)."""
    site = subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                   text=True).strip()
    folder = Path(site) / package
    folder.mkdir(exist_ok=True)
    for name in ("__init__", *submodules):
        (folder / f"{name}.py").write_text(_STAND_IN)


def template_thumbnail(url: str, workflow: Path, out: Path, side: int = 768) -> Path:
    """``example_workflows/<name>.jpg``, the templates browser's card: the workflow's group as
    ComfyUI's frontend draws it at ``url`` (node errors cleared: the template's model is not there)."""
    from PIL import Image
    from playwright.sync_api import sync_playwright

    wf = json.loads(workflow.read_text())
    png = out.with_suffix(".png")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=["--no-sandbox", "--disable-gpu"])
        page = b.new_page(viewport={"width": 2600, "height": 1800})  # fit at ~100%: text drawn, not blocks
        page.goto(url, wait_until="domcontentloaded", timeout=180_000)
        page.wait_for_function("() => window.app && window.app.graph", timeout=180_000)
        page.keyboard.press("Escape")  # the templates dialog of a first visit
        page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", wf)
        page.keyboard.press("Escape")
        page.evaluate("() => { for (const n of window.app.graph._nodes) n.has_errors = false;"
                      " window.app.canvas.setDirty(true, true);"
                      " window.app.extensionManager.command.execute('Comfy.Canvas.FitView'); }")
        page.add_style_tag(content=".p-toast, .minimap-main-container {display: none !important}")
        page.wait_for_timeout(1000)
        clip = page.evaluate("""() => { const ds = window.app.canvas.ds, g = window.app.graph._groups[0];
            const [x, y, w, h] = g._bounding || g.bounding;
            const c = document.querySelector('#graph-canvas').getBoundingClientRect();
            return {x: c.left + (x + ds.offset[0]) * ds.scale, y: c.top + (y + ds.offset[1]) * ds.scale,
                    width: w * ds.scale, height: h * ds.scale}; }""")
        page.screenshot(path=str(png), clip=clip)
        b.close()
    im = Image.open(png).convert("RGB")
    png.unlink()
    im.thumbnail((side, side))
    im.save(out, quality=85)
    return out


if __name__ == "__main__":
    if sys.argv[1:2] == ["thumbnail"]:  # python tests/hosts.py thumbnail URL WORKFLOW.json (a running ComfyUI)
        wf = Path(sys.argv[3])
        print(template_thumbnail(sys.argv[2], wf, wf.with_suffix(".jpg")))
        sys.exit()
    for n in sys.argv[1:] or list(HOSTS):
        try:
            print(n, host_venv(n), flush=True)
        except HostUnavailable as e:
            print(n, "skipped:", e, flush=True)
