"""The real host applications, offline, as a user runs them (tests/hosts.py builds and starts them).

- AUTOMATIC1111 1.10.1 launched with its full environment preparation, so this repository's
  ``install.py`` runs through A1111's own ``launch.run_pip`` (diffusers installed, no stray file);
  Forge f2.0.1 with ``--skip-install``. In both the MACE tab is driven in Debian's Chromium: the
  Checkpoint dropdown shows the loaded model, Erase (closed form; in A1111 also a tiny training
  run) writes the same tensors as ``mace erase`` of the same file run by the host's own Python, "Load the new checkpoint" makes the web UI
  generate with the erased model (txt2img through its API: the infotext names the model that
  actually sampled), and the first use of an erasure (the general prior) reports progress and
  stops on Interrupt. Screenshots: ``test-artifacts/<host>-tab.png``.
- ComfyUI 0.33.0's server with its frontend package: the example workflow loads in Chromium with
  no missing node and no node covering another; the closed-form graph and the staged graph run
  through ``/prompt`` with progress on ``/ws``. Screenshot: ``test-artifacts/comfyui-template.png``.

The model is a full-size SD1.5-layout checkpoint with random weights (fp16), made once. Its
images are NaN (black), so what sampled is read from the host's infotext, not from pixels.
Each host is skipped, with the reason, only where its tarball in ../shared/hosts is absent.
Timings of every step are written to ``test-artifacts/hosts-timings.json``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hosts  # noqa: E402

REPO = hosts.REPO
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
THREADS = 1  # the hosts and the reference CLI run on one torch thread each: same arithmetic, bit for bit
CONCEPT = "cat"
# a tiny training run on the full-size model: 1 image of 2 sampling steps, 2 LoRA steps; the general
# prior off (its first computation is what test_*_first_use_* covers) and the default protection off
# (80 common objects x 30 templates: 2,400 encodings, 7-15 min of one CPU thread per run, the same
# code in every host), and so is the synonym search (104 full-size UNet passes, minutes on one thread)
CLOSED = {"prior": "0", "fuse_prior": "0", "protection": "none", "synonyms": "none"}
TRAINED = {**CLOSED, "steps": "2", "images": "1", "sample_steps": "2"}
TIMINGS: dict[str, float] = {}


def _timed(key: str, t0: float) -> float:
    return _record(key, time.time() - t0)


def _record(key: str, seconds: float) -> float:
    TIMINGS[key] = round(seconds, 1)
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / "hosts-timings.json"
    try:  # several host tests may run at once (pytest -n, or by hand): merge, write atomically
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = {}
    tmp = path.with_name(f".{os.getpid()}-{path.name}")
    tmp.write_text(json.dumps({**old, **TIMINGS}, indent=1, sort_keys=True))
    os.replace(tmp, path)
    return TIMINGS[key]


def _need(name: str) -> None:
    # a quick local run may leave them out; CI runs them (.ci/run does not set it)
    if os.environ.get("MACE_REAL_HOSTS") == "0":
        pytest.skip(f"MACE_REAL_HOSTS=0: the real {name} is not tested")
    if not hosts.HOSTS[name].tarball.exists():
        pytest.skip(f"{hosts.HOSTS[name].tarball} is absent: the real {name} is not tested")
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does it)")


def _code_key(how: str) -> str:
    """A hash of the core's code and data and of ``how`` the reference is made: a cached reference is
    recomputed when any of them changes."""
    import hashlib

    h = hashlib.sha256(how.encode())
    core = REPO / "shared" / "mace_core"
    for f in sorted(p for p in core.rglob("*") if p.suffix in (".py", ".yaml", ".json", ".txt")):
        h.update(f.relative_to(core).as_posix().encode() + f.read_bytes())
    return h.hexdigest()[:16]


def reference(ui: "WebUI", name: str, settings: dict[str, str], closed_form_only: bool) -> Path:
    """``mace erase`` of the host's model, run by the host's own Python (its torch, transformers and
    diffusers: A1111's transformers 4.30.2 computes CLIP's attention with other kernels than the dev
    venv's 5.23.0, which moves some fp32 results by an ulp, one fp16 ulp after rounding), one thread
    like the host; cached per core version beside the model as a delta (`_delta`): a few MB, where
    whole 2 GB references and the hosts' outputs filled CI's disk."""
    model = hosts.sd15_checkpoint()
    how = json.dumps([model.name, settings, closed_form_only], sort_keys=True)  # and what it was run on
    out = model.parent / "reference" / f"{ui.name}-{name}-{_code_key(how)}.safetensors"
    if out.is_file():
        return out
    out.parent.mkdir(exist_ok=True)
    full = out.with_name(".full-" + out.name)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
    cmd = [str(hosts.host_venv(ui.name)), "-m", "mace_core", "erase", str(model), "--concept", CONCEPT, "--out",
           str(full), "--force", "--device", "cpu", *flags] + (["--closed-form-only"] if closed_form_only else [])
    env = {**hosts.base_env(THREADS), "PYTHONPATH": str(REPO / "shared")}
    t0 = time.time()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    _timed(f"{ui.name}_cli_{name}_s", t0)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    try:
        _delta(full, model, out)
    finally:
        for f in full.parent.glob(full.name + "*"):  # the checkpoint and the CLI's project folder
            shutil.rmtree(f) if f.is_dir() else f.unlink()
    return out


def _delta(full: Path, model: Path, out: Path) -> None:
    """Writes to ``out`` the tensors of checkpoint ``full`` that differ from ``model``'s (in dtype or
    any bit), with ``full``'s key list in its metadata: ``model`` plus the delta is ``full``."""
    from safetensors import safe_open

    from mace_core.files import save_tensors

    with safe_open(str(full), "pt") as ff, safe_open(str(model), "pt") as fm:
        base = set(fm.keys())
        changed = {}
        for k in ff.keys():
            x = ff.get_tensor(k)
            if k not in base or x.dtype != (y := fm.get_tensor(k)).dtype or not x.equal(y):
                changed[k] = x
        keys = sorted(ff.keys())
    save_tensors(out, changed, metadata={"keys": json.dumps(keys)})


