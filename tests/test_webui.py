"""The A1111/Forge tab (`sd_webui_extension/`, `scripts/mace_tab.py`) and its standalone app.

- output/project name validation, and the form -> request mapping against the CLI's;
- the Blocks build without a web UI, under the dev venv's current gradio and (subprocess) under
  gradio 3.41.2, A1111 1.10's pin, in `.cache/gradio341-venv` (built on first use);
- `scripts/mace_tab.py` registering the tab against a stand-in of A1111's `modules`, and an erase /
  interrupt / resume / re-fuse run through the A1111 host on a tiny model;
- the model: A1111's loaded model (a module holding a tiny file's tensors under A1111's names)
  erased in memory, file unread, equal to `mace erase` of the file; otherwise the file, with the
  web UI's model offloaded and restored even when the run fails; Forge always from the file;
- a real browser: the standalone app served on localhost with a tiny SD1 model, driven by
  headless Debian Chromium through Playwright (never a downloaded browser); screenshot kept in
  `test-artifacts/webui.png`.

gradio and Playwright are dev requirements; /usr/bin/chromium comes from Debian (.ci/run installs
it). Where one is missing the UI tests skip, except under CI (`CI` set), where it is a failure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import re
import runpy
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mace_core.errors import InterruptedRun, MaceError  # noqa: E402
from sd_webui_extension import actions  # noqa: E402
from sd_webui_extension.host import StandaloneHost  # noqa: E402
from sd_webui_extension.names import validate_output_name, validate_project_name  # noqa: E402
from venvs import VenvUnavailable, cached_venv  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / "test-artifacts"
TINY_SETTINGS = {"steps": "3", "images": "1", "sample_steps": "2"}


def _unavailable(msg: str):
    """Skip locally; under CI (where .ci/run installs the UI test tools) fail instead."""
    if os.environ.get("CI"):
        pytest.fail(f"{msg} (CI: .ci/run should have installed it)")
    pytest.skip(msg)


def _need_gradio():
    try:
        import gradio  # noqa: F401
    except ImportError:
        _unavailable("gradio is not installed in this venv (see the '#webui' block of requirements-dev.txt)")


@pytest.fixture
def one_thread():
    """torch on one thread: on a shared 2-core machine this is many times faster for tiny models."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_model(tmp_path) -> Path:
    from tiny import tiny_file

    folder = tmp_path / "models"
    folder.mkdir()
    return Path(shutil.copy(tiny_file("sd1"), folder / "tiny-sd1.safetensors"))


def _erased(path: Path) -> list[str]:
    from mace_core.model.checkpoint import read_metadata

    return [c["phrase"] for c in json.loads(read_metadata(path)["mace.concepts"])]


# ---------------------------------------------------------------------------------------------
# (a) names and the form


@pytest.mark.parametrize("bad", ["../x", "..", "/abs/x", "/etc/passwd", "a/b", "a\\b", "..\\x", "C:x", ".hidden",
                                 "", "   ", "x.ckpt", "x.pt", "con", "nul.safetensors", "x\x00y", "a|b", "x.",
                                 ".safetensors", "a" * 300])
def test_output_name_rejects(tmp_path, bad):
    with pytest.raises(MaceError):
        validate_output_name(bad, tmp_path)


def test_output_name_plain_names_get_the_suffix_and_stay_in_the_folder(tmp_path):
    assert validate_output_name("no-cat", tmp_path) == tmp_path / "no-cat.safetensors"
    assert validate_output_name(" no cat.safetensors ", tmp_path) == tmp_path / "no cat.safetensors"
    assert validate_output_name("v1.5-no-cat", tmp_path) == tmp_path / "v1.5-no-cat.safetensors"


def test_output_name_existing_needs_overwrite_and_the_input_is_never_overwritten(tmp_path):
    (tmp_path / "out.safetensors").write_bytes(b"x")
    with pytest.raises(MaceError, match="already exists"):
        validate_output_name("out", tmp_path)
    assert validate_output_name("out", tmp_path, overwrite=True) == tmp_path / "out.safetensors"
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"x")
    with pytest.raises(MaceError, match="input model"):
        validate_output_name("model.safetensors", tmp_path, overwrite=True, protect=(model,))


@pytest.mark.parametrize("bad", ["../p", "/p", "a/b", "", ".p"])
def test_project_name_rejects_paths(bad):
    with pytest.raises(MaceError):
        validate_project_name(bad)
    assert validate_project_name(" my project ") == "my project"