def differences(out: Path, ref: Path) -> list[str]:
    """What differs between checkpoint ``out``'s tensors and the reference's (the host's model with
    delta ``ref``, `reference`): names, dtypes, values; empty when bit-identical."""
    from safetensors import safe_open

    found = []
    with safe_open(str(out), "pt") as fo, safe_open(str(ref), "pt") as fr, \
            safe_open(str(hosts.sd15_checkpoint()), "pt") as fm:
        ko, kr = set(fo.keys()), set(json.loads(fr.metadata()["keys"]))
        if ko != kr:
            found.append(f"keys: {len(ko - kr)} only in {out.name}, {len(kr - ko)} only in the reference")
        changed = set(fr.keys())
        for k in sorted(ko & kr):
            x, y = fo.get_tensor(k), (fr if k in changed else fm).get_tensor(k)
            if x.dtype != y.dtype:
                found.append(f"{k}: {x.dtype} vs {y.dtype}")
            elif not x.equal(y):
                found.append(f"{k}: max |diff| {(x.double() - y.double()).abs().max().item():.3g}")
    return found


# --- the browser ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")  # never fetch a browser build
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                               args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                     "--disable-component-update", "--no-first-run"])
        yield b
        b.close()


def _page(browser, url: str):
    """A page that may reach nothing but the host (no fonts, CDNs or telemetry)."""
    page = browser.new_page(viewport={"width": 1400, "height": 1100})

    def local_only(route):
        if route.request.url.startswith(("http://127.0.0.1", "data:", "blob:", "ws://127.0.0.1")):
            route.continue_()
        else:
            route.abort()

    page.route("**/*", local_only)
    page.goto(url, wait_until="domcontentloaded", timeout=180_000)
    return page


def _box(page, elem_id: str):
    return page.locator(f"#{elem_id}").locator("textarea, input").first


def _status(page, want: tuple[str, ...], timeout: float, elem: str = "mace_status", old: str = "") -> str:
    """The text of ``elem`` once it differs from ``old`` and shows one of ``want`` (or an error)."""
    deadline = time.time() + timeout
    text = ""
    while time.time() < deadline:
        text = page.locator(f"#{elem}").first.inner_text()
        if text != old and (any(w in text for w in want) or "rror" in text):
            return text
        time.sleep(0.5)
    return text


# --- A1111 and Forge ------------------------------------------------------------------------------

class WebUI:
    def __init__(self, name: str, server: hosts.Server, model_title: str):
        self.name, self.server, self.model_title = name, server, model_title
        self.app = hosts.webui_app(name)
        self.ckpt_dir = self.app / "models" / "Stable-diffusion"

    def api(self, path: str, payload: dict | None = None):
        return hosts.http_json(self.server.url + path, payload)

    def txt2img(self) -> dict:
        """One 64x64, 2-step image; the infotext of what sampled it."""
        r = self.api("/sdapi/v1/txt2img", {"prompt": f"a photo of a {CONCEPT}", "steps": 2, "width": 64,
                                           "height": 64, "seed": 1, "sampler_name": "Euler"})
        return json.loads(r["info"])


def _start_webui(name: str):
    _need(name)  # before the model is made: a host without its tarball costs nothing
    sd15 = hosts.sd15_checkpoint()
    t0 = time.time()
    python = hosts.host_venv(name)
    _timed(f"{name}_venv_s", t0)
    if name == "a1111":  # a fresh install of the extension: what its install.py installs is not there yet
        subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", "diffusers"], check=True,
                       capture_output=True)
    app = hosts.webui_app(name)
    ckpt_dir = app / "models" / "Stable-diffusion"
    # a fresh user: no settings, only the base model, no earlier outputs or projects
    for stale in ("config.json", "ui-config.json"):
        (app / stale).unlink(missing_ok=True)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    shutil.rmtree(app / "models" / "mace", ignore_errors=True)
    hosts.link_model(sd15, ckpt_dir)
    t0 = time.time()
    server = hosts.start_webui(name, hosts.free_port(), THREADS, ARTIFACTS / f"{name}.log")
    try:
        server.wait_ready(1800)
        _timed(f"{name}_launch_s", t0)
        # the model loads in the background after the UI is up: wait until it is in
        deadline = time.time() + 600
        while time.time() < deadline:
            title = hosts.http_json(server.url + "/sdapi/v1/options").get("sd_model_checkpoint")
            if name == "forge" or (title and "[" in title):
                break
            time.sleep(2)
        return WebUI(name, server, title)
    except BaseException:
        server.stop()
        raise


def _stop_webui(ui: WebUI) -> None:
    """Stops the server and removes what it wrote into its models folders: 2 GB per erased checkpoint."""
    ui.server.stop()
    shutil.rmtree(ui.ckpt_dir, ignore_errors=True)  # the base model in it is a hard link
    shutil.rmtree(ui.app / "models" / "mace", ignore_errors=True)


@pytest.fixture(scope="class")
def a1111():
    ui = _start_webui("a1111")
    yield ui
    _stop_webui(ui)


@pytest.fixture(scope="class")
def forge():
    ui = _start_webui("forge")
    yield ui
    _stop_webui(ui)


def _open_tab(browser, ui: WebUI):
    page = _page(browser, ui.server.url + "/")
    page.locator("#mace_concepts").wait_for(state="attached", timeout=180_000)
    page.locator("#tabs button", has_text=re.compile(r"^\s*MACE\s*$")).first.click()
    _box(page, "mace_concepts").wait_for(timeout=60_000)
    return page


def _fill(page, concept: str, out_name: str, settings: dict[str, str], closed_form_only: bool) -> None:
    _box(page, "mace_concepts").fill(concept)
    _box(page, "mace_out_name").fill(out_name)
    closed = page.locator("#mace_closed_form input")
    closed.check() if closed_form_only else closed.uncheck()
    page.locator("#mace_previews input").uncheck()  # previews are sampled at 512 px: minutes on a CPU
    if not _box(page, "mace_prior").is_visible():
        page.get_by_text("Advanced settings").first.click()
    for key in ("steps", "images", "sample_steps", "prior", "fuse_prior", "protection", "synonyms"):
        _box(page, f"mace_{key}").fill(settings.get(key, ""))