def test_form_means_the_same_request_as_the_cli():
    from mace_core.cli import main as cli

    # a text box's comments are whole lines (issue 20: '#' inside a line is text, as in 'C# logo')
    form = actions.EraseForm(concepts="cat\n  # comment\nVan Gogh | art | style\n\n", ctype="object",
                             preset="nudity", retain="dog\n  Tom Hanks \n", mask="none",
                             numbers={"steps": "3", "lr": "1e-3", "images": " 2 ", "seed": "", "prior": "5",
                                      "robust_rounds": ""})
    spec = actions.build_spec(form)
    argv = ["erase", "m.safetensors", "--out", "o.safetensors", "--preset", "nudity", "--type", "object",
            "--concept", "cat", "--concept", "Van Gogh | art | style", "--retain", "dog", "--retain", "Tom Hanks",
            "--mask", "none", "--steps", "3", "--lr", "1e-3", "--images", "2", "--prior", "5"]
    assert spec == cli.spec_from_args(cli.build_parser().parse_args(argv))
    form.objective, form.alternative = "abo", "a cow"  # issue 9's options
    argv += ["--objective", "abo", "--alternative", "a cow"]
    form.numbers["robust_rounds"] = "2"  # issue 12's
    argv += ["--robust"]
    form.low_vram = True  # issue 13's
    argv += ["--low-vram"]
    assert actions.build_spec(form) == cli.spec_from_args(cli.build_parser().parse_args(argv))
    assert [c.phrase for c in spec.concepts][-2:] == ["cat", "Van Gogh"]


@pytest.mark.parametrize("numbers,match", [({"steps": "many"}, "LoRA steps"), ({"lr": "inf"}, "finite"),
                                           ({"rank": "1.5"}, "integer"), ({"steps": "0"}, "at least 1")])
def test_form_reports_bad_numbers(numbers, match):
    with pytest.raises(MaceError, match=match):
        actions.build_spec(actions.EraseForm(concepts="cat", numbers=numbers))


def test_form_needs_a_concept_and_no_concept_erased_and_kept():
    with pytest.raises(MaceError, match="nothing to erase"):
        actions.build_spec(actions.EraseForm(concepts="  \n# only a comment\n"))
    with pytest.raises(MaceError, match="both erased and retained"):
        actions.build_spec(actions.EraseForm(concepts="cat", retain="cat"))


def test_packages_import_without_gradio_torch_or_the_web_ui():
    code = ("import sys; import sd_webui_extension, sd_webui_extension.names, sd_webui_extension.host, "
            "sd_webui_extension.actions, sd_webui_extension.a1111; "
            "bad = [m for m in ('gradio', 'torch', 'modules') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "shared")])}
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------------------------------------
# A stand-in for A1111's `modules` package: just the names the A1111 host and script use.

FAKE_A1111 = {
    "modules/__init__.py": "",
    "modules/script_callbacks.py": """
        ui_tabs_callbacks = []
        def on_ui_tabs(fn):
            ui_tabs_callbacks.append(fn)
    """,
    "modules/paths.py": "import os\nmodels_path = os.environ['FAKE_A1111_MODELS']\n",
    "modules/call_queue.py": "import threading\nqueue_lock = threading.Lock()\n",
    "modules/devices.py": "calls = []\ndef torch_gc():\n    calls.append(1)\n",
    "modules/shared.py": """
        import os, types
        class _Opts:
            sd_model_checkpoint = None
            CLIP_stop_at_last_layers = 1
            def set(self, key, value):
                setattr(self, key, value)
                return True
        class _State:
            interrupted = False
            job = ""
            job_count = 0
            sampling_step = 0
            sampling_steps = 0
            textinfo = None
            jobs = []
            def begin(self, job="(unknown)"):
                self.interrupted = False
                self.job = job
                self.jobs.append(job)
            def end(self):
                self.job = ""
            def interrupt(self):
                self.interrupted = True
        opts = _Opts()
        state = _State()
        cmd_opts = types.SimpleNamespace(ckpt_dir=None)
        sd_model = None
    """,
    "modules/sd_models.py": """
        import os, types
        model_path = os.path.join(os.environ['FAKE_A1111_MODELS'], 'Stable-diffusion')
        checkpoints_list = {}
        model_data = types.SimpleNamespace(sd_model=None)  # the loaded model (None: none loaded)
        calls = []  # (what, model) for the two calls that move the loaded model off and back onto the GPU
        def unload_model_weights(sd_model=None, info=None):
            calls.append(("unload", sd_model))
        def send_model_to_device(m):
            calls.append(("to_device", m))
        def list_models():
            checkpoints_list.clear()
            for name in sorted(os.listdir(model_path)):
                if name.endswith(('.safetensors', '.ckpt')):
                    title = f"{name} [0123456789]"
                    checkpoints_list[title] = types.SimpleNamespace(
                        title=title, filename=os.path.join(model_path, name), name=name, model_name=name,
                        sha256=None)
        def checkpoint_tiles():
            return sorted(checkpoints_list)
        def get_closet_checkpoint_match(search):
            for info in checkpoints_list.values():
                if search in info.title:
                    return info
            return None
        list_models()
    """,
}


def write_fake_a1111(root: Path, models: Path) -> Path:
    for rel, src in FAKE_A1111.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(src))
    (models / "Stable-diffusion").mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture
def fake_a1111(tmp_path, monkeypatch, tiny_model):
    """A1111's `modules` importable, its checkpoint folder holding the tiny model (loaded)."""
    models = tmp_path / "webui-models"
    root = write_fake_a1111(tmp_path / "fake-webui", models)
    shutil.copy(tiny_model, models / "Stable-diffusion" / tiny_model.name)
    monkeypatch.setenv("FAKE_A1111_MODELS", str(models))
    monkeypatch.syspath_prepend(str(root))
    for name in [m for m in sys.modules if m == "modules" or m.startswith("modules.")]:
        monkeypatch.delitem(sys.modules, name)
    shared = importlib.import_module("modules.shared")
    sd_models = importlib.import_module("modules.sd_models")
    shared.opts.sd_model_checkpoint = next(iter(sd_models.checkpoints_list))
    yield models
    for name in [m for m in sys.modules if m == "modules" or m.startswith("modules.")]:
        del sys.modules[name]


# ---------------------------------------------------------------------------------------------
# (b) the Blocks build without a web UI


UI_ELEM_IDS = {"mace_checkpoint", "mace_concepts", "mace_type", "mace_preset", "mace_retain", "mace_out_name",
               "mace_overwrite", "mace_closed_form", "mace_steps", "mace_rank", "mace_lr", "mace_images", "mace_seed",
               "mace_mask", "mace_prior", "mace_domain", "mace_erase", "mace_interrupt", "mace_gallery",
               "mace_output_path", "mace_load", "mace_project_list", "mace_project_concepts", "mace_refuse",
               "mace_objective", "mace_alternative", "mace_robust_rounds", "mace_low_vram", "mace_delete_images",
               "mace_estimate", "mace_estimate_info"}

# Run in any venv with gradio (and PyYAML): builds the Blocks with the standalone host and through
# scripts/mace_tab.py with the stand-in `modules`, prints JSON.
BUILD_SCRIPT = r"""
import json, os, runpy, sys, warnings
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
import gradio as gr
from sd_webui_extension.host import StandaloneHost
from sd_webui_extension.ui import build_ui

def progress_handlers(blocks):
    # {handler name: whether this gradio hands it its gr.Progress} for every handler declaring one (gradio
    # 3.41 looks for it among positional parameters only: after *args it never showed, A1111 showed nothing)
    import inspect
    from gradio.helpers import special_args
    out = {}
    for bf in (blocks.fns.values() if isinstance(blocks.fns, dict) else blocks.fns):
        if bf.fn is not None and any(isinstance(p.default, gr.Progress)
                                     for p in inspect.signature(bf.fn).parameters.values()):
            out[bf.fn.__name__] = special_args(bf.fn, [None] * len(bf.inputs))[1] is not None
    return out

def elem_ids(blocks):
    cfg = blocks.get_config_file() if hasattr(blocks, "get_config_file") else blocks.config
    return sorted({c.get("props", {}).get("elem_id") for c in cfg["components"]} - {None})

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    standalone = build_ui(StandaloneHost(sys.argv[1]))
    ns = runpy.run_path(sys.argv[2])
    from modules import script_callbacks
    tabs = [t for fn in script_callbacks.ui_tabs_callbacks for t in fn()]
ours = [f"{w.category.__name__}: {w.message}" for w in caught
        if "sd_webui_extension" in str(w.filename) or "mace_tab" in str(w.filename) or "kwarg" in str(w.message)]
print(json.dumps({"gradio": gr.__version__, "standalone": elem_ids(standalone),
                  "progress": progress_handlers(standalone),
                  "tabs": [[type(b).__name__, title, elem] for b, title, elem in tabs],
                  "a1111": elem_ids(tabs[0][0]), "warnings": ours}))
"""


def _check_build(out: dict) -> None:
    assert not out["warnings"], out["warnings"]
    assert UI_ELEM_IDS <= set(out["standalone"]), UI_ELEM_IDS - set(out["standalone"])
    assert out["tabs"] == [["Blocks", "MACE", "mace_tab"]]
    assert {"on_erase", "on_refuse"} <= set(out["progress"]) and all(out["progress"].values()), out["progress"]
    assert UI_ELEM_IDS <= set(out["a1111"])