def _erase(page, ui: WebUI, out_name: str, settings: dict[str, str], closed: bool, timeout: float) -> Path:
    _fill(page, CONCEPT, out_name, settings, closed)
    want = ui.ckpt_dir / f"{out_name}.safetensors"
    t0 = time.time()
    page.locator("#mace_erase").click()
    # done when the output box shows this run's file (the status keeps the last run's text meanwhile,
    # and gradio draws its progress over it) or the status turns to an error
    deadline = time.time() + timeout
    while time.time() < deadline:
        # generous timeouts: a page starved of CPU by the run answers slowly
        shown = _box(page, "mace_output_path").input_value(timeout=300_000)
        if (shown and Path(shown).resolve() == want.resolve()) or "Error" in page.locator(
                "#mace_status").first.inner_text(timeout=300_000):
            break
        time.sleep(1)
    _timed(f"{ui.name}_erase_{'closed' if closed else 'trained'}_s", t0)
    status = page.locator("#mace_status").first.inner_text()
    assert "Wrote" in status and want.is_file(), f"status: {status!r}\n{ui.server.tail()}"
    return want


def _check_tab_and_erase(browser, ui: WebUI, trained: bool):
    """The tab's defaults, then the closed-form erasure and (``trained``) the tiny training run, each
    equal bit for bit to `reference`; returns (page, the last output)."""
    page = _open_tab(browser, ui)
    # the dropdown defaults to the model the web UI has loaded (it used to start empty)
    assert page.locator("#mace_checkpoint input").first.input_value() == ui.model_title
    # an empty field's placeholder is the type's default, as the line above the fields states it
    # (lam's said "e.g. 100" and lr's "e.g. 1e-4" beside other defaults)
    page.get_by_text("Advanced settings").first.click()
    defaults = page.locator("#mace_defaults").first.inner_text()
    for key in ("lam", "lr", "steps"):
        stated = re.search(rf"\b{key} ([^,]+),", defaults)
        assert stated, (key, defaults)
        assert _box(page, f"mace_{key}").get_attribute("placeholder") == f"default: {stated.group(1)}", defaults

    out = _erase(page, ui, f"{ui.name}-closed", CLOSED, True, 1800)
    page.screenshot(path=str(ARTIFACTS / f"{ui.name}-tab.png"), full_page=True)
    assert differences(out, reference(ui, "closed", CLOSED, True)) == []
    if trained:
        out.unlink()  # 2 GB that nothing uses any more
        out = _erase(page, ui, f"{ui.name}-trained", TRAINED, False, 3600)
        assert differences(out, reference(ui, "trained", TRAINED, False)) == []
    return page, out


def _check_load(page, ui: WebUI, erased: Path) -> None:
    before = ui.txt2img()
    assert before["sd_model_name"] == Path(ui.model_title.split(" [")[0]).stem, before
    shown = page.locator("#mace_status").first.inner_text()
    page.locator("#mace_load").click()
    status = _status(page, ("Selected",), 300, old=shown)
    assert "Selected" in status, f"status: {status!r}\n{ui.server.tail()}"
    t0 = time.time()
    after = ui.txt2img()  # Forge loads the selected model for its next generation
    _timed(f"{ui.name}_txt2img_after_load_s", t0)
    # the infotext names the model object that sampled (shared.sd_model), not the option's value
    assert after["sd_model_name"] == erased.stem, (after, ui.server.tail())
    from mace_core.model.checkpoint import file_sha256

    assert after["sd_model_hash"] == file_sha256(erased)[:10], after
    # and the web UI's own way back to the base model still works (Forge refused it after the old Load)
    ui.api("/sdapi/v1/options", {"sd_model_checkpoint": ui.model_title})
    assert ui.txt2img()["sd_model_name"] == before["sd_model_name"]


def _check_tab_erase_and_load(browser, ui: WebUI, trained: bool) -> None:
    """`_check_tab_and_erase`, then "Load" of its last output (`_check_load`)."""
    page, out = _check_tab_and_erase(browser, ui, trained)
    try:
        _check_load(page, ui, out)
    finally:
        page.close()


def _first_use(browser, ui: WebUI) -> None:
    """Closed-form only, a type whose defaults use the general prior, on a text encoder the host has
    no prior for: the progress names the prior from the start, the estimate counts it, and the
    Interrupt button stops it within seconds, writing nothing."""
    page = _open_tab(browser, ui)
    try:
        prior_dir = ui.app / "models" / "mace" / "prior"
        shutil.rmtree(prior_dir, ignore_errors=True)
        _fill(page, "Tom Cruise", f"{ui.name}-first-use", {"synonyms": "none"}, True)  # the prior first
        page.locator("#mace_type input").first.fill("celebrity")
        page.keyboard.press("Enter")
        page.locator("#mace_estimate").click()
        est = _status(page, ("stimate",), 600, elem="mace_estimate_info")
        assert "general prior" in est, est
        t0 = time.time()
        page.locator("#mace_erase").click()
        deadline = time.time() + 600
        label = ""
        # the progress label, PRIOR_LABEL (the estimate above says "the general prior, first use ...")
        from mace_core.method.prior import PRIOR_LABEL

        while time.time() < deadline:
            label = page.locator("body").inner_text()
            if PRIOR_LABEL in label:
                break
            time.sleep(0.5)
        _timed(f"{ui.name}_first_use_progress_after_s", t0)
        if PRIOR_LABEL not in label:
            page.screenshot(path=str(ARTIFACTS / f"{ui.name}-first-use.png"), full_page=True)
        assert PRIOR_LABEL in label, f"the page shows: {label[-1500:]}\n{ui.server.tail()}"
        time.sleep(3)  # a few batches in
        t1 = time.time()
        before = page.locator("#mace_status").first.inner_text()
        page.locator("#mace_interrupt").click()
        status = _status(page, ("Interrupted",), 120, old=before)
        stopped = _timed(f"{ui.name}_interrupt_s", t1)
        assert "Interrupted" in status, status
        assert stopped < 60, stopped  # one batch of captions, not the whole prior
        assert not (ui.ckpt_dir / f"{ui.name}-first-use.safetensors").exists()
    finally:
        page.close()