def _run_build(python: str, tmp_path: Path, tiny_model: Path) -> dict:
    models = tmp_path / "build-models"
    root = write_fake_a1111(tmp_path / "build-webui", models)
    shutil.copy(tiny_model, models / "Stable-diffusion" / tiny_model.name)
    script = tmp_path / "build_ui.py"
    script.write_text(BUILD_SCRIPT)
    env = {**os.environ, "FAKE_A1111_MODELS": str(models), "GRADIO_ANALYTICS_ENABLED": "False",
           "PYTHONPATH": os.pathsep.join([str(root), str(REPO), str(REPO / "shared")])}
    r = subprocess.run([python, str(script), str(tiny_model), str(REPO / "scripts" / "mace_tab.py")], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_blocks_build_under_current_gradio(tmp_path, tiny_model):
    _need_gradio()
    out = _run_build(sys.executable, tmp_path, tiny_model)
    assert int(out["gradio"].split(".")[0]) >= 4
    _check_build(out)


def _gradio341_python() -> Path:
    """A1111 1.10's gradio in its own venv (tests/venvs.py), from the '#gradio341' pins."""
    try:
        return cached_venv("gradio341")
    except VenvUnavailable as e:
        _unavailable(str(e))


def test_blocks_build_under_gradio_3_41(tmp_path, tiny_model):
    python = _gradio341_python()
    out = _run_build(str(python), tmp_path, tiny_model)
    assert out["gradio"] == "3.41.2"
    _check_build(out)


def test_a1111_script_registers_the_tab_in_process(fake_a1111):
    _need_gradio()
    from modules import script_callbacks

    runpy.run_path(str(REPO / "scripts" / "mace_tab.py"))
    on_ui_tabs = script_callbacks.ui_tabs_callbacks[-1]
    (blocks, title, elem_id), = on_ui_tabs()
    assert (type(blocks).__name__, title, elem_id) == ("Blocks", "MACE", "mace_tab")
    host = on_ui_tabs.__globals__["_HOST"]
    assert host.list_checkpoints() == ["tiny-sd1.safetensors [0123456789]"]
    assert host.current_checkpoint() == "tiny-sd1.safetensors [0123456789]"
    assert host.checkpoint_path(host.current_checkpoint()) == fake_a1111 / "Stable-diffusion" / "tiny-sd1.safetensors"
    assert host.checkpoint_folder() == fake_a1111 / "Stable-diffusion"
    assert host.projects_folder() == fake_a1111 / "mace"


def test_a1111_dropdown_default_before_the_model_is_loaded_never_loads_one(fake_a1111, monkeypatch):
    """A1111 builds its tabs before its model has loaded (fresh install: no option set). The default is
    then the file it will load (its ``select_checkpoint``), found without ``shared.sd_model``, whose
    access loads a model (and raises, killing the whole UI, when there is none)."""
    from modules import sd_models, shared

    from sd_webui_extension.a1111 import A1111Host

    first = next(iter(sd_models.checkpoints_list.values()))
    monkeypatch.setattr(shared.opts, "sd_model_checkpoint", None)
    monkeypatch.setattr(sd_models, "select_checkpoint", lambda: first, raising=False)

    class Loads(type(shared)):
        @property
        def sd_model(self):
            raise AssertionError("shared.sd_model read: that loads a model")

    monkeypatch.setattr(shared, "__class__", Loads)
    assert A1111Host().current_checkpoint() == first.title
    monkeypatch.setattr(sd_models, "select_checkpoint", lambda: (_ for _ in ()).throw(FileNotFoundError("none")))
    assert A1111Host().current_checkpoint() is None  # no checkpoint at all: an empty dropdown, not a crash


def test_forge_load_goes_through_its_checkpoint_change(fake_a1111, monkeypatch, tmp_path):
    """Forge loads a model only through ``modules_forge.main_entry.checkpoint_change``; setting the
    option directly renamed the model without loading it (and then its dropdown refused to switch)."""
    from modules import sd_models, shared

    from sd_webui_extension.a1111 import A1111Host

    forge = tmp_path / "forge-modules" / "modules_forge"
    forge.mkdir(parents=True)
    (forge / "__init__.py").write_text("")
    (forge / "main_entry.py").write_text("calls = []\ndef checkpoint_change(name, save=True, refresh=True):\n"
                                         "    calls.append(name)\n    return True\n")
    monkeypatch.syspath_prepend(str(forge.parent))
    try:
        before = shared.opts.sd_model_checkpoint
        title = next(iter(sd_models.checkpoints_list))
        msg = A1111Host().load_checkpoint(Path(sd_models.checkpoints_list[title].filename))
        from modules_forge import main_entry

        assert main_entry.calls == [title] and title in msg
        assert shared.opts.sd_model_checkpoint == before  # left to Forge's own path
    finally:
        # gone for the tests after this one (monkeypatch.delitem would put them back at teardown,
        # and every later A1111 test would take itself for Forge)
        sys.modules.pop("modules_forge.main_entry", None)
        sys.modules.pop("modules_forge", None)


# ---------------------------------------------------------------------------------------------
# Erase, interrupt, resume, load and re-fuse through the A1111 host (no browser)


def test_a1111_host_erase_interrupt_resume_refuse(fake_a1111, one_thread):
    from modules import devices, shared

    from sd_webui_extension.a1111 import A1111Host

    host = A1111Host(device="cpu")
    form = actions.EraseForm(checkpoint=host.current_checkpoint(), concepts="cat\ndog", out_name="no-pets",
                             previews=False, numbers=dict(TINY_SETTINGS))

    def press_webui_interrupt(label, done, total):  # A1111's own Interrupt button, during dog's training
        if label == "training dog":
            shared.state.interrupt()

    with pytest.raises(InterruptedRun):
        actions.run_erase(host, form, progress=press_webui_interrupt)
    out = fake_a1111 / "Stable-diffusion" / "no-pets.safetensors"
    assert not out.exists()
    assert "cat (object" in actions.project_summary(host.projects_folder(), "no-pets")
    assert shared.state.jobs == ["MACE erase"] and shared.state.job == "" and devices.calls

    labels = []
    res = actions.run_erase(host, form, progress=lambda label, d, n: labels.append(label))
    assert res.path == out and _erased(out) == ["cat", "dog"]
    assert not any(label == "training cat" for label in labels), "cat's finished LoRA is reused"
    assert "Reused finished LoRAs: cat" in res.message
    assert shared.state.textinfo.startswith("MACE: ")
    assert actions.list_projects(host.projects_folder()) == ["no-pets"]

    with pytest.raises(MaceError, match="already exists"):
        actions.run_erase(host, form)

    assert "Selected" in host.load_checkpoint(out)
    assert shared.opts.sd_model_checkpoint == "no-pets.safetensors [0123456789]"

    only_dog = actions.refuse_project(host, "no-pets", ["dog"], "only-dog", False)
    assert _erased(only_dog.path) == ["dog"]
    restored = actions.refuse_project(host, "no-pets", [], "restored", False)
    assert _erased(restored.path) == [] and "restored" in restored.message


def _hijacked(key: str) -> str:
    """A file key as A1111's loaded model names it after its hijack (sd_hijack.py): each text
    encoder, and its token embedding, wrapped in a module that holds the original as ``wrapped``."""
    key = re.sub(r"^(cond_stage_model|conditioner\.embedders\.\d+)\.", r"\1.wrapped.", key)
    return key.replace("token_embedding.weight", "token_embedding.wrapped.weight")


def _a1111_model(path: Path, info):
    """A stand-in of A1111's loaded ``sd_model`` for ``path``: a module holding the file's tensors
    under their hijacked names, with a buffer of its own (ldm's noise schedule) no file has; for
    SDXL the conditioner also registered as ``cond_stage_model``, as the hijack does."""
    import torch
    from safetensors.torch import load_file

    root = torch.nn.Module()
    for key, t in load_file(str(path)).items():
        *parents, leaf = _hijacked(key).split(".")
        mod = root
        for name in parents:
            if name not in mod._modules:
                mod.add_module(name, torch.nn.Module())
            mod = mod._modules[name]
        mod.register_parameter(leaf, torch.nn.Parameter(t, requires_grad=False))
    root.register_buffer("alphas_cumprod", torch.linspace(1, 0, 1000))
    if "conditioner" in root._modules:
        root.add_module("cond_stage_model", root.conditioner)
    root.sd_checkpoint_info = info
    root.parameterization = "eps"
    return root


def _loaded(fake_a1111: Path):
    """The stand-in's checkpoint file and info, and its sd_model loaded from that file."""
    from modules import sd_models

    from tiny import file_digest

    info = next(iter(sd_models.checkpoints_list.values()))
    path = Path(info.filename)
    info.sha256 = file_digest(path)  # A1111 has hashed the loaded checkpoint
    sd_models.model_data.sd_model = _a1111_model(path, info)
    return path, info, sd_models.model_data.sd_model


def test_a1111_erases_its_loaded_model_in_memory_as_the_cli_erases_the_file(fake_a1111, one_thread, monkeypatch,
                                                                              tmp_path):
    """The checkpoint A1111 has loaded is erased from A1111's own tensors: no read of the file before
    the output is written (then its tensors are the output's), no hash, nothing offloaded, A1111's
    weights untouched; the output equals `mace erase` of the file, bit for bit (same fp32 tensors)."""
    import torch
    from safetensors.torch import load_file

    import mace_core.model.checkpoint as checkpoint
    import mace_core.method.erase as erase_module
    from mace_core.cli import main as cli
    from mace_core.model.checkpoint import read_metadata
    from modules import sd_models

    from sd_webui_extension.a1111 import A1111Host

    path, info, model = _loaded(fake_a1111)
    reads, phase = [], ["erasing"]
    load, erase = checkpoint.load_checkpoint, erase_module.erase

    def recording_load(p, *args, **kw):
        reads.append((Path(p).name, phase[0]))
        return load(p, *args, **kw)

    def recording_erase(*args, **kw):
        res = erase(*args, **kw)
        phase[0] = "saving"
        return res

    form = actions.EraseForm(checkpoint=info.title, concepts="cat", out_name="no-cat", numbers=dict(TINY_SETTINGS))
    with monkeypatch.context() as mp:
        mp.setattr(checkpoint, "load_checkpoint", recording_load)
        mp.setattr(erase_module, "erase", recording_erase)
        mp.setattr(checkpoint, "file_sha256", lambda p: pytest.fail(f"hashed {p} although A1111 knows its sha256"))
        res = actions.run_erase(A1111Host(device="cpu"), form)
    assert reads == [(path.name, "saving")]  # the file's tensors, read once, to write the output
    assert sd_models.calls == []  # A1111's model stayed where it was: nothing was duplicated
    assert len(res.gallery) >= 4  # before/after previews, the "after" built on A1111's tensors too
    file_tensors = load_file(str(path))
    held = model.state_dict()
    assert all(torch.equal(held[_hijacked(k)], t) for k, t in file_tensors.items())  # A1111's weights never written

    cli_out = tmp_path / "cli-no-cat.safetensors"
    assert cli.main(["erase", str(path), "--concept", "cat", "--out", str(cli_out), "--steps", TINY_SETTINGS["steps"],
                     "--images", TINY_SETTINGS["images"], "--sample-steps", TINY_SETTINGS["sample_steps"],
                     "--device", "cpu"]) == 0
    tab, ours = load_file(str(res.path)), load_file(str(cli_out))
    assert tab.keys() == ours.keys() == file_tensors.keys()
    assert all(tab[k].dtype == ours[k].dtype and torch.equal(tab[k], ours[k]) for k in tab)
    assert any(not torch.equal(tab[k], file_tensors[k]) for k in tab)  # something was erased
    a, b = read_metadata(res.path), read_metadata(cli_out)
    for key in ("mace.concepts", "mace.settings", "mace.base_sha256"):
        assert a[key] == b[key], key
    assert a["mace.base_sha256"] == info.sha256  # the project's identity is the file's, so `mace fuse/add` work


@pytest.mark.parametrize("name", ["sd2", "sdxl"])
def test_a1111_loaded_sd2_and_sdxl_models_convert_without_reading_the_file(fake_a1111, monkeypatch, name):
    """SD2 (OpenCLIP) and SDXL (two embedders, also reachable as ``cond_stage_model``) hijacked names
    become the file's checkpoint, holding A1111's tensors themselves."""
    import torch

    import mace_core.model.checkpoint as checkpoint
    from modules import sd_models

    from sd_webui_extension.a1111 import A1111Host
    from tiny import tiny_file

    path = Path(shutil.copy(tiny_file(name), fake_a1111 / "Stable-diffusion" / f"tiny-{name}.safetensors"))
    sd_models.list_models()
    info = next(i for i in sd_models.checkpoints_list.values() if i.filename == str(path))
    model = _a1111_model(path, info)
    sd_models.model_data.sd_model = model
    from_file = checkpoint.load_checkpoint(path)
    monkeypatch.setattr(checkpoint, "load_checkpoint", lambda *a, **kw: pytest.fail("read the file"))
    with A1111Host(device="cpu").base_model(path) as ck:
        assert ck.family == from_file.family and ck.source_format == checkpoint.MEMORY
        held = model.state_dict()
        for k, t in from_file.tensors.items():
            assert torch.equal(ck.tensors[k], t) and ck.tensors[k].data_ptr() == held[_hijacked(k)].data_ptr(), k
    assert sd_models.calls == []


def test_a1111_file_path_offloads_the_loaded_model_and_restores_it_even_when_the_run_fails(fake_a1111, one_thread,
                                                                                            caplog):
    """A1111's loaded weights with a LoRA still merged in are not the file's: the tab reads the file,
    and A1111's model is off the GPU while the tab's copy is there, back afterwards, also after a
    failure."""
    import logging

    from modules import sd_models

    from sd_webui_extension.a1111 import A1111Host

    path, info, model = _loaded(fake_a1111)
    model.model.diffusion_model.network_current_names = (("some-lora", 1.0, 1.0, None),)  # A1111's Lora extension
    host = A1111Host(device="cpu")
    form = actions.EraseForm(checkpoint=info.title, concepts="cat", out_name="no-cat", previews=False,
                             numbers=dict(TINY_SETTINGS))
    during = []

    def fail_while_training(label, done, total):
        if label.startswith("training"):
            during.append(list(sd_models.calls))
            raise RuntimeError("CUDA out of memory (simulated)")

    with caplog.at_level(logging.INFO, logger="mace.webui"), pytest.raises(RuntimeError, match="simulated"):
        actions.run_erase(host, form, progress=fail_while_training)
    assert "reading tiny-sd1.safetensors from disk" in caplog.text and "LoRA" in caplog.text
    assert during == [[("unload", model)]]
    assert sd_models.calls == [("unload", model), ("to_device", model)]

    assert "Estimate" in actions.estimate_run(host, form)  # the host is free again; the same pair around it
    assert sd_models.calls == [("unload", model), ("to_device", model)] * 2


def test_forge_model_is_read_from_the_file_and_unloaded_for_the_run(fake_a1111, one_thread, caplog):
    """Forge's loaded model (``forge_objects``) is never used in memory (its weights are inference
    tensors): the tab reads the file and unloads Forge's models for the run (Forge reloads them)."""
    import logging
    import types

    from modules import sd_models

    from sd_webui_extension.a1111 import A1111Host

    info = next(iter(sd_models.checkpoints_list.values()))
    forge = types.SimpleNamespace(forge_objects=types.SimpleNamespace(), sd_checkpoint_info=info)
    sd_models.model_data.sd_model = forge
    form = actions.EraseForm(checkpoint=info.title, concepts="cat", out_name="no-cat", previews=False,
                             closed_form_only=True, numbers=dict(TINY_SETTINGS))
    with caplog.at_level(logging.INFO, logger="mace.webui"):
        res = actions.run_erase(A1111Host(device="cpu"), form)
    assert "inference_mode" in caplog.text
    assert sd_models.calls == [("unload", forge), ("to_device", forge)]
    assert _erased(res.path) == ["cat"]


def test_standalone_host_interrupt_flag_stops_a_run(tiny_model, one_thread):
    host = StandaloneHost(tiny_model, device="cpu")
    form = actions.EraseForm(checkpoint=tiny_model.name, concepts="cat", out_name="x", previews=False,
                             numbers=dict(TINY_SETTINGS))

    def interrupt(label, done, total):  # the tab's Interrupt button
        if label.startswith("training"):
            host.interrupt()

    with pytest.raises(InterruptedRun):
        actions.run_erase(host, form, progress=interrupt)
    assert not (tiny_model.parent / "x.safetensors").exists()
    assert host.should_stop()  # until the next run's job() clears it
    res = actions.run_erase(host, form)
    assert _erased(res.path) == ["cat"]


def test_the_general_prior_is_kept_in_the_hosts_model_folder(tiny_model, one_thread, monkeypatch, tmp_path):
    """A first run with a type that uses the general prior keeps it in models/mace/prior (the host's
    folder, where the estimate looks for it too), never in the CLI's cache; "prior" is no project name."""
    from mace_core.errors import MaceError

    monkeypatch.setenv("MACE_CACHE", str(tmp_path / "cli-cache"))
    host = StandaloneHost(tiny_model, device="cpu")
    form = actions.EraseForm(checkpoint=tiny_model.name, concepts="Tom Cruise", ctype="celebrity", out_name="no-tom",
                             previews=False, closed_form_only=True)
    assert "general prior" in actions.estimate_run(host, form)
    actions.run_erase(host, form)
    kept = host.projects_folder() / "prior"
    assert len(list(kept.glob("*.safetensors"))) == 1
    assert not (tmp_path / "cli-cache").exists()
    assert "general prior" not in actions.estimate_run(host, form)  # found where the run keeps it
    assert actions.list_projects(host.projects_folder()) == ["no-tom"]
    with pytest.raises(MaceError, match="taken by the folder of general priors"):
        actions.run_erase(host, dataclasses.replace(form, project="prior", out_name="other"))


def test_estimate_then_a_low_vram_run_that_deletes_its_training_images(tiny_model, one_thread):
    from mace_core.model.checkpoint import read_metadata
    from mace_core.run.estimate import unet_calls

    host = StandaloneHost(tiny_model, device="cpu")
    form = actions.EraseForm(checkpoint=tiny_model.name, concepts="cat\ndog", out_name="no-pets", previews=False,
                             low_vram=True, delete_images=True, numbers=dict(TINY_SETTINGS))
    text = actions.estimate_run(host, form)
    calls = unet_calls(actions.build_spec(form))
    # each concept: the synonym search (26 prompts at 4 timesteps), drawing (CFG doubles), training; and once
    # the check of the object type's fixed list (13 prompts at 4 timesteps) and the subjectless prompt the two
    # concepts' nearby words are compared against (4 timesteps)
    assert calls == 2 * (26 * 4 + 1 * 2 * 2 + 3) + 13 * 4 + 4 and f"({calls} UNet calls at" in text
    assert "estimated" in text
    assert "Too large" not in text  # a CPU run is never refused
    assert not host.projects_folder().exists()  # estimating writes nothing

    res = actions.run_erase(host, form)
    assert _erased(res.path) == ["cat", "dog"]
    assert json.loads(read_metadata(res.path)["mace.settings"])["low_vram"] is True
    project = host.projects_folder() / "no-pets"
    assert "Deleted the project's 6 training image files" in res.message  # 2 x (image, mask, latents)
    assert not [p for p in project.rglob("*") if p.suffix == ".png" or p.name == "latents.safetensors"]
    assert len(list(project.rglob("lora.safetensors"))) == 2
    only_dog = actions.refuse_project(host, "no-pets", ["dog"], "only-dog", False)  # re-fuse needs no images
    assert _erased(only_dog.path) == ["dog"]


# ---------------------------------------------------------------------------------------------
# (c) the real browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _standalone_app(model: Path, log: Path):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "shared")]),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "sd_webui_extension", "--model", str(model), "--port",
                                 str(port), "--device", "cpu"], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the standalone app exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"the standalone app did not answer on {url}:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _box(page, elem_id: str):
    """The text field of a gradio Textbox (a textarea or an input, by gradio version)."""
    return page.locator(f"#{elem_id}").locator("textarea, input").first


def _wait_status(page, timeout: float, want: tuple[str, ...]) -> str:
    """The status text once it shows one of ``want`` (or an error)."""
    status = ""
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = page.locator("#mace_status").inner_text()
        if any(w in status for w in want + ("rror",)):
            break
        time.sleep(0.5)
    return status


def test_browser_erase_in_the_standalone_app(tiny_model, tmp_path):
    _need_gradio()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed in this venv (see the '#webui' block of requirements-dev.txt)")
    if not CHROMIUM.exists():
        _unavailable(f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does it)")
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")  # never fetch a browser build
    ARTIFACTS.mkdir(exist_ok=True)
    log = tmp_path / "app.log"
    blocked: list[str] = []

    def local_only(route):  # the page may not reach anything but the app (fonts, CDNs, telemetry)
        url = route.request.url
        if url.startswith(("http://127.0.0.1", "http://localhost", "data:", "blob:")):
            route.continue_()
        else:
            blocked.append(url)
            route.abort()

    with _standalone_app(tiny_model, log) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                     args=["--headless", "--no-sandbox", "--disable-gpu",
                                           "--disable-background-networking", "--disable-component-update",
                                           "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.route("**/*", local_only)
            page.goto(url, wait_until="domcontentloaded", timeout=60_000)
            _box(page, "mace_concepts").wait_for(timeout=60_000)
            _box(page, "mace_concepts").fill("cat")
            _box(page, "mace_out_name").fill("tiny-no-cat")
            page.get_by_text("Advanced settings").first.click()
            _box(page, "mace_images").fill(TINY_SETTINGS["images"])
            _box(page, "mace_sample_steps").fill(TINY_SETTINGS["sample_steps"])

            # A long run, stopped with the Interrupt button: nothing written, the project kept.
            _box(page, "mace_steps").fill("100000")
            page.locator("#mace_erase").click()
            deadline = time.time() + 120
            while "training" not in page.locator("#mace_status").inner_text() and time.time() < deadline:
                time.sleep(0.3)  # the progress bar: the run has started (a run clears stale interrupts)
            page.locator("#mace_interrupt").click()
            status = _wait_status(page, 120, ("Interrupted",))
            assert "Interrupted" in status, f"status: {status!r}\napp log:\n{log.read_text()[-3000:]}"
            assert not (tiny_model.parent / "tiny-no-cat.safetensors").exists()

            # The real run: estimated first, and told to delete its training images when done.
            _box(page, "mace_steps").fill(TINY_SETTINGS["steps"])
            page.locator("#mace_estimate").click()
            estimate = page.locator("#mace_estimate_info")
            deadline = time.time() + 60
            while "UNet calls" not in estimate.inner_text() and time.time() < deadline:
                time.sleep(0.3)
            assert "(7 UNet calls at" in estimate.inner_text(), estimate.inner_text()  # 1 image x 2 steps x 2 + 3
            page.locator("#mace_delete_images input").check()
            page.locator("#mace_erase").click()
            status = _wait_status(page, 150, ("Wrote",))
            page.locator("#mace_gallery img").first.wait_for(timeout=30_000)
            page.wait_for_timeout(500)  # let the images paint before the screenshot
            page.screenshot(path=str(ARTIFACTS / "webui.png"), full_page=True)
            assert "Wrote" in status, f"status: {status!r}\napp log:\n{log.read_text()[-3000:]}"
            assert page.locator("#mace_gallery img").count() >= 4  # before | after, erased and kept rows
            shown_path = _box(page, "mace_output_path").input_value()
        finally:
            browser.close()
    out = tiny_model.parent / "tiny-no-cat.safetensors"
    assert shown_path == str(out)
    assert out.is_file()
    assert _erased(out) == ["cat"]
    assert (tiny_model.parent / "mace" / "tiny-no-cat" / "manifest.json").is_file()
    assert not list((tiny_model.parent / "mace" / "tiny-no-cat").rglob("*.png"))  # deleted when done


def test_the_tab_says_when_the_model_does_not_know_the_default_list(tmp_path, one_thread):
    """The shape world's model never saw an artist, in a prompt of a kind it never saw: it draws the style
    type's artists as one thing, and the tab's result says so beside what was kept (with the cosine the run
    reported), while the erasure itself is made as always."""
    from toyworld import TOY_MODEL

    folder = tmp_path / "models"
    folder.mkdir()
    model = Path(shutil.copy(TOY_MODEL, folder / "toy.safetensors"))
    host = StandaloneHost(model, device="cpu")
    form = actions.EraseForm(checkpoint=model.name, concepts="Claude Monet", ctype="style", out_name="no-monet",
                             previews=False, closed_form_only=True)
    res = actions.run_erase(host, form)
    kept = next(line for line in res.message.split("\n\n") if line.startswith("Erased:"))
    assert "Kept: default protection of style" in kept
    assert re.search(r"the model draws the default list of style \((0\.9[5-9]\d|1\.000) between its first 12 "
                     r"entries\) as one thing", kept), kept
    assert _erased(res.path) == ["Claude Monet"]