class TestA1111:
    """A1111's tests, with its server for this class only: one host runs at a time (each holds ~8 GB)."""

    def test_a1111_fresh_install_tab_matches_the_cli_and_load_switches_the_model(self, a1111, browser):
        app = a1111.app
        # install.py ran through A1111's launch.run_pip: diffusers is there, and no shell redirection
        # left a file such as '=0.27' in the web UI's root
        py = hosts.host_venv("a1111")
        r = subprocess.run([str(py), "-c", "import diffusers; print(diffusers.__version__)"], capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stderr[-1000:]
        assert "Installing mace requirements" in a1111.server.tail(200_000)
        stray = [p.name for p in app.iterdir() if re.match(r"^[=<>]", p.name)]
        assert not stray, stray

        # A1111 erases its loaded copy of the file, in fp32 (--no-half): the CLI's result, bit for bit
        _check_tab_erase_and_load(browser, a1111, trained=True)

    def test_a1111_first_use_prior_shows_progress_and_stops_on_interrupt(self, a1111, browser):
        _first_use(browser, a1111)


class TestForge:
    """Forge's tests, with its server for this class only."""

    def test_forge_tab_matches_the_cli_and_load_switches_the_model(self, forge, browser):
        # Forge is served from the file (see sd_webui_extension/a1111.py), read in fp32 on the CPU: the CLI's
        # arithmetic, bit for bit (the training path is A1111's test: the same code, minutes of CPU each)
        _check_tab_erase_and_load(browser, forge, trained=False)

    def test_forge_first_use_prior_shows_progress_and_stops_on_interrupt(self, forge, browser):
        _first_use(browser, forge)


# --- ComfyUI ------------------------------------------------------------------------------------------

TEMPLATE = "MACE - erase celebrities"


@pytest.fixture(scope="class")
def comfy():
    _need("comfyui")
    sd15 = hosts.sd15_checkpoint()
    t0 = time.time()
    hosts.host_venv("comfyui")
    _timed("comfyui_venv_s", t0)
    app = hosts.webui_app("comfyui")
    shutil.rmtree(app / "models" / "checkpoints", ignore_errors=True)
    shutil.rmtree(app / "output", ignore_errors=True)
    shutil.rmtree(app / "models" / "mace", ignore_errors=True)
    hosts.link_model(sd15, app / "models" / "checkpoints")
    t0 = time.time()
    server = hosts.start_comfyui(hosts.free_port(), THREADS, ARTIFACTS / "comfyui.log")
    try:
        server.wait_ready(900)
        _timed("comfyui_launch_s", t0)
        yield server
    finally:
        server.stop()
        shutil.rmtree(app / "output", ignore_errors=True)  # 2 GB per erased checkpoint
        shutil.rmtree(app / "models" / "mace", ignore_errors=True)


def _api_node(info: dict, cls: str, **given) -> dict:
    """An API-format node of ``cls``: ``given`` inputs, every other required widget at its default
    (a list input: its first choice), as the server's ``/object_info`` describes them."""
    inputs = dict(given)
    for name, spec in info[cls]["input"].get("required", {}).items():
        if name in inputs:
            continue
        kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
        if isinstance(kind, list):
            inputs[name] = opts.get("default", kind[0])
        elif "default" in opts:
            inputs[name] = opts["default"]
    return {"class_type": cls, "inputs": inputs}


def _queue(server: hosts.Server, graph: dict, timeout: float,
           on_message: Callable[[dict], None] | None = None) -> tuple[str, list[dict]]:
    """Submit ``graph`` to ``/prompt`` and read ``/ws`` until it finishes: (prompt id, the messages);
    ``on_message`` sees each message as it arrives."""
    import asyncio
    import uuid

    import aiohttp

    client = uuid.uuid4().hex

    async def go():
        msgs: list[dict] = []
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(f"{server.url.replace('http', 'ws')}/ws?clientId={client}") as ws:
                async with s.post(f"{server.url}/prompt", json={"prompt": graph, "client_id": client}) as r:
                    body = await r.json()
                    assert r.status == 200, body
                pid = body["prompt_id"]
                while True:
                    m = await ws.receive(timeout=timeout)
                    if m.type != aiohttp.WSMsgType.TEXT:
                        continue  # binary: preview images
                    d = json.loads(m.data)
                    msgs.append(d)
                    if on_message is not None:
                        on_message(d)
                    data = d.get("data", {})
                    if data.get("prompt_id") == pid and d["type"] in ("execution_success", "execution_error",
                                                                        "execution_interrupted"):
                        return pid, msgs
    # in a thread of its own: Playwright's sync API keeps an event loop running in this one
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, go()).result()


def _finished(msgs: list[dict]) -> str:
    last = msgs[-1]
    return last["type"] + ("" if last["type"] == "execution_success" else f": {json.dumps(last['data'])[:2000]}")


class TestComfyUI:
    """ComfyUI's tests, with its server for this class only."""

    def test_comfyui_template_loads_with_no_missing_node_and_no_covered_widget(self, comfy, browser):
        import urllib.parse

        info = hosts.http_json(comfy.url + "/object_info")
        assert {"MACELoadConcepts", "MACEEraseConcepts", "MACESaveCheckpoint"} <= set(info)
        # the templates browser lists it under EXTENSIONS -> mace, titled by its file name, with a thumbnail
        listed = hosts.http_json(comfy.url + "/api/workflow_templates")
        assert TEMPLATE in listed.get("mace", []), listed
        base = f"{comfy.url}/api/workflow_templates/mace/{urllib.parse.quote(TEMPLATE)}"
        workflow = hosts.http_json(base + ".json")
        import urllib.request

        with urllib.request.urlopen(base + ".jpg", timeout=30) as r:
            assert r.status == 200 and r.read(3) == b"\xff\xd8\xff"  # a JPEG
        page = _page(browser, comfy.url + "/")
        try:
            page.wait_for_function("() => window.app && window.app.graph", timeout=180_000)
            page.keyboard.press("Escape")  # the templates dialog a first visit opens
            nodes = page.evaluate("""async (wf) => {
                await window.app.loadGraphData(wf);
                const th = window.LiteGraph.NODE_TITLE_HEIGHT;
                return window.app.graph._nodes.map(n => ({id: n.id, type: n.type, title: n.title,
                    registered: !!window.LiteGraph.registered_node_types[n.type],
                    box: [n.pos[0], n.pos[1] - th, n.size[0], n.size[1] + th],
                    widgets: (n.widgets || []).length}));
            }""", workflow)
            page.wait_for_timeout(1000)
            page.screenshot(path=str(ARTIFACTS / "comfyui-template.png"))
        finally:
            page.close()
        missing = [n["type"] for n in nodes if not n["registered"]]
        assert not missing, missing
        covered = []
        for i, a in enumerate(nodes):
            for b in nodes[i + 1:]:
                (ax, ay, aw, ah), (bx, by, bw, bh) = a["box"], b["box"]
                if ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah:
                    covered.append(f"{a['title']} / {b['title']}")
        assert not covered, covered  # e.g. Train LoRAs' widgets under the Prompt node

    def test_comfyui_closed_form_and_staged_graphs_run_with_progress(self, comfy, browser):
        info = hosts.http_json(comfy.url + "/object_info")
        ckpt = hosts.sd15_checkpoint().name
        load = _api_node(info, "CheckpointLoaderSimple", ckpt_name=ckpt)
        closed = {
            "1": load,
            "2": _api_node(info, "MACELoadConcepts", concepts=CONCEPT, default_type="object", preset="none",
                           retain="", project="closed"),
            "3": _api_node(info, "MACEEraseConcepts", model=["1", 0], clip=["1", 1], vae=["1", 2], concepts=["2", 0],
                           closed_form_only=True, protection="none", synonyms="none"),
            "4": _api_node(info, "MACESaveCheckpoint", model=["3", 0], clip=["1", 1], vae=["1", 2],
                           filename_prefix="checkpoints/comfyui-closed"),
        }
        t0 = time.time()
        _, msgs = _queue(comfy, closed, 1800)
        _timed("comfyui_closed_form_graph_s", t0)
        assert msgs[-1]["type"] == "execution_success", _finished(msgs)
        ran = {m["data"].get("node") for m in msgs if m["type"] == "executing"}
        assert {"1", "2", "3", "4"} <= ran

        # the staged graph: the template itself as the frontend queues it, made tiny (one concept, one
        # 64 px image of 2 steps, 2 LoRA steps, 1 sampling step)
        workflow = hosts.http_json(f"{comfy.url}/api/workflow_templates/mace/{TEMPLATE.replace(' ', '%20')}.json")
        page = _page(browser, comfy.url + "/")
        try:
            page.wait_for_function("() => window.app && window.app.graph", timeout=180_000)
            staged = page.evaluate("""async ([wf, ckpt, concept]) => {
                await window.app.loadGraphData(wf);
                const set = {ckpt_name: ckpt, concepts: concept, default_type: "object", retain: "", project: "staged",
                             steps: 2, images: 1, sample_steps: 2, resolution: 64, width: 64, height: 64, preset: "none",
                             protection: "none", synonyms: "none"};
                for (const n of window.app.graph._nodes) {
                    for (const w of (n.widgets || [])) {
                        if (n.type === "KSampler" && w.name === "steps") { w.value = 1; continue; }
                        if (w.name in set) w.value = set[w.name];
                    }
                }
                return (await window.app.graphToPrompt()).output;
            }""", [workflow, ckpt, CONCEPT])
        finally:
            page.close()
        t0 = time.time()
        _, msgs = _queue(comfy, staged, 2400)
        _timed("comfyui_staged_graph_s", t0)
        assert msgs[-1]["type"] == "execution_success", _finished(msgs)
        progress = [m["data"] for m in msgs if m["type"] == "progress"]
        trained = [p for p in progress if staged.get(str(p.get("node")), {}).get("class_type") == "MACETrainLoRAs"]
        assert trained and trained[-1]["value"] == trained[-1]["max"], progress  # the bar reached its end
        saved = list((hosts.webui_app("comfyui") / "output" / "checkpoints").glob("comfyui-closed*.safetensors"))
        assert saved, "the closed-form graph wrote no checkpoint"

    def test_comfyui_first_use_prior_shows_progress_and_stops_on_interrupt(self, comfy):
        """Closed-form only on a celebrity (the type's defaults use the general prior) with no prior kept
        yet: the one-shot node's progress is on /ws from its start, and ComfyUI's Interrupt (POST
        /interrupt, the frontend's cancel button) ends the prompt within a minute, writing nothing."""
        info = hosts.http_json(comfy.url + "/object_info")
        prior_dir = hosts.webui_app("comfyui") / "models" / "mace" / "prior"
        shutil.rmtree(prior_dir, ignore_errors=True)
        graph = {
            "1": _api_node(info, "CheckpointLoaderSimple", ckpt_name=hosts.sd15_checkpoint().name),
            "2": _api_node(info, "MACELoadConcepts", concepts="Tom Cruise", default_type="celebrity", preset="none",
                           retain="", project="first-use"),
            "3": _api_node(info, "MACEEraseConcepts", model=["1", 0], clip=["1", 1], vae=["1", 2], concepts=["2", 0],
                           closed_form_only=True, synonyms="none"),  # the prior first
            "4": _api_node(info, "MACESaveCheckpoint", model=["3", 0], clip=["1", 1], vae=["1", 2],
                           filename_prefix="checkpoints/comfyui-first-use"),
        }
        seen: dict[str, float] = {}

        def on_message(d: dict) -> None:
            data = d.get("data", {})
            if d["type"] == "executing" and data.get("node") == "3":
                seen.setdefault("started", time.time())
            if d["type"] == "progress" and data.get("node") == "3":
                seen.setdefault("progress", time.time())
                if time.time() - seen["progress"] > 3 and "interrupt" not in seen:  # a few batches in
                    seen["interrupt"] = time.time()
                    hosts.http_json(comfy.url + "/interrupt", {})
            if d["type"] == "execution_interrupted":
                seen["stopped"] = time.time()

        _queue(comfy, graph, 1800, on_message)
        assert {"started", "progress", "interrupt", "stopped"} <= set(seen), seen
        assert _record("comfyui_first_use_progress_after_s", seen["progress"] - seen["started"]) < 60, seen
        # one batch of captions, not the whole prior
        assert _record("comfyui_interrupt_s", seen["stopped"] - seen["interrupt"]) < 60, seen
        assert not list(prior_dir.rglob("*.safetensors")) if prior_dir.is_dir() else True
        assert not list((hosts.webui_app("comfyui") / "output" / "checkpoints").glob("comfyui-first-use*"))

    def test_comfyui_fp16_checkpoint_comes_back_fp16(self, comfy):
        """The erased file keeps the input's dtype (it came back fp32, twice the size)."""
        from safetensors import safe_open

        saved = sorted((hosts.webui_app("comfyui") / "output" / "checkpoints").glob("comfyui-closed*.safetensors"))
        if not saved:
            pytest.skip("needs test_comfyui_closed_form_and_staged_graphs_run_with_progress's output")
        with safe_open(str(saved[-1]), "pt") as f, safe_open(str(hosts.sd15_checkpoint()), "pt") as g:
            key = next(k for k in g.keys() if k.endswith("attn2.to_k.weight"))
            assert f.get_slice(key).get_dtype() == g.get_slice(key).get_dtype() == "F16"
